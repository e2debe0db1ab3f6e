"""Lab L6.01: vector store selection, run in quick mode end to end."""

import json

from conftest import ROOT, run_script

LAB = ROOT / "lessons/lesson6/01_vector_store_selection/knowledge_base_selection.py"
STORES = ["faiss_flat", "faiss_hnsw", "faiss_ivf", "chroma", "pgvector"]


def test_lab_vector_store_selection(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["model"] == "minilm-l6" and m["dim"] == 384
    assert m["n_vectors"] == 2000 and m["n_queries"] >= 150
    for s in STORES:
        assert m[f"{s}_build_s"] > 0 and 0 < m[f"{s}_p50_ms"] <= m[f"{s}_p95_ms"] < 1000
        assert m[f"{s}_disk_bytes"] > 2000 * 384 * 4  # at least the raw float32 vectors
        assert 0.0 <= m[f"{s}_recall_at_10"] <= 1.0
    assert m["faiss_flat_recall_at_10"] == 1.0  # exact search is its own ground truth
    assert m["faiss_hnsw_recall_at_10"] >= 0.8 and m["faiss_ivf_recall_at_10"] >= 0.8
    assert m["chroma_recall_at_10"] >= 0.8 and m["pgvector_recall_at_10"] >= 0.8
    # no Elasticsearch server here: the report says so instead of inventing numbers
    assert m["es_measured"] is False and "elasticsearch_p50_ms" not in m
    report = (tmp_path / "report.md").read_text()
    assert "没有可连接的 ES 服务器" in report and "| faiss-hnsw |" in report
    assert (tmp_path / "store_selection.png").exists()
    assert (tmp_path / "stores/faiss-hnsw/store.json").exists()


def test_lab_rejects_unknown_store(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "stores=[milvus]", timeout=120)
    assert r.returncode == 2 and "stores" in r.stderr
