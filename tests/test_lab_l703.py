"""L7.03 lab end to end (quick, on a slice of the support KB) with the real MiniLM embedder."""

import json

from conftest import ROOT, run_script

LAB = ROOT / "lessons/lesson7/03_incremental_updates/update_strategy.py"


def test_lab_quick_slice(tmp_path):
    out = tmp_path / "out"
    p = run_script(LAB, "--quick", "--out", out, "n_docs=10", "n_queries=4", "scope=enterprise_",
                   'crash_points=["embed:1"]', timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["crash_drill_passed"] is True and m["crash_points"] == 1
    assert 0 < m["incremental_embedded"] < m["full_embedded"] == m["initial_embedded"]
    assert (m["incremental_added"], m["incremental_updated"], m["incremental_deleted"]) == (2, 3, 1)
    assert m["scoped_updated"] == 1 and m["scoped_deleted"] == 1 and m["scoped_outside_untouched"]
    assert m["second_writer_refused"] and m["reader_not_blocked"] and m["unreadable_kept"]
    assert m["audit_ok"] and m["audit_tamper_detected"] and m["final_consistent"]
    assert "审计日志校验" in (out / "report.md").read_text(encoding="utf-8")
