"""Screen encoder levers offline by their distortion on a model's own keys and values:
``python -m evals.screen``.

Two levers of the accuracy-frontier issue change what the kernels would decode, not just the encoder, so they
are screened here before anything is built for serving: they must first beat the served encoding at equal bytes
on the quantity a codebook minimises. Keys (centred by the head's key mean) and values are captured from the
model on the automatic calibration's text (``calibrate.capture_kv``, the first ``SKIP`` tokens of every chunk
left out, as the calibration does), then split by chunk: the first half fits every method, the second half is
held out. The score is the held-out relative MSE E‖u − û‖² of the unit vectors u = x / ‖x‖ (the norm is stored
exactly in every method, so this is the whole error up to its scale).

Methods, each with b bits per coordinate (d·b code bits per vector, the same bytes as the served slot):

* ``served``: what the plain presets serve: the seeded Haar rotation and one Lloyd-Max codebook per head fitted
  on the head's rotated coordinates (``registry.calibrate``, encoded by ``reference.quantize``).
* ``vq2``: a 2-D vector-quantisation codebook for pairs of rotated coordinates: 2^(2b) points per head, k-means
  (Lloyd's algorithm in 2-D) started from the served codebook's product grid, so it is never worse on the
  fitting half.
* ``klt``: the head's own principal axes (the Karhunen-Loève transform) in place of the random rotation, with the
  d·b bits allocated over coordinates by greedy reverse water-filling on the axis variances (Gaussian Lloyd-Max
  distortions, at most 4 bits per coordinate as the layout's code fields allow) and one Lloyd-Max codebook per
  coordinate; a 0-bit coordinate decodes to its mean.

Sources: Lloyd-Max distortion of a unit Gaussian (Max 1960): 1, 0.3634, 0.1175, 0.03454, 0.0095 at 0..4 bits;
the transform-coding gain of the KLT and the greedy bit allocation: Gersho & Gray, *Vector Quantization and
Signal Compression* (1992), ch. 8.

Runs on the CPU in a minute or two per model (no engine: ``transformers`` captures the K/V).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

#: Lloyd-Max mean squared error of a unit-variance Gaussian at 0..4 bits (Max 1960).
GAUSSIAN_LLOYD_MAX_MSE = (1.0, 0.3634, 0.1175, 0.03454, 0.0095)
MAX_BITS = len(GAUSSIAN_LLOYD_MAX_MSE) - 1  # the widest code field of the layout
METHODS = ("served", "vq2", "klt")
KMEANS_ITERS = 30


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ along the last dim (zero rows stay zero)."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def allocate_bits(variances: torch.Tensor, total: int, max_bits: int = MAX_BITS) -> torch.Tensor:
    """Greedy integer bit allocation (int64, same shape as ``variances`` (d,)) summing to ``total``: each bit goes
    to the coordinate whose Gaussian Lloyd-Max distortion σ²·D(b) it lowers most (reverse water-filling with
    integer rates). Raises ValueError when ``total`` exceeds d·max_bits."""
    d = variances.numel()
    if not 0 <= total <= d * max_bits:
        raise ValueError(f"cannot allocate {total} bits over {d} coordinates at most {max_bits} each")
    table = torch.tensor(GAUSSIAN_LLOYD_MAX_MSE + (0.0,), dtype=torch.float64)
    bits = torch.zeros(d, dtype=torch.long)
    var = variances.to(torch.float64).clamp_min(0)
    for _ in range(total):
        gain = var * (table[bits] - table[(bits + 1).clamp_max(max_bits + 1)])
        gain[bits >= max_bits] = -1.0
        bits[int(gain.argmax())] += 1
    return bits


def _scalar_codebooks(train: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd-Max codebooks (boundaries, centroids), one per row of train (R, N), started from the Gaussian table
    scaled by each row's standard deviation."""
    from vllm_turboquant.codebook import fit_codebook, get_codebook

    _, centroids = get_codebook(64, bits, "gaussian").tensors()  # Lloyd-Max for N(0, 1/64): rescaled to N(0, 1)
    init = centroids.double().unsqueeze(0) * 8.0 * train.std(1, keepdim=True).clamp_min(1e-12)
    return fit_codebook(train, init.sort(dim=1).values, KMEANS_ITERS)


def _nearest(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, points).argmin(dim=1)


def vq2_error(train: torch.Tensor, test: torch.Tensor, centroids: torch.Tensor) -> float:
    """Held-out MSE per vector of a 2-D codebook of len(centroids)² points on coordinate pairs. train / test:
    (N, d) rotated unit vectors (d even); centroids (K,) the served scalar codebook, whose product grid starts
    k-means."""
    pairs = train.reshape(-1, 2)
    points = torch.cartesian_prod(centroids, centroids).to(train.dtype)
    for _ in range(KMEANS_ITERS):
        idx = _nearest(pairs, points)
        sums = torch.zeros_like(points).index_add_(0, idx, pairs)
        counts = torch.bincount(idx, minlength=points.shape[0]).unsqueeze(1)
        points = torch.where(counts > 0, sums / counts.clamp_min(1), points)
    held = test.reshape(-1, 2)
    err = ((held - points[_nearest(held, points)]) ** 2).sum(-1)
    return float(err.sum() / test.shape[0])


