"""L6.06 scheduled recall / answer-accuracy monitoring with a degraded run (--quick)."""

import json

import pytest

from conftest import ROOT, run_script

LAB = ROOT / "lessons/lesson6/06_optimization/optimization_lab.py"


@pytest.mark.slow
def test_lab_monitoring_quick(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "monitor.generate=4", "interval_s=0",
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["runs"] == 4 and m["dropped_docs"] == 15
    # the alert fires on the degraded run (3) and on no other
    assert m["alert_runs"] == "3" and m["degraded_runs_alerted"] is True
    assert m["false_alerts"] == 0 and m["alerts"] >= 4
    assert m["good_hit5"] > 0.9 and m["degraded_hit5"] < m["good_hit5"] - 0.15
    assert m["degraded_mrr"] < m["good_mrr"] - 0.15
    # the fixed run is back where it started
    assert m["run4_hit@5"] == m["run1_hit@5"] and m["run4_mrr@10"] == m["run1_mrr@10"]
    assert 0.0 <= m["run1_answer_accuracy"] <= 1.0
    assert m["run1_answer_in_context"] > 0.85
    # the half-written history line is reported and skipped, the history goes on
    assert m["history_lines_skipped"] == 1 and m["history_records"] == 4
    assert "REGRESSION in run 3" in r.stderr and "history.jsonl:3" in r.stderr
    alerts = [json.loads(x) for x in (tmp_path / "monitor/alerts.jsonl").read_text().splitlines()]
    assert alerts and {a["run"] for a in alerts} == {3}
    assert (tmp_path / "trends.png").exists()
