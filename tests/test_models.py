
import pytest
import torch

from llmtech import models
from llmtech.errors import ModelNotAvailable


def test_unknown_model_is_clear_error():
    with pytest.raises(ModelNotAvailable, match="unknown model 'no-such-model'"):
        models.resolve("no-such-model")


def test_hf_offline_missing_says_how(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailable) as e:
        models.resolve("hf:someorg/missing-model")
    assert "hf download someorg/missing-model" in str(e.value)


def test_ms_offline_missing_says_how(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMTECH_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailable) as e:
        models.resolve("ms:Qwen/Qwen2.5-0.5B-Instruct")
    assert "modelscope download --model Qwen/Qwen2.5-0.5B-Instruct" in str(e.value)


def test_hf_id_loads_from_local_hub_cache(monkeypatch, tmp_path, tiny):
    """The hf: path is real hub code (snapshot_download) reading a hub-layout cache offline."""
    model, tok = tiny
    repo = tmp_path / "models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    m2, t2 = models.load_lm("hf:acme/tiny")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(m2(ids).logits, model(ids).logits, atol=1e-6)


def test_ms_id_loads_from_local_modelscope_cache(monkeypatch, tmp_path, tiny):
    model, tok = tiny
    from modelscope import snapshot_download

    # Lay the model out the way ModelScope's cache does, then resolve it offline.
    monkeypatch.setenv("LLMTECH_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "acme" / "tiny"
    model.save_pretrained(target)
    tok.save_pretrained(target)
    try:
        found = snapshot_download("acme/tiny", local_files_only=True, cache_dir=str(tmp_path))
    except Exception as e:  # layout of this modelscope version differs
        pytest.skip(f"modelscope cache layout differs in this version: {e}")
    assert models.resolve("ms:acme/tiny") == type(models.resolve("ms:acme/tiny"))(found)


def test_local_folder_and_gguf_file(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, _ = models.load_lm(str(tmp_path / "m"))
    assert sum(p.numel() for p in m2.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ModelNotAvailable, match="not a model folder"):
        models.load_lm(str(tmp_path))


def test_chat_template_has_eos_in_target(tiny):
    _, tok = tiny
    from llmtech.evals.lm import encode_chat_example

    ex = encode_chat_example(tok, models.chat_messages("退货政策？", "7 天无理由退货。"))
    target_ids = [i for i, m in zip(ex["input_ids"], ex["target_mask"]) if m]
    assert tok.eos_token_id in target_ids  # the model learns to stop
    assert tok.pad_token_id != tok.eos_token_id


def test_tiny_llama_is_small_and_deterministic():
    tok = models.load_tokenizer("tiny-llama")
    a = models.build_tiny_llama(tok, seed=1)
    b = models.build_tiny_llama(tok, seed=1)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_cli_unknown_model_no_traceback():
    from conftest import run_cli

    r = run_cli("models", "prepare", "nope-model")
    assert r.returncode == 2
    assert "error: unknown model 'nope-model'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bundled_model_generates_sensibly(smol):
    from llmtech.evals.lm import generate

    model, tok = smol
    out = generate(model, tok, [models.chat_messages("What is the capital of France?")], max_new_tokens=12)
    assert "Paris" in out[0]


def test_sequence_scoring_builds_no_autograd_graph(tiny):
    # scoring a whole eval set with gradients on keeps every batch's graph alive (an OOM in the
    # demo's DPO eval once); it must run under no_grad
    from llmtech.evals import lm

    model, tok = tiny
    ex = [lm.encode_chat_example(tok, [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "hello there"}])]
    sums, counts = lm.sequence_logprobs(model, tok, ex, 1)
    assert not sums.requires_grad and int(counts[0]) > 0
