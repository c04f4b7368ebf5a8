"""The ``cpu`` implementation of ``ops.AttentionOps`` (the contract and its documentation live there):
compiled C++ kernels that read and write the packed slots directly.

The kernels (``vllm_turboquant/csrc``, see its README) are a plain shared library built with the package
(``setup.py``) and called through ctypes on raw pointers: no torch ABI. The instruction set is chosen at
run time from the CPU's features -- AVX-512, AVX2 + FMA, or portable C++ (the only one off x86, e.g.
aarch64); ``VLLM_TURBOQUANT_CPU_ISA=avx512|avx2|generic`` forces one -- and every ISA gives the same bits.

* ``paged_decode`` / ``prefill``: tiles of 16 positions; key codes become centroid values through a
  16-entry table held in a vector register, scores of the rotated query in float32, an online softmax with
  an explicit exp, values summed in the rotated space and un-rotated once per query row. Protected tokens
  (sink and window) are read from their exact copies; a compressed prefill chunk makes its own ones from
  its K/V exactly as ``write_cache`` stores them (the cache need not hold them). A prefill chunk that
  attends its own exact K/V (``compressed_chunk=False``) goes to torch's fused flash attention in float32
  for that part (a GEMM kernel, on the inputs as given, as the reference's fused float32 attention) --
  merged with the kernels' cached part by the two log-sum-exps.
* ``write_cache``: the reference's bytes. The rotation runs in float32 with a proven bound on its error;
  a coordinate within that bound of a codebook boundary (a few per thousand) is recomputed in float64 as
  the reference computes it. QJL presets and exact copies are encoded in float64.

Invariance: each (sequence, KV head, block of queries) is computed by one thread in a fixed order, no
fast-math, and a query row's arithmetic does not depend on the other rows it is computed with. Decode and
``compressed_chunk`` prefill therefore give the same bits for a query whatever the batch composition, the
chunking, the thread count (``torch.get_num_threads()``, as vLLM's CPU worker sets it) or the prefix cache.

Beyond the contract: tensors live on the CPU; outputs are within ~1e-6 relative of the torch reference
(tests/kernels/test_cpu_ops.py holds them to 1e-5). When the library is missing, every op is served by the
reference, with one warning that says how to build it.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from pathlib import Path

import torch

from .layout import CacheFormat, cache_format
from .ops import check_sliding_window
from .protected import ProtectedTokens, is_active
from .registry import LayerTables

#: This module's name in ``vllm_turboquant.ops.IMPLEMENTATIONS``.
NAME = "cpu"
__all__ = ["NAME", "write_cache", "paged_decode", "prefill", "available", "unavailable_reason", "isa", "set_isa"]


#: How to get the library when it is missing.
BUILD_HINT = ("reinstall the package to build it: pip install -e <repository> (or pip install --no-deps "
              "--force-reinstall vllm-turboquant); it needs a C++17 compiler (g++ or clang++)")
ABI_VERSION = 4
ISAS = ("generic", "avx2", "avx512")  # index = the library's TQ_ISA_* value

_F32, _F16, _BF16, _F64, _I32, _I64 = range(6)
_FLOAT_CODES = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16, torch.float64: _F64}
_INT_CODES = {torch.int32: _I32, torch.int64: _I64}
_i32, _i64, _f32, _vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Cache(ctypes.Structure):
    _fields_ = [("data", _vp), ("stride_block", _i64), ("stride_token", _i64), ("stride_head", _i64),
                ("num_blocks", _i64), ("block_size", _i32)]


class _ExactCache(ctypes.Structure):
    _fields_ = [("data", _vp), ("stride_block", _i64), ("stride_token", _i64), ("stride_head", _i64),
                ("num_blocks", _i64), ("block_size", _i32), ("dtype", _i32)]


class _LayerDesc(ctypes.Structure):
    _fields_ = [(n, _i32) for n in ("head_dim", "num_heads", "key_bits", "value_bits", "qjl_dim", "off_key_codes",
                                    "off_key_signs", "off_key_norm", "off_key_gamma", "off_value_codes",
                                    "off_value_norm", "slot_bytes")] + [("qjl_coef", _f32)] + [
        (n, _vp) for n in ("key_rotation", "value_rotation", "qjl", "key_boundaries", "key_centroids",
                           "value_boundaries", "value_centroids", "key_mean")]


#: the key/value fields that write and attention arguments share
_KV_FIELDS = [("key", _vp), ("value", _vp), ("kv_dtype", _i32), ("key_stride_token", _i64),
              ("key_stride_head", _i64), ("value_stride_token", _i64), ("value_stride_head", _i64)]


class _WriteArgs(ctypes.Structure):
    _fields_ = [("cache", _Cache), *_KV_FIELDS, ("slot_mapping", _vp), ("slot_dtype", _i32), ("num_tokens", _i64),
                ("exact", _ExactCache), ("exact_slot_mapping", _vp), ("exact_slot_dtype", _i32),
                ("num_threads", _i32)]


class _AttnArgs(ctypes.Structure):
    _fields_ = [("cache", _Cache), ("query", _vp), ("q_dtype", _i32), ("q_stride_token", _i64),
                ("q_stride_head", _i64), ("num_rows", _i64), ("num_q_heads", _i32), *_KV_FIELDS,
                ("block_table", _vp), ("block_table_dtype", _i32), ("block_table_stride", _i64),
                ("block_table_cols", _i64), ("seq_lens", _vp), ("seq_lens_dtype", _i32),
                ("query_start_loc", _vp), ("query_start_loc_dtype", _i32), ("num_seqs", _i64), ("scale", _f32),
                ("sliding_window", _i32), ("chunk", _i32), ("sink", _i32), ("window", _i32),
                ("exact", _ExactCache), ("exact_block_table", _vp), ("exact_block_table_dtype", _i32),
                ("exact_block_table_stride", _i64), ("exact_block_table_cols", _i64), ("out", _vp), ("lse", _vp),
                ("num_threads", _i32)]


#: What attention reads of a prefill chunk's own keys (``TQ_CHUNK_*``): their slots, their exact K/V, nothing.
_CHUNK_CACHED, _CHUNK_EXACT, _CHUNK_SKIP = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# the library
# ---------------------------------------------------------------------------------------------

_lib: ctypes.CDLL | None = None
_why_not: str | None = None


def _library_path() -> Path | None:
    found = sorted(Path(__file__).parent.glob("_tq_cpu*.so")) + sorted(Path(__file__).parent.glob("_tq_cpu*.pyd"))
    return found[0] if found else None


def _load() -> ctypes.CDLL | None:
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    path = _library_path()
    if path is None:
        _why_not = "the compiled library vllm_turboquant/_tq_cpu*.so is not there"
        return None
    try:
        lib = ctypes.CDLL(str(path))
        lib.tq_abi_version.restype = _i32
        if lib.tq_abi_version() != ABI_VERSION:
            raise OSError(f"ABI version {lib.tq_abi_version()}, this module expects {ABI_VERSION} (a stale build)")
    except (OSError, AttributeError) as exc:
        _why_not = f"{path.name} cannot be loaded: {exc}"
        return None
    lib.tq_layer_new.restype = _vp
    lib.tq_layer_new.argtypes = [ctypes.POINTER(_LayerDesc)]
    lib.tq_layer_free.argtypes = [_vp]
    lib.tq_write_cache.argtypes = [_vp, ctypes.POINTER(_WriteArgs)]
    lib.tq_attention.argtypes = [_vp, ctypes.POINTER(_AttnArgs)]
    lib.tq_last_error.restype = ctypes.c_char_p
    lib.tq_set_isa.argtypes = [_i32]
    forced = os.environ.get("VLLM_TURBOQUANT_CPU_ISA", "").strip().lower()
    if forced and (forced not in ISAS or lib.tq_set_isa(ISAS.index(forced)) != 0):
        _why_not = (f"VLLM_TURBOQUANT_CPU_ISA={forced!r} is not available here; accepted: "
                    + ", ".join(n for i, n in enumerate(ISAS) if lib.tq_isa_supported(i)))
        return None
    _lib = lib
    return lib


def available() -> bool:
    """Whether the compiled library loads (``ops.resolve("auto")`` picks ``cpu`` on the CPU when it does)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the library does not load (None when it does)."""
    _load()
    return _why_not


def isa() -> str:
    """The instruction set the kernels run with: ``avx512``, ``avx2`` or ``generic``."""
    return ISAS[_need().tq_isa()]


def set_isa(name: str) -> str:
    """Run the kernels with ``name`` (one of ``ISAS`` the CPU supports); returns the previous one. For
    tests and benchmarks: every ISA gives the same bits."""
    lib, before = _need(), isa()
    if name not in ISAS or lib.tq_set_isa(ISAS.index(name)) != 0:
        raise ValueError(f"ISA {name!r} is not available; accepted: "
                         + ", ".join(n for i, n in enumerate(ISAS) if lib.tq_isa_supported(i)))
    return before


def _need() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"vllm-turboquant's compiled CPU ops are unavailable: {_why_not}; {BUILD_HINT}")
    return lib


def _check(rc: int) -> None:
    if rc != 0:
        raise ValueError(_lib.tq_last_error().decode())


# ---------------------------------------------------------------------------------------------
# per-layer tables, preprocessed once per (LayerTables object, CacheFormat)
# ---------------------------------------------------------------------------------------------

class _Layer:
    """A layer's tables in the library (freed with this object)."""

    def __init__(self, tables: LayerTables, fmt: CacheFormat):
        lay = fmt.layout
        keep = {f: getattr(tables, f).detach().to("cpu", torch.float32).contiguous()
                for f in LayerTables.__dataclass_fields__}
        desc = _LayerDesc(lay.head_dim, tables.num_heads, lay.key_bits, lay.value_bits, lay.qjl_dim, lay.key_codes,
                          lay.key_signs, lay.key_norm, lay.key_gamma, lay.value_codes, lay.value_norm,
                          lay.slot_bytes, fmt.qjl_coefficient, *(keep[f].data_ptr() for f in (
                              "key_rotation", "value_rotation", "qjl", "key_boundaries", "key_centroids",
                              "value_boundaries", "value_centroids", "key_mean")))
        self.handle = _lib.tq_layer_new(ctypes.byref(desc))
        if not self.handle:
            raise ValueError(f"the compiled CPU ops refuse this layer: {_lib.tq_last_error().decode()}")
        self.num_heads, self.slot_bytes = tables.num_heads, lay.slot_bytes

    def __del__(self):
        if getattr(self, "handle", None) and _lib is not None:
            _lib.tq_layer_free(self.handle)
            self.handle = None


