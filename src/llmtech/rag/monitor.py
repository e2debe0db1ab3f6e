"""Recall and answer-accuracy monitoring: run an eval set against a knowledge base on a schedule.

Each run asks every question of the eval set (``id, question, answer, doc_ids, lang`` JSONL; an
empty ``answer`` marks a question the knowledge base cannot answer) and measures, on the
answerable ones, at document level (a document ranks where its best chunk ranks):

- ``hit@1``, ``hit@k``, ``mrr@10``, ``recall@k``: did a document holding the answer come back;
- ``answer_in_context``: the gold short answer appears verbatim (whitespace and case ignored)
  in the top-k passages — what the generator needs to have any chance;
- ``answer_accuracy`` (when a generator is given, on ``generate`` questions spread over the
  set): the generated answer contains the gold answer, or, for an unanswerable question, the
  generator refused.

The run's metrics, the time, a fingerprint of the knowledge base (documents + config), a hash
of the eval set and the run's config are appended as one line to a history JSONL. History is
append-only and never rewritten; a line that does not parse (a run killed mid-write, a hand
edit) is reported as ``file:line`` and skipped. Before appending, each watched metric is compared
with the median (or best) of the previous ``window`` runs on the same eval set: a drop larger
than ``threshold`` is a regression — logged as a warning and appended to an alerts JSONL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from pydantic import Field

from ..config import StrictModel
from ..errors import DataError
from .metrics import answer_scores, evaluate_run, ranked_docs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- eval set

@dataclass
class EvalItem:
    id: str
    question: str
    answer: str            # short gold answer; "" = the knowledge base cannot answer it
    doc_ids: list[str]     # documents that hold the answer
    lang: str = ""

    @property
    def answerable(self) -> bool:
        return bool(self.answer) and bool(self.doc_ids)


def load_eval_set(path: str | Path) -> list[EvalItem]:
    """Read an eval-set JSONL; a missing field or a bad line is an error naming file:line."""
    from ..data.formats import read_records

    items = []
    for where, rec in read_records(path):
        for key in ("id", "question"):
            if not str(rec.get(key) or "").strip():
                raise DataError(f"{where}: missing field '{key}'")
        doc_ids = rec.get("doc_ids") or []
        if not isinstance(doc_ids, list):
            raise DataError(f"{where}: 'doc_ids' must be a list of document ids")
        items.append(EvalItem(str(rec["id"]), rec["question"], str(rec.get("answer") or ""),
                              [str(d) for d in doc_ids], str(rec.get("lang") or "")))
    if not items:
        raise DataError(f"{path}: the eval set is empty")
    return items


def eval_hash(items: Sequence[EvalItem]) -> str:
    blob = json.dumps([asdict(i) for i in items], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------- metrics

def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s).lower()


def answer_in_context(answer: str, passages: Iterable[Any]) -> bool:
    """The gold answer appears in the passages (whitespace and case ignored)."""
    return bool(answer) and _squash(answer) in _squash("\n".join(p.text for p in passages))


def retrieval_metrics(items: Sequence[EvalItem], results: Sequence[Sequence[Any]],
                      k: int = 5) -> dict[str, float]:
    """Document-level hit@1/hit@k/MRR@10/recall@k and answer-in-context on answerable items."""
    pairs = [(it, res) for it, res in zip(items, results) if it.answerable]
    if not pairs:
        return {"n_questions": 0}
    run = {it.id: ranked_docs(res) for it, res in pairs}
    qrels = {it.id: {d: 1 for d in it.doc_ids} for it, _ in pairs}
    m = evaluate_run(run, qrels, ks=sorted({1, k}))
    out = {key: m[key] for key in ("hit@1", f"hit@{k}", "mrr@10", f"recall@{k}")}
    out["answer_in_context"] = sum(answer_in_context(it.answer, res[:k])
                                   for it, res in pairs) / len(pairs)
    out["n_questions"] = len(pairs)
    return out


def spread(items: Sequence[EvalItem], n: int) -> list[EvalItem]:
    """``n`` items evenly spaced over the set (deterministic, covers every topic and language)."""
    if n <= 0:
        return []
    if n >= len(items):
        return list(items)
    if n == 1:
        return [items[0]]
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


# --------------------------------------------------------------------------- history files

def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line durably. A previous line left without its newline (a killed writer)
    is closed first, so the new record never fuses with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_lenient(path: str | Path, required: Sequence[str] = ()
                       ) -> tuple[list[dict], list[str]]:
    """Records of a JSONL file and the problems met: a bad line is reported as ``file:line:
    reason`` and skipped, never fatal. A missing file is an empty history."""
    path = Path(path)
    records: list[dict] = []
    problems: list[str] = []
    if not path.exists():
        return records, problems
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{path}:{n}: not valid JSON ({type(e).__name__}: "
                                f"{str(e)[:80]}), line skipped")
                continue
            missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
            if missing:
                problems.append(f"{path}:{n}: missing field '{missing[0]}', line skipped")
                continue
            records.append(rec)
    return records, problems


# --------------------------------------------------------------------------- regressions

Baseline = Literal["median", "best"]


def detect_regressions(previous: Sequence[dict], current: dict[str, float], watch: Sequence[str],
                       threshold: float = 0.05, baseline: Baseline = "median",
                       window: int = 5) -> list[dict[str, Any]]:
    """Watched metrics of ``current`` that fell more than ``threshold`` (absolute) below the
    median/best of the last ``window`` previous runs (``previous``: metric dicts, oldest first).
    Needs at least one previous value of a metric to judge it."""
    alerts = []
    for name in watch:
        value = current.get(name)
        history = [p[name] for p in previous[-window:] if isinstance(p.get(name), (int, float))]
        if not isinstance(value, (int, float)) or not history:
            continue
        base = max(history) if baseline == "best" else statistics.median(history)
        drop = base - value
        if drop > threshold:
            alerts.append({"metric": name, "value": round(value, 4), "baseline": round(base, 4),
                           "drop": round(drop, 4), "threshold": threshold,
                           "baseline_kind": f"{baseline} of last {len(history)}"})
    return alerts


# --------------------------------------------------------------------------- the monitor

class MonitorConfig(StrictModel):
    k: int = Field(5, ge=1)                       # passages retrieved per question
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    watch: list[str] = ["hit@1", "hit@5", "mrr@10", "recall@5", "answer_in_context",
                        "answer_accuracy"]
    threshold: float = Field(0.05, ge=0)          # absolute drop that raises an alert
    baseline: Baseline = "median"
    window: int = Field(5, ge=1)                  # previous runs the baseline looks at
    generate: int = Field(0, ge=0)                # questions answered by the generator per run
    generate_k: int = Field(3, ge=1)              # passages given to the generator
    memo_answers: bool = True                     # same question + same passages -> reuse answer


def kb_fingerprint(kb: Any) -> str:
    """A short hash of what the knowledge base holds (document hashes + its config)."""
    h = hashlib.sha256()
    if hasattr(kb, "doc_hashes"):
        h.update(json.dumps(sorted(kb.doc_hashes().items())).encode("utf-8"))
    if hasattr(kb, "config") and hasattr(kb.config, "model_dump_json"):
        h.update(kb.config.model_dump_json().encode("utf-8"))
    return h.hexdigest()[:12]


class Monitor:
    """Evaluate a knowledge base now (``run_once``) or on a schedule (``run_every``).

    ``kb`` is anything with ``search_many(queries, k, mode=...) -> list[list[Passage]]`` (a
    ``KnowledgeBase``), or a path, opened afresh for each run. ``generator`` has
    ``answer(question, passages) -> Answer(text, refused, ...)``; ``config`` is stored with
    each run so a regression can be traced to what changed.
    """

    def __init__(self, kb: Any, items: Sequence[EvalItem], history: str | Path,
                 alerts: str | Path | None = None, cfg: MonitorConfig | None = None,
                 generator: Any = None, config: dict[str, Any] | None = None):
        self.kb, self.items = kb, list(items)
        self.history_path = Path(history)
        self.alerts_path = Path(alerts) if alerts else self.history_path.with_name("alerts.jsonl")
        self.cfg = cfg or MonitorConfig()
        self.generator, self.config = generator, dict(config or {})
        self.eval_hash = eval_hash(self.items)
        self._memo: dict[str, Any] = {}
        self._reported: set[str] = set()
        self.last_answers: list[tuple[EvalItem, Any, float]] = []  # (item, answer, correct)

    # -- history
    def _read(self, path: Path, required: tuple[str, ...]) -> tuple[list[dict], list[str]]:
        records, problems = read_jsonl_lenient(path, required)
        for p in problems:
            if p not in self._reported:  # each bad line is reported once, not on every read
                self._reported.add(p)
                log.warning(p)
        return records, problems

    def history(self) -> tuple[list[dict], list[str]]:
        """Run records in order and the ``file:line`` problems of lines that were skipped."""
        return self._read(self.history_path, ("metrics",))

    def alerts(self) -> tuple[list[dict], list[str]]:
        return self._read(self.alerts_path, ("metric",))

    # -- one run
    def _open(self):
        if isinstance(self.kb, (str, Path)):
            from .kb import KnowledgeBase

            return KnowledgeBase.open(self.kb), True
        return self.kb, False

    def _answers(self, questions: list[str], contexts: list[list]) -> tuple[list[Any], int, float]:
        """Generated answers (memoised by question + passage texts: greedy decoding of the same
        prompt gives the same answer), how many were generated now and the seconds spent."""
        keys = [hashlib.sha256(json.dumps([q, [p.text for p in ps]], ensure_ascii=False)
                               .encode("utf-8")).hexdigest() for q, ps in zip(questions, contexts)]
        todo = [i for i, k in enumerate(keys) if not (self.cfg.memo_answers and k in self._memo)]
        t0 = time.perf_counter()
        if todo:
            qs, cs = [questions[i] for i in todo], [contexts[i] for i in todo]
            if hasattr(self.generator, "answer_many"):  # batched: much faster on a CPU
                fresh = self.generator.answer_many(qs, cs)
            else:
                fresh = [self.generator.answer(q, c) for q, c in zip(qs, cs)]
            self._memo.update((keys[i], a) for i, a in zip(todo, fresh))
        return [self._memo[k] for k in keys], len(todo), time.perf_counter() - t0

    def evaluate(self, kb: Any) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        results = kb.search_many([it.question for it in self.items], k=max(cfg.k, 10),
                                 mode=cfg.mode)
        metrics: dict[str, float] = retrieval_metrics(self.items, results, cfg.k)
        metrics["search_ms_per_q"] = 1000 * (time.perf_counter() - t0) / len(self.items)
        if self.generator is not None and cfg.generate:
            by_id = {it.id: res for it, res in zip(self.items, results)}
            subset = spread(self.items, cfg.generate)
            answers, fresh, spent = self._answers(
                [it.question for it in subset], [list(by_id[it.id][:cfg.generate_k]) for it in subset])
            correct = [answer_scores(a.text, it.answer)["contains"] if it.answerable
                       else float(bool(getattr(a, "refused", False)))
                       for it, a in zip(subset, answers)]
            self.last_answers = [(it, a, c) for it, a, c in zip(subset, answers, correct)]
            metrics["answer_accuracy"] = sum(correct) / len(correct)
            metrics["answer_n"] = len(correct)
            metrics["answer_generated"] = fresh
            metrics["answer_s_per_q"] = spent / fresh if fresh else 0.0
        return metrics

    def run_once(self, label: str = "") -> dict[str, Any]:
        """Evaluate, compare with history, append the run (and any alerts); returns the record."""
        t0 = time.perf_counter()
        kb, opened = self._open()
        try:
            metrics = self.evaluate(kb)
            fingerprint = kb_fingerprint(kb)
        finally:
            if opened:
                kb.close()
        previous, _ = self.history()
        same_eval = [r["metrics"] for r in previous if r.get("eval_hash") == self.eval_hash]
        record = {"run": len(previous) + 1,
                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "label": label, "kb_hash": fingerprint, "eval_hash": self.eval_hash,
                  "config": {**self.config, **self.cfg.model_dump(exclude={"watch"})},
                  "metrics": {k: round(v, 4) if isinstance(v, float) else v
                              for k, v in metrics.items()}}
        alerts = detect_regressions(same_eval, metrics, self.cfg.watch, self.cfg.threshold,
                                    self.cfg.baseline, self.cfg.window)
        record["alerts"] = [a["metric"] for a in alerts]
        record["seconds"] = round(time.perf_counter() - t0, 2)
        append_jsonl(self.history_path, record)
        for a in alerts:
            a = {"time": record["time"], "run": record["run"], "label": label,
                 "kb_hash": fingerprint, **a}
            append_jsonl(self.alerts_path, a)
            log.warning("REGRESSION in run %d (%s): %s fell to %.3f from %.3f (%s; drop %.3f > %.3f)",
                        record["run"], label or "-", a["metric"], a["value"], a["baseline"],
                        a["baseline_kind"], a["drop"], a["threshold"])
        return record

    def run_every(self, seconds: float, times: int,
                  before_each: Callable[[int], str | None] | None = None) -> list[dict]:
        """Run ``times`` times, ``seconds`` apart (start to start). ``before_each(i)`` runs
        before run ``i`` (0-based) and may return the run's label."""
        records = []
        for i in range(times):
            start = time.monotonic()
            label = (before_each(i) if before_each else None) or ""
            records.append(self.run_once(label))
            if i + 1 < times:
                time.sleep(max(0.0, seconds - (time.monotonic() - start)))
        return records


# --------------------------------------------------------------------------- plots

def plot_trends(records: Sequence[dict], metrics: Sequence[str], alerts: Sequence[dict] = ()):
    """One line per metric over runs; alerted points are marked red. Returns the figure."""
    import matplotlib.pyplot as plt

    runs = [r["run"] for r in records]
    shown = [m for m in metrics if any(m in r["metrics"] for r in records)]
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    flagged = {(a["run"], a["metric"]) for a in alerts}
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, shown):
        ys = [r["metrics"].get(m) for r in records]
        ax.plot(runs, ys, marker="o")
        bad = [(x, y) for x, y in zip(runs, ys) if (x, m) in flagged and y is not None]
        if bad:
            ax.scatter(*zip(*bad), color="red", zorder=3, s=60, label="alert")
            ax.legend(loc="lower left", fontsize=8)
        ax.set_title(m)
        ax.set_xlabel("run")
        ax.set_xticks(runs)
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    return fig
