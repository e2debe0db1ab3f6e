"""L5.04 model versioning: MLflow (SQLite store + Model Registry) and W&B offline, read back from
what they wrote; the promotion rule both ways; corrupt stores; the lab on tiny-llama."""

import hashlib
import math
import os
import sqlite3

import pytest

from conftest import ROOT, SUPPORT, load_lab_module
from llmtech.errors import ConfigError, DataError, LlmtechError
from llmtech.track import registry as R

LAB = ROOT / "lessons/lesson5/04_model_versioning/version_tracking.py"


def _adapter(tmp_path, name="adapter", payload=b"weights"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(payload)
    (d / "adapter_config.json").write_text('{"r": 8}')
    return d


def _client(root):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root.resolve() / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --------------------------------------------------------------------------- MLflow

def test_runs_versions_aliases_and_lineage_read_back_from_sqlite(tmp_path):
    root = tmp_path / "not" / "yet" / "there"  # a missing backend folder is created
    reg = R.ModelRegistry(root, "exp", "support-lora")
    assert (root / "mlflow.db").read_bytes()[:16] == R.SQLITE_MAGIC
    decisions = []
    for i, (lr, loss) in enumerate([(1e-4, 2.0), (1e-3, 1.7), (1e-6, 1.69)]):
        ad = _adapter(tmp_path, f"ad{i}", payload=bytes([i]) * 100)
        tags = R.lineage([SUPPORT / "sft_train.jsonl"], "tiny-llama", ad, {"lr": lr}, ROOT)
        hist = [{"step": s, "loss": 3.0 - 0.1 * s - i, "learning_rate": lr} for s in range(1, 5)]
        rid = reg.log_run(f"run{i}", {"learning_rate": lr}, {"eval_response_loss": loss}, hist,
                          tags=tags, artifacts={"adapter": ad, "config": ad / "adapter_config.json"})
        v = reg.register(rid, "adapter", tags=tags)
        decisions.append(R.promote(reg, v, "eval_response_loss", margin=0.05))
    assert [d.promoted for d in decisions] == [True, True, False]
    assert decisions[1].improvement == pytest.approx(0.3) and decisions[2].improvement == pytest.approx(0.01)
    assert "拒绝" in decisions[2].reason and decisions[2].champion_after == "2"

    # a fresh client on the same SQLite file sees everything
    c = _client(root)
    assert str(c.get_model_version_by_alias("support-lora", "champion").version) == "2"
    assert str(c.get_model_version_by_alias("support-lora", "challenger").version) == "3"
    mvs = sorted(c.search_model_versions("name = 'support-lora'"), key=lambda m: int(m.version))
    assert [str(m.version) for m in mvs] == ["1", "2", "3"]
    assert [m.tags["promotion"] for m in mvs] == ["promoted", "promoted", "refused"]
    for i, mv in enumerate(mvs):
        run = c.get_run(mv.run_id)
        assert run.data.params["learning_rate"] == str([1e-4, 1e-3, 1e-6][i])
        assert run.data.metrics["eval_response_loss"] == [2.0, 1.7, 1.69][i]
        steps = [(m.step, m.value) for m in c.get_metric_history(mv.run_id, "loss")]
        assert steps == [(s, pytest.approx(3.0 - 0.1 * s - i)) for s in range(1, 5)]
        lin = {k: v for k, v in run.data.tags.items() if k.startswith("lineage.")}
        digest = hashlib.sha256(b"sft_train.jsonl\0" + hashlib.sha256(
            (SUPPORT / "sft_train.jsonl").read_bytes()).hexdigest().encode() + b"\n").hexdigest()
        assert lin["lineage.dataset_sha256"] == digest
        assert lin["lineage.adapter_sha256"] == R.tree_sha256(tmp_path / f"ad{i}")
        assert lin["lineage.config_sha256"] == R.config_sha256({"lr": [1e-4, 1e-3, 1e-6][i]})
        assert lin["lineage.base_model"] == "tiny-llama" and lin["lineage.git_commit"]
        assert mv.source == f"runs:/{mv.run_id}/adapter"
        files = {f.path for f in c.list_artifacts(mv.run_id, "adapter")}
        assert files == {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}
    # adapters differ, the dataset does not
    tags = [c.get_run(m.run_id).data.tags for m in mvs]
    assert len({t["lineage.adapter_sha256"] for t in tags}) == 3
    assert len({t["lineage.dataset_sha256"] for t in tags}) == 1
    back = reg.download("2", tmp_path / "dl")
    assert (back / "adapter_model.safetensors").read_bytes() == bytes([1]) * 100
    # reopening continues the same history
    assert [v.version for v in R.ModelRegistry(root, "exp", "support-lora").versions()] == ["1", "2", "3"]


def test_promotion_rule_both_ways_and_edge_cases():
    assert R.should_promote(1.0, None, 0.1) == (True, None)  # first version
    assert R.should_promote(1.0, 1.2, 0.1)[0] is True
    assert R.should_promote(1.15, 1.2, 0.1)[0] is False  # better, but by less than the margin
    assert R.should_promote(1.3, 1.2, 0.0)[0] is False  # worse
    assert R.should_promote(0.9, 0.8, 0.05, lower_is_better=False)[0] is True  # e.g. accuracy
    assert R.should_promote(math.nan, 1.2, 0.0) == (False, None)
    assert R.should_promote(math.inf, None, 0.0) == (False, None)
    with pytest.raises(ConfigError):
        R.should_promote(1.0, 1.2, -0.1)


def test_corrupt_or_foreign_store_is_a_clear_error_and_left_untouched(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    garbage = os.urandom(4096)
    (root / "mlflow.db").write_bytes(garbage)
    with pytest.raises(DataError) as e:
        R.ModelRegistry(root, "exp", "m")
    assert str(root / "mlflow.db") in str(e.value) and "not an SQLite database" in str(e.value)
    assert (root / "mlflow.db").read_bytes() == garbage and sorted(os.listdir(root)) == ["mlflow.db"]
    # an SQLite file that is someone else's database
    other = tmp_path / "other"
    other.mkdir()
    con = sqlite3.connect(other / "mlflow.db")
    con.execute("create table notes (x text)")
    con.commit()
    con.close()
    before = (other / "mlflow.db").read_bytes()
    with pytest.raises(DataError, match="not an MLflow store"):
        R.ModelRegistry(other, "exp", "m")
    assert (other / "mlflow.db").read_bytes() == before
    # a valid header followed by garbage
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "mlflow.db").write_bytes(R.SQLITE_MAGIC + b"\xff" * 200)
    with pytest.raises(DataError, match="mlflow.db"):
        R.check_backend(tmp_path / "trunc")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="must be a folder"):
        R.check_backend(tmp_path / "afile")


