"""L5.06 answer diversity: metrics against hand-computed values, sweep validation, seeded
sampling on tiny-llama, and the lab end to end on tiny-llama."""

import json
import math

import numpy as np
import pytest

from conftest import ROOT, load_lab_module, run_script
from llmtech import labs, models
from llmtech.config import load_config
from llmtech.errors import ConfigError
from llmtech.evals import diversity as D
from llmtech.evals import lm

LAB = ROOT / "lessons/lesson5/06_diversity_debug/diversity_evaluation.py"


# --------------------------------------------------------------------------- metrics by hand

def test_distinct_n_by_hand():
    assert D.distinct_n(["a b a b"], 1, "space") == 0.5            # {a, b} / 4
    assert D.distinct_n(["a b a b"], 2, "space") == pytest.approx(2 / 3)  # ab, ba, ab
    assert D.distinct_n(["a b", "a c"], 1, "space") == 0.75        # pooled: a b a c
    assert D.distinct_n(["a b", "a c"], 2, "space") == 1.0         # ab, ac (no n-gram across texts)
    assert D.distinct_n(["a"], 2, "space") == 0.0                  # no bigram at all
    assert D.mean_distinct_n([["a a"], ["a b"]], 1, "space") == 0.75  # (1/2 + 2/2) / 2
    # Chinese through jieba words: 退货 / 退货 / 怎么办 -> 2 different of 3
    assert D.distinct_n(["退货退货怎么办"], 1) == pytest.approx(2 / 3)


def test_entropy_of_uniform_and_constant_distributions():
    assert D.ngram_entropy(["a b c d"], 1, "space") == pytest.approx(2.0)   # uniform over 4
    assert D.ngram_entropy(["a b", "c d e f g h"], 1, "space") == pytest.approx(3.0)  # 8 distinct
    assert D.ngram_entropy(["a a a a"], 1, "space") == 0.0
    assert D.ngram_entropy(["a a b b"], 1, "space") == pytest.approx(1.0)
    # bigrams of "a b a b c": ab ×2, ba, bc -> -(.5 log .5 + 2 · .25 log .25) = 1.5
    assert D.ngram_entropy(["a b a b c"], 2, "space") == pytest.approx(1.5)


