"""L3.04 training-log inspector: the three readers on a real tiny run, every injected fault found,
detector edge cases on hand-made curves, bad input (file:line, clear errors), the CLI and the lab."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, load_lab_module
from llmtech.errors import DataError
from llmtech.labs import LabContext
from llmtech.track import logs as L
from llmtech.train.callbacks import read_log, read_tensorboard_scalars

LAB = ROOT / "lessons/lesson3/04_log_analysis/training_log_inspector.py"
ENV = {**os.environ, "PYTHONPATH": str(Path(L.__file__).resolve().parents[2])}


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """The lab's main on tiny-llama: a real 16-step SFT run with TensorBoard, then every fault."""
    out = tmp_path_factory.mktemp("l304")
    lab = load_lab_module(LAB, "l304_lab")
    cfg = lab.Config(model="tiny-llama", quick=True, train_samples=32, steps=16, batch_size=2,
                     eval_samples=4, eval_steps=8, max_length=128, finetuning="full",
                     learning_rate=1e-3)
    return out, lab, lab.main(cfg, LabContext(out=out, lab_id="L3.04", title="t"))


def write_log(path, losses, lrs=None, grads=None, extra=None):
    rows = []
    for i, loss in enumerate(losses):
        row = {"step": i + 1, "loss": loss}
        if lrs is not None:
            row["learning_rate"] = lrs[i]
        if grads is not None:
            row["grad_norm"] = grads[i]
        rows.append(row)
    text = "".join(json.dumps(r) + "\n" for r in rows + list(extra or []))
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def cosine(n, peak=1e-3, warm=0):
    return [peak * (i + 1) / warm if i < warm else
            peak * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, n - warm))) for i in range(n)]


def decreasing(n, seed=0, noise=0.03):
    rng = np.random.default_rng(seed)
    return [float(3.0 * math.exp(-i / n) * (1 + noise * rng.standard_normal())) for i in range(n)]


# --------------------------------------------------------------------------- the lab + real run

def test_lab_finds_every_injected_fault_and_the_healthy_run_is_clean(lab_run):
    out, lab, m = lab_run
    assert m["faults_injected"] == len(lab.PLAN) == 11
    assert m["faults_found"] == m["faults_injected"] and m["all_faults_found"]
    assert m["false_alarms"] == 0 and m["healthy_errors"] == 0 and m["healthy_findings"] == "none"
    assert all(m[f"found_{f}_{k}"] for f, k in lab.PLAN)
    assert m["loss_last"] < m["loss_first"] and m["tokens_per_s"] > 0 and m["bad_input_errors_name_the_file"]
    assert (out / "healthy_logs.png").stat().st_size > 10_000
    report = (out / "healthy" / "diagnosis.md").read_text(encoding="utf-8")
    assert "未发现问题" in report and "吞吐 tokens/s" in report
    nan_report = next(out.glob("faults/01_nan_*/report/diagnosis.md")).read_text(encoding="utf-8")
    assert "NaN / Inf" in nan_report and "max_grad_norm" in nan_report and "trainer_state.json:" in nan_report


def test_three_sources_of_a_real_run_agree_and_give_throughput(lab_run):
    run = lab_run[0] / "run"
    insp = L.inspect(run)
    assert {s.kind for s in insp.sources} == {"jsonl", "trainer_state", "tensorboard"}
    assert not insp.problems() and not insp.findings
    loss = {s.kind: [(p.step, p.value) for p in L.ordered(s.series["loss"])] for s in insp.sources}
    assert [st for st, _ in loss["jsonl"]] == list(range(1, 17))
    assert loss["jsonl"] == loss["trainer_state"]  # same floats, two files
    assert [v for _, v in loss["tensorboard"]] == pytest.approx([v for _, v in loss["jsonl"]], rel=1e-6)
    # run settings come from TensorBoard's "args" text and trainer_state.json
    assert insp.config["lr_scheduler_type"] == "cosine" and insp.config["warmup_steps"] == 4
    assert insp.config["max_steps"] == 16 and L.warmup_steps(insp.settings, insp.config) == 4
    # throughput by hand from the jsonl rows: tokens and cumulative runtime, the evaluation excluded
    rows = read_log(run / "trainer_log.jsonl")
    train = {r["step"]: r for r in rows if "loss" in r}
    eval_s = sum(r["eval_runtime"] for r in rows if "eval_runtime" in r and r["step"] < 16)
    secs = train[16]["train_runtime"] - train[1]["train_runtime"] - eval_s
    toks = train[16]["num_input_tokens_seen"] - train[1]["num_input_tokens_seen"]
    assert insp.throughput["tokens_per_s"] == pytest.approx(toks / secs, rel=1e-6)
    assert insp.throughput["steps_per_s"] == pytest.approx(15 / secs, rel=1e-6)
    # the callbacks' reader is the same code path
    tb = read_tensorboard_scalars(run / "tensorboard")
    assert [v for _, v in tb["train/loss"]] == pytest.approx([v for _, v in loss["jsonl"]], rel=1e-6)


