"""L2.04 model compression: magnitude / structured pruning, knowledge distillation, the lab."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from conftest import ROOT, run_script
from llmtech import models
from llmtech.compress import compare, distill, prune
from llmtech.errors import LlmtechError
from llmtech.evals import lm

LAB = ROOT / "lessons" / "lesson2" / "04_model_compression" / "compression_lab.py"
TEXTS = ["Refunds start within three business days after the warehouse receives and checks the "
         "item, and the money goes back to the original payment account.",
         "To reset the router, hold the small button on the back for ten seconds until the light "
         "blinks orange, then wait two minutes for it to restart."] * 6


@pytest.fixture()
def fresh_tiny(tiny):
    model, tok = tiny
    return copy.deepcopy(model).eval(), tok


# --------------------------------------------------------------------------- unstructured

@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_magnitude_prune_reaches_sparsity_and_keeps_shapes(fresh_tiny, scope, sparsity):
    model, _ = fresh_tiny
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    emb = model.get_input_embeddings().weight.clone()
    before = {n: m.weight.detach().clone() for n, m in prune.prunable_linears(model).items()}
    rep = prune.magnitude_prune(model, sparsity, scope)
    assert rep.sparsity == pytest.approx(sparsity, abs=2e-3)
    assert prune.weight_sparsity(model) == pytest.approx(rep.sparsity)
    # permanent and shape-preserving: no masks / weight_orig, same tensors, head/embedding untouched
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert torch.equal(model.get_input_embeddings().weight, emb)
    after = {n: m.weight for n, m in prune.prunable_linears(model).items()}
    for n, w in after.items():
        kept, cut = before[n][w != 0].abs(), before[n][w == 0].abs()
        assert torch.equal(w[w != 0], before[n][w != 0])  # survivors are unchanged
        if scope == "layer":
            assert (w == 0).float().mean().item() == pytest.approx(sparsity, abs=0.02)
            assert cut.max() <= kept.min()  # the smallest magnitudes of that matrix went
    if scope == "global":
        allk = torch.cat([before[n][after[n] != 0].abs() for n in after])
        allc = torch.cat([before[n][after[n] == 0].abs() for n in after])
        assert allc.max() <= rep.threshold < allk.min()


def test_magnitude_prune_rejects_bad_sparsity(fresh_tiny):
    with pytest.raises(LlmtechError, match="sparsity"):
        prune.magnitude_prune(fresh_tiny[0], 1.2)


def test_csr_bytes_arithmetic():
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, 33, dtype=torch.float32).view(4, 8))
        lin.weight[:, :4] = 0  # 16 of 32 entries are zero
    model = nn.Sequential(lin)
    dense = 32 * 4
    assert prune.csr_bytes(model, index_bytes=4, skip=()) == 16 * (4 + 4) + (4 + 1) * 4
    assert prune.csr_bytes(model, index_bytes=4, skip=()) > dense  # 50 % sparse CSR > dense fp32


# --------------------------------------------------------------------------- structured

def test_structured_mlp_pruning_equals_zeroing_the_removed_neurons(fresh_tiny, tmp_path):
    model, tok = fresh_tiny
    ref = copy.deepcopy(model)
    calib = lm.token_windows(tok, TEXTS, 32, 128)
    scores = prune.mlp_channel_scores(model, "activation", calib)
    full_bytes = compare.saved_bytes(model, tmp_path / "full")
    rep = prune.prune_mlp_channels(model, 0.25, scores, method="activation")
    assert (rep.intermediate_before, rep.intermediate_after) == (128, 96)
    assert model.config.intermediate_size == 96 and rep.params_after < rep.params_before
    for layer, s in zip(model.model.layers, scores):
        assert layer.mlp.gate_proj.weight.shape == (96, 64) == layer.mlp.up_proj.weight.shape
        assert layer.mlp.down_proj.weight.shape == (64, 96)
    # the same function as the full model with the dropped neurons' down_proj columns zeroed
    with torch.no_grad():
        for layer, s in zip(ref.model.layers, scores):
            layer.mlp.down_proj.weight[:, s.topk(128 - 96, largest=False).indices] = 0
    ids = torch.tensor([calib[0]])
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    # saved smaller by exactly the removed parameters, and it reloads as the same model
    small_bytes = compare.saved_bytes(model, tmp_path / "small")
    removed = (rep.params_before - rep.params_after) * 4
    assert full_bytes - small_bytes == pytest.approx(removed, abs=4096)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert again.config.intermediate_size == 96
    assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_weight_scores_are_products_of_channel_norms(fresh_tiny):
    model, _ = fresh_tiny
    mlp = model.model.layers[1].mlp
    s = prune.mlp_channel_scores(model, "weight")[1]
    i = 7
    want = (mlp.gate_proj.weight[i].norm() * mlp.up_proj.weight[i].norm()
            * mlp.down_proj.weight[:, i].norm())
    assert s[i].item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(LlmtechError, match="calibration"):
        prune.mlp_channel_scores(model, "activation")


def test_pareto_front():
    pts = {"a": (1.0, 5.0), "b": (2.0, 2.0), "c": (3.0, 3.0), "d": (0.5, 9.0), "e": (2.0, 2.0)}
    assert compare.pareto_front(pts) == ["a", "b", "d", "e"]  # c is dominated by b; ties both stay


# --------------------------------------------------------------------------- distillation

def _softmax(xs):
    mx = max(xs)
    e = [math.exp(x - mx) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_equals_its_definition():
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]])
    t = torch.tensor([[[2.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 4.0, 1.0]]])
    labels = torch.tensor([[1, 2, -100]])  # the third position has no label: left out
    T, alpha = 2.0, 0.3
    kd = ce = 0.0
    for pos in range(2):
        p = _softmax([x / T for x in t[0, pos].tolist()])
        q = _softmax([x / T for x in s[0, pos].tolist()])
        kd += T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
        ce += -math.log(_softmax(s[0, pos].tolist())[labels[0, pos]]) / 2
    out = distill.kd_loss(s, t, labels, temperature=T, alpha=alpha)
    assert out.kd.item() == pytest.approx(kd, rel=1e-5)
    assert out.ce.item() == pytest.approx(ce, rel=1e-5)
    assert out.total.item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)
    same = distill.kd_loss(s, s.clone(), labels, temperature=T, alpha=alpha)
    assert abs(same.kd.item()) < 1e-6
    assert same.total.item() == pytest.approx((1 - alpha) * same.ce.item(), rel=1e-5)
    with pytest.raises(LlmtechError, match="alpha=1"):
        distill.kd_loss(s, t, None, alpha=0.5)


def test_student_is_built_from_evenly_spread_teacher_layers(tiny):
    _, tok = tiny
    assert distill.student_layer_ids(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert distill.student_layer_ids(4, 2) == [0, 3] and distill.student_layer_ids(5, 1) == [0]
    teacher = models.build_tiny_llama(tok, layers=4).eval()
    student = distill.build_student(teacher, 2)
    assert student.config.num_hidden_layers == 2 and student.config.distilled_from_layers == [0, 3]
    tsd, ssd = teacher.state_dict(), student.state_dict()
    assert torch.equal(ssd["model.layers.1.mlp.up_proj.weight"], tsd["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(ssd["model.embed_tokens.weight"], tsd["model.embed_tokens.weight"])
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    full = distill.build_student(teacher, 4)  # all layers: the teacher itself, KD = 0
    blocks = distill.pack_blocks(tok, TEXTS, 16)[:2]
    assert distill.kd_eval(teacher, full, blocks) < 1e-6
    with pytest.raises(LlmtechError, match="between 1 and 4"):
        distill.build_student(teacher, 5)


def test_a_few_distillation_steps_reduce_the_kd_loss(tiny, tmp_path):
    teacher, tok = copy.deepcopy(tiny[0]).eval(), tiny[1]
    with torch.no_grad():  # a confident teacher (sharp distributions): random tiny logits are flat
        teacher.model.norm.weight.mul_(30)
    student = distill.build_student(teacher, 1)
    blocks = distill.pack_blocks(tok, TEXTS, 32)
    before = distill.kd_eval(teacher, student, blocks)
    frozen = student.get_input_embeddings().weight.clone()
    res = distill.distill(teacher, student, tok, TEXTS, distill.DistillSettings(
        steps=6, batch_size=4, block_size=32, lr=1e-3, alpha=1.0), log_file=tmp_path / "log.jsonl",
        progress=False)
    after = distill.kd_eval(teacher, student, blocks)
    assert before > 1.0 and after < 0.5 * before, (before, after)
    assert res.tokens == 6 * 4 * 32 and len(res.history) == 6
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 6
    assert torch.equal(student.get_input_embeddings().weight, frozen)  # freeze_embeddings


# --------------------------------------------------------------------------- the lab

def test_lab_runs_on_tiny_llama(tmp_path):
    r = run_script(LAB, "--quick", "--out", tmp_path, "model=tiny-llama", "student_layers=1",
                   "distill_steps=2", "distill_block=32", "max_new_tokens=4", "ppl_max_tokens=128",
                   timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["sparsity_sparse50"] == pytest.approx(0.5, abs=2e-3)
    # dense storage: 50 % zeros save nothing on disk; removing MLP neurons and 4-bit storage do
    assert m["size_mb_sparse50"] == pytest.approx(m["size_mb_fp32"], rel=1e-3)
    assert m["sparse_size_ratio"] == pytest.approx(1.0, rel=1e-3)
    assert m["size_mb_mlp"] < m["size_mb_fp32"] and m["mlp_intermediate"] == 96
    assert m["size_mb_student_kd"] < m["size_mb_fp32"] and m["student_layers"] == 1
    assert m["size_mb_nf4"] < 0.6 * m["size_mb_fp32"]
    for v in ("fp32", "sparse30", "sparse50", "mlp", "student_init", "student_kd", "int8", "nf4"):
        assert m[f"ppl_{v}"] > 1 and m[f"tokens_per_s_{v}"] > 0, v
    assert set(m["pareto_size_mb"].split(",")) <= {"fp32", "sparse30", "sparse50", "mlp",
                                                  "student_init", "student_kd", "int8", "nf4", "gguf"}
    assert m["gguf_status"] and ("ppl_gguf" in m)  # measured, or None with the reason
    assert not (tmp_path / "models").exists()  # the saved copies were only for measuring size
    for f in ("report.md", "compression_pareto.png", "distill_loss.png", "distill_log.jsonl"):
        assert (tmp_path / f).exists(), f
