"""Recall / answer-accuracy monitor: the regression detector, the append-only history, and a
scheduled run where the alert fires on the degraded run only (fake and real knowledge base)."""

import json
import shutil
from types import SimpleNamespace

import pytest

from conftest import SUPPORT
from llmtech.errors import DataError
from llmtech.rag.monitor import (EvalItem, Monitor, MonitorConfig, answer_in_context,
                                 append_jsonl, detect_regressions, load_eval_set, plot_trends,
                                 ranked_docs, read_jsonl_lenient, retrieval_metrics, spread)
from llmtech.rag.types import Passage

# --------------------------------------------------------------------------- detector

STABLE = [{"hit@5": v} for v in (0.80, 0.82, 0.79, 0.81)]  # run-to-run noise of ±0.02


def test_no_alert_on_noise_or_improvement():
    assert detect_regressions(STABLE, {"hit@5": 0.78}, ["hit@5"], threshold=0.05) == []
    assert detect_regressions(STABLE, {"hit@5": 0.95}, ["hit@5"], threshold=0.05) == []


def test_alert_on_a_real_drop_names_metric_and_baseline():
    [a] = detect_regressions(STABLE, {"hit@5": 0.70, "mrr@10": 0.1}, ["hit@5"], threshold=0.05)
    assert a["metric"] == "hit@5" and a["baseline"] == pytest.approx(0.805)
    assert a["drop"] == pytest.approx(0.105) and a["baseline_kind"] == "median of last 4"


def test_best_vs_median_window_and_missing_values():
    cur = {"hit@5": 0.77}
    assert detect_regressions(STABLE, cur, ["hit@5"], threshold=0.04, baseline="median") == []
    [a] = detect_regressions(STABLE, cur, ["hit@5"], threshold=0.04, baseline="best")
    assert a["baseline"] == 0.82
    # only the last `window` runs count: an old bad stretch does not lower the bar
    hist = [{"m": 0.2}, {"m": 0.2}, {"m": 0.2}, {"m": 0.8}, {"m": 0.8}]
    assert detect_regressions(hist, {"m": 0.6}, ["m"], window=5) == []   # median 0.2
    assert detect_regressions(hist, {"m": 0.6}, ["m"], window=2)[0]["baseline"] == 0.8
    # nothing to compare with: first run, or a metric earlier runs did not have
    assert detect_regressions([], {"m": 0.0}, ["m"]) == []
    assert detect_regressions([{"other": 1.0}], {"m": 0.0}, ["m"]) == []
    assert detect_regressions(STABLE, {}, ["hit@5"]) == []


# --------------------------------------------------------------------------- history files

def test_corrupt_history_line_is_reported_with_line_number_and_skipped(tmp_path):
    path = tmp_path / "history.jsonl"
    append_jsonl(path, {"run": 1, "metrics": {"hit@5": 1.0}})
    append_jsonl(path, {"run": 2, "metrics": {"hit@5": 0.9}})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"run": 3, "metrics": {"hit@')            # a writer killed mid-line
    append_jsonl(path, {"run": 4, "metrics": {"hit@5": 0.8}})  # must start on a new line
    with open(path, "ab") as f:
        f.write(b'[1, 2]\n{"run": 6}\n\xff\xfe\n')
    records, problems = read_jsonl_lenient(path, required=("metrics",))
    assert [r["run"] for r in records] == [1, 2, 4]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:3", f"{path}:5", f"{path}:6",
                                                   f"{path}:7"]
    assert "not valid JSON" in problems[0] and "missing field 'metrics'" in problems[2]
    assert read_jsonl_lenient(tmp_path / "absent.jsonl") == ([], [])


