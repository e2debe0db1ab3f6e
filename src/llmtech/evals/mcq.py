"""Multiple-choice evaluation by log-likelihood, on CMMLU / C-Eval style CSV folders.

Layout: ``DIR/test/<subject>.csv`` (questions) and ``DIR/dev/<subject>.csv`` (few-shot
examples of the same subject), or a ``DIR`` that directly holds ``<subject>.csv`` files. Each
CSV has a header naming the columns ``Question, A, B, C, D, Answer`` (any case, any extra
columns, e.g. CMMLU's leading index column). Files may be UTF-8 or GBK/GB18030.

Two ways to ask a causal LM for its choice:

* ``letter``: the prompt lists the four options and ends with ``答案:``; the model's choice is
  the letter among `` A`` / `` B`` / `` C`` / `` D`` with the highest next-token log-probability.
* ``cloze``: the prompt is the question alone; each option's text is scored as the
  continuation, and the choice is the highest log-likelihood per character (length-normalised,
  so long options are not penalised for having more tokens to pay for).

Each question costs one forward pass over the prompt; the four continuations then reuse the
prompt's key/value cache in one padded batch (letters need no second pass at all).
Rows with a bad answer letter or a missing choice are skipped and reported with file and line.
"""

from __future__ import annotations

import csv
import inspect
import io as _io
import json
import logging
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..errors import ConfigError, DataError
from ..io import decode_bytes

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
MODES = ("letter", "cloze")
CHANCE = 0.25
COLUMNS = ("question", "a", "b", "c", "d", "answer")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A" .. "D"
    where: str  # "file:line"

    @property
    def answer_text(self) -> str:
        return self.choices[LETTERS.index(self.answer)]


