"""PPO pieces against hand-computed numbers; PPO / GRPO runs on the tiny model; rollout helpers."""

import json
import math

import pytest
import torch

from llmtech import models
from llmtech.errors import ConfigError, DataError, TrainingDiverged
from llmtech.train import ppo, rollout
from llmtech.train.reward import RewardScorer

LN2 = math.log(2.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- GAE

def test_gae_by_hand_with_early_end():
    # γ = 0.9, λ = 0.5; the reply ends after 3 tokens (V beyond the end is ignored, taken as 0)
    # t=2: δ = 2 + 0.9·0 − 0.25 = 1.75                       A2 = 1.75
    # t=1: δ = 0 + 0.9·0.25 − 1.0 = −0.775                   A1 = −0.775 + 0.45·1.75 = 0.0125
    # t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4                       A0 = 1.4 + 0.45·0.0125 = 1.405625
    rewards, values, mask = t([1.0, 0.0, 2.0, 5.0]), t([0.5, 1.0, 0.25, 9.0]), t([1, 1, 1, 0])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, t([1.405625, 0.0125, 1.75, 0.0]))
    torch.testing.assert_close(ret, t([1.905625, 1.0125, 2.0, 0.0]))  # A + V, 0 past the end


def test_gae_monte_carlo_and_td0_limits():
    rewards, values, mask = t([0.0, 0.0, 0.0, 1.0]), t([0.0, 0.0, 0.0, 0.0]), t([1, 1, 1, 1])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)  # λ=1, γ=1: A_t = Σ future r
    torch.testing.assert_close(adv, t([1.0, 1.0, 1.0, 1.0]))
    # λ = 0: A_t = δ_t = r_t + γV_{t+1} − V_t with V = [1, 2, 3] and γ = 0.5
    adv, _ = ppo.gae(t([0.0, 0.0, 4.0]), t([1.0, 2.0, 3.0]), t([1, 1, 1]), gamma=0.5, lam=0.0)
    torch.testing.assert_close(adv, t([0 + 0.5 * 2 - 1, 0 + 0.5 * 3 - 2, 4 + 0 - 3]))  # [0, -0.5, 1]


# --------------------------------------------------------------------------- whitening

