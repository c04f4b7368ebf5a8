"""Tiny random-weight models built at test time (no hub): Llama-style with any head_dim,
GQA or MQA, and a Gemma-3-style model with sliding-window layers, each with an offline
word-level tokenizer (words ``w0 w1 ...``)."""

from __future__ import annotations

from pathlib import Path

import torch

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