def _mutable(tables: LayerTables) -> tuple[torch.Tensor, ...]:
    # inference tensors (vLLM builds tables in inference mode) have no version counter: they cannot change
    return tuple(x for x in (getattr(tables, f) for f in LayerTables.__dataclass_fields__) if not x.is_inference())


class _Entry:
    """A _Layer with what identifies it: the tables object (weakly), the format, the tensors' versions."""

    __slots__ = ("tables", "fmt", "mutable", "versions", "layer")

    def __init__(self, tables: LayerTables, fmt: CacheFormat):
        self.tables, self.fmt = weakref.ref(tables), fmt
        self.mutable = _mutable(tables)
        self.versions = tuple(x._version for x in self.mutable)
        self.layer = _Layer(tables, fmt)


_LAYERS: dict[tuple[int, int], _Entry] = {}


def _layer(tables: LayerTables, fmt: CacheFormat) -> _Layer:
    """The library's copy of a layer's tables, made once per (LayerTables object, CacheFormat) and again
    only if a tensor of the tables is modified in place."""
    key = (id(tables), id(fmt))
    e = _LAYERS.get(key)
    if e is None or e.tables() is not tables or e.fmt is not fmt or (
            e.mutable and tuple(x._version for x in e.mutable) != e.versions):
        e = _LAYERS[key] = _Entry(tables, fmt)
        weakref.finalize(tables, _LAYERS.pop, key, None)
    return e.layer


