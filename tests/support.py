"""What the tests share (one module; no test module imports another).

* tiny random-weight models built at test time (no hub): ``build_llama`` (any head_dim, GQA or MQA)
  and ``build_gemma3`` (sliding-window layers), each with an offline word-level tokenizer (``w0 w1 ...``);
* tables: ``registry_tables`` (the data-oblivious registry's) and ``jittered_tables`` (per-head
  distinct codebooks, a QJL matrix and a key mean, for the kernels);
* paged caches: ``make_paged``, ``paged_setup``, ``filled_cache``, ``slots_of``, ``strided_like``;
* references and checks: ``dense_decode``, ``rel_err``, ``assert_slots_match``;
* ``vllm033_root``: vLLM 0.33's Python sources, fetched once into the cache folder;
* ``DEVICE`` (CUDA when available and the Triton interpreter is off, else CPU), ``SKETCHED``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from vllm_turboquant import reference as R
from vllm_turboquant.cache import cache_dir
from vllm_turboquant.codebook import get_codebook
from vllm_turboquant.layout import slot_layout, unpack_slots
from vllm_turboquant.presets import Preset, get_preset
from vllm_turboquant.registry import CodebookRegistry, LayerTables

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("0", "false", "off", "")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")

#: Attention outputs of the Triton kernels against the float64 reference (rel err = max |got - want| / max |want|):
#: every operand fp32-accurate -- scores and value products as hi + lo fp16 pieces (``kernels.common.precise_mma``,
#: ``kernels.tile.weighted_mma``), 2**-22 each -- so the measured worst case is ~2e-6 (decode and compressed
#: prefill, head_dim 64-256); 2e-5 leaves a margin. One single-fp16 product in the value path (2**-11) fails it.
ATTN_TOL = 2e-5
#: Where single fp16 operands remain: prefill whose chunk attends its own K/V (``compressed_chunk=False``: the
#: chunk's rotated values are one fp16 operand each, 2**-11 relative), and caches written by the kernels (a code
#: within rounding of a cell boundary may flip: ``assert_slots_match``). Measured worst 1.6e-3 with fp16 scores too
#: (``benchmarks/operand_accuracy.py``); a real bug (a wrong code, norm, mask, copy or merge) moves outputs >= 1e-2.
OPERAND_TOL = 4e-3

#: A sketch on top of 3-bit codes, m = 0.75 d (not a power of two), variance-optimal lambda.
SKETCHED = Preset("test_k3v3_qjl075", 3, 3, qjl_ratio=0.75, qjl_scale="optimal")


def jittered_tables(preset, d: int, H: int, *, mean_scale: float = 0.5, seed: int = 0) -> LayerTables:
    """Seeded rotations, the shipped codebooks of preset's bit widths (per head, jittered so that
    heads differ), a random QJL matrix and a random key mean; works for presets not in PRESETS."""
    preset = get_preset(preset)
    base = CodebookRegistry.default("turboquant3", d, 1, H, seed=seed).layer(0)
    g = torch.Generator().manual_seed(1000 + seed)

    def per_head(bits):
        b, c = get_codebook(d, bits).tensors()
        jitter = 1.0 + 0.05 * torch.rand(H, 1, generator=g)  # per-head tables, still sorted
        return b.expand(H, -1) * jitter, c.expand(H, -1) * jitter

    kb, kc = per_head(preset.key_bits)
    vb, vc = per_head(preset.value_bits)
    return dataclasses.replace(
        base, qjl=torch.randn(H, preset.qjl_dim(d), d, generator=g),
        key_boundaries=kb.contiguous(), key_centroids=kc.contiguous(),
        value_boundaries=vb.contiguous(), value_centroids=vc.contiguous(),
        key_mean=torch.randn(H, d, generator=g) * mean_scale,
    ).to(DEVICE)


def paged_setup(lens, block_size, H, layout, seed=0):
    """An empty cache with a shuffled block table giving every sequence enough blocks."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    per_seq = max(1, -(-max(lens) // block_size))
    num_blocks = B * per_seq + 3
    cache = torch.zeros(num_blocks, block_size, H, layout.slot_bytes, dtype=torch.uint8, device=DEVICE)
    block_table = torch.randperm(num_blocks, generator=g)[:B * per_seq].reshape(B, per_seq).int().to(DEVICE)
    return cache, block_table


