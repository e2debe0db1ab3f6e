"""L2.03 P-Tuning v2 vs v1 vs LoRA: parameter counts (GQA-aware), training through TRL, label
evaluation, prefix save/reload, text-initialised prefix, and the lab on tiny-llama."""

import importlib.util
import json

import pytest
import torch

from conftest import ROOT
from llmtech import labs, models
from llmtech.errors import ConfigError, LlmtechError
from llmtech.io import atomic_write_jsonl
from llmtech.train import prompt_tuning as pt
from llmtech.train.prompt_tuning import PromptTuningSettings

LAB = ROOT / "lessons/lesson2/03_ptuning/ptuning_v2_demo.py"
LABELS = {"troubleshooting_l3": "lock", "troubleshooting_s1": "robot", "payment": "payment"}
TEMPLATE = "Topic ({labels})?\nQuestion: {question}"
RECORDS = [
    {"instruction": "How do I reset the L3 lock?", "input": "", "topic": "troubleshooting_l3"},
    {"instruction": "扫地机不能自动回充", "input": "", "topic": "troubleshooting_s1"},
    {"instruction": "Can I pay in installments?", "input": "", "topic": "payment"},
    {"instruction": "门锁电池没电了怎么开门？", "input": "", "topic": "troubleshooting_l3"},
    {"instruction": "The S1 shows error E08", "input": "", "topic": "troubleshooting_s1"},
    {"instruction": "付了两次钱怎么办？", "input": "", "topic": "payment"},
    {"instruction": "Where is my parcel?", "input": "", "topic": "shipping"},  # not a class: left out
]


def fresh():
    """A new tiny Llama each time: wrapping freezes / changes the model in place."""
    return models.load_lm("tiny-llama")


def test_tiny_model_uses_grouped_query_attention(tiny):
    c = tiny[0].config  # the counts below are only a GQA check if K/V are narrower than hidden
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 64, 4, 2)
    assert pt.kv_dim(c) == 2 * 16


@pytest.mark.parametrize("n", [1, 8])
def test_prefix_params_are_n_layers_2_kv_dim(n):
    model, _ = fresh()
    pm = pt.wrap(model, PromptTuningSettings(method="ptv2", num_virtual_tokens=n))
    count = pt.trainable_report(pm)
    # n virtual positions × 2 layers × (K and V) × (2 kv heads × head_dim 16) — not × hidden 64
    assert count["trainable_params"] == n * 2 * 2 * 32 == pt.analytic_prefix_params(model.config, n)
    assert count["trainable_params"] != n * 2 * 2 * 64
    assert count["trainable_share"] == pytest.approx(n * 128 / count["total_params"])
    emb = pm.prompt_encoder["default"].embedding.weight
    assert tuple(emb.shape) == (n, 2 * 2 * 32)
    assert not any(p.requires_grad for p in pm.get_base_model().parameters())


def test_prefix_projection_and_prompt_encoder_counts():
    model, _ = fresh()
    s = PromptTuningSettings(method="ptv2", num_virtual_tokens=4, prefix_projection=True,
                             encoder_hidden_size=16)
    n = pt.trainable_report(pt.wrap(model, s))["trainable_params"]
    # 4 × 32 embeddings + Linear(32→16) + Linear(16→2·2·32), with biases
    assert n == 4 * 32 + (32 * 16 + 16) + (16 * 128 + 128) == pt.analytic_trainable(model, s)
    for kind, layers in [("MLP", 2), ("LSTM", 1), ("LSTM", 2)]:
        model, _ = fresh()
        s = PromptTuningSettings(method="ptv1", num_virtual_tokens=5, encoder_hidden_size=24,
                                 encoder_type=kind, encoder_num_layers=layers)
        expected = pt.analytic_trainable(model, s)
        assert pt.trainable_report(pt.wrap(model, s))["trainable_params"] == expected
    assert expected > 5 * 64  # the encoder is counted, not only the 5 × hidden embeddings
    mlp = 5 * 64 + (64 * 24 + 24) + (24 * 24 + 24) + (24 * 64 + 64)
    assert pt.analytic_prompt_encoder_params(model.config, 5, 24) == mlp
    model, _ = fresh()
    s = PromptTuningSettings(method="lora", lora_r=4, target_modules=["q_proj", "v_proj"])
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # v_proj maps 64 -> 32 (2 kv heads)
    assert pt.analytic_trainable(model, s) == expected
    assert pt.trainable_report(pt.wrap(model, s))["trainable_params"] == expected


