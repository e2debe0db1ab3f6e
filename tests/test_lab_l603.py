"""Lab L6.03: FAISS build, reload, incremental update vs full rebuild (quick mode)."""

import json

from conftest import ROOT, run_script

LAB = ROOT / "lessons/lesson6/03_vector_db_build/build_vector_store.py"


def test_lab_incremental_vector_store(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_docs"] >= 40 and m["n_chunks"] > m["n_docs"]
    assert m["reload_identical"] is True and m["index_consistent"] is True
    assert m["incremental_equals_full"] is True and m["deleted_doc_hits"] == 0
    assert (m["docs_added"], m["docs_updated"], m["docs_deleted"]) == (1, 2, 1)
    # only the changed chunks are embedded again; a rebuild embeds them all
    assert 0 < m["embedded_incremental"] <= 6 and m["embedded_full"] > 20 * m["embedded_incremental"]
    assert m["incremental_s"] < m["full_rebuild_s"]
    assert "10 天" in (tmp_path / "report.md").read_text()
    assert not (ROOT / "data/support/kb/gift_cards_zh.md").exists()   # the originals untouched


def test_lab_rejects_unknown_key(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "chunk_sise=3", timeout=120)
    assert r.returncode == 2 and "chunk_sise" in r.stderr and "Traceback" not in r.stderr
