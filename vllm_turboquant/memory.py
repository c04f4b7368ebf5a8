"""KV-cache size arithmetic: bytes per token for bf16, fp8 and every preset."""

from __future__ import annotations

from dataclasses import dataclass

from .layout import slot_layout
from .presets import get_preset


@dataclass(frozen=True)
class MemoryEstimate:
    """KV-cache bytes for one model at one context length (all layers, K and V)."""

    preset: str
    tokens: int
    bf16_bytes: int
    fp8_bytes: int
    preset_bytes: int

    @property
    def ratio(self) -> float:
        """Compression ratio against bf16."""
        return self.bf16_bytes / self.preset_bytes


def bf16_bytes_per_token_head(head_dim: int) -> int:
    """bf16 K and V of one token and KV head."""
    return 2 * 2 * head_dim


def estimate_memory(num_layers: int, num_kv_heads: int, seq_len: int, head_dim: int,
                    preset: str = "turboquant3") -> MemoryEstimate:
    """KV-cache size of seq_len tokens in bf16, fp8 and ``preset`` (padding included)."""
    units = num_layers * num_kv_heads * seq_len
    bf16 = units * bf16_bytes_per_token_head(head_dim)
    return MemoryEstimate(
        preset=get_preset(preset).name, tokens=seq_len, bf16_bytes=bf16, fp8_bytes=bf16 // 2,
        preset_bytes=units * slot_layout(preset, head_dim).slot_bytes,
    )


# -- protected tokens ------------------------------------------------------------------------------------

def exact_copy_block_size(page_bytes: int, row_bytes: int, block_size: int) -> int:
    """Tokens per exact-copy block: the largest divisor of the packed block size whose exact rows
    (``row_bytes`` per token, all KV heads) fit in one packed page of ``page_bytes`` (vLLM keeps one page
    size for every KV-cache group; a divisor keeps prefix-hit granularity). Raises ValueError when not even
    one token's copy fits."""
    fits = page_bytes // row_bytes
    if fits < 1:
        raise ValueError(f"protected tokens: one token's exact copy ({row_bytes} B) does not fit in a packed KV "
                         f"page ({page_bytes} B); raise --block-size or set sink=0, window=0")
    return max(d for d in range(1, block_size + 1) if block_size % d == 0 and d <= fits)


def exact_copy_blocks(block_size: int, sink: int, window: int) -> int:
    """Exact-copy blocks a running request holds: the sink's, and a W-token window's (which may start mid-block)."""
    if sink + window == 0:
        return 0
    return -(-sink // block_size) + -(-(max(window, 1) - 1) // block_size) + 1


def packed_capacity_ratio(preset: str, head_dim: int, max_model_len: int, block_size: int, sink: int, window: int,
                          dtype_bytes: int = 2) -> float:
    """The KV capacity vLLM reports for ``preset`` over bf16's in the same space (any number of layers and
    KV heads): a request of max_model_len tokens holds its packed pages plus, with protected tokens, the
    exact-copy blocks of its sink and window, each a packed page's worth of memory."""
    slot = slot_layout(preset, head_dim).slot_bytes
    page = block_size * slot
    pages = -(-max_model_len // block_size)
    if sink + window:
        bs_x = exact_copy_block_size(page, 2 * head_dim * dtype_bytes, block_size)
        pages += exact_copy_blocks(bs_x, sink, window)
    return max_model_len * bf16_bytes_per_token_head(head_dim) / (pages * page)
