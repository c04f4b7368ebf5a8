"""What every TurboQuant kernel shares: constants, slot-field access, host-side argument checks.

A slot is a run of ``SLOT_BYTES`` uint8 (see ``vllm_turboquant.layout``); every field offset and
bit width arrives as a ``tl.constexpr`` from ``CacheFormat.kernel_constants()``, so nothing here
knows where a field lives. ``slot_constants`` adds what depends on the cache tensor too: how the
slot bases are aligned (``SLOT_ALIGN``) and, from that and the layout's offsets, the widest word
each code field can be read in (``KEY_WORD`` / ``SIGN_WORD`` / ``VALUE_WORD``: 32, 16 or 8 bits).

Device helpers:

* ``load_codes`` / ``store_codes``: b-bit little-endian code fields (b = 1 for QJL signs), read as
  words and unpacked with shifts; ``centroid_values`` (float32) / ``read_signs``
  decode them for a dot.
* ``load_norm`` / ``store_norm``: the one place a stored norm (key n, value n_v) is decoded or
  encoded (``layout.decode_norm`` / ``encode_norm``: fp16 of √n). ``load_fp16`` / ``store_fp16``: other
  fp16 fields (QJL γ).
* ``lookup``: codebook decode, ``LOOKUP="gather"`` (table in registers, ``tl.gather``) or
  ``"load"`` (a gather load from the L1-resident table in global memory).
* ``bucketize``: codes = number of boundaries strictly below y (``torch.searchsorted``).
* ``pow2_scale``: a row's power-of-two scale σ (and 1/σ) from its max |x|, so that x / σ is an fp16
  operand whatever x (``row_scale``: σ, 1/σ of the rows of a tile).
* ``split_operand``: a float32 tile as two fp16 operands (hi + lo); ``fp32_dot``: an fp32-accurate product
  from three fp16 MMAs of such pieces (rotations; ``tile.scores`` does the same for the scores);
  ``unrotate_store``: out = Πᵀ x for a tile of rotated rows, in column chunks.

Paged caches are uint8 ``[num_blocks, block_size, H, slot_bytes]`` with *any* strides for the
first three dims (the last must be 1): vLLM allocates ``[num_blocks, H, block_size, slot_bytes]``
and the backend passes ``kv_cache.permute(0, 2, 1, 3)``. Kernels address the slot of (block,
offset, head) as ``cache + block * stride_cb + offset * stride_cs + head * stride_ch`` in 64-bit
arithmetic.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import CacheFormat, cache_format
from ..protected import is_active

LOG2E = 1.4426950408889634
#: Tensor-core operand type of the attention dots (scores and values; fp32 accumulation). fp16, not bf16:
#: every operand is bounded far inside fp16's range whatever the inputs -- centroids |c| < 1, signs ±1,
#: softmax weights in [0, 1] times w / max w of the tile, and every raw vector (rotated queries, exact
#: key / value rows, a prefill chunk's fresh K / V) divided by its row's power-of-two scale
#: (``pow2_scale``: max |x| / σ in [1, 2)), σ multiplied back in fp32 -- and fp16 keeps 3 more mantissa
#: bits. Same MMA rate as bf16 on sm_80+; the Triton interpreter computes fp16 dots correctly (not bf16 ones).
#: Score operands that are not exact in fp16 (rotated queries, centroids) go in as two pieces
#: (``split_operand``): a score's error is relative to the score, and scores grow with the key norm.
OPERAND_DTYPE = tl.constexpr(tl.float16)
#: The same type for operands prepared on the host side (rotated fresh values; rotated queries as hi + lo pieces).
OPERAND_TORCH_DTYPE = torch.float16
#: How codebook entries are looked up: "gather" (register table + tl.gather) or "load".
DEFAULT_LOOKUP = "gather"
LOOKUP_MODES = ("gather", "load")


# ---------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------

def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


#: Environment variable with launch-configuration overrides per kernel family, as JSON:
#: ``{"prefill": {"BLOCK_R": 64}, "store": {"BLOCK_T": 32}, "decode": {...}}`` (keys of ``prefill_config``,
#: ``store_config``, ``decode_config``). For tuning on a new GPU, and for runs under ``TRITON_INTERPRET=1``,
#: where a program costs per operation, not per element, so larger tiles run several times faster with the
#: same maths (only the order of the fp32 online-softmax merges changes). A ``config`` argument wins over it.
CONFIG_ENV = "VLLM_TURBOQUANT_TRITON_CONFIG"
CONFIG_FAMILIES = ("store", "decode", "prefill")


@functools.lru_cache(maxsize=8)
def env_overrides(text: str) -> dict[str, dict]:
    """The ``CONFIG_ENV`` overrides in ``text``, parsed: ``{family: {setting: value}}``. Raises ValueError
    (naming the variable) for text that is not a JSON object of objects keyed by ``CONFIG_FAMILIES``."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{CONFIG_ENV}={text!r} is not JSON: {e}") from e
    if not isinstance(parsed, dict) or any(k not in CONFIG_FAMILIES or not isinstance(v, dict)
                                           for k, v in parsed.items()):
        raise ValueError(f"{CONFIG_ENV}={text!r}: expected an object of objects keyed by "
                         f"{', '.join(CONFIG_FAMILIES)}")
    return parsed