# --------------------------------------------------------------------------- detectors

def kinds(path, **settings):
    return [(f.kind, f.severity, f.steps) for f in L.inspect(path, L.InspectSettings(**settings)).findings]


def test_spike_recovers_but_a_level_shift_is_divergence(tmp_path):
    base = decreasing(30)
    spiked = list(base)
    spiked[15] *= 2.2
    assert kinds(write_log(tmp_path / "a.jsonl", spiked)) == [("loss_spike", "warning", "16")]
    shifted = base[:15] + [x * 3.0 for x in base[15:]]
    got = kinds(write_log(tmp_path / "b.jsonl", shifted))
    assert [k for k, _, _ in got] == ["divergence"] and got[0][1] == "error"
    assert kinds(write_log(tmp_path / "c.jsonl", base)) == []  # 3% noise on a falling curve: nothing
    assert kinds(write_log(tmp_path / "d.jsonl", spiked), spike_ratio=2.5) == []  # threshold is a setting


def test_plateau_needs_a_flat_clean_curve_and_a_learning_rate_that_is_still_high(tmp_path):
    n = 30
    flat = [3.0 - 0.15 * i for i in range(8)] + [1.95 * (1 + 0.002 * math.sin(i)) for i in range(n - 8)]
    high = [1e-3] * n
    got = L.inspect(write_log(tmp_path / "a.jsonl", flat, high), L.InspectSettings(scheduler="constant"))
    assert [f.kind for f in got.findings] == ["plateau"] and got.findings[0].step_start >= 8
    ev = got.findings[0].evidence
    assert abs(ev["fitted_change"]) < 0.02 and ev["noise"] < 0.05 and ev["lr_over_peak"] == 1.0
    decayed = [1e-3] * 8 + [1e-5] * (n - 8)  # the schedule has run out: convergence, not a plateau
    assert kinds(write_log(tmp_path / "b.jsonl", flat, decayed)) == []
    rng = np.random.default_rng(1)
    noisy = [2.0 * (1 + 0.15 * rng.standard_normal()) for _ in range(n)]  # too noisy to call
    assert kinds(write_log(tmp_path / "c.jsonl", noisy, high), scheduler="constant") == []


def test_learning_rate_mistakes_and_their_exemptions(tmp_path):
    n, loss = 24, decreasing(24)
    ok = cosine(n, warm=4)
    assert kinds(write_log(tmp_path / "ok.jsonl", loss, ok), warmup_steps=4) == []
    # warmup configured as a fraction of max_steps (HF's rule), yet the LR starts at its peak
    no_warm = [1e-3] * 4 + ok[4:]
    got = kinds(write_log(tmp_path / "w.jsonl", loss, no_warm), warmup_steps=0.15, max_steps=n)
    assert ("lr_no_warmup", "warning", "1-2") in got
    assert kinds(write_log(tmp_path / "w2.jsonl", loss, no_warm)) == []  # no warmup configured
    const = [1e-3] * n
    assert [k for k, _, _ in kinds(write_log(tmp_path / "c.jsonl", loss, const))] == ["lr_no_decay"]
    assert kinds(tmp_path / "c.jsonl", scheduler="constant_with_warmup") == []
    assert kinds(tmp_path / "c.jsonl", max_steps=100) == []  # only 24 of 100 planned steps yet
    restart = ok[:14] + ok[4:14]
    assert [k for k, _, _ in kinds(write_log(tmp_path / "r.jsonl", loss[:24], restart))] == ["lr_restart"]
    assert kinds(tmp_path / "r.jsonl", scheduler="cosine_with_restarts") == []
    zero = kinds(write_log(tmp_path / "z.jsonl", loss, [0.0] * n))
    assert zero == [("lr_zero", "error", f"1-{n}")]
    early = ok[:16] + [0.0] * 8  # the schedule ended 8 steps early
    assert kinds(write_log(tmp_path / "e.jsonl", loss, early)) == [("lr_zero", "warning", "17-24")]
    middle = ok[:10] + [0.0, 0.0] + ok[12:]
    assert ("lr_zero", "error", "11-12") in kinds(write_log(tmp_path / "m.jsonl", loss, middle))


def test_nan_and_inf_are_errors_with_the_line_they_came_from(tmp_path):
    p = tmp_path / "trainer_log.jsonl"
    p.write_text('{"step": 1, "loss": 2.0, "grad_norm": 1.0}\n{"step": 2, "loss": NaN, "grad_norm": Infinity}\n'
                 '{"step": 3, "loss": "nan", "grad_norm": 1.0}\n', encoding="utf-8")
    insp = L.inspect(p)
    by_metric = {f.metric: f for f in insp.findings}
    assert set(by_metric) == {"loss", "grad_norm"} and all(f.severity == "error" for f in insp.findings)
    assert by_metric["loss"].evidence["count"] == 2 and by_metric["loss"].evidence["first_at"] == "trainer_log.jsonl:2"
    assert by_metric["loss"].evidence["last_finite"] == 2.0 and by_metric["grad_norm"].steps == "2"
    assert json.loads(json.dumps(insp.to_dict(), allow_nan=False))  # strict JSON out


