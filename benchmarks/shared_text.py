"""Natural text for benchmarks that need long prompts: the Shakespeare corpus from the
evals' assets when present, else a fixed built-in passage repeated."""

from __future__ import annotations

from pathlib import Path

_BUILTIN = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the other "
    "way. "
)


def passage(chars: int) -> str:
    """At least ``chars`` characters of English prose."""
    try:
        from vllm_turboquant.cache import cache_dir

        corpus = sorted(Path(cache_dir("data")).rglob("*shakespeare*.txt"))
        if corpus:
            text = corpus[0].read_text(errors="ignore")
            if len(text) >= chars:
                return text[len(text) // 3: len(text) // 3 + chars]
    except OSError:
        pass
    return (_BUILTIN * (chars // len(_BUILTIN) + 1))[:chars]