# --------------------------------------------------------------------------- W&B offline

def test_wandb_offline_run_files_hold_config_metrics_and_artifact(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    ad = _adapter(tmp_path)
    hist = [{"step": s, "loss": 2.0 / s} for s in range(1, 6)]
    wb = R.log_wandb_offline(tmp_path / "wb", "proj", "v1", {"learning_rate": 1e-3, "lora_r": 8},
                             hist, {"eval_response_loss": 1.234}, ad, "support-adapter")
    assert wb.run_file.is_file() and wb.run_dir.name.startswith("offline-run-")
    assert wb.run_dir.is_relative_to((tmp_path / "wb").resolve())
    back = R.read_wandb_offline(wb.run_file)
    assert back["run_id"] == wb.run_id and back["project"] == "proj"
    assert back["config"] == {"learning_rate": 1e-3, "lora_r": 8}
    assert [(h["_step"], h["loss"]) for h in back["history"]] == [(s, pytest.approx(2.0 / s)) for s in range(1, 6)]
    assert back["summary"]["eval_response_loss"] == 1.234
    assert back["artifacts"] == [{"name": "support-adapter", "type": "model",
                                  "files": ["adapter_config.json", "adapter_model.safetensors"]}]
    assert list(home.iterdir()) == []  # nothing written into the user's home
    # W&B's offline mode stays inside the run: a leftover WANDB_MODE=offline makes transformers
    # print to stdout on import in every child process (it broke `llmtech rag` JSON output)
    R.ModelRegistry(tmp_path / "mlflow")
    assert "WANDB_MODE" not in os.environ
    dry = R.wandb_sync_dry_run(wb.run_dir, tmp_path / "wb")
    assert "Would sync 1 run" in dry and wb.run_id in dry
    assert wb.sync_command == f"wandb sync {wb.run_dir}"
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(DataError, match="run-x.wandb"):
        R.read_wandb_offline(bad)


# --------------------------------------------------------------------------- the lab

def test_lab_on_tiny_llama_promotes_and_refuses(tmp_path, capsys):
    from llmtech.labs import LabContext

    lab = load_lab_module(LAB, "l504_lab")
    cands = [{"name": "tiny-lr", "learning_rate": 1e-6, "steps": 2},
             {"name": "high-lr", "learning_rate": 3e-2, "steps": 3},
             {"name": "tiny-lr-again", "learning_rate": 1e-6, "steps": 2, "lora_r": 4}]
    cfg = lab.Config(model="tiny-llama", quick=True, max_train_samples=12, eval_samples=8,
                     max_length=64, candidates=cands, margin=0.005)
    m = lab.main(cfg, LabContext(out=tmp_path, lab_id="L5.04", title="t"))
    ev = [m[f"eval_loss_v{i}"] for i in (1, 2, 3)]
    assert m["versions_registered"] == m["versions_total"] == 3
    # the rule acted on the measured numbers: v2 learnt (promoted), v3 did not beat it (refused)
    assert m["promoted_v1"] is True
    assert m["promoted_v2"] is (ev[0] - ev[1] >= 0.005) is True
    assert m["promoted_v3"] is False and ev[2] > ev[1] - 0.005
    assert m["champion_version"] == 2 and m["champion_eval_loss"] == ev[1]
    assert (m["promotions"], m["refusals"]) == (2, 1)
    assert m["wandb_runs"] == 3 and m["wandb_matches_mlflow"] and m["wandb_sync_dry_run_ok"]
    c = _client(tmp_path / "mlflow")
    assert str(c.get_model_version_by_alias("support-sft-lora", "champion").version) == "2"
    v3 = c.get_model_version("support-sft-lora", "3")
    assert v3.tags["promotion"] == "refused" and v3.tags["wandb_run_id"]
    assert {f.path for f in c.list_artifacts(v3.run_id, "adapter")} >= {
        "adapter/adapter_model.safetensors", "adapter/adapter_config.json"}
    assert len(c.get_metric_history(v3.run_id, "loss")) == 2  # per-step losses
    assert (tmp_path / "versions.png").stat().st_size > 10_000
    # a second run into the same folder archives the previous store (renamed, not deleted) and
    # starts from an empty registry; here it stops early at the (missing) model
    before = (tmp_path / "mlflow" / "mlflow.db").read_bytes()
    with pytest.raises(LlmtechError):
        lab.main(lab.Config(model="no-such-model-xyz", eval_samples=2),
                 LabContext(out=tmp_path, lab_id="L5.04", title="t"))
    archived = list(tmp_path.glob("mlflow.prev-*"))
    assert len(archived) == 1 and (archived[0] / "mlflow.db").read_bytes() == before
    # a corrupt store stops the lab with a one-line error naming the file; the file survives
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mlflow.db").write_bytes(b"\x00garbage" * 64)
    from llmtech import labs

    with pytest.raises(SystemExit) as e:
        labs.run(lab.main, lab.Config, argv=["--out", str(tmp_path / "o2"), "model=tiny-llama",
                                             f"registry_dir={bad}"])
    assert e.value.code == 2 and (bad / "mlflow.db").read_bytes() == b"\x00garbage" * 64
    err = capsys.readouterr().err
    assert f"{bad / 'mlflow.db'}: not an SQLite database" in err and "Traceback" not in err
