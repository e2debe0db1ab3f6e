"""L3.05 evaluation metrics lab: runs end to end on tiny-llama with the project's own MCQ fixtures."""

import csv
import json

import pytest

from conftest import ROOT, load_lab_module
from llmtech.evals import human
from llmtech.labs import LabContext

LAB = ROOT / "lessons/lesson3/05_evaluation/evaluation_metrics.py"


def test_lab_main_on_tiny_llama(tmp_path):
    lab = load_lab_module(LAB, "l305_lab")
    cfg = lab.Config(model="tiny-llama", cmmlu="tests/data/mcq", subjects=["arithmetic", "geography"],
                     limit=3, limit_fewshot=2, shots=[0, 5], gen_n=3, max_new_tokens=6, ppl_max_tokens=300, quick=True)
    ctx = LabContext(out=tmp_path, lab_id="L3.05", title="t")
    m = lab.main(cfg, ctx)
    json.dumps(m)
    assert m["mcq_n"] == 6 and m["mcq_n_fewshot"] == 4  # 3 + 3 valid geography rows (3 bad rows skipped)
    for key, n in (("mcq_letter_0shot", 6), ("mcq_cloze_0shot", 6), ("mcq_letter_5shot", 4), ("mcq_cloze_5shot", 4)):
        assert 0 <= m[f"{key}_ci_low"] <= m[f"{key}_acc"] <= m[f"{key}_ci_high"] <= 1
        assert m[f"{key}_acc"] * n == pytest.approx(round(m[f"{key}_acc"] * n), abs=1e-3)
    # more context per scored token (smaller stride) on the same text
    for lang in ("zh", "en"):
        assert m[f"ppl_{lang}_stride128"] > 1 and m[f"ppl_{lang}"] == m[f"ppl_{lang}_stride32"]
        assert m[f"bpc_{lang}_stride32"] > 0
    assert 0 <= m["bleu_jieba"] <= 1 and 0 <= m["rouge_l"] <= 1
    assert m["raters_simulated"] is True and m["human_items"] == 3
    for who in ("A", "B"):
        for ext in ("csv", "html"):
            assert (tmp_path / f"human_eval_{who}.{ext}").stat().st_size > 200
    rows = list(csv.DictReader((tmp_path / "human_eval_A.csv").open(encoding="utf-8-sig")))
    assert [r["id"] for r in rows] == ["q01", "q02", "q03"] and all(r["correctness"] == "" for r in rows)
    a = human.read_sheet(tmp_path / "human_eval_A_filled.csv")
    b = human.read_sheet(tmp_path / "human_eval_B_filled.csv")
    k = human.agreement(a, b)[0]
    assert m["kappa_correctness"] == (None if k["kappa"] != k["kappa"] else round(k["kappa"], 4))
    assert (tmp_path / "mcq_accuracy.png").stat().st_size > 5000
    report = "".join(ctx.sections)
    assert "模拟评分员" in report and "分科准确率" in report


def test_lab_without_cmmlu_says_so(tmp_path):
    lab = load_lab_module(LAB, "l305_lab_missing")
    cfg = lab.Config(model="tiny-llama", cmmlu="no/such/folder", gen_n=2, max_new_tokens=4,
                     ppl_max_tokens=100, quick=True)
    ctx = LabContext(out=tmp_path, lab_id="L3.05", title="t")
    m = lab.main(cfg, ctx)
    assert m["mcq_n"] == 0 and m["mcq_cloze_0shot_acc"] is None
    assert any("CMMLU 不可用" in s for s in ctx.sections)
