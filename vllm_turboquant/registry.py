"""The per-head codebook registry: rotation, QJL matrix, codebooks and key mean
of every (layer, KV head).

The default is data-oblivious: matrices are seeded from (seed, layer, head) and
every head shares the shipped Lloyd-Max tables, so there is nothing to
calibrate or download. ``calibrate`` fits per-head codebooks and key means on
captured post-RoPE K/V; ``save``/``load_registry`` keep them in a safetensors
file with JSON metadata. Heads are indexed globally, so a tensor-parallel
worker takes its slice with ``LayerTables.heads``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .codebook import fit_codebook, get_codebook
from .layout import check_head_dim
from .presets import Preset, get_preset
from .rotation import ROTATION_KINDS, RotationKind, derive_seed, qjl_matrix, rotation

FORMAT_VERSION = 1
_META_KEY = "vllm_turboquant"


class CalibrationError(ValueError):
    """A calibration file that cannot be used: corrupt, or made for another model or preset."""


@dataclass(frozen=True)
class LayerTables:
    """What the encoder and attention need for one layer; leading dim H = KV heads.

    key_rotation, value_rotation: (H, d, d) float32, y = Π x.
    qjl: (H, m, d) float32 (m = 0 without a sketch).
    key_boundaries (H, 2**kb - 1), key_centroids (H, 2**kb); value_* likewise.
    key_mean: (H, d) float32, subtracted from keys before encoding (zeros = off).
    """

    key_rotation: torch.Tensor
    value_rotation: torch.Tensor
    qjl: torch.Tensor
    key_boundaries: torch.Tensor
    key_centroids: torch.Tensor
    value_boundaries: torch.Tensor
    value_centroids: torch.Tensor
    key_mean: torch.Tensor

    def to(self, device: torch.device | str) -> LayerTables:
        return LayerTables(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def heads(self, start: int, stop: int) -> LayerTables:
        """The tables of global KV heads [start, stop) (a tensor-parallel worker's slice)."""
        return LayerTables(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    @property
    def num_heads(self) -> int:
        return self.key_rotation.shape[0]


@dataclass(frozen=True)
class RegistrySpec:
    """What a registry was built for; written as a calibration file's metadata."""

    preset: str
    head_dim: int
    num_layers: int
    num_kv_heads: int
    seed: int = 0
    rotation: RotationKind = "haar"
    model: str = ""

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if self.rotation not in ROTATION_KINDS:
            raise ValueError(f"unknown rotation {self.rotation!r}; accepted: {', '.join(ROTATION_KINDS)}")
        if self.num_layers < 1 or self.num_kv_heads < 1:
            raise ValueError(f"num_layers and num_kv_heads must be >= 1, got {self.num_layers}, {self.num_kv_heads}")


_CALIBRATED = ("key_boundaries", "key_centroids", "value_boundaries", "value_centroids", "key_mean")


class CodebookRegistry:
    """Maps (layer, global KV head) to its tables; builds and caches a layer on first use.

    ``calibrated`` optionally holds stacked per-layer tensors, keyed by the names
    in ``LayerTables`` (key_boundaries, key_centroids, value_boundaries,
    value_centroids, key_mean), each of shape (L, H, ...).
    """

    def __init__(self, spec: RegistrySpec, calibrated: dict[str, torch.Tensor] | None = None,
                 preset: Preset | None = None):
        self.spec = spec
        self.preset = preset if preset is not None else get_preset(spec.preset)  # a record not in PRESETS works too
        self.calibrated = dict(calibrated or {})
        self._layers: dict[int, LayerTables] = {}

    @classmethod
    def default(cls, preset: str | Preset, head_dim: int, num_layers: int, num_kv_heads: int,
                seed: int = 0, rotation: RotationKind = "haar", model: str = "") -> CodebookRegistry:
        """The data-oblivious registry."""
        preset = get_preset(preset)
        return cls(RegistrySpec(preset.name, head_dim, num_layers, num_kv_heads, seed, rotation, model), preset=preset)

    def layer(self, index: int) -> LayerTables:
        """Tables of layer ``index`` for all global KV heads (CPU, float32)."""
        if not 0 <= index < self.spec.num_layers:
            raise IndexError(f"layer {index} out of range: the registry has {self.spec.num_layers} layers")
        if index not in self._layers:
            self._layers[index] = self._build(index)
        return self._layers[index]

    def _build(self, layer: int) -> LayerTables:
        s, p = self.spec, self.preset
        d, heads, m = s.head_dim, range(s.num_kv_heads), p.qjl_dim(s.head_dim)

        def per_head(purpose: str, make) -> torch.Tensor:
            return torch.stack([make(derive_seed(s.seed, layer, h, purpose)) for h in heads])

        kb, kc = get_codebook(d, p.key_bits).tensors()
        vb, vc = get_codebook(d, p.value_bits).tensors()
        H = s.num_kv_heads
        tables = dict(
            key_rotation=per_head("key_rotation", lambda sd: rotation(d, sd, s.rotation)),
            value_rotation=per_head("value_rotation", lambda sd: rotation(d, sd, s.rotation)),
            qjl=per_head("qjl", lambda sd: qjl_matrix(m, d, sd)),
            key_boundaries=kb.expand(H, -1).clone(), key_centroids=kc.expand(H, -1).clone(),
            value_boundaries=vb.expand(H, -1).clone(), value_centroids=vc.expand(H, -1).clone(),
            key_mean=torch.zeros(H, d),
        )
        for name, stacked in self.calibrated.items():
            tables[name] = stacked[layer].float().clone()
        return LayerTables(**tables)

    # -- persistence -------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the registry as safetensors (calibrated tensors) + JSON metadata."""
        from safetensors.torch import save_file

        meta = {"format_version": FORMAT_VERSION, **self.spec.__dict__,
                "calibrated": sorted(self.calibrated)}
        tensors = {k: v.contiguous().float() for k, v in self.calibrated.items()}
        if not tensors:  # safetensors needs at least one tensor to be a useful file
            tensors = {"_empty": torch.zeros(0)}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


def load_registry(path: str | Path, *, model: str | None = None, preset: str | None = None,
                  head_dim: int | None = None, num_layers: int | None = None,
                  num_kv_heads: int | None = None) -> CodebookRegistry:
    """Load a calibration file; every expectation given must match, else CalibrationError names it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("_")}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CalibrationError(f"calibration file {str(path)!r} is not a readable safetensors file: {exc}") from exc
    if raw is None:
        raise CalibrationError(f"calibration file {str(path)!r} has no vllm_turboquant metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"calibration file {str(path)!r} has corrupt metadata: {exc}") from exc

    expected = {"format_version": FORMAT_VERSION, "model": model, "preset": preset,
                "head_dim": head_dim, "num_layers": num_layers, "num_kv_heads": num_kv_heads}
    wrong = [f"{k} is {meta.get(k)!r} in the file but {v!r} is expected"
             for k, v in expected.items() if v is not None and meta.get(k) != v]
    if wrong:
        raise CalibrationError(f"calibration file {str(path)!r} does not match: " + "; ".join(wrong))
    try:
        spec = RegistrySpec(**{f.name: meta[f.name] for f in fields(RegistrySpec)})
        get_preset(spec.preset)
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"calibration file {str(path)!r} has invalid metadata: {exc}") from exc
    _check_calibrated_shapes(path, spec, tensors)
    return CodebookRegistry(spec, tensors)


def _check_calibrated_shapes(path: Path, spec: RegistrySpec, tensors: dict[str, torch.Tensor]) -> None:
    p = get_preset(spec.preset)  # checked by the caller
    L, H, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    shapes = {
        "key_boundaries": (L, H, 2 ** p.key_bits - 1), "key_centroids": (L, H, 2 ** p.key_bits),
        "value_boundaries": (L, H, 2 ** p.value_bits - 1), "value_centroids": (L, H, 2 ** p.value_bits),
        "key_mean": (L, H, d),
    }
    for name, t in tensors.items():
        if name not in shapes:
            raise CalibrationError(f"calibration file {str(path)!r} holds an unknown tensor {name!r}")
        if tuple(t.shape) != shapes[name]:
            raise CalibrationError(
                f"calibration file {str(path)!r}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"expected {shapes[name]} for {spec.preset} with {L} layers, {H} KV heads, head_dim {d}"
            )
        if not torch.isfinite(t).all():
            raise CalibrationError(f"calibration file {str(path)!r}: tensor {name!r} has non-finite values")


def calibrate(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], preset: str | Preset, *,
              center_keys: bool = True, seed: int = 0, rotation: RotationKind = "haar", model: str = "",
              iters: int = 50) -> CodebookRegistry:
    """Fit per-head codebooks (and key means) on captured post-RoPE K/V.

    keys[l], values[l]: (N, H, d) for layer l. Returns a registry whose rotations
    are the data-oblivious ones for ``seed`` and whose codebooks are Lloyd-Max on
    each head's own rotated, normalised coordinates (started from the Beta table).
    """
    if len(keys) != len(values) or not keys:
        raise ValueError(f"need one key and one value tensor per layer, got {len(keys)} and {len(values)}")
    n, H, d = keys[0].shape
    base = CodebookRegistry.default(preset, d, len(keys), H, seed, rotation, model)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in _CALIBRATED}
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        if k.shape[1:] != (H, d) or v.shape[1:] != (H, d):
            raise ValueError(f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)}, expected (N, {H}, {d})")
        t = base.layer(layer)
        k = k.float()
        mean = k.mean(0) if center_keys else torch.zeros(H, d)
        for prefix, x, rot, init in (("key", k - mean, t.key_rotation, t.key_centroids),
                                     ("value", v.float(), t.value_rotation, t.value_centroids)):
            y = torch.einsum("nhd,hed->hne", _unit(x), rot)  # (H, N, d): every coordinate is a sample
            boundaries, centroids = fit_codebook(y, init, iters)
            out[f"{prefix}_boundaries"].append(boundaries)
            out[f"{prefix}_centroids"].append(centroids)
        out["key_mean"].append(mean)
    return CodebookRegistry(base.spec, {name: torch.stack(ts) for name, ts in out.items()}, base.preset)


def _unit(x: torch.Tensor) -> torch.Tensor:
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