def test_self_bleu_identical_is_one_disjoint_is_zero():
    assert D.self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
    assert D.self_bleu(["您好，退货需要在签收后七天内申请。"] * 2) == pytest.approx(1.0)
    assert D.self_bleu(["a b c d", "e f g h"], "space") == 0.0
    assert D.self_bleu(["", ""]) == 1.0 and D.self_bleu(["", "a b"], "space") == 0.0
    part = D.self_bleu(["the cat sat on the mat", "the cat sat on a rug"], "space")
    assert 0.0 < part < 1.0
    # one hypothesis by hand: "a b" vs ref "a c", max_n 2, add-one on n=2: p1 = 1/2, p2 = 1/2
    assert D.self_bleu(["a b", "a c"], "space", max_n=2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        D.self_bleu(["only one"])


def test_repetition_and_dispersion_by_hand():
    assert D.seq_repetition("a b c a b c", 3, "space") == pytest.approx(0.25)  # abc bca cab abc
    assert D.seq_repetition("a b c d", 3, "space") == 0.0
    e1, e2 = np.eye(2)
    assert D.embedding_dispersion(np.stack([e1, e2])) == pytest.approx(1.0)
    assert D.embedding_dispersion(np.stack([e1, e1, -e1])) == pytest.approx(4 / 3)  # 0, 2, 2
    assert D.embedding_dispersion(np.stack([3 * e1, e1])) == pytest.approx(0.0)  # scale-free


def test_score_setting_greedy_like_group():
    def embed(texts):  # bag of letters, normalised: enough to check the wiring
        v = np.array([[t.count(c) for c in "abcdefgh"] for t in texts], float) + 1e-9
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    same = D.score_setting([["a b c"] * 3], ["a b c"], embed=embed, tokenize="space")
    assert same["self_bleu"] == 1.0 and same["dispersion"] == 0.0
    assert same["embed_sim"] == pytest.approx(1.0) and same["rouge_l"] == 1.0
    assert same["distinct1_prompt"] == pytest.approx(1 / 3, abs=1e-4) and same["one_minus_self_bleu"] == 0.0
    mixed = D.score_setting([["a b c", "d e f", "g h"]], ["a b c"], embed=embed, tokenize="space")
    assert mixed["distinct1_corpus"] == 1.0 and mixed["self_bleu"] == 0.0
    assert mixed["dispersion"] > 0.9 and mixed["embed_sim"] == pytest.approx(1 / 3, abs=1e-3)
    loop = D.score_setting([["a b a b a b", "a b c d", ""]], ["a b"], tokenize="space")
    assert loop["rep3"] == pytest.approx(0.5 / 3, abs=1e-4)  # aba bab aba bab -> 0.5; others 0
    assert loop["degenerate_rate"] == pytest.approx(2 / 3, abs=1e-4)  # the loop and the empty one
    assert "embed_sim" not in loop


def test_pareto_front_and_recommend_rule():
    assert D.pareto_front([(0, 1), (1, 0), (0.5, 0.5), (0.4, 0.4)]) == [0, 2, 1]
    rows = [{"name": "greedy", "do_sample": False, "embed_sim": 0.50, "distinct2_prompt": 0.2, "degenerate_rate": 0},
            {"name": "T0.3", "do_sample": True, "embed_sim": 0.48, "distinct2_prompt": 0.6, "degenerate_rate": 0},
            {"name": "T0.7", "do_sample": True, "embed_sim": 0.46, "distinct2_prompt": 0.8, "degenerate_rate": 0.2},
            {"name": "T1.0", "do_sample": True, "embed_sim": 0.44, "distinct2_prompt": 0.9, "degenerate_rate": 0},
            {"name": "T1.5", "do_sample": True, "embed_sim": 0.20, "distinct2_prompt": 1.0, "degenerate_rate": 0}]
    r = D.recommend(rows, tolerance=0.05, max_degenerate=0.1)
    assert r["name"] == "T0.3" and r["eligible"] == ["T0.3"]   # T0.7 degenerate, T1.0 below 0.45
    assert D.recommend(rows, tolerance=0.07)["name"] == "T1.0"
    assert D.recommend(rows, tolerance=0.0)["name"] == "T0.3"   # none eligible -> best sampled quality
    assert D.recommend(rows, tolerance=0.07)["best_quality_setting"] == "greedy"
    with pytest.raises(ConfigError, match="unknown"):
        D.recommend(rows, quality="bleu")


# --------------------------------------------------------------------------- bad sweeps

@pytest.mark.parametrize("sweep, words", [
    ({"temperature": [0.5, 0]}, ["sweep.temperature", "0"]),
    ({"temperature": [-1]}, ["sweep.temperature", "-1"]),
    ({"top_p": [1.5]}, ["sweep.top_p", "1.5", "(0, 1]"]),
    ({"top_p": [0]}, ["sweep.top_p", "0"]),
    ({"top_k": [2.5]}, ["sweep.top_k", "2.5"]),
    ({"temp": [1.0]}, ["unknown sweep key 'temp'", "temperature"]),
    ({"repetition_penalty": ["x"]}, ["sweep.repetition_penalty", "'x'"]),
])
def test_bad_sweep_is_a_config_error(sweep, words):
    with pytest.raises(ConfigError) as e:
        D.expand_sweep(sweep)
    for w in words:
        assert w in str(e.value)


def test_expand_sweep_one_factor_at_a_time():
    s = D.expand_sweep({"temperature": [0.5, 1.0], "top_k": [10.0]}, base={"top_p": 0.9})
    assert [x.name for x in s] == ["greedy", "base", "T0.5", "k10"]  # T1 equals base: dropped
    assert not s[0].do_sample and s[1].top_p == 0.9 and s[1].temperature == 1.0
    assert s[2].temperature == 0.5 and s[2].top_p == 0.9 and s[3].top_k == 10
    assert s[3].generate_kwargs() == {"do_sample": True, "temperature": 1.0, "top_p": 0.9,
                                      "top_k": 10, "repetition_penalty": 1.0}


def test_lab_config_and_cli_name_the_key_and_value():
    lab = load_lab_module(LAB, "l506_lab")
    with pytest.raises(ConfigError, match=r"sweep\.top_p: value 0\.0 must be in \(0, 1\]"):
        load_config(lab.Config, None, ["sweep.top_p=[0.0]"])
    with pytest.raises(ConfigError, match="unknown sweep key 'tmp'"):
        load_config(lab.Config, None, ["sweep.tmp=[1]"])
    cfg = load_config(lab.Config, None, ["sweep.temperature=0.4", "sweep.top_k=[5, 20]"])
    assert cfg.sweep == {"temperature": [0.4], "top_k": [5, 20]}  # a scalar is one value
    r = run_script(LAB, "--quick", "sweep.temperature=[0]", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sweep.temperature: value 0" in r.stderr


# --------------------------------------------------------------------------- sampling + lab

def test_seeded_sweep_on_tiny_llama(tiny):
    model, tok = tiny
    side = tok.padding_side
    convs = [models.chat_messages("How do I return an item?"), models.chat_messages("退货运费谁出？")]
    greedy, base, _hot = D.expand_sweep({"temperature": [5.0]})
    g = D.sample_responses(model, tok, convs, greedy, n=3, max_new_tokens=6, seed=0)
    assert len(g) == 2 and all(len(x) == 3 and len(set(x)) == 1 for x in g)
    assert [x[0] for x in g] == lm.generate(model, tok, convs, max_new_tokens=6)  # same greedy path
    a = D.sample_responses(model, tok, convs, base, n=3, max_new_tokens=6, seed=1, batch_prompts=1)
    b = D.sample_responses(model, tok, convs, base, n=3, max_new_tokens=6, seed=1, batch_prompts=1)
    assert a == b and all(len(set(x)) > 1 and all(x) for x in a)  # seeded, samples differ
    assert D.sample_responses(model, tok, convs, base, n=3, max_new_tokens=6, seed=2, batch_prompts=1) != a
    assert tok.padding_side == side  # restored after left-padded generation


def test_lab_end_to_end_on_tiny_llama(tmp_path):
    lab = load_lab_module(LAB, "l506_lab_e2e")
    cfg = lab.Config(model="tiny-llama", prompts=2, samples=3, max_new_tokens=8, quick=True,
                     sweep={"temperature": [0.5], "top_p": [0.5]})
    m = lab.main(cfg, labs.LabContext(out=tmp_path, lab_id="L5.06", title="t"))
    labs._check_flat(m)
    json.dumps(m)
    names = ["greedy", "base", "T0.5", "p0.5"]
    assert m["n_settings"] == 4 and m["n_prompts"] == 2 and m["recommended"] in names[1:]
    assert m["greedy_self_bleu"] == 1.0 and m["greedy_dispersion"] == 0.0
    assert m["base_distinct2_prompt"] > m["greedy_distinct2_prompt"]
    assert m["recommended_quality"] >= m["best_quality"] - cfg.tolerance or m["n_eligible"] == 0
    assert set(m["pareto_settings"].split(",")) <= set(names)
    for k in names:
        assert 0.0 <= m[f"{k}_distinct1_corpus"] <= 1.0 and math.isfinite(m[f"{k}_embed_sim"])
    assert (tmp_path / "quality_vs_diversity.png").stat().st_size > 10_000