def test_load_eval_set_and_its_errors(tmp_path):
    items = load_eval_set(SUPPORT / "eval_qa.jsonl")
    assert len(items) == 128 and sum(it.answerable for it in items) == 116
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"id": "a", "question": "q?", "answer": "x", "doc_ids": ["d"]}\n'
                   '{"id": "b", "answer": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.jsonl:2: missing field 'question'"):
        load_eval_set(bad)
    bad.write_text('{"id": "a", "question": "q?"}\n{"id": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.jsonl:2"):
        load_eval_set(bad)


# --------------------------------------------------------------------------- metrics

def P(doc, text="", n=0):
    return Passage(f"{doc}#{n}", doc, text)


def test_retrieval_metrics_are_document_level():
    items = [EvalItem("q1", "a?", "7天", ["returns_zh.md", "returns_en.md"]),
             EvalItem("q2", "b?", "36 months", ["warranty_en.md"]),
             EvalItem("q3", "c?", "", [])]                       # unanswerable: not scored
    results = [[P("returns_zh.md", "退货期限为 7 天。", 0), P("returns_zh.md", "", 1), P("x.md")],
               [P("a.md"), P("b.md"), P("warranty_en.md", "Locks: 36 Months of cover")],
               [P("a.md")]]
    assert ranked_docs(results[0]) == ["returns_zh.md", "x.md"]  # a doc ranks at its best chunk
    m = retrieval_metrics(items, results, k=5)
    assert m["n_questions"] == 2
    assert m["hit@1"] == 0.5 and m["hit@5"] == 1.0
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["recall@5"] == pytest.approx((0.5 + 1) / 2)
    assert m["answer_in_context"] == 1.0       # "7天" ~ "7 天", "36 months" ~ "36 Months"
    assert not answer_in_context("", [P("a", "anything")])
    assert [it.id for it in spread(items, 2)] == ["q1", "q3"] and spread(items, 0) == []


# --------------------------------------------------------------------------- the monitor

class FakeKB:
    """Returns each question's gold documents first, unless they were removed."""

    def __init__(self, items):
        self.by_q = {it.question: it for it in items}
        self.removed: set[str] = set()
        self.calls = 0

    def search_many(self, queries, k=5, mode="hybrid"):
        self.calls += 1
        out = []
        for q in queries:
            it = self.by_q[q]
            docs = [d for d in it.doc_ids if d not in self.removed] + ["faq.md", "misc.md"]
            out.append([P(d, f"{d}: {it.answer if d in it.doc_ids else 'nothing'}")
                        for d in docs][:k])
        return out

    def doc_hashes(self):
        docs = {d for it in self.by_q.values() for d in it.doc_ids} - self.removed
        return {d: "h" for d in docs}


class FakeGenerator:
    def __init__(self):
        self.generated = 0

    def answer_many(self, questions, contexts):
        self.generated += len(questions)
        out = []
        for ps in contexts:
            text = ps[0].text.split(": ", 1)[1] if ps else ""
            out.append(SimpleNamespace(text=text, refused=text == "nothing"))
        return out


def test_monitor_alerts_on_the_degraded_run_only(tmp_path):
    items = [EvalItem(f"q{i}", f"question {i}?", f"answer {i}", [f"doc{i % 6}.md"])
             for i in range(30)] + [EvalItem("u1", "unanswerable?", "", [])]
    kb, gen = FakeKB(items), FakeGenerator()
    mon = Monitor(kb, items, tmp_path / "h.jsonl", tmp_path / "a.jsonl",
                  MonitorConfig(generate=8, threshold=0.05), gen, config={"note": "fake"})
    schedule = ["good", "good", "degraded", "good", "good"]

    def before_each(i):
        kb.removed = {"doc0.md", "doc1.md"} if schedule[i] == "degraded" else set()
        if i == 3:  # a corrupt line appears in the history: reported, never fatal
            with open(tmp_path / "h.jsonl", "a") as f:
                f.write("{not json\n")
        return schedule[i]

    records = mon.run_every(0, len(schedule), before_each)
    assert [bool(r["alerts"]) for r in records] == [False, False, True, False, False]
    assert records[0]["metrics"]["hit@1"] == 1.0 and records[2]["metrics"]["hit@1"] < 0.7
    assert {"hit@1", "hit@5", "mrr@10", "answer_in_context", "answer_accuracy"} <= set(records[2]["alerts"])
    assert records[0]["kb_hash"] == records[1]["kb_hash"] != records[2]["kb_hash"]
    alerts, _ = mon.alerts()
    assert {a["run"] for a in alerts} == {3} and all(a["label"] == "degraded" for a in alerts)
    history, problems = mon.history()
    assert [r["run"] for r in history] == [1, 2, 3, 4, 5]
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'h.jsonl'}:4:")
    assert history[0]["config"]["note"] == "fake" and history[0]["eval_hash"]
    # answers are reused when question + context are unchanged: 8 good + 8 degraded prompts
    assert gen.generated < 16 and records[1]["metrics"]["answer_generated"] == 0
    assert records[0]["metrics"]["answer_accuracy"] == 1.0   # 7 correct + 1 refusal
    fig = plot_trends(history, ["hit@1", "answer_accuracy", "nope"], alerts)
    fig.savefig(tmp_path / "t.png")
    # a new eval set is not compared with runs of the old one
    mon2 = Monitor(kb, items[:20], tmp_path / "h.jsonl", tmp_path / "a.jsonl")
    kb.removed = {"doc0.md", "doc1.md"}
    assert mon2.run_once("other eval set")["alerts"] == []


def test_monitor_on_a_real_knowledge_base(tmp_path):
    """Integration: a real KnowledgeBase (MiniLM + FAISS + BM25), opened from its path each run;
    half the documents vanish before run 2 and come back before run 3."""
    from llmtech.rag.kb import KnowledgeBase

    docs = tmp_path / "docs"
    docs.mkdir()
    names = sorted(p.name for p in (SUPPORT / "kb").glob("*_en.md"))[:10]
    for n in names:
        shutil.copy(SUPPORT / "kb" / n, docs / n)
    items = [it for it in load_eval_set(SUPPORT / "eval_qa.jsonl")
             if it.lang == "en" and set(it.doc_ids) & set(names)]
    assert len(items) >= 10
    kb = KnowledgeBase.build(tmp_path / "kb", docs)
    kb.close()
    mon = Monitor(str(tmp_path / "kb"), items, tmp_path / "history.jsonl",
                  cfg=MonitorConfig(k=5, mode="hybrid"))

    def before_each(i):
        if i == 0:
            return "10 docs"
        for n in names[::2]:
            if i == 1:
                (docs / n).unlink()
            elif not (docs / n).exists():
                shutil.copy(SUPPORT / "kb" / n, docs / n)
        k = KnowledgeBase.build(tmp_path / "kb", docs)
        n_docs = k.stats()["documents"]
        k.close()
        return f"{n_docs} docs"

    records = mon.run_every(0, 3, before_each)
    hit5 = [r["metrics"]["hit@5"] for r in records]
    assert [r["label"] for r in records] == ["10 docs", "5 docs", "10 docs"]
    assert hit5[0] > 0.85 and hit5[1] < hit5[0] - 0.2 and hit5[2] == hit5[0]
    assert [bool(r["alerts"]) for r in records] == [False, True, False]
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["run"] == 2 for x in lines)
