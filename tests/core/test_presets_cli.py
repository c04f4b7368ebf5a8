"""Presets and the command line."""

import dataclasses
import math
import subprocess
import sys

import pytest

import vllm_turboquant as tq
from vllm_turboquant.__main__ import main
from vllm_turboquant.presets import PRESETS, Preset, get_preset


def test_plain_and_paper_rows():
    # the plain names hold the measured best split at b bits per coordinate on average (README)
    for b, split in ((2, (3, 1)), (3, (4, 2)), (4, (4, 4))):
        plain, paper = get_preset(f"turboquant{b}"), get_preset(f"turboquant{b}_qjl")
        assert (plain.key_bits, plain.value_bits, plain.qjl_ratio) == (*split, 0)
        assert plain.key_bits + plain.value_bits == 2 * b
        assert (paper.key_bits, paper.value_bits, paper.qjl_ratio, paper.qjl_scale) == (b - 1, b, 1.0, "unbiased")
        assert paper.qjl_dim(128) == 128 and paper.qjl_lambda(128) == 1.0


def test_optimal_lambda_formula():
    p = Preset("x", 3, 3, qjl_ratio=0.5, qjl_scale="optimal")
    assert p.qjl_dim(128) == 64
    assert p.qjl_lambda(128) == pytest.approx(1 / (1 + math.pi * 128 / (2 * 64)))
    assert p.qjl_coefficient(128) == pytest.approx(p.qjl_lambda(128) * math.sqrt(math.pi / 2) / 64)


def test_unknown_preset_names_the_value_and_the_choices():
    with pytest.raises(ValueError) as e:
        get_preset("turboquant5")
    assert "'turboquant5'" in str(e.value) and all(n in str(e.value) for n in PRESETS)


def test_preset_records_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("turboquant3").key_bits = 4
    with pytest.raises(ValueError, match="key_bits=5"):
        Preset("bad", 5, 3)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vllm_turboquant", *args], capture_output=True, text=True)


def test_cli_presets_reports_design_bytes():
    out = _run("presets", "--head-dim", "128")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith("turboquant")}
    expected = {"turboquant4": 132, "turboquant3": 100, "turboquant2": 68,
                "turboquant4_qjl": 134, "turboquant3_qjl": 102, "turboquant2_qjl": 70}
    for name, nbytes in expected.items():
        assert int(rows[name][5]) == nbytes and int(rows[name][6]) == 0
        assert rows[name][7] == f"{512 / nbytes:.2f}x"


def test_cli_memory_matches_estimate(capsys):
    assert main(["memory", "--layers", "36", "--kv-heads", "2", "--head-dim", "128", "--seq-len", "8192"]) == 0
    out = capsys.readouterr().out
    est = tq.estimate_memory(36, 2, 8192, 128, "turboquant3")
    assert est.bf16_bytes == 36 * 2 * 8192 * 512 and est.preset_bytes == 36 * 2 * 8192 * 100
    assert "288.00 MiB" in out and "56.25 MiB" in out and f"{est.ratio:.2f}x" in out


def test_cli_errors_name_the_bad_value():
    out = _run("presets", "--head-dim", "100")
    assert out.returncode == 2 and "unsupported head_dim 100" in out.stderr and out.stdout == ""
    out = _run("memory", "--layers", "2", "--kv-heads", "1", "--head-dim", "64", "--seq-len", "10", "--preset", "foo")
    assert out.returncode == 2 and "'foo'" in out.stderr and "turboquant3" in out.stderr
    assert _run("--help").returncode == 0