@dataclass
class McqSet:
    """Questions (and few-shot examples) per subject, plus the rows that were skipped."""

    questions: dict[str, list[Question]]
    dev: dict[str, list[Question]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # subject -> display name (e.g. Chinese)
    skipped: list[dict] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(len(v) for v in self.questions.values())


# --------------------------------------------------------------------------- reading

def _clean(s: str) -> str:
    # CMMLU has Kangxi/CJK radicals left over from PDF extraction ('⽤' for '用'): NFKC fixes them
    return unicodedata.normalize("NFKC", s).strip()


def read_mcq_csv(path: str | Path, subject: str | None = None) -> tuple[list[Question], list[dict]]:
    """Questions of one CSV file and the rows skipped as ``{"file", "line", "reason"}``."""
    path = Path(path)
    subject = subject or subject_of(path)
    raw = path.read_bytes()
    if not raw.strip():
        return [], [{"file": str(path), "line": 1, "reason": "file is empty"}]
    text, _ = decode_bytes(raw, str(path))
    reader = csv.reader(_io.StringIO(text))
    header = next(reader, [])
    cols = {h.strip().lower(): i for i, h in enumerate(header)}
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        return [], [{"file": str(path), "line": 1,
                     "reason": "header must name the columns Question, A, B, C, D, Answer "
                               f"(missing: {', '.join(m.upper() if len(m) == 1 else m.title() for m in missing)})"}]
    out: list[Question] = []
    skipped: list[dict] = []
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num
        if not any(c.strip() for c in row):
            continue

        def skip(reason: str) -> None:
            skipped.append({"file": str(path), "line": start, "reason": reason})

        if len(row) > len(header):
            skip(f"{len(row)} values but the header has {len(header)} columns")
            continue
        get = lambda c: _clean(row[cols[c]]) if cols[c] < len(row) else ""  # noqa: E731
        q = get("question")
        choices = tuple(get(c) for c in "abcd")
        empty = [L for L, c in zip(LETTERS, choices) if not c]
        ans = get("answer").upper()
        if not q:
            skip("question is empty")
        elif empty:
            skip(f"missing choice {', '.join(empty)}")
        elif ans not in LETTERS:
            skip(f"answer {ans!r} is not one of A, B, C, D" if ans else "answer is empty")
        else:
            out.append(Question(subject, q, choices, ans, f"{path}:{start}"))  # type: ignore[arg-type]
    return out, skipped


def subject_of(path: Path) -> str:
    """``agronomy.csv`` -> ``agronomy``; C-Eval's ``law_val.csv`` / ``law_dev.csv`` -> ``law``."""
    stem = path.stem
    for suffix in ("_test", "_val", "_dev"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def find_mcq_files(data: str | Path, split: str = "test") -> tuple[dict[str, Path], dict[str, Path]]:
    """``(question files, dev files)`` by subject, for a folder in the CMMLU layout or a folder
    (or a single file) of subject CSVs. No CSV at all is a DataError."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: folder not found")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"{data}: expected a folder of CSV files (or one .csv file)")
        files, dev_dir = [data], data.parent.parent / "dev"
    elif (data / split).is_dir():
        files, dev_dir = sorted((data / split).glob("*.csv")), data / "dev"
    else:
        files, dev_dir = sorted(data.glob("*.csv")), data / "dev"
    if not files:
        raise DataError(f"{data}: no CSV files (expected {data}/{split}/*.csv or {data}/*.csv, "
                        "with the columns Question, A, B, C, D, Answer)")
    tests = {subject_of(f): f for f in files}
    devs = {subject_of(f): f for f in sorted(dev_dir.glob("*.csv"))} if dev_dir.is_dir() else {}
    return tests, devs


def subject_names(data: str | Path) -> dict[str, str]:
    """Display names from CMMLU's ``categories.json`` (``name_en2zh``) when the folder has one."""
    data = Path(data)
    for p in (data / "categories.json", data.parent / "categories.json"):
        if p.is_file():
            try:
                names = json.loads(p.read_text(encoding="utf-8")).get("name_en2zh", {})
            except (ValueError, AttributeError):
                return {}
            return {k: v for k, v in names.items() if isinstance(v, str)}
    return {}


def load_mcq(data: str | Path, subjects: Iterable[str] | None = None, limit: int | None = None,
             shots: int = 0, split: str = "test") -> McqSet:
    """Read the questions (first ``limit`` valid ones per subject) and, for ``shots > 0``, the
    subject's dev examples. Unknown subjects, or shots without dev files, are DataErrors."""
    if shots < 0:
        raise ConfigError(f"shots must be >= 0 (got {shots})")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 (got {limit})")
    tests, devs = find_mcq_files(data, split)
    wanted = list(subjects) if subjects else sorted(tests)
    unknown = [s for s in wanted if s not in tests]
    if unknown:
        some = ", ".join(sorted(tests)[:8]) + (" ..." if len(tests) > 8 else "")
        raise DataError(f"{data}: no CSV for subject(s) {', '.join(unknown)} (have: {some})")
    out = McqSet(questions={}, names=subject_names(data))
    for s in wanted:
        qs, bad = read_mcq_csv(tests[s], s)
        out.questions[s] = qs[:limit] if limit else qs
        out.skipped += bad
        if shots:
            if s not in devs:
                raise DataError(f"{data}: {shots}-shot prompts need dev examples, but there is no "
                                f"dev/{s}.csv")
            ex, bad = read_mcq_csv(devs[s], s)
            out.skipped += bad
            if len(ex) < shots:
                log.warning("%s: only %d dev examples for %d shots", devs[s], len(ex), shots)
            out.dev[s] = ex[:shots]
    for b in out.skipped:
        log.warning("skipped %s:%s: %s", b["file"], b["line"], b["reason"])
    if out.n == 0:
        raise DataError(f"{data}: no valid questions in {', '.join(wanted)} "
                        f"({len(out.skipped)} rows skipped)")
    return out


# --------------------------------------------------------------------------- prompts

def _block(q: Question, mode: str, with_answer: bool) -> str:
    if mode == "letter":
        opts = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, q.choices))
        return f"题目：{q.question}\n{opts}\n答案:" + (f" {q.answer}\n\n" if with_answer else "")
    return f"题目：{q.question}\n答案：" + (f"{q.answer_text}\n\n" if with_answer else "")


