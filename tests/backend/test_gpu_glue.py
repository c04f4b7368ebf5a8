"""The CUDA backend's vLLM glue, run on this CPU machine against vLLM 0.33.0's own classes.

``backend/gpu.py`` and ``backend/platform.py`` are written for vLLM 0.33 on CUDA; the CPU build here is 0.32.
The GPU wheel's Python sources (``support.vllm033_root``) do run on the CPU: this module, run as a script in a
subprocess with them first on ``PYTHONPATH``, ``VLLM_TARGET_DEVICE=cpu`` and ``TRITON_INTERPRET=1`` (the CUDA
extension module stubbed, the device capability faked for selection, the model registry inspected
in-process), drives the real 0.33 chain a CUDA worker runs under Model Runner V2 (MRV2), on CPU tensors:

* **selection**: our platform plugin's ``TurboQuantCudaPlatform.get_attn_backend_cls`` next to vLLM's own
  ``CudaPlatform.get_attn_backend_cls``: our presets, ``auto``, ``fp8``, vLLM's ``turboquant_k3v4_nc``,
  ``--attention-backend CUSTOM``, a bf16 layer under CUSTOM, an untested head size; ``--kv-cache-dtype-skip-layers``
  through vLLM's grouping with protected tokens off (accepted) and on (refused, and why);
* **spec, layout, pages**: the real ``Attention`` layers of the tiny Qwen2 (``support.build_qwen2``: d = 128,
  8 query / 2 KV heads) -- a full-attention layer and a sliding-window one (window 24) -- with the backend our
  platform selects, ``process_weights_after_loading`` (the exact-copy companions), the platform's
  ``update_block_size_for_backend``, MRV2's ``get_kv_cache_spec`` (``customize_attention_spec``), the KV-cache
  config builder (grouping, page unification and padding), ``resolve_kv_cache_layout`` for the layout under test
  (``VLLM_KV_CACHE_LAYOUT``; an undeclared layout is refused there), MRV2's ``init_attn_backend`` and
  ``init_kv_cache`` (``allocate_kv_cache`` -> ``create_kv_cache_views`` -> ``compute_layout_strides``, binding);
* **steps**: vLLM's ``KVCacheManager`` (our ``ExactCopyManager`` for the companions: sink kept, window freed)
  allocates blocks for four requests; block tables are gathered as MRV2's ``gather_block_tables`` does
  (sliding-window groups' entries below ``num_retained_tokens`` nulled) and slot mappings computed with ``-1``
  padding slots; MRV2's ``build_attn_metadata`` builds ``CommonAttentionMetadata`` and runs the builders; each
  layer's ``Attention.forward`` (vLLM's custom ops -> ``do_kv_cache_update`` / ``forward``) runs inside
  ``set_forward_context``. Steps: a prefill with a chunk, a mixed decode-first step (MRV2's order), a mixed
  unordered step with a one-token prompt (the index path), two pure-decode steps padded as a FULL CUDA-graph
  replay pads them (3 padding tokens, 2 padding requests of length 0);
* **profile and capture**: the memory-profile forward (no metadata), an MRV2 FULL-capture build
  (``build_for_cudagraph_capture``: uniform decode, zeroed block tables, all-padding slots) and a piecewise
  warm-up step (mixed, zeroed tables, all-padding slots); none may change a cache byte;
* **num_retained_tokens**: the last step again with the companions' block tables nulled at vLLM's default
  reach, to show what ``ExactCopySpec.num_retained_tokens = 0`` prevents;
* **CUDA graphs**: our builder's ``get_cudagraph_support`` and the engine-wide minimum ``init_attn_backend``
  takes over all groups, with protected tokens on (the preset's default sink and window) and off, per ops
  setting (layers, specs and builders only: no steps);
* **no host reads**: in the Triton configuration every ``forward`` and ``do_kv_cache_update`` runs with the
  ways a tensor reaches the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/``float``/index of
  a tensor, ``Tensor.to`` naming a device) refused, the interpreter's own argument copies aside.

Every attention output is compared with the torch reference (``vllm_turboquant.reference``) fed the same
queries, keys and values through its own cache, its own block tables and exact copies of every token (nothing
freed, nothing nulled, no padding). Tolerances are the kernel tests': the torch ops in a float32 model agree
to 1e-4 (they agree exactly: the same arithmetic on the same bytes; a token read from the wrong place, at the
wrong precision or outside its window moves an output by > 1e-2), the Triton kernels (interpreter) in a bf16
model to 1e-2 (tests/kernels: 4e-3 for the kernels, plus one bf16 rounding of the output).

Configurations (the Triton interpreter costs ~1 ms per program instance, so not the full cross product with
Triton): every preset x every declared layout x protected tokens on/off with the torch ops, which carry the
glue's logic; one Triton configuration (turboquant4_qjl, the block-outer BLHNC layout, protected tokens on,
a third of the tokens); compressed prefill off once. Each prints its max error and wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = "vllm_turboquant.backend.gpu.TurboQuantGPUBackend"
#: Tolerances (relative to max |reference|), see the module docstring.
TOL = {"torch": 1e-4, "triton": 1e-2}
SINK, WINDOW = 4, 16  # protected tokens when on (small, so that the window slides within a few steps)
SLIDING_WINDOW = 24  # layer 1's own sliding window
BLOCK = 16
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(2)]  # the two attention layers the harness builds
WINDOWS = [None, SLIDING_WINDOW]


# ================================================================================ the pytest side (vLLM 0.32)

@pytest.fixture(scope="module")
def glue(tmp_path_factory, request):
    """The harness's results (run once per module); its report goes to the terminal even under capture."""
    from support import build_qwen2, vllm033_root

    root = vllm033_root()
    if root is None:
        pytest.skip("vLLM 0.33 sources not available (pip download failed and VLLM033_SRC unset)")
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("glue")
    qwen = build_qwen2(tmp / "qwen2")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "TRITON_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(root.parent), str(REPO)]), VLLM_TARGET_DEVICE="cpu",
               TRITON_INTERPRET="1", VLLM_CACHE_ROOT=str(tmp / "vllm-cache"), VLLM_TURBOQUANT_CALIBRATION="none",
               VLLM_LOGGING_LEVEL="WARNING", OMP_NUM_THREADS="2")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(qwen)], capture_output=True,
                          text=True, env=env, cwd=tmp, timeout=900)
    wall = time.perf_counter() - start
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("SELECT ", "CONFIG ", "CHECK "))]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n".join(["", "GPU glue on vLLM 0.33.0's classes (tests/backend/test_gpu_glue.py):", *lines,
                         f"GPU glue: {wall:.0f} s wall in all"]), flush=True)
    results = [json.loads(ln[len("RESULT "):]) for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and results, done.stdout[-3000:] + done.stderr[-6000:]
    return results[-1]


def test_selection_against_vllm_033_cuda_platform(glue):
    """Ours for our presets (where vLLM's own platform finds nothing), vLLM's answer for everything else."""
    sel = glue["selection"]
    ours = OURS
    assert sel["turboquant3"]["ours"] == ours and "No valid attention backend" in sel["turboquant3"]["stock"]
    for name in ("turboquant2", "turboquant4_qjl"):
        assert sel[name]["ours"] == ours
    assert sel["auto"]["ours"] == sel["auto"]["stock"] == "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
    assert sel["turboquant_k3v4_nc"]["ours"] == sel["turboquant_k3v4_nc"]["stock"] \
        == "vllm.v1.attention.backends.turboquant_attn.TurboQuantAttentionBackend"
    assert sel["fp8"]["ours"] == sel["fp8"]["stock"] and "turboquant" not in sel["fp8"]["ours"]
    assert sel["CUSTOM turboquant3"]["ours"] == sel["CUSTOM turboquant3"]["stock"] == ours
    # a layer kept at bf16 in a turboquant3 run under CUSTOM: vLLM's own backend with ours, an error without
    assert sel["CUSTOM auto (skip layer)"]["ours"] == sel["auto"]["stock"]
    assert "not a vllm-turboquant preset" in sel["CUSTOM auto (skip layer)"]["stock"]
    assert any("registered kv-cache dtypes" in line for line in glue["registered"])  # plugin.register's CUDA branch
    assert not any("not ours" in line for line in glue["registered"])  # our platform was the active one
    assert glue["platform"] == {"name": "vllm_turboquant.backend.platform.TurboQuantCudaPlatform", "is_cuda": True,
                                "pickles": True, "stock_base": True}
    assert sel["turboquant3 head 192"]["ours"].startswith("ERROR") and "tested for head sizes" in \
        sel["turboquant3 head 192"]["ours"]


def test_skip_layers_get_vllms_backend_or_a_clear_refusal(glue):
    """bf16 layers next to packed ones: vLLM's own backend, the packed pages kept at their size -- or, with
    protected tokens on (where vLLM 0.33 would pad the packed pages to the bf16 size), refused naming the fix."""
    off, on = glue["skip_layers"]["off"], glue["skip_layers"]["on"]
    for row in (off, on):
        assert row["backends"] == [glue["selection"]["auto"]["stock"], OURS]
    assert off["refusal"] == "" and off["packed_page"] == off["packed_real"] < off["bf16_page"] / 4
    assert on["packed_page"] == on["bf16_page"] > 4 * on["packed_real"]  # what the refusal prevents
    assert "--kv-cache-dtype-skip-layers" in on["refusal"] and '"sink": 0, "window": 0' in on["refusal"]


def test_every_configuration_matches_the_reference(glue):
    configs = glue["configs"]
    from vllm_turboquant.presets import PRESETS

    layouts = set(glue["declared_layouts"])
    assert layouts == {"LBHNC", "LBNHC", "BLHNC", "BLNHC"}
    torch_runs = {(c["preset"], c["layout"], c["protected"]) for c in configs if c["ops"] == "torch"}
    assert torch_runs == {(p, lay, prot) for p in PRESETS for lay in layouts for prot in (True, False)}
    assert [c["layout"] for c in configs if c["ops"] == "triton"] == ["BLHNC"]
    assert any(not c["compressed"] for c in configs)
    for c in configs:
        assert c["max_err"] < TOL[c["ops"]], c
        assert c["checked_rows"] > 0 and c["steps"] >= 5
        if c["protected"]:
            assert c["exact_groups"] >= 1 and c["layout_padded"]  # companion pages are padded pages


def test_profile_run_and_mrv2_capture_builds(glue):
    for c in glue["configs"]:
        assert c["profile_ok"] and c["capture_ok"] and c["warmup_untouched"], c


def test_cudagraph_support_is_the_same_with_protected_tokens_on_and_off(glue):
    """Protected tokens (the preset's default sink and window; their exact-copy companion groups, whose builder
    says ALWAYS) change nothing vLLM decides about CUDA graphs: neither our builder's ``get_cudagraph_support``
    nor the engine-wide minimum ``init_attn_backend`` takes over every group."""
    cg = glue["cudagraph"]
    for ops in ("auto", "triton", "torch"):
        on, off = cg[f"{ops} on"], cg[f"{ops} off"]
        assert "ExactCopySpec" in on["groups"] and "ExactCopySpec" not in off["groups"], (ops, on, off)
        assert on["builder"] == off["builder"] and on["engine"] == off["engine"], (ops, on, off)
        assert on["builder"] == [on["engine"]]  # the companions never lower it
    assert cg["triton on"]["engine"] == cg["auto on"]["engine"] == "UNIFORM_SINGLE_TOKEN_DECODE"
    assert cg["torch on"]["engine"] == "NEVER"  # the torch reference ops sync with the host
    # the same in every full configuration (the torch ones: on and off per preset and layout)
    by_run = {(c["preset"], c["layout"], c["ops"], c["compressed"], c["protected"]): c["cudagraph"]
              for c in glue["configs"]}
    for (preset, layout, ops, compressed, protected), row in by_run.items():
        assert row["builder"] == [row["engine"]], (preset, layout, ops, row)
        twin = by_run.get((preset, layout, ops, compressed, not protected))
        assert twin is None or twin == row, (preset, layout, ops, row, twin)
    assert any(c["cudagraph"]["engine"] == "UNIFORM_SINGLE_TOKEN_DECODE" and c["protected"] for c in glue["configs"])


def test_forward_and_cache_write_read_nothing_back_to_the_host(glue):
    """In the Triton configuration (protected tokens on) every ``forward`` and ``do_kv_cache_update`` ran with
    ``Tensor.item / tolist / cpu / numpy``, ``bool / int / float / index`` of a tensor and a ``Tensor.to`` naming a
    device refused (the Triton interpreter's own argument copies aside): decode-only and prefill+decode batches,
    the outputs still matching the reference. The planning they would need is the builder's (``plan_step``)."""
    guarded = [c for c in glue["configs"] if "host_reads" in c]
    assert [(c["ops"], c["protected"]) for c in guarded] == [("triton", True)]
    reads = guarded[0]["host_reads"]
    assert len(reads["self_check"]) == 10, reads["self_check"]  # the guard refused every read tried on purpose
    calls = reads["calls"]
    assert calls.get("decode-only", 0) > 0 and calls.get("prefill+decode", 0) > 0 and calls.get("cache write", 0) > 0
    assert reads["violations"] == []
    assert guarded[0]["max_err"] < TOL["triton"] and guarded[0]["capture_ok"]


def test_mrv2_nulling_is_harmless_only_because_of_num_retained_tokens(glue):
    """MRV2 nulls a sliding-window group's block-table entries below ``num_retained_tokens``; the companion's
    spec sets it to 0. With vLLM's default (window - 1) the sink's blocks would be nulled and outputs change."""
    demo = glue["retained_demo"]
    assert demo["nulled_sink_blocks"] > 0 and demo["max_err_default"] > 1e-3 > demo["max_err_ours"]


def test_undeclared_layouts_are_refused_by_vllm_not_crashing_it(glue):
    for name, message in glue["undeclared_layouts"].items():
        assert "does not satisfy every supported set" in message, (name, message)


# ================================================================================ the harness (vLLM 0.33)

def _setup_033() -> None:
    """Before anything imports vLLM: the CUDA extension stubbed, the model registry inspected in-process."""
    import types

    sys.modules.setdefault("vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))
    import vllm

    assert "0.33" in getattr(vllm, "__version__", "") or "vllm-0.33" in vllm.__file__, vllm.__file__
    import vllm.model_executor.models.registry as registry

    registry._run_in_subprocess = lambda fn: fn()  # a subprocess would import the installed 0.32
    import functools

    from vllm_turboquant import rotation

    # every configuration builds the same seeded rotations (a float64 QR each): make them once
    cached = functools.cache(rotation.haar_orthogonal)
    rotation.haar_orthogonal = lambda dim, seed: cached(dim, seed).clone()


def _platform_classes():
    """(ours, vLLM's own CudaPlatform), both with a faked Hopper capability."""
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    import vllm_turboquant.backend.platform as platform

    CudaPlatform.get_device_capability = classmethod(lambda cls, device_id=0: DeviceCapability(9, 0))
    return platform.TurboQuantCudaPlatform, CudaPlatform


def _register_cuda(ours) -> list[str]:
    """``plugin.register()`` itself, run while ``vllm.platforms.current_platform`` is our CUDA platform (then the
    CPU one again), so its CUDA branch does the registering (it then ignores vLLM's later plugin loads). The
    installed distribution is the 0.32 CPU build: the version check reads the sources' own version instead.
    Returns the log records of the plugin."""
    import logging

    import vllm
    import vllm.platforms as platforms

    from vllm_turboquant.backend import plugin, version

    version.vllm_version = lambda: vllm.__version__  # "0.33.0": the sources on PYTHONPATH
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("vllm.vllm_turboquant")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    cpu = platforms.current_platform
    platforms.current_platform = ours()
    try:
        plugin.register()
    finally:
        platforms.current_platform = cpu
        logger.removeHandler(handler)
        logger.level = level
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum.CUSTOM.get_path() == OURS and not AttentionBackendEnum.CPU_ATTN.is_overridden()
    for line in records:
        print(f"CHECK plugin.register() on CUDA: {line}", flush=True)
    return records


def _engine_config(model: str, preset: str, dtype: str, extra: dict | None = None, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=model, dtype=dtype, kv_cache_dtype=preset, block_size=BLOCK, max_model_len=256,
                enforce_eager=True, skip_tokenizer_init=True, max_num_batched_tokens=64, max_num_seqs=8,
                additional_config={"turboquant": extra or {}})
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def _selection(model: str, ours, stock) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    cfg = _engine_config(model, "turboquant3", "bfloat16")  # the run's dtype; each layer's is the case's
    custom = AttentionBackendEnum.CUSTOM
    cases = [  # label, --attention-backend, the layer's kv-cache dtype, head size
        ("turboquant3", None, "turboquant3", 128), ("turboquant2", None, "turboquant2", 128),
        ("turboquant4_qjl", None, "turboquant4_qjl", 128), ("auto", None, "auto", 128), ("fp8", None, "fp8", 128),
        ("turboquant_k3v4_nc", None, "turboquant_k3v4_nc", 128), ("CUSTOM turboquant3", custom, "turboquant3", 128),
        ("CUSTOM auto (skip layer)", custom, "auto", 128), ("turboquant3 head 192", None, "turboquant3", 192)]
    out = {}
    with set_current_vllm_config(cfg):
        for label, backend, dtype, head in cases:
            sel = AttentionSelectorConfig(head_size=head, dtype=torch.bfloat16, kv_cache_dtype=dtype, block_size=None)
            row = {}
            for who, cls in (("ours", ours), ("stock", stock)):
                try:
                    row[who] = cls.get_attn_backend_cls(backend, sel, 8)
                except Exception as exc:  # noqa: BLE001 -- the message is the result
                    row[who] = f"ERROR {type(exc).__name__}: {exc}"
            out[label] = row
            print(f"SELECT {label:25s} ours: {_short(row['ours'])}  |  vLLM's CudaPlatform: {_short(row['stock'])}")
    return out


def _short(answer: str) -> str:
    return answer.split("(")[0][:70] if answer.startswith("ERROR") else answer.rsplit(".", 1)[-1]


def _skip_layers(model: str, ours) -> dict:
    """``--kv-cache-dtype-skip-layers 0`` in a turboquant3 run: layer 0 (bf16) gets vLLM's own backend; with
    protected tokens off the KV-cache groups keep the packed layer's real page, with them on vLLM would pad
    it to the bf16 page (shown with our refusal bypassed), so ``check_and_update_config`` refuses it."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
    from vllm.model_executor.layers.attention import Attention
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.core.kv_cache_planning import get_kv_cache_groups_from_builder
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec

    import vllm_turboquant.backend.gpu as gpu
    import vllm_turboquant.backend.platform as platform

    out = {}
    os.environ.pop("VLLM_KV_CACHE_LAYOUT", None)
    for protected in (False, True):
        extra = {"ops": "torch"} if protected else {"ops": "torch", "sink": 0, "window": 0}
        cfg = _engine_config(model, "turboquant3", "bfloat16", extra)
        cfg.cache_config.kv_cache_dtype_skip_layers = ["0"]
        try:
            ours.check_and_update_config(cfg)
            refusal = ""
        except Exception as exc:  # noqa: BLE001 -- the message is the result
            refusal = str(exc)
        # build it regardless: the impl and the engine state (``exact.check_supported``) both refuse it
        check, gpu.skip_layers_problem = gpu.skip_layers_problem, lambda _cfg: None
        platform.skip_layers_problem = gpu.skip_layers_problem
        try:
            with set_current_vllm_config(cfg):
                old = torch.get_default_dtype()
                torch.set_default_dtype(torch.bfloat16)
                layers, backends = [], []
                for i, dtype in enumerate(("auto", "turboquant3")):
                    sel = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype=dtype,
                                                  block_size=None)
                    backends.append(ours.get_attn_backend_cls(cfg.attention_config.backend, sel, 8))
                    layers.append(Attention(8, 128, 128 ** -0.5, 2, cache_config=cfg.cache_config,
                                            prefix=f"model.layers.{i}.self_attn.attn",
                                            attn_backend=resolve_obj_by_qualname(backends[-1])))
                torch.set_default_dtype(old)
                for layer in layers:
                    layer.process_weights_after_loading(torch.bfloat16)
                ours.update_block_size_for_backend(cfg)
                specs = get_kv_cache_spec(cfg)
                supported = [lay.name for lay in get_supported_kv_cache_layouts(get_current_attn_backends(cfg))]
                resolve_kv_cache_layout(cfg, [supported], specs.values())
                builder = resolve_obj_by_qualname(ours.get_kv_cache_config_builder_cls(cfg))()
                groups = get_kv_cache_groups_from_builder(builder, cfg, specs)
        finally:
            gpu.skip_layers_problem = platform.skip_layers_problem = check
        packed = "model.layers.1.self_attn.attn"
        spec = next(g.kv_cache_spec for g in groups if packed in g.layer_names)
        spec = spec.kv_cache_specs[packed] if hasattr(spec, "kv_cache_specs") else spec
        bf16 = next(g.kv_cache_spec for g in groups if "model.layers.0.self_attn.attn" in g.layer_names)
        bf16 = bf16.kv_cache_specs["model.layers.0.self_attn.attn"] if hasattr(bf16, "kv_cache_specs") else bf16
        row = dict(backends=backends, refusal=refusal, groups=len(groups), bf16_page=bf16.page_size_bytes,
                   packed_page=spec.page_size_bytes, packed_real=spec.real_page_size_bytes)
        out["on" if protected else "off"] = row
        print(f"CHECK skip layer 0, protected tokens {'on ' if protected else 'off'}: backends "
              f"{backends[0].split('.')[-1]} + {backends[1].split('.')[-1]}, {len(groups)} group(s), packed page "
              f"{spec.page_size_bytes} B for "
              f"{spec.real_page_size_bytes} B of slots (bf16 page {bf16.page_size_bytes} B) -> "
              + (f"refused: {refusal[:90]}..." if refusal else "accepted"), flush=True)
    return out


class Reference:
    """The torch reference's view of one layer: its own packed cache and exact copies of every token, one
    contiguous run of blocks per request, nothing freed or nulled."""

    def __init__(self, preset: str, tables, head_dim: int, num_kv_heads: int, dtype, window, protected: bool,
                 compressed: bool, max_len: int = 256):
        import torch

        from vllm_turboquant.layout import cache_format

        self.fmt = cache_format(preset, head_dim)
        self.tables, self.window, self.compressed = tables, window, compressed
        self.per_req = -(-max_len // BLOCK)
        blocks = 8 * self.per_req
        self.cache = torch.zeros(blocks, BLOCK, num_kv_heads, self.fmt.layout.slot_bytes, dtype=torch.uint8)
        self.exact = torch.zeros(blocks, BLOCK, num_kv_heads, 2 * head_dim, dtype=dtype) if protected else None
        self.protected = protected

    def block_table(self, r: int):
        import torch

        return (torch.arange(self.per_req, dtype=torch.int32) + r * self.per_req)[None]

    def prot(self, r: int):
        from vllm_turboquant.protected import ProtectedTokens

        return ProtectedTokens(SINK, WINDOW, self.exact, self.block_table(r)) if self.protected else None

    def step(self, reqs, positions, q, k, v, scale):
        """reqs[i], positions[i]: the request and position of row i. Returns the float32 outputs."""
        import torch

        from vllm_turboquant import reference as R

        slots = torch.tensor([r * self.per_req * BLOCK + p for r, p in zip(reqs, positions, strict=True)])
        R.write_cache(self.cache, slots, k, v, self.tables, self.fmt, self.prot(0) if self.protected else None,
                      slots if self.protected else None)
        out = torch.zeros(q.shape, dtype=torch.float32)
        rows_of: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            rows_of.setdefault(r, []).append(i)
        for r, rows in rows_of.items():
            rows_t = torch.tensor(rows)
            seq_len = positions[rows[-1]] + 1
            if len(rows) == 1:
                o = R.paged_decode(q[rows_t], self.cache, self.block_table(r), torch.tensor([seq_len]), self.tables,
                                   self.fmt, scale, self.window, self.prot(r))
            else:
                o = R.prefill(q[rows_t], k[rows_t], v[rows_t], self.cache, self.block_table(r),
                              torch.tensor([0, len(rows)]), torch.tensor([seq_len]), self.tables, self.fmt, scale,
                              self.window, self.compressed, self.prot(r), len(rows))
            out[rows_t] = o.float()
        return out


#: The step schedules: (request, new tokens) in batch order. Prompts A=24, B=45, C=12, D=1 tokens: a
#: prefill with a chunk, a decode-first mixed step, an unordered mixed step with a one-token prompt, two
#: padded decode steps; the exact-copy window (16) and layer 1's window (24) slide, the sink stays.
PROMPTS = {"A": 24, "B": 45, "C": 12, "D": 1}
STEPS = [
    ("prefill + chunk", [("A", 24), ("B", 16)]),
    ("mixed, decode first", [("A", 1), ("B", 20), ("C", 12)]),
    ("mixed, unordered", [("B", 9), ("A", 1), ("C", 1), ("D", 1)]),
    ("decode, padded", [("A", 1), ("B", 1), ("C", 1), ("D", 1)]),
    ("decode, padded", [("A", 1), ("B", 1), ("C", 1), ("D", 1)]),
]
#: The same kinds of step at a third of the tokens, for the Triton interpreter (~1 ms per program).
SMALL_PROMPTS = {"A": 8, "B": 14, "C": 3, "D": 1}
SMALL_STEPS = [
    ("prefill + chunk", [("A", 8), ("B", 6)]),
    ("mixed, decode first", [("A", 1), ("B", 5), ("C", 3)]),
    ("mixed, unordered", [("B", 3), ("A", 1), ("C", 1), ("D", 1)]),
    ("decode, padded", [("A", 1), ("B", 1), ("C", 1), ("D", 1)]),
    ("decode, padded", [("A", 1), ("B", 1), ("C", 1), ("D", 1)]),
]
PAD_TOKENS = 3  # rows past the step's tokens, slot -1 (CUDA-graph padding)
PAD_REQUESTS = 2  # requests a FULL CUDA-graph replay adds to a pure-decode batch (query length 0, seq_len 0)


def _layers_and_groups(model: str, ours, cfg, preset: str, dtype) -> dict:
    """With ``cfg`` current: the two ``Attention`` layers of the model (full attention, sliding window) with the
    backend our platform selects, through loading, MRV2's specs, the layout, grouping and ``init_attn_backend``
    (metadata builders, the engine's CUDA-graph support). No cache is allocated."""
    import torch
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
    from vllm.model_executor.layers.attention import Attention
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.core.kv_cache_planning import get_kv_cache_groups_from_builder
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec, init_attn_backend

    num_heads, num_kv_heads, head = 8, 2, 128
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        layers = []
        for name, window in zip(NAMES, WINDOWS, strict=True):
            sel = AttentionSelectorConfig(head_size=head, dtype=dtype, kv_cache_dtype=preset, block_size=BLOCK,
                                          has_sliding_window=window is not None)
            backend = resolve_obj_by_qualname(ours.get_attn_backend_cls(None, sel, num_heads))
            layers.append(Attention(num_heads, head, head ** -0.5, num_kv_heads, cache_config=cfg.cache_config,
                                    per_layer_sliding_window=window, prefix=name, attn_backend=backend))
    finally:
        torch.set_default_dtype(old_dtype)
    for layer in layers:  # after loading: tables bound, companions created
        layer.process_weights_after_loading(dtype)
    ours.update_block_size_for_backend(cfg)
    specs = get_kv_cache_spec(cfg)
    supported = [lay.name for lay in get_supported_kv_cache_layouts(get_current_attn_backends(cfg))]
    resolved = resolve_kv_cache_layout(cfg, [supported], specs.values())
    builder = resolve_obj_by_qualname(ours.get_kv_cache_config_builder_cls(cfg))()
    groups = get_kv_cache_groups_from_builder(builder, cfg, specs)
    kvc = builder.get_kv_cache_config_from_groups(cfg, groups, num_blocks=400)
    attn_groups, cg, kernel_block_sizes = init_attn_backend(kvc, cfg, torch.device("cpu"))
    return dict(layers=layers, specs=specs, supported=supported, resolved=resolved, kvc=kvc, attn_groups=attn_groups,
                cg=cg, kernel_block_sizes=kernel_block_sizes)


def _cudagraph_support(chain: dict) -> dict:
    """What vLLM asks about CUDA graphs: our metadata builder's ``get_cudagraph_support`` for each of our groups'
    specs, and the engine-wide minimum ``init_attn_backend`` took over every group (the companions' included)."""
    from vllm_turboquant.backend.gpu import TurboQuantGPUMetadataBuilder

    ours = sorted({TurboQuantGPUMetadataBuilder.get_cudagraph_support(g.get_metadata_builder(0).vllm_config,
                                                                      g.kv_cache_spec).name
                   for gs in chain["attn_groups"] for g in gs
                   if isinstance(g.get_metadata_builder(0), TurboQuantGPUMetadataBuilder)})
    return {"builder": ours, "engine": chain["cg"].min_cg_support.name}


def _cudagraph_on_off(model: str, ours) -> dict:
    """The CUDA-graph support vLLM sees with protected tokens on (the preset's default sink and window) and off
    (sink = window = 0), per ops setting: the layers, specs, groups and builders only (no steps)."""
    import torch
    from vllm.config import set_current_vllm_config

    os.environ["VLLM_KV_CACHE_LAYOUT"] = "LBHNC"
    start, out = time.perf_counter(), {}
    for ops in ("auto", "triton", "torch"):
        for protected in (True, False):
            extra = {"ops": ops} if protected else {"ops": ops, "sink": 0, "window": 0}
            cfg = _engine_config(model, "turboquant3", "bfloat16", extra)
            with set_current_vllm_config(cfg):
                chain = _layers_and_groups(model, ours, cfg, "turboquant3", torch.bfloat16)
                row = _cudagraph_support(chain)
            row["groups"] = [type(g.kv_cache_spec).__name__ for g in chain["kvc"].kv_cache_groups]
            out[f"{ops} {'on' if protected else 'off'}"] = row
            print(f"CHECK CUDA graphs, ops={ops:6s} protected tokens {'on ' if protected else 'off'}: our builder "
                  f"{'/'.join(row['builder'])}, engine minimum {row['engine']} over {len(row['groups'])} "
                  "group(s)", flush=True)
    print(f"CHECK CUDA graphs, protected tokens on vs off: {time.perf_counter() - start:.1f} s", flush=True)
    return out


#: Every way a tensor's data reaches the host (free on CPU tensors; a device-to-host copy and a sync on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostRead(AssertionError):
    """A tensor was read back to the host inside the impl's ``forward`` / ``do_kv_cache_update``."""


def _names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a device (or a tensor, whose device it takes)."""
    import torch

    return "device" in kwargs or bool(args) and isinstance(args[0], (str, int, torch.device, torch.Tensor))


@contextlib.contextmanager
def _no_host_reads():
    """Every ``HOST_READS`` method of ``torch.Tensor`` and a ``Tensor.to`` that names a device raise ``HostRead``
    while the block runs -- except when the Triton interpreter (``TRITON_INTERPRET=1``, a CPU stand-in for the
    GPU) makes its own host copies of a kernel's arguments."""
    import torch

    def guarded(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if (name == "to" and not _names_device(args, kwargs)) or caller.split(".")[0] == "triton":
                return original(self, *args, **kwargs)
            raise HostRead(f"Tensor.{name} called in {caller} line {sys._getframe(1).f_lineno}")
        return method

    own = {name: torch.Tensor.__dict__.get(name) for name in (*HOST_READS, "to")}
    for name in own:
        setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
    try:
        yield
    finally:
        for name, before in own.items():
            if before is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, before)


def _guard_refuses() -> list[str]:
    """The reads ``_no_host_reads`` refused when tried on purpose (all of them, or the guard is not in force)."""
    import torch

    t = torch.ones(1)
    tries = {"item": lambda: t.item(), "tolist": lambda: t.tolist(), "cpu": lambda: t.cpu(),
             "numpy": lambda: t.numpy(), "bool": lambda: bool(t),
             "int": lambda: int(t), "float": lambda: float(t), "index": lambda: [0, 1][t.long()],
             "to(cpu)": lambda: t.to("cpu"), "to(device=...)": lambda: t.to(device=t.device)}
    refused = []
    with _no_host_reads():
        for label, read in tries.items():
            try:
                read()
            except HostRead:
                refused.append(label)
        t.to(torch.float16)  # a dtype conversion stays on the device: allowed
    return refused


def _guard_host_reads(impls, record: dict) -> None:
    """Run every impl's ``forward`` and ``do_kv_cache_update`` under ``_no_host_reads``. A host read is recorded
    (``record["violations"]``) and the call run again unguarded, so the outputs can still be checked;
    ``record["calls"]`` counts the guarded calls by kind: the batch's (decode-only, prefill+decode, prefill-only,
    profile), cache writes."""
    def wrap(impl, name):
        original = getattr(impl, name)

        def call(layer, *args, **kwargs):
            if name == "forward":
                meta = args[4]  # (query, key, value, kv_cache, attn_metadata, output, ...)
                kind = ("profile" if meta is None else "decode-only" if meta.decode_only
                        else "prefill+decode" if meta.num_decodes else "prefill-only")
            else:
                kind = "cache write"
            record["calls"][kind] = record["calls"].get(kind, 0) + 1
            try:
                with _no_host_reads():
                    return original(layer, *args, **kwargs)
            except HostRead as exc:
                record["violations"].append(f"{name} ({kind}): {exc}")
                return original(layer, *args, **kwargs)

        setattr(impl, name, call)

    record.setdefault("calls", {})
    record.setdefault("violations", [])
    record["self_check"] = _guard_refuses()
    for impl in impls:
        wrap(impl, "forward")
        wrap(impl, "do_kv_cache_update")


def _run_config(model: str, ours, preset: str, layout: str, protected: bool, ops: str, compressed: bool = True,
                retained_demo: dict | None = None, guard_host_reads: bool = False) -> dict:
    """One configuration through the whole 0.33 chain; returns its record (see the module docstring).
    ``guard_host_reads``: the impls' forward and cache write must not read a tensor back (``_guard_host_reads``)."""
    import numpy as np
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu.attn_utils import build_attn_metadata, build_slot_mappings_by_layer, init_kv_cache

    from vllm_turboquant.registry import CodebookRegistry

    start, start_cpu = time.perf_counter(), time.process_time()
    dtype = torch.float32 if ops == "torch" else torch.bfloat16
    extra = {"ops": ops, "compressed_prefill": compressed, "sink": SINK if protected else 0,
             "window": WINDOW if protected else 0}
    cfg = _engine_config(model, preset, "float32" if ops == "torch" else "bfloat16", extra)
    os.environ["VLLM_KV_CACHE_LAYOUT"] = layout
    device = torch.device("cpu")
    num_heads, num_kv_heads, head = 8, 2, 128
    scale = head ** -0.5
    names, windows = NAMES, WINDOWS
    rec = {"preset": preset, "layout": layout, "protected": protected, "ops": ops, "compressed": compressed}
    with set_current_vllm_config(cfg):
        chain = _layers_and_groups(model, ours, cfg, preset, dtype)
        layers, specs, kvc, attn_groups = chain["layers"], chain["specs"], chain["kvc"], chain["attn_groups"]
        kernel_block_sizes = chain["kernel_block_sizes"]
        rec["declared_layouts"] = chain["supported"]
        assert chain["resolved"].name == layout, (chain["resolved"], layout)
        rec["cudagraph"] = _cudagraph_support(chain)
        context = cfg.compilation_config.static_forward_context
        init_kv_cache(context, kvc, device, kernel_block_sizes, cfg, attn_groups=[g for gs in attn_groups for g in gs])
        group_specs = [g.kv_cache_spec for g in kvc.kv_cache_groups]
        rec["groups"] = [f"{type(s).__name__}(bs={s.block_size})" for s in group_specs]
        rec["exact_groups"] = sum(type(s).__name__ == "ExactCopySpec" for s in group_specs)
        rec["layout_padded"] = any(getattr(s, "page_size_padded", None) for s in specs.values())
        manager = KVCacheManager(kvc, max_model_len=256, scheduler_block_size=BLOCK, hash_block_size=BLOCK,
                                 enable_caching=False)
        impls = [layer.impl for layer in layers]
        if guard_host_reads:
            rec["host_reads"] = {}
            _guard_host_reads(impls, rec["host_reads"])
        registry = CodebookRegistry.default(preset, head, 2, num_kv_heads, seed=0, model=str(cfg.model_config.model))
        refs = []
        for i, (impl, window) in enumerate(zip(impls, windows, strict=True)):
            tables = registry.layer(i).heads(0, num_kv_heads)
            assert all(torch.equal(a, b) for a, b in zip(_tensors(impl.packed.tables), _tensors(tables), strict=True))
            refs.append(Reference(preset, tables, head, num_kv_heads, dtype, window, protected, compressed))

        # -- the memory profile: a forward with no metadata (nothing written, nothing read)
        g = torch.Generator().manual_seed(0)
        q, k, v = _qkv(g, 64, num_heads, num_kv_heads, head, dtype)
        snapshot = _cache_bytes(context, names)
        with set_forward_context(None, cfg, num_tokens=64, slot_mapping={}):
            for layer in layers:
                layer(q.flatten(1), k.flatten(1), v.flatten(1))
        rec["profile_ok"] = _same(_cache_bytes(context, names), snapshot)

        prompts, steps = (PROMPTS, STEPS) if ops == "torch" else (SMALL_PROMPTS, SMALL_STEPS)
        requests = {rid: Request(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=8), None)
                    for rid, n in prompts.items()}
        order = list(prompts)
        max_err, checked = 0.0, 0
        for step, (label, batch) in enumerate(steps):
            # scheduler side: allocate, as the scheduler does before the step
            for rid, n in batch:
                req = requests[rid]
                if req.num_computed_tokens >= req.num_prompt_tokens:  # a decode: the sampled token first
                    req.append_output_token_ids(5)
                assert manager.allocate_slots(req, n) is not None, (label, rid)
            ids = {rid: manager.get_block_ids(rid) for rid, _ in batch}
            # worker side (MRV2): block tables, slot mappings, CommonAttentionMetadata, builders
            num_reqs, num_tokens = len(batch), sum(n for _, n in batch)
            padded = num_tokens + PAD_TOKENS
            # a pure-decode step is replayed as a FULL CUDA graph: MRV2 pads the requests too (query length 0,
            # seq_len 0) and passes the padded token count
            pad_reqs = PAD_REQUESTS if label.startswith("decode") else 0
            qsl = np.concatenate([[0], np.cumsum([n for _, n in batch]), [num_tokens] * pad_reqs]).astype(np.int32)
            first = [requests[rid].num_computed_tokens for rid, _ in batch]
            seq_lens = torch.tensor([f + n for f, (_, n) in zip(first, batch, strict=True)] + [0] * pad_reqs,
                                    dtype=torch.int32)
            positions = [p for f, (_, n) in zip(first, batch, strict=True) for p in range(f, f + n)]
            req_of_row = [order.index(rid) for rid, n in batch for _ in range(n)]
            tables, slots = [], torch.full((len(group_specs), padded), -1, dtype=torch.int64)
            for gi, spec in enumerate(group_specs):
                width = max(len(ids[rid][gi]) for rid, _ in batch)
                bt = torch.zeros(num_reqs + pad_reqs, max(width, 1), dtype=torch.int32)
                reach = spec.num_retained_tokens if isinstance(spec, SlidingWindowSpec) else 0
                for j, (rid, _) in enumerate(batch):
                    row = ids[rid][gi]
                    bt[j, :len(row)] = torch.tensor(row, dtype=torch.int32)
                    if reach > 0:  # gather_block_tables: entries wholly below the reach are nulled
                        bt[j, :max(first[j] - reach, 0) // spec.block_size] = 0
                for t, (j, pos) in enumerate(zip([j for j, (_, n) in enumerate(batch) for _ in range(n)], positions,
                                                 strict=True)):
                    rid = batch[j][0]
                    slots[gi, t] = ids[rid][gi][pos // spec.block_size] * spec.block_size + pos % spec.block_size
                tables.append(bt)
            common = dict(
                attn_groups=attn_groups, num_reqs=num_reqs + pad_reqs, num_tokens=padded if pad_reqs else num_tokens,
                query_start_loc_gpu=torch.from_numpy(qsl), query_start_loc_cpu=torch.from_numpy(qsl),
                max_query_len=max(n for _, n in batch), seq_lens=seq_lens, max_seq_len=int(seq_lens.max()),
                slot_mappings=slots, kv_cache_config=kvc, seq_lens_cpu_upper_bound=seq_lens,
                positions=torch.tensor(positions + [0] * PAD_TOKENS))
            metadata = build_attn_metadata(block_tables=tables, **common)
            by_layer = build_slot_mappings_by_layer(slots, kvc)
            q, k, v = _qkv(g, padded, num_heads, num_kv_heads, head, dtype)
            outs = []
            with set_forward_context(metadata, cfg, num_tokens=padded, slot_mapping=by_layer):
                for layer in layers:
                    outs.append(layer(q.flatten(1), k.flatten(1), v.flatten(1)).view(padded, num_heads, head))
            for out, ref in zip(outs, refs, strict=True):
                want = ref.step(req_of_row, positions, q[:num_tokens], k[:num_tokens], v[:num_tokens], scale)
                err = ((out[:num_tokens].double() - want.double()).abs().max()
                       / want.double().abs().max().clamp_min(1e-12)).item()
                max_err, checked = max(max_err, err), checked + num_tokens
            if retained_demo is not None and step == len(steps) - 1:
                _retained_demo(retained_demo, layers, refs, common, group_specs, tables, first, cfg, q, k, v,
                               num_tokens, req_of_row, positions, scale)
            for rid, n in batch:
                requests[rid].num_computed_tokens += n

        # -- MRV2 capture (FULL, uniform decode) and a piecewise warm-up (mixed): dummy tables, all-padding slots
        snapshot = _cache_bytes(context, names)
        ok = True
        for capture, lens in ((True, [1, 1, 1, 1]), (False, [3, 1, 5])):
            n_reqs, n_tok = len(lens), sum(lens)
            qsl = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
            seq = torch.tensor(lens, dtype=torch.int32)
            dummy_tables = [torch.zeros(n_reqs, 16, dtype=torch.int32) for _ in group_specs]
            dummy_slots = torch.full((len(group_specs), n_tok), -1, dtype=torch.int64)
            md = build_attn_metadata(
                attn_groups=attn_groups, num_reqs=n_reqs, num_tokens=n_tok, query_start_loc_gpu=qsl,
                query_start_loc_cpu=qsl, max_query_len=max(lens), seq_lens=seq, max_seq_len=256,
                block_tables=dummy_tables, slot_mappings=dummy_slots, kv_cache_config=kvc,
                seq_lens_cpu_upper_bound=seq, for_cudagraph_capture=capture)
            if capture:
                ok &= all(int(m.seq_lens.max()) == 1 for m in md.values() if hasattr(m, "decode_only"))
            q, k, v = _qkv(g, n_tok, num_heads, num_kv_heads, head, dtype)
            with set_forward_context(md, cfg, num_tokens=n_tok,
                                     slot_mapping=build_slot_mappings_by_layer(dummy_slots, kvc)):
                for layer in layers:
                    ok &= bool(torch.isfinite(layer(q.flatten(1), k.flatten(1), v.flatten(1))).all())
        rec["capture_ok"] = ok
        rec["warmup_untouched"] = _same(_cache_bytes(context, names), snapshot)
    rec.update(max_err=max_err, checked_rows=checked, steps=len(steps), wall_s=round(time.perf_counter() - start, 2),
               cpu_s=round(time.process_time() - start_cpu, 2))
    print(f"CONFIG {preset:16s} {layout} protected={'on ' if protected else 'off'} ops={ops:6s} "
          f"compressed_prefill={'on ' if compressed else 'off'} groups={len(group_specs)} "
          f"max_err={max_err:.2e} ({checked} rows) {rec['wall_s']:.1f} s ({rec['cpu_s']:.1f} s CPU)", flush=True)
    if guard_host_reads:
        calls = ", ".join(f"{n} {kind}" for kind, n in sorted(rec["host_reads"]["calls"].items()))
        print(f"CHECK no host reads in forward / do_kv_cache_update ({calls}): "
              + ("; ".join(rec["host_reads"]["violations"]) or "none"), flush=True)
    return rec


def _retained_demo(out, layers, refs, common, group_specs, tables, first, cfg, q, k, v, num_tokens, req_of_row,
                   positions, scale) -> None:
    """Re-run the last (pure-decode) step's attention with the companions' block tables nulled at vLLM's default
    reach (window - 1) instead of ``ExactCopySpec.num_retained_tokens`` (0)."""
    import torch
    from vllm.forward_context import set_forward_context
    from vllm.v1.worker.gpu.attn_utils import build_attn_metadata, build_slot_mappings_by_layer

    nulled_tables, nulled = [], 0
    for spec, bt in zip(group_specs, tables, strict=True):
        bt = bt.clone()
        if type(spec).__name__ == "ExactCopySpec":
            reach = spec.sliding_window - 1
            sink_blocks = -(-spec.sink_tokens // spec.block_size)
            for j, f in enumerate(first):
                n_null = max(f - reach, 0) // spec.block_size
                nulled += sum(1 for b in range(min(n_null, sink_blocks)) if bt[j, b] != 0)
                bt[j, :n_null] = 0
        nulled_tables.append(bt)
    errs = {}
    slot_mapping = build_slot_mappings_by_layer(common["slot_mappings"], common["kv_cache_config"])
    for label, bts in (("ours", tables), ("default", nulled_tables)):
        md = build_attn_metadata(block_tables=bts, **common)
        err = 0.0
        with set_forward_context(md, cfg, num_tokens=q.shape[0], slot_mapping=slot_mapping):
            for layer, ref in zip(layers, refs, strict=True):
                got = torch.empty(q.shape, dtype=q.dtype)
                layer.impl.forward(layer, q, k, v, layer.kv_cache, md[layer.layer_name], got)  # attention only
                want = _reference_again(ref, req_of_row, positions, q[:num_tokens], scale)
                err = max(err, ((got[:num_tokens].double() - want.double()).abs().max()
                                / want.double().abs().max()).item())
        errs[label] = err
    out.update(nulled_sink_blocks=nulled, max_err_default=errs["default"], max_err_ours=errs["ours"])
    print(f"CHECK num_retained_tokens: MRV2's default reach would null {nulled} sink block(s) of the exact copies "
          f"-> max_err {errs['default']:.2e}; ExactCopySpec's 0 -> max_err {errs['ours']:.2e}", flush=True)


def _reference_again(ref: Reference, reqs, positions, q, scale):
    """The reference outputs of a pure-decode step already written to the reference cache."""
    import torch

    from vllm_turboquant import reference as R

    out = torch.zeros(q.shape, dtype=torch.float32)
    for i, (r, p) in enumerate(zip(reqs, positions, strict=True)):
        out[i] = R.paged_decode(q[i:i + 1], ref.cache, ref.block_table(r), torch.tensor([p + 1]), ref.tables, ref.fmt,
                                scale, ref.window, ref.prot(r))[0]
    return out


def _tensors(tables) -> list:
    import dataclasses

    import torch

    return [getattr(tables, f.name) for f in dataclasses.fields(tables)
            if isinstance(getattr(tables, f.name), torch.Tensor)]


def _qkv(g, n, num_heads, num_kv_heads, head, dtype):
    import torch

    q = torch.randn(n, num_heads, head, generator=g)
    k = torch.randn(n, num_kv_heads, head, generator=g) + 2 * torch.randn(1, num_kv_heads, head, generator=g)
    v = torch.randn(n, num_kv_heads, head, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _cache_bytes(context, names) -> list:
    """Copies of every packed and exact-copy cache's backing bytes."""
    import torch

    seen, out = set(), []
    for name in names:
        for n in (name, name + ".tq_exact"):
            layer = context.get(n)
            if layer is None:
                continue
            cache = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
            storage = cache.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                out.append(torch.empty(0, dtype=torch.uint8).set_(storage).clone())
    return out


def _same(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _undeclared_layouts(model: str, ours) -> dict:
    """A layout our backend does not declare, asked for by name: vLLM refuses it before allocating."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec

    from vllm_turboquant.backend.gpu import TurboQuantGPUBackend

    out = {}
    for layout in ("LHBNC", "BHLNC"):
        cfg = _engine_config(model, "turboquant3", "float32", {"ops": "torch"})
        with set_current_vllm_config(cfg):
            layer = Attention(8, 128, 128 ** -0.5, 2, cache_config=cfg.cache_config,
                              prefix="model.layers.0.self_attn.attn", attn_backend=TurboQuantGPUBackend)
            layer.process_weights_after_loading(torch.float32)
            specs = get_kv_cache_spec(cfg)
            supported = [lay.name for lay in get_supported_kv_cache_layouts(get_current_attn_backends(cfg))]
            os.environ["VLLM_KV_CACHE_LAYOUT"] = layout
            try:
                resolve_kv_cache_layout(cfg, [supported], specs.values())
                out[layout] = "accepted"
            except ValueError as exc:
                out[layout] = str(exc)
        print(f"CHECK VLLM_KV_CACHE_LAYOUT={layout}: {out[layout][:120]}", flush=True)
    return out


def main(model: str) -> None:
    from vllm_turboquant.presets import PRESETS

    if os.environ.get("GLUE_ONLY"):  # development: one configuration, e.g. GLUE_ONLY=turboquant3,LBHNC,1,torch
        _setup_033()
        ours, _ = _platform_classes()
        _register_cuda(ours)
        preset, layout, prot, ops = os.environ["GLUE_ONLY"].split(",")
        demo = {}
        print(_run_config(model, ours, preset, layout, prot == "1", ops, retained_demo=demo,
                          guard_host_reads=ops == "triton"), demo)
        if os.environ.get("GLUE_CUDAGRAPH"):
            print(_cudagraph_on_off(model, ours))
        return

    t0 = time.perf_counter()
    _setup_033()
    ours, stock = _platform_classes()
    registered = _register_cuda(ours)
    import pickle

    result = {"registered": registered, "selection": _selection(model, ours, stock),
              "skip_layers": _skip_layers(model, ours),
              "platform": {"name": f"{ours.__module__}.{ours.__qualname__}", "is_cuda": ours().is_cuda(),
                           "pickles": pickle.loads(pickle.dumps(ours)) is ours, "stock_base": issubclass(ours, stock)}}
    from vllm_turboquant.backend.gpu import LAYOUTS

    layouts = [lay.name for lay in LAYOUTS]
    result["declared_layouts"] = layouts
    result["undeclared_layouts"] = _undeclared_layouts(model, ours)
    result["cudagraph"] = _cudagraph_on_off(model, ours)
    configs, demo = [], {}
    for preset in PRESETS:
        for layout in layouts:
            for protected in (True, False):
                first = preset == "turboquant3" and layout == layouts[0] and protected
                configs.append(_run_config(model, ours, preset, layout, protected, "torch",
                                           retained_demo=demo if first else None))
    # the Triton kernels (interpreter) behind the same glue: one configuration, bf16, the block-outer layout
    # (its forward and cache write may not read a tensor back to the host: planning belongs in the builder)
    configs.append(_run_config(model, ours, "turboquant4_qjl", "BLHNC", True, "triton", guard_host_reads=True))
    configs.append(_run_config(model, ours, "turboquant3", layouts[0], True, "torch", compressed=False))
    result.update(configs=configs, retained_demo=demo, wall_s=round(time.perf_counter() - t0, 1))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