def test_label_records_and_label_tokens(tmp_path):
    recs = pt.label_records(RECORDS, "topic", LABELS, TEMPLATE)
    assert len(recs) == 6 and recs[0]["output"] == "lock"
    assert recs[1]["instruction"] == "Topic (lock, robot, payment)?\nQuestion: 扫地机不能自动回充"
    with pytest.raises(LlmtechError, match="'returns'"):
        pt.label_records(RECORDS, "topic", {**LABELS, "returns": "return"}, TEMPLATE, "f.jsonl")
    with pytest.raises(ConfigError, match="question"):
        pt.label_records(RECORDS, "topic", LABELS, "no placeholder")
    _, tok = fresh()
    ids, single = pt.label_token_ids(tok, ["lock", "robot", "payment"])
    assert single and len(set(ids)) == 3
    assert not pt.label_token_ids(tok, ["lock", "warranty"])[1]  # warranty is several tokens
    with pytest.raises(ConfigError, match="first token"):
        pt.label_token_ids(tok, ["invoice", "inv"])


def _manual(model, tok, rec, labels):
    """Loss sum/count and predicted label of one record, unpadded, by hand."""
    from llmtech.data import to_messages
    from llmtech.evals.lm import encode_chat_example

    e = encode_chat_example(tok, to_messages(rec))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
    logits = logits[logits.shape[0] - len(e["input_ids"]):]  # drop P-Tuning v1's virtual positions
    logp = torch.log_softmax(logits[:-1].float(), -1)
    p = e["target_mask"].index(1)
    nll = -sum(float(logp[i - 1, e["input_ids"][i]]) for i in range(p, len(e["input_ids"])))
    cand = pt.label_token_ids(tok, labels)[0]
    return nll, len(e["input_ids"]) - p, labels[int(logp[p - 1, cand].argmax())]


@pytest.mark.parametrize("method", ["ptv2", "ptv1"])
def test_evaluate_labels_matches_a_by_hand_computation(method):
    model, tok = fresh()
    pm = pt.wrap(model, PromptTuningSettings(method=method, num_virtual_tokens=6,
                                             encoder_hidden_size=32))
    assert pt.virtual_positions(pm) == (6 if method == "ptv1" else 0)
    recs = pt.label_records(RECORDS, "topic", LABELS, TEMPLATE)
    labels = list(LABELS.values())
    res = pt.evaluate_labels(pm, tok, recs, labels, batch_size=4)  # padded batches
    by_hand = [_manual(pm, tok, r, labels) for r in recs]
    assert res["loss"] == pytest.approx(sum(x[0] for x in by_hand) / sum(x[1] for x in by_hand), rel=1e-4)
    assert res["predictions"] == [x[2] for x in by_hand]
    gold = [r["output"] for r in recs]
    assert res["accuracy"] == pytest.approx(sum(p == g for p, g in zip(res["predictions"], gold)) / 6)


@pytest.mark.parametrize("method, lr", [("ptv2", 0.2), ("ptv1", 5e-2), ("lora", 1e-2)])
def test_a_few_trl_steps_reduce_the_loss_on_a_fixed_batch(method, lr, tmp_path):
    model, tok = fresh()
    recs = pt.label_records(RECORDS, "topic", LABELS, TEMPLATE)
    f = atomic_write_jsonl(tmp_path / "train.jsonl", recs)
    s = PromptTuningSettings(method=method, learning_rate=lr, num_virtual_tokens=4,
                             encoder_hidden_size=32, lora_r=4, lora_dropout=0.0)
    labs.seed_everything(0)
    pm = pt.wrap(model, s)
    base_before = {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters()
                   if "lora_" not in n}
    trainable_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    labels = list(LABELS.values())
    before = pt.evaluate_labels(pm, tok, recs, labels)["loss"]
    res = pt.train(pm, tok, s, f, tmp_path / "run", steps=6, batch_size=6, bf16=False)
    after = pt.evaluate_labels(pm, tok, recs, labels)["loss"]
    assert res["global_step"] == 6 and res["tokens_per_s"] > 0
    assert after < before - 0.05, (before, after)
    trained = dict(pm.named_parameters())
    assert any(not torch.equal(trained[n], v) for n, v in trainable_before.items())
    for n, p in pm.get_base_model().named_parameters():  # the base stays frozen
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


