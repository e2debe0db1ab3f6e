"""L5.02: DPO packaged for the Hugging Face platform (llmtech.track.hub + the lab script)."""

import filecmp
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, load_lab_module

from llmtech import labs
from llmtech.errors import ConfigError, DataError
from llmtech.track import hub

LAB = ROOT / "lessons/lesson5/02_dpo_hf/dpo_hf_run.py"
ACC = ROOT / "configs/lessons/L5.02_accelerate.yaml"


def _card(tmp_path):
    card = hub.build_model_card(
        model_name="smol-dpo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        datasets=["alice/support-preference-pairs"], license="apache-2.0",
        metrics={"pa": ("accuracy", "preference accuracy", 0.625),
                 "rm": ("reward_margin", "implicit reward margin", 0.4321)},
        dataset_name="support pairs (test)", body="# smol-dpo\n\n中文正文", language=["zh", "en"])
    return hub.write_card(card, tmp_path)


def test_model_card_metadata_round_trips(tmp_path):
    from huggingface_hub import ModelCard

    path = _card(tmp_path)
    assert path.read_text(encoding="utf-8").startswith("---\n")
    card = ModelCard.load(path)
    d = card.data
    assert d.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and d.library_name == "peft"
    assert {"dpo", "trl"} <= set(d.tags) and d.license == "apache-2.0"
    assert d.datasets == ["alice/support-preference-pairs"]
    got = {(r.metric_type, r.metric_name): r.metric_value for r in d.eval_results}
    assert got == {("accuracy", "preference accuracy"): 0.625,
                   ("reward_margin", "implicit reward margin"): 0.4321}
    assert d.to_dict()["model-index"][0]["name"] == "smol-dpo"
    assert "中文正文" in card.text


def test_accelerate_config_loads_back(tmp_path):
    # the committed config is what hub.accelerate_config(1) writes, and accelerate reads it
    assert hub.load_accelerate_config(ACC).to_dict() == hub.accelerate_config(1, "bf16").to_dict()
    four = hub.accelerate_config(4, "fp16")
    want = dict(four.to_dict())
    hub.write_accelerate_config(four, tmp_path / "a.yaml", "header\nline")
    back = hub.load_accelerate_config(tmp_path / "a.yaml")
    assert back.to_dict() == want and want["distributed_type"] == "MULTI_GPU" and want["num_processes"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "a.yaml").read_text() + "no_such_key: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*no_such_key"):
        hub.load_accelerate_config(bad)
    with pytest.raises(ConfigError, match="mixed_precision"):
        hub.accelerate_config(1, "fp8x")


@pytest.mark.parametrize("bad", ["a/b/c", "has space/x", "foo--bar", "-x", ""])
def test_repo_id_errors(bad):
    with pytest.raises(ConfigError, match="repo_id"):
        hub.check_repo_id(bad)


def test_repo_id_ok_and_namespacing():
    assert hub.check_repo_id("alice/smol-dpo_v1.2") == "alice/smol-dpo_v1.2"
    assert hub.full_repo_id("smol", "alice") == "alice/smol"
    assert hub.full_repo_id("bob/smol", "alice") == "bob/smol"
    assert hub.full_repo_id("smol", None) == "smol"


def test_upload_decision_branches(monkeypatch):
    assert not hub.decide_upload(token="hf_x", offline=True).online
    assert "HF_HUB_OFFLINE" in hub.decide_upload(token="hf_x", offline=True).reason
    no_tok = hub.decide_upload(token="", offline=False)
    assert not no_tok.online and "token" in no_tok.reason

    def down(tok):
        raise ConnectionError("no route to host")
    assert "连不上" in hub.decide_upload(token="hf_x", offline=False, probe=down).reason

    class Rejected(Exception):
        response = type("R", (), {"status_code": 401})()

    def reject(tok):
        raise Rejected("unauthorized")
    assert "401" in hub.decide_upload(token="hf_x", offline=False, probe=reject).reason
    ok = hub.decide_upload(token="hf_x", offline=False, probe=lambda tok: {"name": "alice"})
    assert ok.online and ok.user == "alice" and "hf_x" not in repr(ok)
    # the real whoami against a closed local port: a genuine network failure, not online
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = hub.decide_upload(token="hf_x", offline=False, endpoint=f"http://127.0.0.1:{port}")
    assert not d.online and "连不上" in d.reason