def klt_error(train: torch.Tensor, test: torch.Tensor, bits: int) -> tuple[float, torch.Tensor]:
    """Held-out MSE per vector of KLT coding at ``bits`` per coordinate on average, and the allocation (d,).
    train / test: (N, d) unit vectors."""
    cov = train.T @ train / train.shape[0]
    variances, axes = torch.linalg.eigh(cov)
    z_train, z_test = train @ axes, test @ axes
    alloc = allocate_bits(variances, bits * train.shape[1])
    recon = z_train.mean(0).expand_as(z_test).clone()  # 0-bit coordinates decode to their mean
    for b in range(1, MAX_BITS + 1):
        cols = (alloc == b).nonzero().flatten()
        if cols.numel():
            boundaries, cents = _scalar_codebooks(z_train[:, cols].T, b)
            idx = torch.searchsorted(boundaries.double().contiguous(), z_test[:, cols].T.contiguous())
            recon[:, cols] = cents.double().gather(1, idx).T
    return float(((z_test - recon) ** 2).sum(-1).mean()), alloc


def screen_head(train: torch.Tensor, test: torch.Tensor, rotation: torch.Tensor, boundaries: torch.Tensor,
                centroids: torch.Tensor, bits: int) -> dict[str, float]:
    """Held-out relative MSE of each method for one head. train / test (N, d) vectors (keys already centred);
    rotation (d, d), boundaries / centroids: the served codebook for ``bits``."""
    from vllm_turboquant.reference import quantize

    a, t = unit(train.double()), unit(test.double())
    codes, _, y = quantize(t.unsqueeze(1), rotation.unsqueeze(0), boundaries.unsqueeze(0))
    return {"served": float(((y[:, 0] - centroids.double()[codes[:, 0]]) ** 2).sum(-1).mean()),
            "vq2": vq2_error(a @ rotation.double().T, y[:, 0], centroids.double()),
            "klt": klt_error(a, t, bits)[0]}