@pytest.mark.parametrize("s", [
    PromptTuningSettings(method="ptv2", num_virtual_tokens=5),
    PromptTuningSettings(method="ptv2", num_virtual_tokens=5, prefix_projection=True,
                         encoder_hidden_size=16),
    PromptTuningSettings(method="ptv1", num_virtual_tokens=5, encoder_hidden_size=16),
], ids=["ptv2", "ptv2-projection", "ptv1"])
def test_saved_prompt_reloads_onto_a_fresh_base_with_equal_logits(s, tmp_path):
    model, tok = fresh()
    labs.seed_everything(0)
    pm = pt.wrap(model, s)
    texts = ["Where is my parcel?", "扫地机不能自动回充"]
    want = pt.logits_of(pm, tok, texts)
    saved = pt.save_prompt(pm, tmp_path / "adapter")
    # only the prefix / the prompt embeddings are stored; the reparameterisation MLPs are not
    stored = 5 * 2 * 2 * 32 if s.method == "ptv2" else 5 * 64
    assert saved["values"] == stored and saved["bytes"] > 4 * stored
    base, _ = fresh()
    plain = pt.logits_of(base, tok, texts)
    reloaded = pt.load_prompt(base, tmp_path / "adapter")
    got = pt.logits_of(reloaded, tok, texts)
    diff = max(float((a - b).abs().max()) for a, b in zip(want, got))
    assert diff <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(want, plain)) > 1e-3  # the prompt matters
    with pytest.raises(LlmtechError, match="adapter_config.json"):
        pt.load_prompt(base, tmp_path)


def test_text_initialised_prefix_acts_like_the_text_prepended():
    model, tok = fresh()
    text = "Sort customer questions by topic and answer in one word."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) - 2
    pm = pt.wrap(model, PromptTuningSettings(method="ptv2", num_virtual_tokens=n, prefix_init="text",
                                             prefix_init_text=text), tok)
    q = tok("How do I pay?", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        got = pm(input_ids=torch.tensor([q])).logits[0]
        with pm.disable_adapter():
            want = pm(input_ids=torch.tensor([ids[:n] + q])).logits[0, n:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="tokens"):
        pt.wrap(fresh()[0], PromptTuningSettings(method="ptv2", num_virtual_tokens=50,
                                                 prefix_init="text", prefix_init_text=text), tok)
    with pytest.raises(ConfigError, match="prefix_projection"):
        pt.wrap(fresh()[0], PromptTuningSettings(method="ptv2", prefix_projection=True,
                                                 prefix_init="text", prefix_init_text=text), tok)


def test_lab_main_on_tiny_llama(tmp_path):
    spec = importlib.util.spec_from_file_location("l203_lab", LAB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = labs.run(mod.main, mod.Config, argv=["--quick", "--out", str(tmp_path), "model=tiny-llama",
                                                "steps=4", "eval_samples=12"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["ptv2_reload_max_abs_diff"] == rec["ptv2_reload_max_abs_diff"] == 0.0
    for k in ("ptv2", "ptv1", "lora"):
        assert m[f"{k}_params_match_analytic"] is True
        assert m[f"{k}_loss_after"] < m["loss_before"]  # 4 steps already move a random model
        assert 0 <= m[f"{k}_accuracy_after"] <= 1
        assert m[f"{k}_trainable_share"] == pytest.approx(
            m[f"{k}_trainable_params"] / (m[f"{k}_trainable_params"] + 3219776))  # tiny base params
    assert m["ptv2_trainable_params"] == 16 * 2 * 2 * 32 == m["ptv2_saved_values"]
    assert m["ptv1_saved_values"] == 16 * 64 < m["ptv1_trainable_params"]  # encoder not stored
    assert m["labels_single_token"] is True and m["num_labels"] == 6
    assert (tmp_path / "comparison.png").stat().st_size > 0 and (tmp_path / "loss.png").exists()
    assert "各类别的留出准确率" in (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit) as e:  # a section whose method does not match its name
        labs.run(mod.main, mod.Config, argv=["--quick", "--out", str(tmp_path),
                                             "model=tiny-llama", "ptv1.method=lora"])
    assert e.value.code == 2