def _folder(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    (src / "sub" / "x.json").write_text("{}")
    _card(src)
    return src


def test_offline_upload_folder_equals_model_folder(tmp_path):
    src = _folder(tmp_path)
    d = hub.UploadDecision(False, "离线")
    r = hub.push_folder(src, "alice/smol-dpo", d, tmp_path / "out")
    dest = tmp_path / "out/hub_upload/alice/smol-dpo"
    assert r["uploaded"] is False and r["local_dir"] == str(dest) and "离线" in r["reason"]
    cmp = filecmp.dircmp(src, dest)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    assert filecmp.cmp(src / "sub/x.json", dest / "sub/x.json", shallow=False)
    assert r["files"] == hub.list_files(dest) and r["total_bytes"] == sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file())
    with pytest.raises(ConfigError, match="a/b/c"):
        hub.push_folder(src, "a/b/c", d, tmp_path / "out")


def test_online_branch_calls_create_repo_and_upload_folder(tmp_path):
    """Which branch is taken when online: a recording stand-in for HfApi (no network here)."""
    src = _folder(tmp_path)
    calls = []

    class Recorder:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            from huggingface_hub import RepoUrl
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))
            raise TimeoutError("recording only")

    d = hub.UploadDecision(True, "online", user="alice", token="hf_x")
    with pytest.raises(hub.HubError, match="alice/smol-dpo"):
        hub.push_folder(src, "smol-dpo", d, tmp_path / "out", api=Recorder())
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "alice/smol-dpo" and calls[0][2]["exist_ok"] and calls[0][2]["private"]
    assert calls[1][2]["folder_path"] == str(src)
    assert not (tmp_path / "out/hub_upload").exists()  # the offline copy is not made online


def test_hardware_plan_uses_memory_estimator():
    from llmtech.dist.memory import GB, estimate

    prices = {"t4-small": (0.4, "ref"), "a100-large": (2.5, "ref")}
    rows = hub.hardware_plan(["llama2-7b"], ["t4-small", "a100-large"], batch=4, seq_len=512,
                             tokens_per_step=3000, mfu=0.3, prices=prices)
    t4, a100 = rows
    assert round(estimate("llama2-7b", "lora", batch=8, seq_len=512).total / GB, 2) == a100["est_mem_gb"]
    assert t4["fits"] is False and a100["fits"] is True
    assert t4["est_step_s"] > a100["est_step_s"] > 0
    with pytest.raises(ConfigError, match="flavors.*nope"):
        hub.check_flavors(["nope"])


def test_lab_bad_input_errors(tmp_path):
    lab = load_lab_module(LAB, "l502")
    ctx = labs.LabContext(out=tmp_path, lab_id="L5.02", title="t")
    with pytest.raises(ConfigError, match="dataset_repo_id.*'x y'"):
        lab.main(lab.Config(dataset_repo_id="x y"), ctx)
    with pytest.raises(DataError, match="missing/pairs.jsonl"):
        lab.main(lab.Config(train_file="missing/pairs.jsonl"), ctx)


def test_lab_end_to_end_under_accelerate_launch(tmp_path):
    """The committed accelerate config launches the lab (CPU here); tiny model, one step."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACC), str(LAB),
                        "--quick", "--out", str(out), "model=tiny-llama", "steps=1", "max_eval_samples=4",
                        "max_length=96", "flavors=[t4-small,a100-large]", "plan_models=[llama2-7b]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["train_steps"] == 1 and m["eval_pairs"] == 4
    for k in ("pref_acc_before", "pref_acc_after", "reward_margin", "cpu_step_s_measured"):
        assert isinstance(m[k], float)
    assert m["accelerate_config_roundtrip"] is True and m["plan_rows_fit"] == 3  # 7B: not on a T4
    assert m["uploaded"] is False and "HF_HUB_OFFLINE" in m["upload_reason"]
    up = Path(m["upload_dir"])
    assert up == out / "hub_upload" / "smollm2-135m-support-dpo"
    cmp = filecmp.dircmp(out / "hub_model", up)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= set(m["upload_files"].split(","))
    assert m["upload_file_count"] == len(hub.list_files(up))
    from huggingface_hub import ModelCard

    card = ModelCard.load(up / "README.md").data
    assert card.library_name == "peft" and card.datasets == ["support-preference-pairs"]
    vals = {r.metric_name: r.metric_value for r in card.eval_results}
    assert vals["implicit reward margin"] == round(m["reward_margin"], 6)
    assert (out / "hub_upload/support-preference-pairs/data/test.jsonl").exists()
    r = subprocess.run([sys.executable, str(LAB), "--quick", "--out", str(tmp_path / "bad"), "repo_id=a/b/c"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'a/b/c'" in r.stderr and "Traceback" not in r.stderr
