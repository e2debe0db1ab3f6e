"""L6.02 chunking strategies, vectorisation throughput and the chunk quality monitor (--quick)."""

import json

import pytest

from conftest import ROOT, run_script

LAB = ROOT / "lessons/lesson6/02_data_preprocessing/data_preprocess.py"


@pytest.mark.slow
def test_lab_data_preprocess_quick(tmp_path):
    # a private embedding cache: the run is hermetic and really embeds (no warm user cache)
    r = run_script(LAB, "--quick", "--out", tmp_path, f"cache={tmp_path / 'emb.sqlite'}",
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    names = ["tokens-64/16", "tokens-128/32", "tokens-256", "recursive-200/40",
             "recursive-500/50", "sentences-200", "sentences-500/1", "whole-doc"]
    assert m["best_strategy"] in names and m["kb_docs"] == 44
    assert m["eval_questions"] == 116 and m["eval_questions_en"] == 59
    # smaller chunks -> more of them; whole-doc = one chunk per document
    assert (m["tokens-64/16_chunks"] > m["tokens-128/32_chunks"] > m["tokens-256_chunks"]
            > m["whole-doc_chunks"] == 44)
    assert m["recursive-200/40_mean_chars"] <= 200 + 1
    # MiniLM reads 256 word pieces: whole documents get cut, 128-token windows never do
    assert m["whole-doc_en_truncated"] > 0.5 and m["tokens-128/32_en_truncated"] == 0
    for n in names:
        for key in ("bm25_hit@5", "dense_hit@5", "bm25_mrr", "dense_mrr"):
            assert 0.5 < m[f"{n}_{key}"] <= 1.0, (n, key)
    assert 0.9 <= m["best_hit5"] <= 1.0 and 0.7 < m["best_mrr"] <= 1.0
    # throughput: the wrapper costs nothing, the cache makes a re-run orders of magnitude faster
    assert m["texts_per_s"] > 5 and m["texts_per_s_raw"] > 5
    assert m["cache_hit_rate"] == 1.0 and m["cache_speedup"] > 20
    assert m["embedder_vs_raw_max_diff"] < 1e-5
    # quality monitor: every corrupted file caught, nothing clean skipped
    assert m["quality_files_detected"] == m["quality_files_corrupted"] == 7
    assert m["quality_clean_skipped"] == 0 and m["quality_mojibake"] > 0
    assert m["quality_exact_dup"] > 0 and m["quality_near_dup"] > 0
    assert m["quality_corrupt_skipped"] > 10
    assert (tmp_path / "chunking.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "每个损坏文件是否被发现" in report and "向量化吞吐" in report