def slots_of(block_table, b, positions, block_size):
    return block_table[b, positions // block_size].long() * block_size + positions % block_size


def strided_like(cache, kind="vllm"):
    """A copy of cache [num_blocks, block_size, H, slot_bytes] (same logical bytes) in other memory.

    "vllm": vLLM's block-head-token cache, allocated [num_blocks, H, block_size, slot_bytes]
    and permuted; "padded": slots padded to slot_bytes + 6 bytes and blocks by one more
    slot, with a storage offset (a view into a larger allocation).
    """
    nb, bs, H, sb = cache.shape
    if kind == "vllm":
        out = torch.zeros(nb, H, bs, sb, dtype=torch.uint8, device=cache.device).permute(0, 2, 1, 3)
    else:
        big = torch.zeros(nb + 1, bs * H + 1, sb + 6, dtype=torch.uint8, device=cache.device)
        out = big[1:, 1:].unflatten(1, (bs, H))[..., 3:3 + sb]
        assert out.storage_offset() > 0
    assert out.stride(-1) == 1 and not out.is_contiguous()
    return out.copy_(cache)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


def registry_tables(preset, d, H, key_mean=False):
    """The data-oblivious registry's tables (seed 3) of one layer, with a random key mean if asked."""
    t = CodebookRegistry.default(preset, d, 1, H, seed=3).layer(0)
    if key_mean:
        t = dataclasses.replace(t, key_mean=torch.randn(H, d) * 2)
    return t


def make_paged(preset, d, H, seq_lens, block_size, tables, num_blocks=None):
    """A cache with random tokens written through a random block table; returns (cache, block_table, K, V)."""
    B = len(seq_lens)
    max_blocks = max(1, -(-max(seq_lens) // block_size))
    num_blocks = num_blocks or B * max_blocks + 3
    cache = torch.zeros(num_blocks, block_size, H, slot_layout(preset, d).slot_bytes, dtype=torch.uint8)
    block_table = torch.randperm(num_blocks)[: B * max_blocks].reshape(B, max_blocks).int()
    keys, values = [], []
    for b, L in enumerate(seq_lens):
        k = torch.randn(L, H, d) * 2 + torch.randn(1, H, d)  # an offset, as real keys have
        v = torch.randn(L, H, d)
        pos = torch.arange(L)
        R.write_cache(cache, (block_table[b, pos // block_size] * block_size + pos % block_size).long(), k, v,
                      tables, preset)
        keys.append(k), values.append(v)
    return cache, block_table, keys, values


def dense_decode(q, cache, block_table, seq_lens, tables, preset, scale, window=None):
    lay = slot_layout(preset, q.shape[-1])
    outs = []
    for b, L in enumerate(seq_lens):
        k, v = R.dequantize(unpack_slots(R.gather_slots(cache, block_table[b:b + 1], L)[0], lay), tables, preset)
        outs.append(R.dense_attention(q[b:b + 1].double(), k.double(), v.double(), scale,
                                      torch.tensor([L - 1]), window).float())
    return torch.cat(outs)


def filled_cache(preset, d, H, lens, block_size, tables, seed=0, writer=None):
    """A paged cache holding lens[b] random tokens per sequence (keys offset by the table's key mean),
    written by ``writer`` (default: the reference's write_cache). Returns (cache, block_table, keys, values)."""
    from vllm_turboquant import reference as ref

    writer = writer or ref.write_cache
    cache, block_table = paged_setup(lens, block_size, H, slot_layout(preset, d), seed)
    g = torch.Generator().manual_seed(seed + 1)
    keys, values = [], []
    for b, n in enumerate(lens):
        key = (torch.randn(n, H, d, generator=g) + tables.key_mean.cpu()).to(DEVICE)
        value = torch.randn(n, H, d, generator=g).to(DEVICE)
        writer(cache, slots_of(block_table, b, torch.arange(n, device=DEVICE), block_size), key, value, tables,
               preset)
        keys.append(key)
        values.append(value)
    return cache, block_table, keys, values


def assert_slots_match(got, want, key, value, tables, preset, layout):
    """Slots (N, H, bytes) must be identical except where a coordinate is within rounding of a boundary.

    A key code that flips may change the residual, so that slot's QJL signs and gamma
    are excused; every other sign flip needs |S r| within rounding of 0. At most
    0.1% of coordinates (and never more than a handful) may flip.
    """
    if torch.equal(got, want):
        return
    fg, fw = unpack_slots(got.cpu(), layout), unpack_slots(want.cpu(), layout)
    t = tables.to("cpu")
    # norms are stored as fp16 of sqrt(n): one step there is up to 2^-9 in n
    torch.testing.assert_close(fg.key_norm, fw.key_norm, rtol=2.5e-3, atol=0)
    torch.testing.assert_close(fg.value_norm, fw.value_norm, rtol=2.5e-3, atol=0)

    def rotated(x, rot):  # float64 unit vectors, rotated
        x = x.double()
        n = x.norm(dim=-1, keepdim=True)
        return torch.einsum("nhd,hed->nhe", torch.where(n > 0, x / n.clamp_min(1e-300), 0.0), rot.double())

    def check_codes(codes_g, codes_w, y, boundaries):
        flips = codes_g != codes_w
        if flips.any():
            dist = (y.unsqueeze(-1) - boundaries.double()[None, :, None, :]).abs().amin(-1)
            assert (dist[flips] < 1e-5).all(), f"codes differ away from a boundary: {dist[flips].max():.3g}"
        return flips

    yk = rotated(key.cpu().float() - t.key_mean, t.key_rotation)
    key_flips = check_codes(fg.key_codes, fw.key_codes, yk, t.key_boundaries)
    value_flips = check_codes(fg.value_codes, fw.value_codes, rotated(value.cpu(), t.value_rotation),
                              t.value_boundaries)
    flips = int(key_flips.sum() + value_flips.sum())
    assert flips <= max(3, key_flips.numel() // 500), f"{flips} code flips"
    if layout.has_qjl:
        excused = key_flips.any(-1)
        torch.testing.assert_close(fg.key_gamma[~excused], fw.key_gamma[~excused], rtol=1e-3, atol=1e-4)
        r = yk - R.lookup(fw.key_codes, t.key_centroids).double()
        proj = torch.einsum("nhd,hmd->nhm", r, t.qjl.double())
        bad = (fg.key_signs != fw.key_signs) & ~excused.unsqueeze(-1)
        assert (proj[bad].abs() < 1e-5).all(), "QJL signs differ away from 0"


def vllm033_root() -> Path | None:
    if os.environ.get("VLLM033_SRC"):
        return Path(os.environ["VLLM033_SRC"])
    target = cache_dir("vllm-0.33.0-src")
    if (target / "vllm" / "config" / "cache.py").exists():
        return target / "vllm"
    wheels = cache_dir("wheels", "vllm-0.33.0")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                           "-d", str(wheels), "vllm==0.33.0"], capture_output=True, text=True, timeout=600)
    found = sorted(wheels.glob("vllm-0.33.0-*.whl"))
    if done.returncode != 0 or not found:
        return None
    with zipfile.ZipFile(found[0]) as z:  # only the Python sources
        z.extractall(target, [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    found[0].unlink()
    return target / "vllm"


# -- tiny models --------------------------------------------------------------------------------

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(path))


def build_llama(path: Path, head_dim: int = 64, num_heads: int = 4, num_kv_heads: int = 2, layers: int = 4,
                vocab: int = 512, seed: int = 0, max_positions: int = 4096) -> Path:
    """A bf16 Llama with ``layers`` layers; returns its folder (reused when present)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    _tokenizer(path, vocab)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=num_heads * head_dim, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      head_dim=head_dim, max_position_embeddings=max_positions, initializer_range=0.08,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(path))
    return path


def build_gemma3(path: Path, head_dim: int = 256, layers: int = 6, sliding_window: int = 16, vocab: int = 512,
                 seed: int = 0) -> Path:
    """A bf16 Gemma-3 text model: 1 KV head, sliding-window layers (every 6th layer global)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = Path(path)
    if (path / "config.json").exists():
        return path
    _tokenizer(path, vocab)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                           sliding_window=sliding_window, max_position_embeddings=4096, initializer_range=0.08,
                           bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(path))
    return path


# -- KV capacity, as vLLM counts it ---------------------------------------------------------------------

def exact_copy_blocks(page_bytes: int, block_size: int, num_kv_heads: int, head_dim: int, dtype_bytes: int,
                      sink: int, window: int) -> tuple[int, int]:
    """(block size, blocks per running request) of a packed layer's exact-copy companion: the largest divisor
    of the packed block size whose rows (K and V, model dtype) fit in one packed page; the sink's blocks plus
    those of a W-token window that may start mid-block."""
    row = num_kv_heads * 2 * head_dim * dtype_bytes
    bs_x = max(d for d in range(1, block_size + 1) if block_size % d == 0 and d * row <= page_bytes)
    return bs_x, -(-sink // bs_x) + -(-(window - 1) // bs_x) + 1


def packed_pages_per_request(preset, max_len: int, block_size: int, num_kv_heads: int, head_dim: int,
                             sink: int, window: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """(page bytes, pages a request of max_len tokens holds per packed layer, exact copies included)."""
    page = block_size * num_kv_heads * slot_layout(preset, head_dim).slot_bytes
    pages = -(-max_len // block_size)
    if sink + window:
        pages += exact_copy_blocks(page, block_size, num_kv_heads, head_dim, dtype_bytes, sink, window)[1]
    return page, pages


def build_qwen2(path: Path, head_dim: int = 128, num_heads: int = 8, num_kv_heads: int = 2, layers: int = 2,
                vocab: int = 512, seed: int = 0, max_positions: int = 4096, bias_scale: float = 0.5) -> Path:
    """A bf16 Qwen2 (the architecture of Qwen2.5: q/k/v projections with bias, GQA, tied embeddings), with
    head_dim 128 and 8 query / 2 KV heads by default; returns its folder (reused when present).

    The q/k/v biases are drawn at ``bias_scale`` (transformers initialises them to zero), so keys carry the
    per-head offset real Qwen2 models have. The tokenizer is Qwen2's own class (transformers loads no other for
    a qwen2 model) over the 256 byte-level symbols: one token per character ("w12" is 3 tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    eos = _qwen2_tokenizer(path)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=num_heads * head_dim, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_positions, initializer_range=0.08, tie_word_embeddings=True,
                      use_sliding_window=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, bias_scale)
    model.to(torch.bfloat16).save_pretrained(str(path))
    return path


def _qwen2_tokenizer(path: Path) -> int:
    """A byte-level Qwen2Tokenizer (no merges: one token per byte) saved to ``path``; returns its
    <|endoftext|> id (256)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(str(path))
    return vocab["<|endoftext|>"]


# ---------------------------------------------------------------------------
# kernel test matrices: the Triton tests (tests/kernels/test_kernels*.py) and the compiled CPU ops'
# (tests/kernels/test_cpu_ops.py, which drops the split counts) run the same cases
# ---------------------------------------------------------------------------

KERNEL_DECODE_CASES = [
    # preset,            d,  H, G, block, seq_lens,          window, splits
    ("turboquant3",     64,  2, 4, 16, [0, 1, 37, 100],    None,   2),  # empty, single token, mid-block
    ("turboquant4_qjl", 128, 1, 8, 32, [70, 5],            20,     3),  # MQA, window, more splits than tiles
    ("turboquant2_qjl", 256, 2, 1, 64, [90, 64],           None,   1),  # MHA, a block-aligned length
    ("turboquant3",     64,  3, 3, 16, [33, 17],           8,      2),  # GQA 3 (SmolLM2 shape)
    ("turboquant4",     128, 2, 4, 64, [129, 1, 0],        64,     4),
    (SKETCHED,          64,  1, 16, 32, [50, 31],          None,   2),  # m = 48, optimal lambda
    ("turboquant3_qjl", 256, 1, 4, 16, [40],               1,      2),  # window of one token
    ("turboquant2",     128, 2, 8, 16, [200],              100,    3),
    ("turboquant4_qjl", 96,  2, 3, 16, [37, 0, 5],         9,      2),  # head_dim not a power of two
]

KERNEL_PREFILL_CASES = [
    # preset,            d,  H, G, block, seq_lens,     query_lens,  window, compressed_chunk
    ("turboquant3",     64,  2, 4, 16, [40, 20, 5],  [10, 20, 0], None, False),  # prefix, fresh, idle seq
    ("turboquant4_qjl", 128, 1, 8, 32, [70, 9],      [12, 3],     20,   False),  # MQA + window
    ("turboquant4_qjl", 128, 1, 8, 32, [70, 9],      [12, 3],     20,   True),
    ("turboquant2_qjl", 256, 2, 1, 64, [50],         [7],         None, True),
    ("turboquant3",     64,  3, 3, 16, [33, 17],     [30, 1],     8,    False),  # GQA 3, decode-like row
    ("turboquant4",     256, 1, 4, 32, [25, 70],     [25, 5],     None, False),  # full prefill + chunk
    (SKETCHED,          128, 2, 2, 64, [100],        [40],        16,   False),
    ("turboquant3_qjl", 96,  2, 2, 16, [30, 12],     [6, 12],     7,    True),   # head_dim 96
]

PROTECTED_DECODE_CASES = [
    # preset,           d,  H, G, block, lens,                S, W,  sliding, splits, copy dtype
    ("turboquant3",     64, 2, 2, 16, [0, 1, 6, 7, 40],       2, 4,  None,    2, torch.float32),
    ("turboquant3_qjl", 64, 2, 4, 16, [5, 37],                4, 0,  None,    2, torch.bfloat16),
    ("turboquant3_qjl", 64, 1, 3, 16, [20, 50],               0, 8,  12,      2, torch.float32),
    ("turboquant4",     80, 2, 2, 32, [45, 10],               3, 5,  16,      3, torch.bfloat16),
    (SKETCHED,          64, 1, 4, 16, [33],                   1, 40, None,    1, torch.float32),
]

PROTECTED_PREFILL_CASES = [
    # preset,           d,  H, G, block, lens,     query_lens, S, W,  sliding, compressed, copy dtype
    ("turboquant3",     64, 2, 2, 16, [30, 9],  [6, 9],     2, 4,  None,    False, torch.float32),
    ("turboquant3",     64, 2, 2, 16, [30, 9],  [6, 9],     2, 4,  None,    True,  torch.bfloat16),
    ("turboquant3_qjl", 64, 2, 4, 16, [40, 12], [10, 12],   4, 0,  16,      True,  torch.float32),
    ("turboquant3_qjl", 64, 1, 2, 16, [33, 3],  [5, 3],     0, 8,  None,    False, torch.bfloat16),
    ("turboquant4",     80, 2, 2, 16, [20, 6],  [4, 6],     3, 30, 10,      True,  torch.float32),
    (SKETCHED,          64, 1, 4, 16, [26],     [7],        1, 3,  None,    True,  torch.float32),
]
