"""The per-head codebook registry: determinism, calibration, save/load and refusal of bad files."""

import json

import pytest
import torch

from vllm_turboquant import reference as R
from vllm_turboquant.registry import CalibrationError, CodebookRegistry, calibrate, load_registry
from vllm_turboquant.rotation import hadamard, randomized_hadamard, rotation


def test_default_tables_are_deterministic_orthogonal_and_distinct_per_head():
    a = CodebookRegistry.default("turboquant3_qjl", 64, 4, 3, seed=7)
    b = CodebookRegistry.default("turboquant3_qjl", 64, 4, 3, seed=7)
    ta, tb = a.layer(2), b.layer(2)
    assert torch.equal(ta.key_rotation, tb.key_rotation) and torch.equal(ta.qjl, tb.qjl)
    eye = torch.eye(64).expand(3, 64, 64)
    assert torch.allclose(ta.key_rotation @ ta.key_rotation.transpose(1, 2), eye, atol=1e-5)
    assert not torch.allclose(ta.key_rotation[0], ta.key_rotation[1])
    assert not torch.allclose(ta.key_rotation[0], ta.value_rotation[0])
    assert not torch.allclose(a.layer(1).key_rotation[0], ta.key_rotation[0])
    assert ta.qjl.shape == (3, 64, 64) and a.layer(0).key_mean.abs().sum() == 0
    assert CodebookRegistry.default("turboquant3", 64, 1, 1).layer(0).qjl.shape == (1, 0, 64)


def test_tensor_parallel_slice_equals_the_global_heads():
    reg = CodebookRegistry.default("turboquant4", 128, 2, 8)
    part = reg.layer(1).heads(4, 8)
    assert torch.equal(part.key_rotation, reg.layer(1).key_rotation[4:8]) and part.num_heads == 4


def test_hadamard_rotation_is_orthogonal_and_seeded():
    h = hadamard(128)
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    r = randomized_hadamard(64, 1)
    assert torch.allclose(r @ r.T, torch.eye(64), atol=1e-6) and not torch.equal(r, randomized_hadamard(64, 2))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(96)
    with pytest.raises(ValueError, match="'givens'"):
        rotation(64, 0, "givens")
    reg = CodebookRegistry.default("turboquant3", 64, 1, 2, rotation="hadamard")
    assert torch.allclose(reg.layer(0).key_rotation.abs(), torch.full((2, 64, 64), 64 ** -0.5), atol=1e-6)


def _captured(L=3, N=300, H=2, d=64):
    keys = [torch.randn(N, H, d) * torch.linspace(0.2, 3, d) + 4.0 for _ in range(L)]
    values = [torch.randn(N, H, d) for _ in range(L)]
    return keys, values


def test_calibrate_save_load_reproduces_identical_slots(tmp_path):
    keys, values = _captured()
    reg = calibrate(keys, values, "turboquant3_qjl", model="tiny-test")
    t = reg.layer(1)
    assert torch.allclose(t.key_mean, keys[1].mean(0))
    default = CodebookRegistry.default("turboquant3_qjl", 64, 3, 2).layer(1)
    assert not torch.allclose(t.key_centroids, default.key_centroids)
    path = tmp_path / "calib.safetensors"
    reg.save(path)
    loaded = load_registry(path, model="tiny-test", preset="turboquant3_qjl", head_dim=64, num_layers=3, num_kv_heads=2)
    k, v = torch.randn(20, 2, 64) * 3 + 4, torch.randn(20, 2, 64)
    for layer in range(3):
        assert torch.equal(R.encode_slots(k, v, reg.layer(layer), "turboquant3_qjl"),
                           R.encode_slots(k, v, loaded.layer(layer), "turboquant3_qjl"))


def test_calibration_lowers_key_error_on_offset_keys():
    keys, values = _captured(L=1)
    cal = calibrate(keys, values, "turboquant3").layer(0)
    plain = CodebookRegistry.default("turboquant3", 64, 1, 2).layer(0)
    k = keys[0][:100]
    err = {}
    for name, t in (("calibrated", cal), ("default", plain)):
        kk, _ = R.dequantize(R.encode(k, k, t, "turboquant3"), t, "turboquant3")
        err[name] = ((kk - k - 0) ** 2).sum() / (k - k.mean(0)).pow(2).sum()
    assert err["calibrated"] < err["default"]


def test_default_registry_round_trips_through_a_file(tmp_path):
    reg = CodebookRegistry.default("turboquant2", 128, 2, 1, seed=5)
    reg.save(tmp_path / "r.safetensors")
    back = load_registry(tmp_path / "r.safetensors")
    assert back.spec == reg.spec and torch.equal(back.layer(1).value_rotation, reg.layer(1).value_rotation)


@pytest.mark.parametrize("field,value,message", [
    ("num_layers", 4, "num_layers is 3 in the file but 4 is expected"),
    ("num_kv_heads", 1, "num_kv_heads is 2 in the file but 1 is expected"),
    ("head_dim", 128, "head_dim is 64 in the file but 128 is expected"),
    ("preset", "turboquant4", "preset is 'turboquant3' in the file but 'turboquant4' is expected"),
    ("model", "other", "model is 'tiny' in the file but 'other' is expected"),
])
def test_mismatched_file_is_refused_naming_the_mismatch(tmp_path, field, value, message):
    keys, values = _captured()
    path = tmp_path / "c.safetensors"
    calibrate(keys, values, "turboquant3", model="tiny").save(path)
    with pytest.raises(CalibrationError, match=message):
        load_registry(path, **{field: value})


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    keys, values = _captured(L=1)
    good = tmp_path / "good.safetensors"
    calibrate(keys, values, "turboquant3").save(good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="not a readable safetensors file"):
        load_registry(bad)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_registry(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CalibrationError, match="no vllm_turboquant metadata"):
        load_registry(foreign)
    meta = json.dumps({"format_version": 99})
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"vllm_turboquant": meta})
    with pytest.raises(CalibrationError, match="format_version is 99 in the file but 1 is expected"):
        load_registry(foreign)
    # right metadata, wrong tensor shape
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
    tensors["key_centroids"] = tensors["key_centroids"][:, :, :4].contiguous()
    save_file(tensors, str(foreign), metadata=meta)
    with pytest.raises(CalibrationError, match="'key_centroids' has shape"):
        load_registry(foreign)
    tensors = {k: v for k, v in tensors.items() if k != "key_centroids"}
    tensors["key_mean"] = tensors["key_mean"] * float("nan")
    save_file(tensors, str(foreign), metadata=meta)
    with pytest.raises(CalibrationError, match="non-finite"):
        load_registry(foreign)


def test_layer_out_of_range_and_bad_spec():
    reg = CodebookRegistry.default("turboquant3", 64, 2, 1)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        reg.layer(2)
    with pytest.raises(ValueError, match="unsupported head_dim 65"):
        CodebookRegistry.default("turboquant3", 65, 2, 1)


def test_registry_accepts_a_preset_record_outside_the_table():
    from vllm_turboquant.presets import Preset

    custom = Preset("k3v3_qjl_half", 3, 3, qjl_ratio=0.5, qjl_scale="optimal")
    t = CodebookRegistry.default(custom, 64, 1, 2).layer(0)
    assert t.qjl.shape == (2, 32, 64) and t.key_centroids.shape == (2, 8)