def build_prompt(q: Question, mode: str = "letter", shots: list[Question] | None = None,
                 subject_name: str | None = None) -> tuple[str, list[str]]:
    """``(prompt, four continuations)`` for one question in ``letter`` or ``cloze`` mode."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    name = subject_name or q.subject.replace("_", " ")
    head = (f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n" if mode == "letter"
            else f"以下是关于{name}的问题和答案。\n\n")
    prompt = head + "".join(_block(x, mode, True) for x in shots or []) + _block(q, mode, False)
    conts = [f" {L}" for L in LETTERS] if mode == "letter" else list(q.choices)
    return prompt, conts


# --------------------------------------------------------------------------- scoring

def _forward_params(model) -> set[str]:
    """Keyword names the model's forward accepts (a PEFT wrapper passes keywords on to its base
    model, so the base model's names count)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(inner.forward).parameters)
    except (TypeError, ValueError):
        return set()


@torch.no_grad()
def score_token_continuations(model, prompt_ids: list[int], continuations: list[list[int]],
                              pad_id: int = 0) -> list[float]:
    """log p(continuation | prompt) summed over its tokens, for token-id sequences. The prompt
    runs once; its key/value cache is repeated for the continuations, which run together as one
    right-padded batch (skipped when every continuation is a single token)."""
    if not prompt_ids or not continuations or any(not c for c in continuations):
        raise ValueError("prompt and every continuation need at least one token")
    model.eval()
    c_ids = continuations
    longest = max(len(c) for c in c_ids)
    dev = model.device
    params = _forward_params(model)
    kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    out = model(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=longest > 1, **kw)
    first = torch.log_softmax(out.logits[0, -1].float(), -1).cpu()
    sums = [float(first[c[0]]) for c in c_ids]
    if longest > 1:
        n, P, L = len(c_ids), len(prompt_ids), longest - 1
        ids = torch.full((n, L), pad_id, dtype=torch.long)
        att = torch.zeros((n, P + L), dtype=torch.long)
        att[:, :P] = 1
        for j, c in enumerate(c_ids):
            ids[j, :len(c) - 1] = torch.tensor(c[:-1])
            att[j, P:P + len(c) - 1] = 1
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False,
                       **{cache_arg: cache}).logits.float().cpu()
        logp = torch.log_softmax(logits, -1)
        for j, c in enumerate(c_ids):
            if len(c) > 1:
                sums[j] += float(logp[j, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum())
    return sums


@torch.no_grad()
def score_continuations(model, tokenizer, prompt: str, continuations: list[str],
                        max_length: int = 2048) -> tuple[list[float], list[int], bool]:
    """log p(continuation | prompt) summed over its tokens, for each continuation; the token
    counts; and whether the prompt had to be cut (from the left) to fit ``max_length``.

    The prompt runs once; its key/value cache is repeated for the continuations, which run
    together as one right-padded batch (skipped when every continuation is a single token).
    Context and continuation are tokenised separately, so every option is scored on the same
    prompt tokens.
    """
    model.eval()
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if not p_ids or any(not c for c in c_ids):
        raise ValueError("prompt and every continuation need at least one token")
    longest = max(len(c) for c in c_ids)
    truncated = len(p_ids) + longest > max_length
    if truncated:
        p_ids = p_ids[-(max_length - longest):]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = score_token_continuations(model, p_ids, c_ids, pad)
    return sums, [len(c) for c in c_ids], truncated


def binomial_summary(correct: int, n: int, chance: float = CHANCE) -> dict:
    """Accuracy with a Wilson 95% interval and the one-sided binomial p-value against chance."""
    from scipy.stats import binomtest

    if n == 0:
        return {"accuracy": 0.0, "n": 0, "correct": 0, "ci95_low": 0.0, "ci95_high": 1.0,
                "p_vs_chance": 1.0}
    t = binomtest(correct, n, chance, alternative="greater")
    ci = binomtest(correct, n).proportion_ci(0.95, method="wilson")
    return {"accuracy": correct / n, "n": n, "correct": correct, "ci95_low": float(ci.low),
            "ci95_high": float(ci.high), "p_vs_chance": float(t.pvalue)}


def evaluate_mcq(model, tokenizer, data: McqSet, mode: str = "letter", shots: int = 0,
                 max_length: int = 2048, return_items: bool = False) -> dict:
    """Accuracy of ``model`` on ``data`` (see module docstring). Returns a JSON-able dict:
    ``accuracy, n, correct, ci95_low, ci95_high, p_vs_chance, chance, by_subject, predicted``
    (how often each letter was chosen), ``truncated``, ``skipped``, ``seconds``; in cloze mode
    also ``accuracy_sum`` (no length normalisation) and ``accuracy_per_token``; and ``items``
    (one record per question) when ``return_items``."""
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    t0 = time.time()
    items = []
    all_q = [q for qs in data.questions.values() for q in qs]
    for q in tqdm(all_q, desc=f"mcq {mode} {shots}-shot", disable=None):
        prompt, conts = build_prompt(q, mode, data.dev.get(q.subject, [])[:shots] if shots else [],
                                     data.names.get(q.subject))
        sums, ntok, cut = score_continuations(model, tokenizer, prompt, conts, max_length)
        if mode == "letter":
            main = sums
        else:
            main = [s / max(len(c), 1) for s, c in zip(sums, conts)]
        pick = lambda xs: LETTERS[max(range(4), key=lambda i: xs[i])]  # noqa: E731
        items.append({"where": q.where, "subject": q.subject, "answer": q.answer,
                      "pred": pick(main), "pred_sum": pick(sums),
                      "pred_per_token": pick([s / n for s, n in zip(sums, ntok)]),
                      "scores": [round(x, 4) for x in main], "truncated": cut})
    correct = sum(it["pred"] == it["answer"] for it in items)
    res = {"mode": mode, "shots": shots, **binomial_summary(correct, len(items)), "chance": CHANCE}
    if mode == "cloze":
        res["accuracy_sum"] = sum(it["pred_sum"] == it["answer"] for it in items) / len(items)
        res["accuracy_per_token"] = sum(it["pred_per_token"] == it["answer"] for it in items) / len(items)
    res["by_subject"] = {}
    for s in data.questions:
        its = [it for it in items if it["subject"] == s]
        if its:
            k = sum(it["pred"] == it["answer"] for it in its)
            res["by_subject"][s] = {"accuracy": k / len(its), "n": len(its)}
    res["predicted"] = {L: sum(it["pred"] == L for it in items) for L in LETTERS}
    res["gold"] = {L: sum(it["answer"] == L for it in items) for L in LETTERS}
    res["truncated"] = sum(it["truncated"] for it in items)
    res["skipped"] = list(data.skipped)
    res["seconds"] = round(time.time() - t0, 2)
    if return_items:
        res["items"] = items
    return res


def run_mcq(data: str | Path, model: str | None = None, subjects: Iterable[str] | None = None,
            shots: int = 0, limit: int | None = None, mode: str = "letter",
            max_length: int = 2048) -> dict:
    """Load the questions, then the model, and evaluate (what ``llmtech eval mcq`` prints)."""
    from .. import models

    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    mcq = load_mcq(data, subjects, limit, shots)
    model_id = model or models.DEFAULT_LM
    lm, tok = models.load_lm(model_id)
    res = evaluate_mcq(lm, tok, mcq, mode, shots, max_length)
    return {"data": str(data), "model": model_id, **res}


def accuracy_line(res: dict) -> str:
    """``0.338 (n=240, 95% CI 0.28–0.40)`` for reports."""
    if not res.get("n"):
        return "n=0"
    return (f"{res['accuracy']:.3f} (n={res['n']}, 95% CI {res['ci95_low']:.3f}–{res['ci95_high']:.3f}, "
            f"p={res['p_vs_chance']:.3g} vs {CHANCE})")


__all__ = ["LETTERS", "MODES", "CHANCE", "Question", "McqSet", "read_mcq_csv", "find_mcq_files",
           "load_mcq", "build_prompt", "score_continuations", "binomial_summary", "evaluate_mcq",
           "run_mcq", "accuracy_line"]
