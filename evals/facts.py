"""Fact retrieval (``python -m evals.run --suite facts``): seeded synthetic passages with facts at controlled
depths, a question about one of them, the answer generated after the prompt and scored against the fact's value.

A passage is held-out Shakespeare (``data/text/shakespeare_heldout.txt``, ``evals.assets``: natural text the
models read as prose or verse, out of domain for the automatic calibration's built-in text) cut at a seeded
line, as many lines as make the whole prompt about ``length`` tokens of the model's tokenizer. Into it go one
or three facts, each a sentence on its own line::

    The access code of the blue door is 7341.            (code: 4 digits)
    The keeper of the silver lighthouse is named Ingrid.  (name)
    The green suitcase was left in Bergen.                (place: a city)
    The red crate weighs 482 kilograms.                   (number: 2-3 digits)

at fixed depths of the passage's tokens (``DEPTHS``: start 10%, middle 50%, end 90%: every fact lies well
outside a 64-token recent window once the question follows). The asked fact is at the sample's depth; with
three facts the other two (same kind, other keys and values) sit at the other two depths as distractors.
Samples cycle through depth x kind x {1, 3} facts, so 24 samples hold each combination once. Names and
cities are drawn from lists that do not occur in the filler text, so a value in the answer came from its
fact. The prompt asks the question after the passage (the model's chat template when it has one, else
``Question: ... / Answer:``).

Scoring (``score_answer``): a **hit** = the asked fact's value appears in the answer as a whole word
(case-insensitive; digits not part of a longer number) and no distractor's value does. Per sample the record
keeps the prompt id, length, depth, kind, number of facts, expected value, the answer and the hit.
Everything here but ``run_facts`` (which needs a ``vllm.LLM``) runs without a model.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

DEPTHS: dict[str, float] = {"start": 0.1, "middle": 0.5, "end": 0.9}
KEYS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white", "brown",
        "grey", "pink", "violet", "crimson", "amber"]
# names and cities chosen not to occur in Shakespeare (``build_samples`` checks it against the filler)
NAMES = ["Ingrid", "Desmond", "Priya", "Kenji", "Olga", "Rafael", "Yusuf", "Leila", "Anders", "Camila", "Dmitri",
         "Fiona", "Nadia", "Oskar", "Sven", "Wanda", "Ximena", "Zoltan", "Keiko", "Marisol", "Tobias", "Ravi",
         "Svetlana", "Bjorn", "Amara", "Lucian", "Greta", "Hamid", "Ines", "Jasper"]
CITIES = ["Bergen", "Nairobi", "Oslo", "Lima", "Hanoi", "Toronto", "Madrid", "Cairo", "Dublin", "Kigali",
          "Santiago", "Helsinki", "Manila", "Bogota", "Warsaw", "Osaka", "Accra", "Quito", "Perth", "Riga",
          "Havana", "Seoul", "Zurich", "Jakarta", "Montreal", "Budapest", "Caracas", "Denver", "Glasgow", "Kyoto"]


@dataclass(frozen=True)
class Kind:
    """One kind of fact: its sentence, its question and how a value is drawn."""

    name: str
    statement: str    # "... {key} ... {value} ..."
    question: str     # "... {key} ...?"

    def value(self, rng: random.Random) -> str:
        if self.name == "code":
            return str(rng.randint(1000, 9999))
        if self.name == "number":
            return str(rng.randint(12, 987))
        return rng.choice(NAMES if self.name == "name" else CITIES)


KINDS = [
    Kind("code", "The access code of the {key} door is {value}.", "What is the access code of the {key} door?"),
    Kind("name", "The keeper of the {key} lighthouse is named {value}.",
         "What is the name of the keeper of the {key} lighthouse?"),
    Kind("place", "The {key} suitcase was left in {value}.", "In which city was the {key} suitcase left?"),
    Kind("number", "The {key} crate weighs {value} kilograms.", "How many kilograms does the {key} crate weigh?"),
]
INSTRUCTION = "Read the text below. A question about it follows the text."
ANSWER_HINT = "Answer with the value only."


@dataclass
class FactSample:
    """One passage and its question (``prompt_ids`` are the exact tokens the engine is given)."""

    id: str
    length: int                    # target prompt length in tokens
    depth: str                     # start / middle / end: where the asked fact is
    kind: str
    n_facts: int
    expected: str
    distractors: list[str]
    question: str
    prompt_ids: list[int] = field(repr=False)
    prompt_sha: str = ""           # sha1 of the prompt tokens: the same sample across dtypes
    tokens: int = 0                # actual prompt length
    fact_positions: list[int] = field(default_factory=list)   # token offset of each fact's line (approximate)

    def meta(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("prompt_ids")
        return d


def design(i: int) -> tuple[str, Kind, int]:
    """(depth, kind, number of facts) of sample ``i``: depth fastest, then kind, then 1 / 3 facts."""
    depth = list(DEPTHS)[i % len(DEPTHS)]
    kind = KINDS[(i // len(DEPTHS)) % len(KINDS)]
    n_facts = 1 if (i // (len(DEPTHS) * len(KINDS))) % 2 == 0 else 3
    return depth, kind, n_facts


def filler_lines(text: str) -> list[str]:
    """The filler text's non-empty lines, whitespace collapsed."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _prompt_text(tokenizer, passage: str, question: str) -> str:
    body = f"{INSTRUCTION}\n\n{passage}\n\nQuestion: {question} {ANSWER_HINT}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body + "\nAnswer:"