def test_whiten_by_hand():
    # masked entries [2, 4, 6]: mean 4, unbiased variance (4 + 0 + 4) / 2 = 4, std 2
    x, mask = t([2.0, 4.0, 6.0, 100.0]), t([1, 1, 1, 0])
    torch.testing.assert_close(ppo.whiten(x, mask), t([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(ppo.whiten(x, mask, shift_mean=False), t([3.0, 4.0, 5.0, 0.0]))
    assert float(ppo.masked_mean(x, mask)) == pytest.approx(4.0)


# --------------------------------------------------------------------------- KL

@pytest.mark.parametrize("kind, expected", [
    ("k1", [LN2, -LN2]),                      # log π − log π_ref
    ("k2", [0.5 * LN2 ** 2, 0.5 * LN2 ** 2]),   # ½ d² = 0.240227
    ("mse", [0.5 * LN2 ** 2, 0.5 * LN2 ** 2]),
    ("k3", [-0.5 + LN2, 1.0 - LN2]),           # r = π_ref/π = 0.5 → (0.5−1) − ln 0.5; r = 2 → 1 − ln 2
    ("abs", [LN2, LN2]),
])
def test_kl_kinds_by_hand(kind, expected):
    logp = torch.log(t([0.5, 0.25]))
    ref = torch.log(t([0.25, 0.5]))
    torch.testing.assert_close(ppo.kl_per_token(logp, ref, kind), t(expected))


def test_k3_is_nonnegative_and_zero_at_equality():
    d = torch.linspace(-3, 3, 13)
    assert (ppo.kl_per_token(d, torch.zeros_like(d), "k3") >= 0).all()
    assert float(ppo.kl_per_token(torch.zeros(1), torch.zeros(1), "k3")) == 0.0
    with pytest.raises(ValueError):
        ppo.kl_per_token(d, d, "k9")


# --------------------------------------------------------------------------- reward shaping

def test_shape_rewards_score_at_last_token_kl_elsewhere():
    # β = 0.1, k1. Row 0 ends after 2 tokens: kl = [0.5, 0] → r = [−0.05, 0 + 1.0, 0]
    # row 1 full: kl = [−1, 0, −2] → r = [0.1, 0, 0.2 − 2.0]
    score = t(1.0, -2.0)
    logp = t([-1.0, -1.0, -1.0], [-2.0, -1.0, -3.0])
    ref = t([-1.5, -1.0, -0.5], [-1.0, -1.0, -1.0])
    mask = t([1, 1, 0], [1, 1, 1])
    rewards, kl = ppo.shape_rewards(score, logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, t([-0.05, 1.0, 0.0], [0.1, 0.0, -1.8]))
    torch.testing.assert_close(kl, t([0.5, 0.0, 0.0], [-1.0, 0.0, -2.0]))
    assert ppo.last_index(mask).tolist() == [1, 2]


# --------------------------------------------------------------------------- clipped losses

@pytest.mark.parametrize("adv, ratio, loss, clipped, grad", [
    (1.0, 1.1, -1.1, 0.0, -1.1),   # inside [0.8, 1.2]: −A·ρ, gradient −A·ρ w.r.t. log π
    (1.0, 1.5, -1.2, 1.0, 0.0),    # A > 0, ρ above 1+ε: clipped at −1.2, no gradient
    (1.0, 0.5, -0.5, 0.0, -0.5),   # A > 0, ρ below 1−ε: pessimistic max keeps −0.5 (unclipped)
    (-1.0, 1.5, 1.5, 0.0, 1.5),    # A < 0, ρ above: keeps 1.5 (unclipped)
    (-1.0, 0.5, 0.8, 1.0, 0.0),    # A < 0, ρ below 1−ε: clipped at 0.8, no gradient
])
def test_policy_loss_cases_by_hand(adv, ratio, loss, clipped, grad):
    new = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out, clipfrac, approx_kl = ppo.policy_loss(new, torch.zeros(1, 1), t([adv]), t([1.0]), clip=0.2)
    assert float(out) == pytest.approx(loss, abs=1e-6)
    assert float(clipfrac) == clipped
    assert float(approx_kl) == pytest.approx(0.5 * math.log(ratio) ** 2, abs=1e-7)
    out.backward()
    assert float(new.grad) == pytest.approx(grad, abs=1e-6)


def test_policy_loss_masked_mean():
    # tokens: (A=1, ρ=1.5) → −1.2 clipped; (A=1, ρ=0.5) → −0.5; (A=−1, ρ=1.5) → 1.5; 4th masked
    new = torch.log(t([1.5, 0.5, 1.5, 9.0]))
    out, clipfrac, _ = ppo.policy_loss(new, torch.zeros(1, 4), t([1.0, 1.0, -1.0, 5.0]), t([1, 1, 1, 0]), 0.2)
    assert float(out) == pytest.approx((-1.2 - 0.5 + 1.5) / 3, abs=1e-6)
    assert float(clipfrac) == pytest.approx(1 / 3)


@pytest.mark.parametrize("old, new, ret, loss, clipped", [
    (1.0, 1.5, 2.0, 0.5 * 0.64, 1.0),   # V_clip = 1.2: max(0.25, 0.64) = 0.64
    (1.0, 1.5, 1.0, 0.5 * 0.25, 0.0),   # V_clip = 1.2: max(0.25, 0.04) = 0.25
    (1.0, 1.1, 3.0, 0.5 * 3.61, 0.0),   # inside the clip range: both errors 1.9² = 3.61
])
def test_value_loss_by_hand(old, new, ret, loss, clipped):
    out, frac = ppo.value_loss(t([new]), t([old]), t([ret]), t([1.0]), clip=0.2)
    assert float(out) == pytest.approx(loss, abs=1e-6)
    assert float(frac) == clipped


# --------------------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_by_hand():
    # β = 0.1, target 6, horizon 10000, n = 256:
    # KL 9   → e = clip(0.5) = 0.2   → β = 0.1·(1 + 0.2·0.0256) = 0.100512
    # KL 6.6 → e = 0.1               → β = 0.1·(1 + 0.1·0.0256) = 0.100256
    # KL 0   → e = clip(−1) = −0.2   → β = 0.1·(1 − 0.2·0.0256) = 0.099488
    for kl, beta in ((9.0, 0.100512), (6.6, 0.100256), (0.0, 0.099488)):
        c = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
        assert c.update(kl, 256) == pytest.approx(beta, rel=1e-9)
    c = ppo.AdaptiveKLController(0.1, 6.0, 10000)
    c.update(9.0, 256)
    c.update(9.0, 256)
    assert c.value == pytest.approx(0.1 * 1.00512 ** 2)
    fixed = ppo.FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    with pytest.raises(ConfigError):
        ppo.AdaptiveKLController(0.1, 0.0, 100)


def test_settings_reject_unknown_keys():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ppo.PPOSettings(kl_coeff=0.1)


# --------------------------------------------------------------------------- rollout helpers

def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    mask, ended = rollout.response_mask_after_eos(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_win_rate_ties_half():
    assert rollout.win_rate([1, 2, 3, 0], [0, 2, 4, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_load_prompts_from_each_format(tmp_path):
    pairs = rollout.load_prompts("data/support/preference.jsonl")
    assert pairs[0] == [{"role": "user", "content": "S1 找不到充电座怎么办？"}]
    assert len({repr(p) for p in pairs}) == len(pairs)  # deduplicated
    sft = rollout.load_prompts("data/support/sft_train.jsonl", limit=5)
    assert len(sft) == 5 and all(p[-1]["role"] == "user" for p in sft)
    kto = tmp_path / "kto.jsonl"
    kto.write_text("\n".join(json.dumps({"prompt": q, "completion": "ok", "label": lab}, ensure_ascii=False)
                             for q, lab in (("问题一", True), ("问题一", False), ("问题二", True))) + "\n")
    assert [p[-1]["content"] for p in rollout.load_prompts(kto)] == ["问题一", "问题二"]
    with pytest.raises(DataError, match="not found"):
        rollout.load_prompts(tmp_path / "missing.jsonl")


def test_sampled_logprobs_match_an_unpadded_forward(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": "S1 找不到充电座怎么办？"}], [{"role": "user", "content": "Hi"}]]
    r = rollout.sample(model, tok, prompts, max_new_tokens=6, generator_seed=3)
    assert r.prompt_ids.shape[0] == 2 and r.response_ids.shape == r.response_mask.shape
    lp = rollout.response_logprobs(model, r)
    for i in range(2):  # each row alone, without padding, gives the same log-probs
        n = int(r.response_mask[i].sum())
        ids = torch.cat([r.prompt_ids[i][r.prompt_mask[i].bool()], r.response_ids[i][:n]])[None]
        with torch.no_grad():
            logits = model(ids).logits[0, -n - 1:-1]
        by_hand = torch.log_softmax(logits, -1).gather(-1, ids[0, -n:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, :n], by_hand, atol=1e-4, rtol=1e-4)
    # the same model as its own reference: KL is exactly 0
    assert rollout.sequence_kl(model, model, tok, rollout=r)["kl"] == 0.0


# --------------------------------------------------------------------------- runs on the tiny model

@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "rm"
    model, tok = models.load_reward_lm("tiny-llama", seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _settings(tmp_path, rm, **kw):
    base = dict(model="tiny-llama", reward_model=str(rm), output_dir=str(tmp_path / "ppo"), steps=2,
                rollout_batch=4, mini_batch=2, ppo_epochs=2, max_new_tokens=6, max_prompts=12,
                max_eval_prompts=3, save_steps=1, save_total_limit=None, seed=0)
    base.update(kw)
    return ppo.PPOSettings(**base)


def _log(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_run_ppo_writes_everything_and_resumes_exactly(tmp_path, tiny_rm):
    s = _settings(tmp_path, tiny_rm)
    res = ppo.run_ppo(s)
    out = tmp_path / "ppo"
    rows = _log(out / "trainer_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("score_mean", "reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "entropy", "response_len"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples before any update
    assert (out / "ppo_curves.png").stat().st_size > 0
    for d in ("checkpoint-1", "checkpoint-2", "final"):
        assert (out / d / "adapter_model.safetensors").exists() and (out / d / "value_head.pt").exists()
    saved = json.loads((out / "result.json").read_text())
    for key in ("eval_score_before", "eval_score_after", "eval_kl_after", "eval_win_rate"):
        assert math.isfinite(saved[key]), key
    assert saved["global_step"] == 2 and res["resumed_from_step"] == 0

    # a run killed before it saved step 2: resume from checkpoint-1 repeats step 2 exactly
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    res2 = ppo.run_ppo(s.model_copy(update={"resume": True, "steps": 3}))
    assert res2["resumed_from_step"] == 1
    rows2 = _log(out / "trainer_log.jsonl")
    assert [r["step"] for r in rows2] == [1, 2, 3]
    for key in ("score_mean", "kl", "policy_loss", "value_loss"):
        assert rows2[1][key] == pytest.approx(rows[1][key], abs=1e-5), key
    assert (out / "checkpoint-3" / "ppo_state.json").exists()


def test_reward_model_with_another_tokenizer_is_a_clear_error(tmp_path, tiny_rm):
    rm, tok = models.load_reward_lm(str(tiny_rm))
    tok.add_tokens(["<only_in_the_rm>"])
    with pytest.raises(ConfigError, match="reward model's tokenizer differs"):
        ppo.run_ppo(_settings(tmp_path, tiny_rm), scorer=RewardScorer(rm, tok))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, tiny_rm, monkeypatch):
    real = ppo.policy_loss
    calls = {"n": 0}

    def poisoned(new, old, adv, mask, clip):
        calls["n"] += 1
        loss, cf, akl = real(new, old, adv, mask, clip)
        return (loss * float("nan") if calls["n"] > 4 else loss), cf, akl  # 4 updates = step 1

    monkeypatch.setattr(ppo, "policy_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 2"):
        ppo.run_ppo(_settings(tmp_path, tiny_rm, steps=3, eval_prompts_file=None))
    out = tmp_path / "ppo"
    assert ppo.last_ppo_checkpoint(out) == out / "checkpoint-1"
    assert not (out / "checkpoint-2").exists()


def test_mini_batch_must_divide_rollout_batch(tmp_path, tiny_rm):
    with pytest.raises(ConfigError, match="mini_batch"):
        ppo.run_ppo(_settings(tmp_path, tiny_rm, rollout_batch=4, mini_batch=3))


@pytest.mark.slow
def test_grpo_runs_with_the_reward_model(tmp_path, tiny_rm):
    from llmtech.train.online import GRPOSettings, run_grpo

    s = GRPOSettings(model="tiny-llama", reward_model=str(tiny_rm), output_dir=str(tmp_path / "grpo"),
                     steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=6, max_prompts=8,
                     max_eval_prompts=3, save_steps=1)
    res = run_grpo(s)
    rows = _log(tmp_path / "grpo" / "trainer_log.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert "rewards/reward_model/mean" in rows[0]  # our callable's __name__
    assert res["global_step"] == 2 and (tmp_path / "grpo" / "final" / "adapter_model.safetensors").exists()
    assert math.isfinite(res["eval_score_after"]) and math.isfinite(res["eval_kl_after"])
    res2 = run_grpo(s.model_copy(update={"resume": True, "steps": 3, "eval_before": False}))
    assert res2["resumed_from_step"] == 2 and res2["global_step"] == 3
    assert [r["step"] for r in _log(tmp_path / "grpo" / "trainer_log.jsonl") if "reward" in r] == [1, 2, 3]
