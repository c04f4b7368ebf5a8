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