def _encode(tokenizer, text: str, bos_id: int | None) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    return ([bos_id] if bos_id is not None and (not ids or ids[0] != bos_id) else []) + ids


def build_samples(tokenizer, text: str, lengths: list[int], n: int, seed: int = 0,
                  bos_id: int | None = None) -> list[FactSample]:
    """``n`` samples per target length, seeded: the same tokenizer, text and seed give the same token ids.

    Sample ``i`` depends only on (seed, length, i), so the first ``k`` samples of ``n`` are the samples of
    ``k`` (what lets ``extend_facts_record`` add passages to a stored run).
    ``bos_id``: prepended to every prompt (models whose tokenizer does not add BOS but need it: Gemma)."""
    lines = filler_lines(text)
    cache: dict[int, int] = {}

    def line_tokens(k: int) -> int:   # tokens of line k, + 1 for its newline (tokenised on first use)
        if k not in cache:
            cache[k] = len(tokenizer(lines[k], add_special_tokens=False).input_ids) + 1
        return cache[k]

    lowered = text.lower()
    for word in NAMES + CITIES:
        if re.search(rf"\b{word.lower()}\b", lowered):
            raise ValueError(f"fact value {word!r} occurs in the filler text: pick another")
    samples = []
    for length in lengths:
        for i in range(n):
            rng = random.Random(f"facts-{seed}-{length}-{i}")
            depth, kind, n_facts = design(i)
            keys = rng.sample(KEYS, n_facts)
            values: list[str] = []
            while len(values) < n_facts:
                v = kind.value(rng)
                if v not in values:
                    values.append(v)
            depths = [depth] + [d for d in DEPTHS if d != depth][: n_facts - 1]
            facts = [(DEPTHS[d], kind.statement.format(key=k, value=v)) for d, k, v in zip(depths, keys, values,
                                                                                         strict=True)]
            question = kind.question.format(key=keys[0])
            # tokens everything but the filler costs, then filler lines up to the target length
            fixed = len(_encode(tokenizer, _prompt_text(tokenizer, "\n".join(f for _, f in facts), question),
                                bos_id))
            budget = max(length - fixed, 16)
            start = rng.randrange(len(lines))
            chosen, used, j = [], 0, start
            while used < budget:
                chosen.append(j % len(lines))
                used += line_tokens(j % len(lines))
                j += 1
            passage_lines = [lines[k] for k in chosen]
            cum, total = [], 0
            for k in chosen:
                cum.append(total)
                total += line_tokens(k)
            # insert from the deepest fact up, so earlier indices stay valid
            positions = {}
            for frac, sentence in sorted(facts, key=lambda f: -f[0]):
                at = next((idx for idx, c in enumerate(cum) if c >= frac * total), len(cum))
                passage_lines.insert(at, sentence)
                positions[sentence] = int(frac * total)
            prompt = _prompt_text(tokenizer, "\n".join(passage_lines), question)
            ids = _encode(tokenizer, prompt, bos_id)
            samples.append(FactSample(
                id=f"L{length}-{i:03d}", length=length, depth=depth, kind=kind.name, n_facts=n_facts,
                expected=values[0], distractors=values[1:], question=question, prompt_ids=ids,
                prompt_sha=hashlib.sha1(str(ids).encode()).hexdigest()[:12], tokens=len(ids),
                fact_positions=[positions[f] for _, f in facts]))
    return samples


def _found(value: str, answer: str) -> bool:
    if value.isdigit():
        return re.search(rf"(?<!\d){value}(?!\d)", answer) is not None
    return re.search(rf"\b{re.escape(value)}\b", answer, re.IGNORECASE) is not None


def score_answer(answer: str, expected: str, distractors: list[str] | tuple[str, ...] = ()) -> bool:
    """A hit: ``expected`` appears in ``answer`` as a whole word (digits: not inside a longer number) and no
    distractor value does."""
    return _found(expected, answer) and not any(_found(d, answer) for d in distractors)


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a binomial proportion ``hits / n``."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def sign_test(lost: int, gained: int) -> float:
    """Two-sided exact sign test of paired hits (McNemar's exact test): the p-value of ``gained`` successes in
    ``lost + gained`` discordant pairs under p = 1/2 (``scipy.stats.binomtest``); 1.0 without discordant pairs."""
    from scipy.stats import binomtest

    n = lost + gained
    return 1.0 if n == 0 else float(binomtest(gained, n, 0.5).pvalue)


def fmt_p(p: float) -> str:
    """A p-value for a table: two decimals, or one significant digit below 0.01."""
    return f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"