# ---------------------------------------------------------------------------------------------
# argument checks and conversion
# ---------------------------------------------------------------------------------------------

def _cache(cache: torch.Tensor, layer: _Layer) -> _Cache:
    shape, strides = cache.shape, cache.stride()
    if cache.dtype != torch.uint8 or len(shape) != 4 or not cache.is_cpu:
        raise ValueError(f"cache must be a uint8 CPU tensor [num_blocks, block_size, H, slot_bytes], got "
                         f"{cache.dtype} {tuple(shape)} on {cache.device}")
    if shape[2] != layer.num_heads or shape[3] != layer.slot_bytes:
        raise ValueError(f"cache shape {tuple(shape)} does not match the layer ({layer.num_heads} KV heads, "
                         f"{layer.slot_bytes}-byte slots)")
    if strides[3] != 1:
        raise ValueError(f"cache must have stride 1 in its slot dim, got strides {strides}")
    return _Cache(cache.data_ptr(), strides[0], strides[1], strides[2], shape[0], shape[1])


def _exact_cache(protected: ProtectedTokens, layer: _Layer, head_dim: int) -> _ExactCache:
    c = protected.cache
    if (c.dim() != 4 or c.dtype not in _FLOAT_CODES or c.device.type != "cpu" or c.shape[2] != layer.num_heads
            or c.shape[3] != 2 * head_dim or c.stride(3) != 1):
        raise ValueError(f"protected.cache must be a float CPU tensor [num_blocks, block_size, {layer.num_heads}, "
                         f"{2 * head_dim}] with a contiguous last dim, got {c.dtype} {tuple(c.shape)} strides "
                         f"{c.stride()} on {c.device}")
    size = c.element_size()
    return _ExactCache(c.data_ptr(), c.stride(0) * size, c.stride(1) * size, c.stride(2) * size, c.shape[0],
                       c.shape[1], _FLOAT_CODES[c.dtype])