def screen_model(keys: list[torch.Tensor], values: list[torch.Tensor], bits_list: list[int], *, seed: int = 0,
                 chunk: int | None = None, skip: int | None = None, progress: bool = True) -> list[dict]:
    """One row per (kind, bits, layer, head): held-out MSE of every method. keys / values: per layer (N, H, d)
    as ``capture_kv`` returns them; chunks of ``chunk`` tokens, the first ``skip`` of each left out, the first
    half of the chunks fit, the rest is held out."""
    from tqdm import tqdm

    from vllm_turboquant.calibrate import CHUNK, SKIP
    from vllm_turboquant.presets import Preset
    from vllm_turboquant.registry import calibrate

    chunk, skip = chunk or CHUNK, SKIP if skip is None else skip
    n = keys[0].shape[0]
    pos = torch.arange(n)
    n_chunks = (n + chunk - 1) // chunk
    if n_chunks < 2:
        raise ValueError(f"need at least two chunks of {chunk} tokens to hold one out, got {n} tokens")
    fit = (pos % chunk >= skip) & (pos < chunk * (n_chunks // 2))
    held = (pos % chunk >= skip) & (pos >= chunk * (n_chunks // 2))
    rows, registries = [], {}  # bits -> the served tables (keys and values), fitted once per width
    work = [(kind, b) for kind in ("key", "value") for b in bits_list]
    for kind, b in tqdm(work, desc="screening", unit="kind x bits", disable=not progress):
        if b not in registries:
            preset = Preset(f"screen-k{b}v{b}", b, b, description="evals.screen")  # not registered: not servable
            registries[b] = calibrate([k[fit] for k in keys], [v[fit] for v in values], preset, seed=seed)
        for layer in range(len(keys)):
            t = registries[b].layer(layer)
            x = keys[layer] - t.key_mean if kind == "key" else values[layer]
            x_fit, x_held = x[fit], x[held]
            for h in range(x.shape[1]):
                errs = screen_head(x_fit[:, h], x_held[:, h], getattr(t, f"{kind}_rotation")[h],
                                   getattr(t, f"{kind}_boundaries")[h], getattr(t, f"{kind}_centroids")[h], b)
                rows.append({"kind": kind, "bits": b, "layer": layer, "head": h, **errs})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (kind, bits): mean MSE of each method over heads; for each lever the ratio of means to ``served``,
    and its worst and best per-head ratio."""
    out = []
    for kind, b in sorted({(r["kind"], r["bits"]) for r in rows}, key=lambda kb: (kb[0] != "key", kb[1])):
        group = [r for r in rows if r["kind"] == kind and r["bits"] == b]
        s = {"kind": kind, "bits": b, "heads": len(group)}
        for m in METHODS:
            s[m] = sum(r[m] for r in group) / len(group)
        for m in METHODS[1:]:
            ratios = [r[m] / r["served"] for r in group]
            s[f"{m}_ratio"] = s[m] / s["served"]
            s[f"{m}_worst"], s[f"{m}_best"] = max(ratios), min(ratios)
        out.append(s)
    return out


def render(model: str, summary: list[dict], meta: dict) -> str:
    lines = [f"# Encoder lever screen: {model}", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}). Wall time "
             f"{meta['seconds']:.0f} s; machine load (1/5/15-min averages) {meta['load'][0]} at the start, "
             f"{meta['load'][1]} at the end.", "",
             f"- K/V captured from `{model}` on the automatic calibration's text ({meta['tokens']} tokens in "
             f"chunks of {meta['chunk']}, the first {meta['skip']} of each left out); the first half of the "
             "chunks fits every method, the second half is held out.",
             "- Cells: held-out relative MSE E‖u − û‖² of the unit vectors (keys centred by the fitted key "
             "mean), mean over every (layer, KV head); for a lever, its ratio to `served` and the worst / best "
             "head's ratio. Below 1 is better than what is served, at the same bytes.",
             "- `served`: seeded Haar rotation + one fitted Lloyd-Max codebook per head (the plain presets). "
             "`vq2`: a fitted 2-D codebook on pairs of rotated coordinates. `klt`: the head's principal axes "
             "with bits allocated over them by reverse water-filling (at most 4 per coordinate) and a codebook "
             "per coordinate (`evals/screen.py`).",
             "- ≈ bits: the high-rate rule, a ratio r is worth −½·log2 r bits per coordinate.", "",
             "| kind | bits | heads | `served` | `vq2` (ratio; worst / best head) | ≈ bits | "
             "`klt` (ratio; worst / best head) | ≈ bits |",
             "|---|---:|---:|---:|---|---:|---|---:|"]
    for s in summary:
        cells = []
        for m in METHODS[1:]:
            r = s[f"{m}_ratio"]
            cells += [f"{s[m]:.4f} ({r:.2f}; {s[f'{m}_worst']:.2f} / {s[f'{m}_best']:.2f})",
                      f"{-0.5 * math.log2(r):+.2f}"]
        lines.append(f"| {s['kind']} | {s['bits']} | {s['heads']} | {s['served']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())  # 1/5/15-min load averages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.screen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="an eval model name (smollm2, gemma3) or a local folder")
    ap.add_argument("--bits", default="1,2,3", help="bits per coordinate to screen, comma-separated, 1..4 "
                    "(default 1,2,3: the plain presets' value and key widths)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens to capture, at least two chunks of 512 "
                    "(default: the automatic calibration's 4096)")
    ap.add_argument("--out", default=None, help="report path (default evals/results/levers/screen_MODEL.md)")
    args = ap.parse_args(argv)
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        ap.error(f"--bits {args.bits!r}: comma-separated integers, accepted 1..{MAX_BITS}")
    if not bits or any(not 1 <= b <= MAX_BITS for b in bits):
        ap.error(f"--bits {args.bits!r}: accepted 1..{MAX_BITS}")

    from evals.paths import REPO, portable_text
    from evals.perplexity import resolve_model
    from vllm_turboquant.calibrate import AUTO_TOKENS, CHUNK, SKIP, builtin_text, capture_kv

    if args.tokens is not None and args.tokens < 2 * CHUNK:
        ap.error(f"--tokens {args.tokens}: at least {2 * CHUNK} (one chunk of {CHUNK} to fit, one held out)")

    start, load = time.perf_counter(), [_load()]
    name, path = resolve_model(args.model)
    tokens = args.tokens or AUTO_TOKENS
    keys, values = capture_kv(path, builtin_text(), tokens, device="cpu")
    rows = screen_model(keys, values, bits)
    out = Path(args.out) if args.out else REPO / "evals" / "results" / "levers" / f"screen_{name}.md"
    command = " ".join(["python -m evals.screen", *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": portable_text(command), "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
            "tokens": tokens,
            "chunk": CHUNK, "skip": SKIP, "seconds": time.perf_counter() - start,
            "load": load + [_load()]}
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    out.write_text(render(name, summary, meta), encoding="utf-8")
    # the raw rows beside the report, as every stored report has them (``python -m evals.index`` lists it)
    record = {"kind": "screen", "model": name, "meta": meta, "summary": summary, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"[evals.screen] wrote {out} and {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
