"""Loaders and helpers for the offline lm-eval tasks in this folder (``tq_*.yaml``).

lm-eval imports this file by path (``!function tq_offline.<name>`` in the YAMLs), so it
must not rely on the repository being on ``sys.path``. Data paths are machine-specific,
so the YAMLs carry no paths: each task's ``custom_dataset`` function below resolves the
converted JSONL in the cache folder (``$VLLM_TURBOQUANT_CACHE``, else
``~/.cache/vllm-turboquant``, folder ``data/lm_eval/<task>/<split>.jsonl``) at run time,
fetches it with ``evals/assets.py`` when it is missing, and loads it with
``datasets.load_dataset("json", data_files=...)`` -- the same thing as ``dataset_path: json``
plus ``dataset_kwargs.data_files`` in a YAML, without writing a path into any file.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import datasets

_ASSETS_NAME = "_vllm_turboquant_evals_assets"


def _assets():
    """``evals/assets.py``, loaded by path (no sys.path change, no import of the repo root)."""
    mod = sys.modules.get("evals.assets") or sys.modules.get(_ASSETS_NAME)
    if mod is None:
        path = Path(__file__).resolve().parents[1] / "assets.py"
        spec = importlib.util.spec_from_file_location(_ASSETS_NAME, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_ASSETS_NAME] = mod
        spec.loader.exec_module(mod)
    return mod


def _load(task: str, *splits: str) -> datasets.DatasetDict:
    assets = _assets()
    files = {split: str(assets.ensure_task_file(task, split)) for split in splits}
    return datasets.load_dataset("json", data_files=files)


# ----------------------------------------------------------------------------- custom_dataset loaders
# lm-eval calls these as custom_dataset(**metadata, **dataset_kwargs); metadata carries the model args.

def load_hellaswag(**_):
    return _load("hellaswag", "validation")


def load_piqa(**_):
    return _load("piqa", "validation")


def load_winogrande(**_):
    return _load("winogrande", "validation")


def load_boolq(**_):
    return _load("boolq", "validation")


def load_arc_easy(**_):
    return _load("arc_easy", "validation", "test")


def load_arc_challenge(**_):
    return _load("arc_challenge", "validation", "test")


def load_lambada(**_):
    return _load("lambada", "test")


def load_gsm8k(**_):
    return _load("gsm8k", "test")


# ------------------------------------------------------------------------- HellaSwag (as lm-eval's hellaswag/utils.py)

def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(_process)


# ----------------------------------------------------------------------------- Winogrande (as lm-eval's winogrande)

def winogrande_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# ----------------------------------------------------------------------------- RULER needle-in-a-haystack
# lm-eval's RULER generators (lm_eval/tasks/ruler/prepare_niah.py) need `wonderwords` and `nltk`.
# The "repeat" and "needle" haystacks need neither nltk data (punkt_tab) nor the network; the
# "essay" haystack needs Paul Graham essays from the hub, so tq_niah_shakespeare swaps in the
# held-out Shakespeare text and a regex sentence splitter in place of nltk's punkt.

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")


def _prepare_niah():
    """Import lm-eval's RULER generator without its import-time ``nltk.download("punkt_tab")`` network call."""
    if "lm_eval.tasks.ruler.prepare_niah" not in sys.modules:
        try:
            import nltk
            import wonderwords  # noqa: F401
        except ImportError as exc:
            raise ImportError("RULER needle tasks need `wonderwords` and `nltk`: pip install wonderwords nltk") from exc
        real_download = nltk.download
        nltk.download = lambda *a, **k: False  # punkt_tab is only used by the essay haystack
        try:
            import lm_eval.tasks.ruler.prepare_niah  # noqa: F401
        finally:
            nltk.download = real_download
    return sys.modules["lm_eval.tasks.ruler.prepare_niah"]


def _split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;:])\s+", text.strip()) if s]


def _niah(metadata: dict, haystack_kind: str, **gen) -> datasets.DatasetDict:
    from lm_eval.tasks.ruler.common_utils import get_tokenizer, resolve_tokenizer_name

    prep = _prepare_niah()
    lengths = metadata.pop("max_seq_lengths", None) or [4096]
    if isinstance(lengths, (int, str)):
        lengths = [lengths]
    num_samples = int(metadata.pop("num_samples", 100))
    tokenizer = get_tokenizer(resolve_tokenizer_name(metadata))
    if haystack_kind == "shakespeare":
        text = _assets().ensure_text_file("shakespeare_heldout").read_text(encoding="utf-8")
        haystack = re.sub(r"\s+", " ", text).split(" ")
        prep.sent_tokenize = _split_sentences  # used by cached_sent_tokenize for the "essay" layout
        prep.cached_sent_tokenize.cache_clear()
        kind = "essay"
    else:
        haystack, kind = prep.get_haystack(type_haystack=haystack_kind), haystack_kind
    rows = []
    for length in lengths:
        rows += prep.generate_samples(haystack, max_seq_length=int(length), template=NIAH_TEMPLATE,
                                      type_haystack=kind, num_samples=num_samples, TOKENIZER=tokenizer, **gen)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def niah_single_1(**metadata):
    return _niah(metadata, "repeat", type_needle_k="words", type_needle_v="numbers")


def niah_multikey_2(**metadata):
    return _niah(metadata, "needle", type_needle_k="words", type_needle_v="numbers")


def niah_multikey_3(**metadata):
    return _niah(metadata, "needle", type_needle_k="uuids", type_needle_v="uuids")


def niah_shakespeare(**metadata):
    return _niah(metadata, "shakespeare", type_needle_k="words", type_needle_v="numbers")


def niah_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """RULER string_match_all: the share of the needle values found in the answer."""
    preds = [re.sub(r"[\x00-\x1f]", "\n", r.strip()).strip() for r in results]
    refs = doc["outputs"]
    return {"score": sum(sum(r.lower() in p.lower() for r in refs) / len(refs) for p in preds) / len(preds)}


def niah_aggregate(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