def launch_config(family: str, base: dict, config: dict | None = None) -> dict:
    """``base`` (a ``*_config`` result), updated by the ``CONFIG_ENV`` overrides of ``family`` and then by
    ``config``. Raises ValueError for malformed overrides or a key ``base`` does not have (naming its keys)."""
    cfg = dict(base)
    for source, over in ((CONFIG_ENV, env_overrides(os.environ.get(CONFIG_ENV) or "{}").get(family, {})),
                         ("config", config or {})):
        unknown = sorted(set(over) - set(base))
        if unknown:
            raise ValueError(f"{source}: {family} has no launch setting {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(base))}")
        cfg.update(over)
    return cfg


def check_launch_overrides(text: str | None) -> None:
    """Check the ``VLLM_TURBOQUANT_TRITON_CONFIG`` text (``CONFIG_ENV``; None or empty = no overrides)
    before an engine starts, so a typo is refused at start-up rather than at the first launch of a kernel:
    every family must be one of ``store`` / ``decode`` / ``prefill``, every setting one of that family's
    (``store_config``, ``decode_config``, ``prefill_config``), every value a positive integer and every
    ``BLOCK_*`` a power of two (``tl.arange`` needs one). Raises ValueError naming the variable, the bad
    entry and the accepted values."""
    from .decode import decode_config  # (these modules import this one)
    from .prefill import prefill_config
    from .store import store_config

    bases = {"store": store_config(64), "decode": decode_config(64), "prefill": prefill_config(64, 1)}
    for family, over in env_overrides(text or "{}").items():
        for key, value in over.items():
            if key not in bases[family]:
                raise ValueError(f"{CONFIG_ENV}: {family} has no launch setting {key!r}; accepted: "
                                 f"{', '.join(sorted(bases[family]))}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{CONFIG_ENV}: {family}.{key}={value!r}; accepted: a positive integer")
            if key.startswith("BLOCK_") and value & (value - 1):
                raise ValueError(f"{CONFIG_ENV}: {family}.{key}={value}; accepted: a power of two (16, 32, 64, ...)")


def check_lookup(mode: str) -> str:
    if mode not in LOOKUP_MODES:
        raise ValueError(f"lookup_mode={mode!r}; accepted: {', '.join(LOOKUP_MODES)}")
    return mode


def slot_alignment(cache: torch.Tensor) -> int:
    """Bytes (4, 2 or 1) that divide the cache's data pointer and its block / token / head strides:
    the alignment of every slot base."""
    align = 4
    for v in (cache.data_ptr(), *cache.stride()[:3]):
        while v % align:
            align //= 2
    return align


