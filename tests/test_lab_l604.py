"""Lab L6.04: retrieve → rerank → generate with citations, run end to end in quick mode."""

import json

import pytest

from conftest import ROOT, run_script

LAB = ROOT / "lessons/lesson6/04_rag_architecture/rag_architecture_demo.py"


@pytest.mark.slow
def test_lab_rag_architecture_quick(tmp_path):
    # a smaller quick run: 6 questions (2 unanswerable), one reranker, short answers
    r = run_script(LAB, "--quick", "--out", tmp_path, "questions=6", "compare_rerank=[]",
                   "max_new_tokens=16", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["lab"] == "L6.04" and m["model"] == "smollm2-135m" and m["questions"] == 6
    assert m["reranker"] == "llm-ql" and m["kb_chunks"] > 100
    # retrieval on the sample KB is strong; the hybrid retriever must find the answer documents
    assert m["hit_at_k_retrieval"] >= 0.6 and m["hit_at_1_retrieval"] >= 0.3
    for key in ["acc_no_rag", "acc_rag", "acc_rag_rerank", "hit_at_k_rerank", "refusal_accuracy",
                "refusal_accuracy_no_rag", "f1_rag", "rouge_l_rag_rerank", "cited_share",
                "attributed_share", "echo_share"]:
        assert 0.0 <= m[key] <= 1.0, key
    for key in ["citation_accuracy", "attribution_accuracy"]:  # None when nothing was cited
        assert m[key] is None or 0.0 <= m[key] <= 1.0, key
    # the reranker's cost is measured: k candidates per question, batched forward passes
    assert m["rerank_pairs"] == 6 * m["k"] and 6 <= m["rerank_forward_passes"] < m["rerank_pairs"]
    assert m["rerank_tokens"] > 100 * m["rerank_pairs"] and m["rerank_seconds_per_query"] > 0
    assert m["generate_seconds_per_query_rag"] > m["generate_seconds_per_query_no_rag"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "## 讨论" in report and "检索与重排" in report and "答案示例" in report
    assert (tmp_path / "rag_stages.png").stat().st_size > 10_000


def test_lab_unknown_offline_model_is_a_clear_error(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "model=hf:no-org/no-such-model", timeout=300)
    assert r.returncode == 2 and "no-org/no-such-model" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "metrics.json").exists()