# --------------------------------------------------------------------------- bad input

def test_malformed_and_truncated_lines_are_reported_as_file_line_and_the_rest_is_read(tmp_path):
    p = tmp_path / "trainer_log.jsonl"
    good = [json.dumps({"step": i, "loss": 3.0 - 0.1 * i}) for i in range(1, 9)]
    lines = good[:2] + ["{not json"] + good[2:4] + ["[1, 2]", '{"loss": 1.0}', '{"step": 5.5, "loss": 1}',
                                                     '{"step": 7, "loss": "high"}'] + good[4:] + ['{"step": 9, "lo']
    p.write_text("\n".join(lines), encoding="utf-8")
    insp = L.inspect(p)
    probs = {pr.line: pr.message for pr in insp.problems()}
    assert sorted(probs) == [3, 6, 7, 8, 9, 14]
    assert probs[3].startswith("malformed JSON") and "got list" in probs[6]
    assert "no integer 'step'" in probs[7] and "no integer 'step'" in probs[8]
    assert "'loss' is not a number" in probs[9] and probs[14].startswith("truncated last line")
    assert insp.summary["loss_points"] == 8 and [f.kind for f in insp.findings] == ["unreadable_input"]
    assert f"{p.name}:14" in insp.findings[0].evidence["locations"]
    with pytest.raises(DataError, match=rf"{p.name}:3: malformed JSON"):
        read_log(p)  # the strict reader the training code uses names the same line


def test_truncated_trainer_state_and_event_file_keep_what_precedes_the_damage(lab_run, tmp_path):
    run = lab_run[0] / "run"
    state = next(run.glob("checkpoint-*/trainer_state.json"))
    text = state.read_text(encoding="utf-8")
    cut = text.index('"step": 9')
    (tmp_path / "trainer_state.json").write_text(text[:cut], encoding="utf-8")
    insp = L.inspect(tmp_path / "trainer_state.json")
    assert [p.step for p in insp.series["loss"]] == list(range(1, 9))
    assert insp.problems()[0].line == text[:cut].count("\n") + 1
    events = max((run / "tensorboard").glob(L.EVENTS_GLOB), key=lambda f: f.stat().st_size)
    data = bytearray(events.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: TensorBoard would silently stop there
    bad = tmp_path / "tb" / events.name
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    got = L.inspect(bad.parent)
    assert "checksum mismatch" in str(got.problems()[0]) or "corrupt length" in str(got.problems()[0])
    assert 0 < len(got.series["loss"]) < 16


def test_empty_missing_and_unknown_inputs_are_clear_errors(tmp_path):
    empty = tmp_path / "trainer_log.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{empty}: empty log file"):
        L.inspect(empty)
    with pytest.raises(DataError, match=r"nope/trainer_state.json: not found"):
        L.inspect(tmp_path / "nope" / "trainer_state.json")
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        L.inspect(tmp_path / "x.csv")
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match="no training logs found"):
        L.inspect(tmp_path / "blank")
    # in a run folder an empty file is one problem among the sources, not the end
    state = {"max_steps": 8, "log_history": [{"step": i, "loss": 2.0 / i} for i in range(1, 9)]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    insp = L.inspect(tmp_path)
    assert [f.kind for f in insp.findings] == ["unreadable_input"] and insp.summary["loss_points"] == 8
    with pytest.raises(DataError, match="no readable log records"):
        (tmp_path / "trainer_state.json").write_text('{"log_history": [}', encoding="utf-8")
        L.inspect(tmp_path)


def test_inject_fault_rejects_what_it_cannot_do(tmp_path):
    short = write_log(tmp_path / "s.jsonl", [1.0, 0.9, 0.8])
    with pytest.raises(DataError, match="at least 8"):
        L.inject_fault("spike", short, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="unknown fault"):
        L.inject_fault("gremlins", short, tmp_path / "o.jsonl")


# --------------------------------------------------------------------------- CLI

def test_cli_prints_json_writes_the_report_and_fails_only_on_unreadable_input(lab_run, tmp_path, capsys):
    bad_lines = next(lab_run[0].glob("faults/*malformed_lines*/trainer_log.jsonl"))
    r = subprocess.run([sys.executable, "-m", "llmtech.track.logs", str(bad_lines), "--out", str(tmp_path / "o"),
                        "spike_ratio=2"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["counts"]["warning"] >= 1 and d["findings"][0]["kind"] == "unreadable_input"
    assert len(d["sources"][0]["problems"]) == 4 and all(bad_lines.name + ":" in p for p in d["sources"][0]["problems"])
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"diagnosis.md", "findings.json", "log_inspection.png"}
    r = subprocess.run([sys.executable, "-m", "llmtech.track.logs", str(tmp_path / "missing.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert L.main([str(bad_lines), "spike_ratoi=2"]) == 2
    assert "unknown config key 'spike_ratoi'" in capsys.readouterr().err