def field_word_bits(offset: int, nbytes: int, bits: int, block: int, align: int, slot_bytes: int) -> int:
    """Bits of the words ``load_codes`` reads a code field in: the widest of 32 / 16 / 8 whose loads are
    aligned (slot base ``align`` and field ``offset``), end inside the slot, and hold at most ``block``
    codes (``bits`` per code; a 3-bit field is read in groups of three words holding one code per bit
    of a word)."""
    for nb in (4, 2, 1):
        per = nb * 8 // bits if (nb * 8) % bits == 0 else nb * 8
        if nb <= align and offset % nb == 0 and offset + -(-nbytes // nb) * nb <= slot_bytes and per <= block:
            return nb * 8
    raise ValueError(f"a {bits}-bit field of {nbytes} bytes cannot be read in tiles of {block} codes")


def slot_constants(fmt: CacheFormat, align: int) -> dict:
    """Constexpr kwargs of the kernels for slots whose bases are ``align``-aligned: the layout
    (``CacheFormat.kernel_constants``: offsets, bit widths, BLOCK_D, BLOCK_QJL), ``SLOT_ALIGN`` and the
    word width of each code field (``field_word_bits``). Computed once per (format, alignment): every layer
    of every step asks."""
    return dict(_slot_constants(fmt, align))


@functools.lru_cache(maxsize=64)
def _slot_constants(fmt: CacheFormat, align: int) -> tuple:
    lay = fmt.layout
    kw = fmt.kernel_constants()
    if any(off % 2 for off in (lay.key_norm, lay.value_norm, lay.key_gamma)):
        raise ValueError(f"fp16 fields of {lay} are not 2-byte aligned")
    words = {
        "KEY_WORD": (lay.key_codes, lay.key_code_bytes, lay.key_bits, kw["BLOCK_D"]),
        "SIGN_WORD": (lay.key_signs, lay.sign_bytes, 1, kw["BLOCK_QJL"]),
        "VALUE_WORD": (lay.value_codes, lay.value_code_bytes, lay.value_bits, kw["BLOCK_D"]),
    }
    kw.update({name: field_word_bits(off, nbytes, bits, block, align, lay.slot_bytes) if nbytes else 8
               for name, (off, nbytes, bits, block) in words.items()})
    kw["SLOT_ALIGN"] = align
    return tuple(kw.items())


def cache_strides(cache: torch.Tensor, num_kv_heads: int | None, slot_bytes: int) -> tuple[int, int, int]:
    """Check a paged cache and return its (block, token, head) strides in bytes.

    ``cache`` must be uint8 ``[num_blocks, block_size, H, slot_bytes]`` (H == num_kv_heads
    unless that is None) whose last dim is contiguous (stride 1); the other strides are
    free (vLLM's ``[num_blocks, H, block_size, slot_bytes]`` cache permuted to this order
    is the usual case). Raises ValueError otherwise.
    """
    heads = "H" if num_kv_heads is None else str(num_kv_heads)
    want = f"uint8 [num_blocks, block_size, {heads}, {slot_bytes}] with stride 1 in the last dim"
    if (cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[3] != slot_bytes
            or (num_kv_heads is not None and cache.shape[2] != num_kv_heads)):
        raise ValueError(f"cache must be {want}, got {cache.dtype} {tuple(cache.shape)}")
    if cache.stride(3) != 1 and cache.shape[3] > 1:
        raise ValueError(f"cache must be {want}: got strides {tuple(cache.stride())} "
                         "(the bytes of a slot must be contiguous)")
    return cache.stride(0), cache.stride(1), cache.stride(2)


@dataclass(frozen=True)
class AttentionArgs:
    """What the attention launchers share, checked (``attention_setup``): the format, the constexpr kwargs
    (``slot_constants`` + LOOKUP + PROTECT), the cache's (block, token, head) strides, KV heads H, group G,
    and the protected-token kernel arguments (``protected_args``; dummies when PROTECT is off)."""

    fmt: CacheFormat
    constants: dict
    strides: tuple[int, int, int]
    num_kv_heads: int
    group: int
    protected: tuple


def attention_setup(query: torch.Tensor, cache: torch.Tensor, tables, fmt, protected, batch: int,
                    lookup_mode: str) -> AttentionArgs:
    """The argument checks the attention kernels share (ValueError on a bad cache, head counts, tables,
    protected tokens or lookup mode)."""
    _, Hq, D = query.shape
    fmt = cache_format(fmt, D)
    strides = cache_strides(cache, None, fmt.layout.slot_bytes)
    H = cache.shape[2]
    if H == 0 or Hq % H:
        raise ValueError(f"Hq={Hq} query heads must be a multiple of the cache's H={H} KV heads")
    check_tables(tables, cache.device)
    protect = protection(protected, H, D, cache.device, batch)
    constants = {**slot_constants(fmt, slot_alignment(cache)), "LOOKUP": check_lookup(lookup_mode), "PROTECT": protect}
    return AttentionArgs(fmt, constants, strides, H, Hq // H, protected_args(protected if protect else None, cache))


def protection(protected, num_kv_heads: int, head_dim: int, device: torch.device, batch: int = 0) -> bool:
    """Whether protected tokens are on (``protected`` given and S + W > 0), after ``check_protected``.

    When this is False the kernels compile the protected-token code out."""
    if not is_active(protected):
        return False
    check_protected(protected, num_kv_heads, head_dim, device, batch)
    return True


def protected_args(protected, dummy: torch.Tensor) -> tuple:
    """Kernel arguments for ``ProtectedTokens`` (dummies when None): the exact-copy cache, its block table,
    the table's row stride, the block size, the cache's (block, token, head) strides, sink and window."""
    if protected is None:
        return dummy, dummy, 0, 1, 0, 0, 0, 0, 0
    x, bt = protected.cache, protected.block_table
    return x, bt, bt.stride(0), x.shape[1], x.stride(0), x.stride(1), x.stride(2), protected.sink, protected.window


def check_protected(protected, num_kv_heads: int, head_dim: int, device: torch.device, batch: int = 0) -> None:
    """The exact-copy cache must be [blocks, block_size, num_kv_heads, 2 head_dim] float (bf16 / fp16 / fp32)
    with stride 1 in the last dim, its block table a 2-d int32 / int64 tensor with a row per sequence
    (>= ``batch``), both on ``device``; ValueError otherwise."""
    x, bt = protected.cache, protected.block_table
    want = f"[blocks, block_size, {num_kv_heads}, {2 * head_dim}] float with stride 1 in the last dim"
    if (x.dim() != 4 or tuple(x.shape[2:]) != (num_kv_heads, 2 * head_dim) or not x.is_floating_point()
            or x.stride(3) != 1 or x.shape[1] == 0):
        raise ValueError(f"protected.cache must be {want}, got {x.dtype} {tuple(x.shape)} strides {tuple(x.stride())}")
    if bt.dtype not in (torch.int32, torch.int64) or bt.dim() != 2 or bt.shape[0] < batch:
        raise ValueError(f"protected.block_table must be a 2-d int tensor with >= {batch} rows, got {bt.dtype} "
                         f"{tuple(bt.shape)}")
    if x.device != device or bt.device != device:
        raise ValueError(f"protected tokens live on {x.device} / {bt.device}, the cache on {device}")


def check_tables(tables, device: torch.device) -> None:
    if tables.key_rotation.device != device:
        raise ValueError(f"LayerTables live on {tables.key_rotation.device}, the cache on {device}: "
                         "move them with tables.to(device)")


# ---------------------------------------------------------------------------
# Device helpers: code fields
# ---------------------------------------------------------------------------

@triton.jit
def _load_words(slot_ptrs, mask, OFFSET: tl.constexpr, w, FIELD_BYTES: tl.constexpr, WORD: tl.constexpr):
    """Words ``w`` [W] of the field at OFFSET of slots [S] as uint32 [S, W] (words that start past the
    field read as 0; one that starts inside may run on into the next field -- ``field_word_bits`` keeps
    it inside the slot)."""
    start = w * (WORD // 8)
    ptrs = slot_ptrs[:, None] + (OFFSET + start)[None, :]
    ok = mask[:, None] & (start < FIELD_BYTES)[None, :]
    if WORD == 32:
        ptrs = ptrs.to(tl.pointer_type(tl.uint32))
    elif WORD == 16:
        ptrs = ptrs.to(tl.pointer_type(tl.uint16))
    return tl.load(ptrs, mask=ok, other=0).to(tl.uint32)


@triton.jit
def load_codes(slot_ptrs, mask, OFFSET: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr,
               WORD: tl.constexpr):
    """Codes [S, BLOCK] int32 of the BITS-bit field at OFFSET of slots ``slot_ptrs`` [S].

    Coordinate j sits at bits [j*BITS, (j+1)*BITS) of the field read as one little-endian integer
    (``layout.pack_bits``); j >= N and masked slots read as 0. The field is read in WORD-bit words
    (``field_word_bits``). When BITS divides WORD, a word holds WORD / BITS codes: one shift and
    mask per code. Otherwise (3 bits) WORD codes fill three words, and the code that straddles two
    words is joined from both (a funnel shift).
    """
    FIELD_BYTES: tl.constexpr = N * BITS // 8
    if WORD % BITS == 0:
        PER: tl.constexpr = WORD // BITS
        words = _load_words(slot_ptrs, mask, OFFSET, tl.arange(0, BLOCK // PER), FIELD_BYTES, WORD)
        shift = (tl.arange(0, PER) * BITS).to(tl.uint32)
        codes = (words[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    else:
        tl.static_assert(BITS == 3, "code fields are 1, 2, 3 or 4 bits")
        g = tl.arange(0, BLOCK // WORD) * 3
        w0 = _load_words(slot_ptrs, mask, OFFSET, g, FIELD_BYTES, WORD)[:, :, None]
        w1 = _load_words(slot_ptrs, mask, OFFSET, g + 1, FIELD_BYTES, WORD)[:, :, None]
        w2 = _load_words(slot_ptrs, mask, OFFSET, g + 2, FIELD_BYTES, WORD)[:, :, None]
        bit = tl.arange(0, WORD) * BITS
        first = (bit // WORD)[None, None, :]
        shift = (bit % WORD).to(tl.uint32)[None, None, :]
        lo = tl.where(first == 0, w0, tl.where(first == 1, w1, w2))
        hi = tl.where(first == 0, w1, w2)  # only a straddling code keeps bits of it
        codes = ((lo >> shift) | ((hi << 1) << (WORD - 1 - shift))) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, (codes.shape[0], BLOCK)).to(tl.int32)
    if BLOCK != N:
        codes = tl.where((tl.arange(0, BLOCK) < N)[None, :], codes, 0)
    return codes


@triton.jit
def store_codes(slot_ptrs, mask, codes, OFFSET: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr, c0,
                WORD: tl.constexpr):
    """Pack codes [S, C] (< 2**BITS) of coordinates c0 .. c0 + C - 1 into the BITS-bit field at OFFSET of
    slots [S] (``layout.pack_bits``: 8 codes fill BITS bytes); coordinates >= N are not written.
    A group is one uint8 / uint16 / uint32 store when the field's words are that wide, else BITS bytes."""
    S: tl.constexpr = codes.shape[0]
    C: tl.constexpr = codes.shape[1]
    groups = tl.reshape(codes.to(tl.uint32), (S, C // 8, 8))
    word = tl.sum(groups << (tl.arange(0, 8) * BITS).to(tl.uint32)[None, None, :], axis=2)  # disjoint bits
    g = tl.arange(0, C // 8)
    ok = mask[:, None] & (c0 + 8 * g < N)[None, :]
    ptrs = slot_ptrs[:, None] + (OFFSET + (c0 // 8 + g) * BITS)[None, :]
    if BITS == 1:
        tl.store(ptrs, word.to(tl.uint8), mask=ok)
    elif BITS == 2 and WORD >= 16:
        tl.store(ptrs.to(tl.pointer_type(tl.uint16)), word.to(tl.uint16), mask=ok)
    elif BITS == 4 and WORD >= 32:
        tl.store(ptrs.to(tl.pointer_type(tl.uint32)), word, mask=ok)
    else:
        k = tl.arange(0, 4)
        byte = (word[:, :, None] >> (k * 8).to(tl.uint32)[None, None, :]) & 0xFF
        tl.store(ptrs[:, :, None] + k[None, None, :], byte.to(tl.uint8),
                 mask=ok[:, :, None] & (k < BITS)[None, None, :])


@triton.jit
def load_table(table_ptr, BITS: tl.constexpr):
    """One head's codebook, 2**BITS float32 entries, into registers."""
    return tl.load(table_ptr + tl.arange(0, 1 << BITS))


@triton.jit
def lookup(table, table_ptr, codes, BITS: tl.constexpr, LOOKUP: tl.constexpr):
    """Centroids table[codes] for codes [S, D]; ``table`` is ``load_table(table_ptr, BITS)``."""
    if LOOKUP == "gather":
        rows = tl.broadcast_to(table[None, :], (codes.shape[0], 1 << BITS))
        return tl.gather(rows, codes, axis=1)
    else:
        return tl.load(table_ptr + codes)


@triton.jit
def centroid_values(slot_ptrs, mask, table, table_ptr, OFFSET: tl.constexpr, BITS: tl.constexpr,
                    N: tl.constexpr, BLOCK: tl.constexpr, WORD: tl.constexpr, LOOKUP: tl.constexpr):
    """Centroid values [S, BLOCK] float32 (the table's own values; 0 past N) of the code field at OFFSET:
    what ``reference._read_tokens`` decodes a code field to."""
    y = lookup(table, table_ptr, load_codes(slot_ptrs, mask, OFFSET, BITS, N, BLOCK, WORD), BITS, LOOKUP)
    if BLOCK != N:
        y = tl.where((tl.arange(0, BLOCK) < N)[None, :], y, 0.0)
    return y


@triton.jit
def read_signs(slot_ptrs, mask, OFFSET: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr, WORD: tl.constexpr):
    """QJL signs [S, BLOCK] as ±1 dot operands (bit set = +1); padding columns read -1 and meet S Π q = 0."""
    return (2 * load_codes(slot_ptrs, mask, OFFSET, 1, M, BLOCK, WORD) - 1).to(OPERAND_DTYPE)


@triton.jit
def bucketize(y, bnd_ptr, BITS: tl.constexpr):
    """Codes (int32, y's shape) = number of the 2**BITS - 1 boundaries at bnd_ptr strictly below y."""
    codes = tl.zeros(y.shape, dtype=tl.int32)
    for k in tl.static_range((1 << BITS) - 1):
        codes += (y > tl.load(bnd_ptr + k)).to(tl.int32)
    return codes


# ---------------------------------------------------------------------------
# Device helpers: fp16 fields and norms
# ---------------------------------------------------------------------------

@triton.jit
def load_fp16(ptrs, mask, ALIGN: tl.constexpr):
    """fp16 fields at byte pointers ``ptrs`` as float32 (masked -> 0): one 16-bit load when the
    slots are 2-byte aligned (ALIGN >= 2), else two byte loads."""
    if ALIGN >= 2:
        return tl.load(ptrs.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)
    else:
        lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(ptrs + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def store_fp16(ptrs, x, mask, ALIGN: tl.constexpr):
    """Store float32 x as fp16 (round to nearest even) at byte pointers ``ptrs`` (same shape)."""
    h = x.to(tl.float16)
    if ALIGN >= 2:
        tl.store(ptrs.to(tl.pointer_type(tl.float16)), h, mask=mask)
    else:
        bits = h.to(tl.uint16, bitcast=True)
        tl.store(ptrs, (bits & 0xFF).to(tl.uint8), mask=mask)
        tl.store(ptrs + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def load_norm(ptrs, mask, ALIGN: tl.constexpr):
    """Stored norms (key n, value n_v) at byte pointers ``ptrs`` as float32: the one place a norm field
    is decoded (``layout.decode_norm``: the field is fp16 √n, n = s², exact in float32)."""
    s = load_fp16(ptrs, mask, ALIGN)
    return s * s


@triton.jit
def store_norm(ptrs, n, mask, ALIGN: tl.constexpr):
    """Encode norms n >= 0 (float32) into their fields at ``ptrs``: the one place a norm is encoded
    (``layout.encode_norm``: fp16 of √n, saturated at 65504, round to nearest even)."""
    store_fp16(ptrs, tl.minimum(tl.sqrt_rn(n), 65504.0), mask, ALIGN)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE, to nearest even; to bf16 by hand (Triton's interpreter truncates
    float32 -> bf16, a GPU rounds: this gives both the GPU's bits)."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a tl.constexpr: its == is the one that works)
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


# ---------------------------------------------------------------------------
# Device helpers: rotations
# ---------------------------------------------------------------------------

@triton.jit
def pow2_scale(m):
    """(σ, 1/σ) for magnitudes m >= 0 (float32, any shape): σ the power of two with m / σ in [1, 2), exact
    reciprocals (integer exponent arithmetic: no division, no rounding). σ is clamped to [2**-126, 2**126]:
    m = 0 (or subnormal) gives 2**-126, so x / σ = 0; m >= 2**127 gives m / σ < 4."""
    e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF  # the biased exponent (m >= 0: no sign bit)
    e = tl.minimum(tl.maximum(e, 1), 253)
    return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def row_scale(x):
    """``pow2_scale`` of the rows of x [R, C] (float32): (σ [R], 1/σ [R]); x * (1/σ)[:, None] has
    max |.| in [1, 2) per row (0 for a zero row) and its fp16 rounding keeps 11 significant bits of every
    coordinate above 2**-14 of the row's max, whatever the row's magnitude."""
    return pow2_scale(tl.max(tl.abs(x), axis=1))


@triton.jit
def split_operand(x):
    """float32 x as two dot operands (hi, lo) in ``OPERAND_DTYPE``: hi = fp16(x), lo = fp16(x - hi) (x - hi is
    exact in float32), so hi + lo = x within 2**-22 |x|, or 2**-25 absolute where x - hi is below fp16's normal
    range (|x| < 2**-2). For |x| < 65504 (no fp16 overflow): the pieces of ``fp32_dot``'s three-pass product."""
    hi = x.to(OPERAND_DTYPE)
    return hi, (x - hi.to(tl.float32)).to(OPERAND_DTYPE)


@triton.jit
def precise_mma(a_hi, a_lo, b_hi, b_lo):
    """a @ b for split operands a and b to about fp32 accuracy (``fp32_dot``'s three passes:
    a_hi b_lo + a_lo b_hi + a_hi b_hi; a_lo b_lo is below fp32's rounding)."""
    acc = tl.dot(a_hi, b_lo, out_dtype=tl.float32)  # one accumulator, the small terms first
    acc = tl.dot(a_lo, b_hi, acc, out_dtype=tl.float32)
    return tl.dot(a_hi, b_hi, acc, out_dtype=tl.float32)


@triton.jit
def fp32_dot(a, b, PASSES: tl.constexpr = 3):
    """a @ b of float32 tiles on fp16 tensor cores, fp32 accumulation. PASSES=3: about fp32-accurate (as
    3xTF32: both have 11-bit pieces) from a_hi b_lo + a_lo b_hi + a_hi b_hi, x_hi = fp16(x), x_lo =
    fp16(x - x_hi), at half of 3xTF32's MMA cost and operand registers; PASSES=1: a_hi b_hi only (relative
    error ~2**-11). For operands within fp16's range (|x| < 65504; parts below 2**-14 keep an absolute
    error <= 2**-24): unit vectors, rotations, QJL matrices, rows divided by their ``row_scale``."""
    if PASSES == 3:
        a_hi, a_lo = split_operand(a)
        b_hi, b_lo = split_operand(b)
        return precise_mma(a_hi, a_lo, b_hi, b_lo)
    else:
        return tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), out_dtype=tl.float32)


@triton.jit
def unrotate_store(x, rot_ptr, out_rows, row_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_OUT: tl.constexpr):
    """out[r, :] = Πᵀ x[r, :] for x [R, BLOCK_D] rotated rows (fp32-accurate, ``fp32_dot``); Π (HEAD_DIM,
    HEAD_DIM) at rot_ptr. ``out_rows`` [R] points at each output row; written BLOCK_OUT columns at a time
    so Π never has to sit in registers whole. Any finite x: each row is divided by its ``row_scale`` σ
    for the fp16 pieces and the product multiplied by σ in fp32 (attention outputs are averages of values,
    as large as the values' norms).
    """
    sigma, inv = row_scale(x)
    x = x * inv[:, None]
    e = tl.arange(0, BLOCK_D)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_OUT):
        c = c0 + tl.arange(0, BLOCK_OUT)
        rot = tl.load(rot_ptr + e[:, None] * HEAD_DIM + c[None, :],
                      mask=(e < HEAD_DIM)[:, None] & (c < HEAD_DIM)[None, :], other=0.0)
        y = fp32_dot(x, rot) * sigma[:, None]
        out_ptrs = out_rows[:, None] + c[None, :]
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=row_mask[:, None] & (c < HEAD_DIM)[None, :])