def _floats(x: torch.Tensor, name: str) -> torch.Tensor:
    """x (N, H, d) as a CPU float tensor with a contiguous last dim."""
    if x.dim() != 3 or not x.is_cpu:
        raise ValueError(f"{name} must be a 3-d CPU tensor, got {tuple(x.shape)} on {x.device}")
    if x.dtype not in _FLOAT_CODES:
        x = x.float()
    return x if x.stride(2) == 1 or x.shape[2] <= 1 else x.contiguous()


def _ints(x: torch.Tensor, dims: int = 1) -> torch.Tensor:
    if x.dtype not in _INT_CODES:
        x = x.long()
    return x if x.stride(-1) == 1 and (dims == 1 or x.dim() == 2) else x.contiguous()


def _set_kv(args, key: torch.Tensor, value: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """Point args at key/value (N, heads, d); returns the value tensor used (to keep a converted copy alive)."""
    shape = key.shape
    if value.shape != shape or shape[1] != heads or shape[2] != d:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be (N, {heads}, {d})")
    if value.dtype != key.dtype:
        value = value.to(key.dtype)
    ks, vs = key.stride(), value.stride()
    args.key, args.value, args.kv_dtype = key.data_ptr(), value.data_ptr(), _FLOAT_CODES[key.dtype]
    args.key_stride_token, args.key_stride_head, args.value_stride_token, args.value_stride_head = (
        ks[0], ks[1], vs[0], vs[1])
    return value


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------

def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                tables: LayerTables, fmt: CacheFormat, protected: ProtectedTokens | None = None,
                exact_slot_mapping: torch.Tensor | None = None) -> None:
    """``ops.AttentionOps.write_cache``: every slot bit-identical to the reference's (float64 encode), and
    the exact copies too (rotated in float64, rounded once). (A preset name for ``fmt`` is accepted too.)"""
    if _lib is None:
        _need()
    fmt = cache_format(fmt, key.shape[-1])
    layer = _layer(tables, fmt)
    args = _WriteArgs()
    args.cache = _cache(cache, layer)
    n = min(slot_mapping.shape[0], key.shape[0])
    key, value = _floats(key, "key"), _floats(value, "value")
    keep = [_set_kv(args, key, value, layer.num_heads, fmt.head_dim)]
    slots = _ints(slot_mapping)
    args.slot_mapping, args.slot_dtype = slots.data_ptr(), _INT_CODES[slots.dtype]
    if protected is not None and exact_slot_mapping is not None:
        exact = _ints(exact_slot_mapping)
        if exact.shape[0] < n:  # (fewer copies than tokens: the rest have none, their packed slots are written)
            exact = torch.cat([exact, exact.new_full((n - exact.shape[0],), -1)])
        args.exact = _exact_cache(protected, layer, fmt.head_dim)
        args.exact_slot_mapping, args.exact_slot_dtype = exact.data_ptr(), _INT_CODES[exact.dtype]
        keep.append(exact)
    args.num_tokens, args.num_threads = n, torch.get_num_threads()
    _check(_lib.tq_write_cache(layer.handle, ctypes.byref(args)))
    del keep