def run_facts(llm, model_path: str, cfg: dict[str, Any], text: str, bos_id: int | None) -> dict[str, Any]:
    """Generate the answers of every sample of ``cfg`` (``facts_lengths`` x ``facts_n``, ``facts_seed``) greedily
    with ``llm`` (all prompts submitted at once, as a server would batch them); returns the ``facts`` part of a
    worker record: per length ``{"n", "hits", "samples": {id: {...}}}``.

    With ``cfg["facts_first"] = k`` (the runner extending a stored run of ``k`` passages) only samples
    ``k .. facts_n-1`` are generated; the part then also holds ``"built_sha"``: ``{id: prompt_sha}`` of samples
    ``0 .. k-1`` built again, which ``extend_facts_record`` checks against the stored ones."""
    from vllm import SamplingParams, TokensPrompt

    tokenizer = llm.get_tokenizer()
    first = int(cfg.get("facts_first", 0))
    samples, rebuilt = [], []   # passages to generate; passages 0 .. first-1, built again only to be checked
    for s in build_samples(tokenizer, text, cfg["facts_lengths"], cfg["facts_n"], cfg.get("facts_seed", 0), bos_id):
        (samples if int(s.id.split("-")[1]) >= first else rebuilt).append(s)
    params = SamplingParams(max_tokens=cfg.get("facts_gen_toks", 24), temperature=0.0, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s.prompt_ids) for s in samples], params, use_tqdm=False)
    result: dict[str, Any] = {}
    for s, o in zip(samples, outs, strict=True):
        answer = o.outputs[0].text
        hit = score_answer(answer, s.expected, s.distractors)
        part = result.setdefault(str(s.length), {"length": s.length, "n": 0, "hits": 0, "samples": {}})
        part["n"] += 1
        part["hits"] += hit
        part["samples"][s.id] = {**s.meta(), "answer": answer.strip()[:160], "hit": bool(hit)}
    for s in rebuilt:
        result[str(s.length)].setdefault("built_sha", {})[s.id] = s.prompt_sha
    return result


def extendable_facts(stored: dict[str, Any], cfg: dict[str, Any]) -> int:
    """How many passages per length a stored worker record ``stored`` holds that a run of config ``cfg`` can
    keep: its ``facts_n`` when ``cfg`` asks for more passages and is otherwise the same config and the record
    has no errors; 0 otherwise (the runner then measures everything again)."""
    old = stored.get("config") or {}
    n_old, n_new = old.get("facts_n") or 0, cfg.get("facts_n") or 0
    same = {k: v for k, v in old.items() if k != "facts_n"} == {k: v for k, v in cfg.items() if k != "facts_n"}
    ok = same and 0 < n_old < n_new and not stored.get("errors") and stored.get("facts_results")
    return n_old if ok else 0


def extend_facts_record(stored: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The worker record of a run extended from ``stored`` (passages ``0 .. k-1``) by ``new`` (a worker run
    with ``facts_first = k``: passages ``k .. n-1``): per length the union of the samples with ``n`` and
    ``hits`` recounted, ``new``'s config without ``facts_first``, timings summed, and ``"extended"`` listing
    the passage counts run in each part.

    Raises ValueError when ``new`` has errors, when the passages it built again for ``0 .. k-1`` do not
    have the stored prompts (``prompt_sha``: another tokenizer, filler text or design), or when the union is
    not exactly passages ``0 .. n-1`` of every length."""
    if new.get("errors"):
        raise ValueError(f"the extension run has errors: {new['errors']}")
    cfg = {k: v for k, v in new["config"].items() if k != "facts_first"}
    k, n = new["config"].get("facts_first", 0), cfg["facts_n"]
    merged = {**new, "config": cfg, "facts_results": {}}
    for length, part in new["facts_results"].items():
        old = stored["facts_results"].get(length) or {}
        old_sha = {i: s.get("prompt_sha") for i, s in old.get("samples", {}).items()}
        if old_sha != part.get("built_sha", {}):
            raise ValueError(f"length {length}: the stored passages are not the first {k} of this design "
                             "(prompt tokens differ); run without --reuse")
        samples = {**old["samples"], **part["samples"]}
        if sorted(samples) != [f"L{length}-{i:03d}" for i in range(n)]:
            raise ValueError(f"length {length}: the stored and new passages are not passages 0..{n - 1}")
        merged["facts_results"][length] = {"length": part["length"], "n": len(samples),
                                           "hits": sum(bool(s["hit"]) for s in samples.values()),
                                           "samples": samples}
    if sorted(merged["facts_results"]) != sorted(stored["facts_results"]):
        raise ValueError("the stored and new runs measured other lengths")
    times = stored.get("timings", {}), new.get("timings", {})
    merged["timings"] = {key: times[0].get(key, 0) + times[1].get(key, 0) for key in {**times[0], **times[1]}}
    merged["extended"] = [*stored.get("extended", [stored["config"]["facts_n"]]), n - k]
    return merged
