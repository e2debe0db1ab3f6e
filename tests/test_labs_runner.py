import json
import textwrap

from conftest import run_cli, run_script
from llmtech import labs, report


def test_registry_has_42_labs_in_course_order():
    assert len(labs.LABS) == 42
    assert [lab.id for lab in labs.LABS][:3] == ["L1.01", "L1.02", "L1.03"]
    assert labs.LABS[-1].id == "L7.06"
    assert labs.get_lab("l1.03").path == "lesson1/03_hf_finetune/hf_finetune_scaffold.py"
    # status is derived from the file being there: never "built" for a missing script
    for lab in labs.LABS:
        assert lab.built == lab.file.exists()


def test_cli_lab_list_shows_42_with_status():
    r = run_cli("lab", "list", "--json")
    rows = json.loads(r.stdout)
    assert r.returncode == 0 and len(rows) == 42
    assert {x["status"] for x in rows} <= {"built", "not built yet"}
    # every status agrees with the file system (all 42 scripts exist by now)
    assert [x["status"] for x in rows] == [lab.status for lab in labs.LABS]


def test_unbuilt_or_unknown_lab_is_clean_error():
    import pytest

    from llmtech.errors import LlmtechError

    missing = labs.Lab("L7.99", "lesson7/99_missing/missing.py", "missing")
    assert missing.status == "not built yet"
    with pytest.raises(LlmtechError, match="not built yet"):
        labs.run_lab_subprocess(missing, quick=True, out=None, overrides=[])
    r = run_cli("lab", "run", "L8.01")
    assert r.returncode == 2 and "unknown lab" in r.stderr and "Traceback" not in r.stderr


def _toy_lab(tmp_path):
    script = tmp_path / "toy_lab.py"
    script.write_text(textwrap.dedent('''
        from llmtech import labs
        from llmtech.errors import DataError

        class Config(labs.LabConfig):
            n: int = 3
            fail: bool = False

        def main(cfg, lab):
            if cfg.fail:
                raise DataError("toy.jsonl:7: missing field 'output'")
            lab.table([{"i": i, "sq": i * i} for i in range(cfg.n)], title="squares")
            return {"total": sum(i * i for i in range(cfg.n)), "n": cfg.n}

        if __name__ == "__main__":
            labs.run(main, Config, full={"n": 10}, headline=["total"])
    '''), encoding="utf-8")
    return script


def test_lab_contract_metrics_report_quick_full_overrides(tmp_path):
    script = _toy_lab(tmp_path)
    r = run_script(script, "--quick", "--out", tmp_path / "q", "n=4")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "q/metrics.json").read_text())
    assert m["total"] == 14 and m["quick"] is True and m["headline"] == "total"
    assert "squares" in (tmp_path / "q/report.md").read_text()
    r = run_script(script, "--out", tmp_path / "f")  # full mode takes the lab's full settings
    assert json.loads((tmp_path / "f/metrics.json").read_text())["n"] == 10


def test_lab_errors_exit_2_and_keep_previous_metrics(tmp_path):
    script = _toy_lab(tmp_path)
    run_script(script, "--quick", "--out", tmp_path / "o")
    before = (tmp_path / "o/metrics.json").read_text()
    r = run_script(script, "--quick", "--out", tmp_path / "o", "fail=true")
    assert r.returncode == 2 and "toy.jsonl:7" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "o/metrics.json").read_text() == before  # nothing already written is lost
    r = run_script(script, "--quick", "--out", tmp_path / "o", "colour=red")
    assert r.returncode == 2 and "unknown config key 'colour'" in r.stderr


def test_report_gathers_metrics_into_table_and_plot(tmp_path):
    (tmp_path / "L1.01").mkdir()
    (tmp_path / "L1.01/metrics.json").write_text(json.dumps(
        {"lab": "L1.01", "quick": True, "loss_before": 2.5, "loss_after": 1.25,
         "headline": "loss_before,loss_after", "wall_time_s": 3.0}))
    path = report.build_report(tmp_path)
    text = path.read_text()
    assert "loss_after = 1.25" in text and "L7.06" in text
    assert (tmp_path / "report_headlines.png").exists()
