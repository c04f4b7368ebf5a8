"""Every attention-ops implementation holds to ``vllm_turboquant.ops.AttentionOps``: the protocol's three
functions with its parameters (names, order, defaults), and a NAME; ``load_ops`` resolves names."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest
import torch

from vllm_turboquant import ops, reference


@pytest.mark.parametrize("name", sorted(ops.IMPLEMENTATIONS))
def test_each_implementation_matches_the_protocol(name):
    if name == "triton":
        pytest.importorskip("triton")
    module = importlib.import_module(ops.IMPLEMENTATIONS[name])
    ops.check_implements(module)
    assert name == module.NAME
    assert isinstance(module, ops.AttentionOps)
    for op in ("write_cache", "paged_decode", "prefill"):  # annotations too: a drop-in for the reference
        assert inspect.signature(getattr(module, op)) == inspect.signature(getattr(reference, op)), (name, op)


def test_auto_picks_the_compiled_cpu_ops_when_they_load():
    """``auto`` on the CPU: ``cpu`` when its library loads (what serving uses), the reference otherwise."""
    from vllm_turboquant import cpu_ops

    want = "cpu" if cpu_ops.available() else "torch"
    assert ops.resolve("auto", torch.device("cpu")) == want
    assert ops.load_ops("auto", torch.device("cpu")) is importlib.import_module(ops.IMPLEMENTATIONS[want])
    assert ops.load_ops("cpu", torch.device("cpu")) is cpu_ops  # named, it serves (by the reference if unbuilt)


def test_a_drifted_signature_is_caught():
    fake = types.ModuleType("fake_ops")
    fake.NAME = "fake"
    fake.write_cache, fake.prefill = reference.write_cache, reference.prefill

    def paged_decode(query, cache, block_table, seq_lens, tables, preset, scale, sliding_window=None,
                     protected=None):  # "preset" where the protocol says "fmt"
        raise AssertionError

    fake.paged_decode = paged_decode
    with pytest.raises(TypeError, match=r"fake_ops does not implement .*paged_decode"):
        ops.check_implements(fake)
    del fake.prefill
    with pytest.raises(TypeError, match="no prefill"):
        ops.check_implements(fake)


def test_load_ops_resolves_auto_and_refuses_unknown_names():
    assert ops.load_ops("torch", torch.device("cpu")) is reference
    assert ops.resolve("auto", torch.device("cuda")) == "triton"
    assert ops.resolve("auto", torch.device("cpu")) in ops.IMPLEMENTATIONS
    with pytest.raises(ValueError, match=r"ops='bogus'; accepted: auto, torch, triton"):
        ops.resolve("bogus", torch.device("cpu"))


def test_only_the_reference_encodes_lsq_scales():
    """Preset.lsq_scale (an accuracy lever under evaluation) is encoded by the torch ops only: asking any other
    implementation for it is refused, naming ops='torch'."""
    from vllm_turboquant.presets import Preset

    lsq = Preset("t_lsq", 3, 1, lsq_scale=True)
    assert ops.load_ops("torch", torch.device("cpu"), lsq) is reference
    for name in ("triton", "cpu", "auto"):
        with pytest.raises(ValueError, match=rf"'t_lsq' stores least-squares scales.*ops={name!r}: set ops='torch'"):
            ops.check_preset(name, lsq)
    ops.check_preset("cpu", Preset("t_plain", 3, 1))