def _attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               tables: LayerTables, fmt: CacheFormat | str, scale: float, sliding_window: int | None,
               protected: ProtectedTokens | None, query_start_loc: torch.Tensor | None, chunk: int = _CHUNK_CACHED,
               key: torch.Tensor | None = None, value: torch.Tensor | None = None, lse: bool = False):
    """The library's attention: out (T, Hq, d) float32, and with ``lse`` the log-sum-exp (T, Hq) float32, in
    natural-log units, of the scaled scores scale·<q, k - mu> over the keys attended to (what ``_flash``'s
    log-sum-exp is merged with)."""
    window = check_sliding_window(sliding_window)
    query = _floats(query, "query")
    T, Hq, d = query.shape
    fmt = cache_format(fmt, d)
    layer = _layer(tables, fmt)
    if Hq % layer.num_heads:
        raise ValueError(f"query heads ({Hq}) must be a multiple of the KV heads ({layer.num_heads})")
    args = _AttnArgs()
    args.cache = _cache(cache, layer)
    q_strides = query.stride()
    args.query, args.q_dtype, args.q_stride_token, args.q_stride_head = (
        query.data_ptr(), _FLOAT_CODES[query.dtype], q_strides[0], q_strides[1])
    args.num_rows, args.num_q_heads, args.chunk = T, Hq, chunk
    keep = [query]
    if key is not None:  # the chunk's own K/V: attended exactly (_CHUNK_EXACT), or its protected keys' copies
        key = _floats(key, "key")
        if key.shape[0] < T:
            raise ValueError(f"key/value have {key.shape[0]} rows for {T} queries")
        keep += [key, _set_kv(args, key, _floats(value, "value"), layer.num_heads, d)]
    bt, sl = _ints(block_table, 2), _ints(seq_lens)
    if bt.dim() != 2 or bt.shape[0] < sl.shape[0]:
        raise ValueError(f"block_table {tuple(bt.shape)} must have a row per sequence ({sl.shape[0]})")
    args.block_table, args.block_table_dtype = bt.data_ptr(), _INT_CODES[bt.dtype]
    args.block_table_stride, args.block_table_cols = bt.stride(0), bt.shape[1]
    args.seq_lens, args.seq_lens_dtype, args.num_seqs = sl.data_ptr(), _INT_CODES[sl.dtype], sl.shape[0]
    keep += [bt, sl]
    if query_start_loc is not None:
        qsl = _ints(query_start_loc)
        if qsl.shape[0] != sl.shape[0] + 1:
            raise ValueError(f"query_start_loc has {qsl.shape[0]} entries for {sl.shape[0]} sequences")
        args.query_start_loc, args.query_start_loc_dtype = qsl.data_ptr(), _INT_CODES[qsl.dtype]
        keep.append(qsl)
    elif sl.shape[0] != T:
        raise ValueError(f"decode takes one query per sequence: {T} queries, {sl.shape[0]} sequences")
    args.scale, args.sliding_window = float(scale), window
    if is_active(protected):
        pbt = _ints(protected.block_table, 2)
        if pbt.dim() != 2 or pbt.shape[0] < sl.shape[0]:
            raise ValueError(f"protected.block_table {tuple(pbt.shape)} must have a row per sequence ({sl.shape[0]})")
        args.sink, args.window, args.exact = protected.sink, protected.window, _exact_cache(protected, layer, d)
        args.exact_block_table, args.exact_block_table_dtype = pbt.data_ptr(), _INT_CODES[pbt.dtype]
        args.exact_block_table_stride, args.exact_block_table_cols = pbt.stride(0), pbt.shape[1]
        keep.append(pbt)
    out = torch.empty(T, Hq, d, dtype=torch.float32)
    args.out, args.num_threads = out.data_ptr(), torch.get_num_threads()
    if lse:
        lse_out = torch.empty(T, Hq, dtype=torch.float32)
        args.lse = lse_out.data_ptr()
    _check(_lib.tq_attention(layer.handle, ctypes.byref(args)))
    del keep
    return (out, lse_out) if lse else out


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, sliding_window: int | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of one chunk over its own K/V (n, H, d), GQA: torch's fused flash attention in
    float32 (what the reference computes this part in; bf16 would be up to 2x faster but ~1e-3 off).
    Returns out (n, Hq, d) float32 and the log-sum-exp (n, Hq) of its scores <q, k>."""
    n, Hq, _ = query.shape
    G = Hq // key.shape[1]
    dtype = torch.float32
    q = query.to(dtype).transpose(0, 1).contiguous().unsqueeze(0)  # (1, Hq, n, d)
    k = key.to(dtype).transpose(0, 1).repeat_interleave(G, 0).unsqueeze(0)
    v = value.to(dtype).transpose(0, 1).repeat_interleave(G, 0).unsqueeze(0)
    mask = None
    if sliding_window is not None and sliding_window < n:
        i = torch.arange(n)
        visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
        mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~visible, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, mask is None,
                                                                          attn_mask=mask, scale=scale)[:2]
    return out[0].transpose(0, 1).float(), lse[0].transpose(0, 1)


def _prefill_exact_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
                          block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          tables: LayerTables, fmt: CacheFormat | str, scale: float, sliding_window: int | None,
                          protected: ProtectedTokens | None) -> torch.Tensor:
    """Prefill whose chunks attend their own exact K/V: the kernels attend what is cached before each
    chunk (log-sum-exp of scores <q, k - mu>), ``_flash`` the chunk, merged by the two log-sum-exps."""
    check_sliding_window(sliding_window)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    T, Hq, d = query.shape
    H = key.shape[1]
    cached = any(n - (b - a) > 0 for a, b, n in zip(starts[:-1], starts[1:], lens, strict=False))
    if cached:
        out, lse = _attention(query, cache, block_table, seq_lens, tables, fmt, scale, sliding_window, protected,
                              query_start_loc, _CHUNK_SKIP, lse=True)
    else:  # no prefix anywhere (a cold prompt)
        cache_format(fmt, d)
        out = torch.zeros(T, Hq, d, dtype=torch.float32)
    for b, (a, z) in enumerate(zip(starts[:-1], starts[1:], strict=False)):
        if z == a:
            continue
        o_c, lse_c = _flash(query[a:z], key[a:z], value[a:z], scale, sliding_window)
        if lens[b] == z - a:  # nothing before the chunk
            out[a:z] = o_c
            continue
        # the chunk's scores are <q, k>: shift them to <q, k - mu> like the cached keys'
        n = z - a
        q_mu = torch.einsum("nhgd,hd->nhg", query[a:z].float().reshape(n, H, Hq // H, d), tables.key_mean.float())
        lse_c = lse_c - scale * q_mu.reshape(n, Hq)
        lse_p = lse[a:z]
        top = torch.maximum(lse_p, lse_c)
        w_p, w_c = torch.exp(lse_p - top), torch.exp(lse_c - top)
        total = w_p + w_c
        out[a:z] = out[a:z] * (w_p / total).unsqueeze(-1) + o_c * (w_c / total).unsqueeze(-1)
    return out


def paged_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 tables: LayerTables, fmt: CacheFormat, scale: float,
                 sliding_window: int | None = None, protected: ProtectedTokens | None = None) -> torch.Tensor:
    """``ops.AttentionOps.paged_decode``. (A preset name for ``fmt`` is accepted too.)"""
    if _lib is None:
        _need()
    return _attention(query, cache, block_table, seq_lens, tables, fmt, scale, sliding_window, protected, None)


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
            block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
            tables: LayerTables, fmt: CacheFormat, scale: float, sliding_window: int | None = None,
            compressed_chunk: bool = False, protected: ProtectedTokens | None = None,
            max_query_len: int | None = None) -> torch.Tensor:
    """``ops.AttentionOps.prefill``. With ``compressed_chunk`` every key comes from the caches, through the
    kernels (the same bits as decode). Otherwise the kernels attend the cached prefix and torch's fused
    float32 flash attention the chunk's own K/V, and the two are merged by their log-sum-exps.
    ``max_query_len`` is not needed. (A preset name for ``fmt`` is accepted too.)"""
    if _lib is None:
        _need()
    if compressed_chunk:  # with protected tokens, the chunk's own copies are made from its K/V (as stored)
        own = is_active(protected)
        return _attention(query, cache, block_table, seq_lens, tables, fmt, scale, sliding_window, protected,
                          query_start_loc, key=key if own else None, value=value if own else None)
    return _prefill_exact_chunks(query, key, value, cache, block_table, query_start_loc, seq_lens, tables, fmt, scale,
                                 sliding_window, protected)
