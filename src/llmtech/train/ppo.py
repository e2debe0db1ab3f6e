"""PPO for RLHF on a chat LM, written from the definitions.

The recipe is Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"),
Ouyang et al. 2022 (InstructGPT) and Huang et al.'s "The N implementation details of RLHF with
PPO": the reply to a prompt is an episode whose actions are tokens; the reward model's scalar
score arrives at the last token and every token pays a KL penalty for leaving the reference
(SFT) policy; a value head estimates returns; advantages come from GAE; the policy takes a few
epochs of clipped-surrogate steps on each batch of rollouts.

One model in memory: the SFT model with a LoRA adapter is the policy, the same model with the
adapter disabled is the reference, and a linear value head reads the policy's last hidden
state (:class:`PolicyWithValue`).

The loss pieces are pure functions over ``[batch, response_len]`` tensors with a response mask
(1 on real reply tokens, 0 after the reply's end), so the tests check them against hand-computed
numbers. ``run_ppo`` is the loop: sample → score → reference log-probs → shaped rewards → GAE →
``ppo_epochs`` over mini-batches → log / checkpoint, then evaluation before/after.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..config import StrictModel
from ..errors import ConfigError, TrainingDiverged
from ..io import atomic_savefig, atomic_write_json, atomic_write_jsonl, replace_dir, staged_dir
from ..models import DEFAULT_LM
from . import rollout as ro
from .lora import LoraSettings, lora_config, merge_and_save

log = logging.getLogger(__name__)

KLKind = Literal["k1", "k2", "mse", "k3", "abs"]


# --------------------------------------------------------------------------- masked statistics

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ x·m / Σ m (over all entries, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; ``unbiased`` applies Bessel's correction n/(n−1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / √(σ² + ε) with μ, σ² the masked mean and unbiased variance; masked-out entries
    come back as 0. ``shift_mean=False`` adds μ back (scale only: used for rewards, whose sign
    matters)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- KL and rewards

def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the log-probs of sampled tokens (Schulman's kN):

    * ``k1``: log π − log π_ref (unbiased, can be negative);
    * ``k2`` / ``mse``: ½ (log π − log π_ref)² (low variance, biased);
    * ``k3``: (r − 1) − log r with r = π_ref/π = exp(log π_ref − log π) (unbiased, ≥ 0);
    * ``abs``: |log π − log π_ref|.
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind in ("k2", "mse"):
        return 0.5 * d ** 2
    if kind == "k3":
        log_r = -d
        return torch.expm1(log_r) - log_r
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown KL kind {kind!r} (k1, k2, mse, k3, abs)")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last 1 in each row of ``mask`` (0 for an empty row)."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), cols, torch.zeros_like(cols)).max(1).values


def shape_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kind: KLKind = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −β·KL_t, plus the reward model's score at the last reply token.

    Returns ``(rewards, kl)``, both ``[B, R]`` and 0 past the mask.
    """
    kl = kl_per_token(logp, ref_logp, kind) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += score.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the reply:

        δ_t = r_t + γ·V_{t+1} − V_t,     A_t = δ_t + γλ·A_{t+1},     returns_t = A_t + V_t

    with V and A taken as 0 past the reply's last token (the episode ends there). Returns
    ``(advantages, returns)``, 0 past the mask.
    """
    r, v = rewards * mask, values * mask
    T = r.shape[1]
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(v[:, 0])
        delta = r[:, t] + gamma * next_v - v[:, t]
        next_adv = delta + gamma * lam * next_adv
        adv[:, t] = next_adv
    adv = adv * mask
    return adv, (adv + v) * mask


# --------------------------------------------------------------------------- losses

def policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al. 2017), as a loss to minimise:

        ρ_t = exp(log π_new − log π_old),
        L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))

    Returns ``(loss, clipfrac, approx_kl)``: the share of tokens where the clipped term is the
    larger one (its gradient is zero there), and ½·mean (log ρ)² (the k2 estimate of
    KL(π_old‖π_new))."""
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    clipfrac = masked_mean((pg2 > pg1).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def value_loss(new_v: torch.Tensor, old_v: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: V_clip = V_old + clip(V_new − V_old, −ε, ε),

        L_V = ½ · mean_t max((V_new − R_t)², (V_clip − R_t)²)

    Returns ``(loss, vf_clipfrac)`` (share of tokens where the clipped error is the larger)."""
    v_clip = old_v + torch.clamp(new_v - old_v, -clip, clip)
    e1, e2 = (new_v - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(e1, e2), mask)
    return loss, masked_mean((e2 > e1).float(), mask).detach()


class FixedKLController:
    """β stays what it was set to."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019's proportional controller, aiming the KL at ``target``:

        e = clip(KL / target − 1, −0.2, 0.2),     β ← β · (1 + e · n / horizon)

    where n is the number of episodes in the batch just used."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"adaptive KL needs target_kl > 0 and kl_horizon > 0, got {target}, {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value


# --------------------------------------------------------------------------- the model

class PolicyWithValue(nn.Module):
    """The policy LM (a PEFT model: adapter on = policy, adapter off = reference) and a scalar
    value head ``nn.Linear(hidden, 1)`` on its last hidden state."""

    def __init__(self, lm, init_std: float = 0.0):
        super().__init__()
        self.lm = lm
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.v_head = nn.Linear(cfg.hidden_size, 1)
        with torch.no_grad():
            nn.init.normal_(self.v_head.weight, std=init_std) if init_std > 0 else self.v_head.weight.zero_()
            self.v_head.bias.zero_()
        self.v_head.to(next(lm.parameters()).device)

    def forward(self, rollout: ro.Rollout, temperature: float = 1.0):
        """Logits predicting each reply token ``[B, R, V]`` and the values there ``[B, R]``."""
        logits, h = ro.forward_response(self.lm, rollout, temperature, hidden=True)
        return logits, self.v_head(h.float()).squeeze(-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_policy(model, lora: LoraSettings | None, value_init_std: float = 0.0) -> PolicyWithValue:
    """Wrap a causal LM: LoRA adapter (unless it already is a PEFT model) + value head."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PolicyWithValue):
        return model
    if not isinstance(model, PeftModel):
        if lora is None:
            raise ConfigError("PPO here trains a LoRA adapter (the reference is the adapter switched "
                              "off): give lora settings or a PEFT model")
        model = get_peft_model(model, lora_config(lora))
    return PolicyWithValue(model, value_init_std)


# --------------------------------------------------------------------------- settings

class PPOSettings(StrictModel):
    model: str = DEFAULT_LM  # the SFT model (registry name, folder, hf:/ms:)
    reward_model: str = "runs/rm/final-merged"  # folder written by run_reward (its merged_dir)
    prompts_file: str = "data/support/preference.jsonl"
    eval_prompts_file: str | None = "data/support/sft_test.jsonl"
    system_prompt: str | None = None
    max_prompts: int | None = None
    max_eval_prompts: int | None = 16
    steps: int = 20
    rollout_batch: int = 8  # prompts (= episodes) per PPO step
    mini_batch: int = 4
    ppo_epochs: int = 2
    max_new_tokens: int = 48
    eval_max_new_tokens: int | None = None  # None = max_new_tokens
    temperature: float = 0.7  # sampling temperature; log-probs use the same logits / T
    top_k: int = 0  # 0 / 1.0 = off: anything else samples from a different distribution than π
    top_p: float = 1.0
    learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "linear"] = "constant"
    adam_eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05  # β, the initial value with an adaptive controller
    target_kl: float | None = None  # set: adaptive controller aiming the sequence KL here
    kl_horizon: int = 10000
    kl_kind: KLKind = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    score_clip: float | None = None  # clip the RM score to [-c, c]
    missing_eos_penalty: float | None = None  # subtracted from the score of truncated replies
    value_init_std: float = 0.0  # 0 = value head starts at exactly 0
    lora: LoraSettings = LoraSettings(dropout=0.0)  # dropout would make π_old ≠ π on the same batch
    # bf16 autocast for the training rollouts and updates (evaluation stays in full precision);
    # None = where the hardware has native bf16.
    # Measured here (SmolLM2-135M, 8 rollouts × 40 tokens, 2 epochs): 8.3 s vs 12.9 s per step.
    bf16: bool | None = None
    gen_batch_size: int = 16
    rm_max_length: int = 512
    output_dir: str = "runs/ppo"
    logging_steps: int = 1  # every step is written to trainer_log.jsonl; this is the console
    save_steps: int = 10
    save_total_limit: int | None = 2
    resume: bool = False
    seed: int = 0
    eval_before: bool = True
    eval_kl: bool = True
    save_final: bool = True
    merge: bool = False  # also save the policy with its adapter folded in (final-merged/)


# --------------------------------------------------------------------------- checkpoints

STATE_FILE = "ppo_state.json"


def last_ppo_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete PPO checkpoint (written to a temp folder and renamed, so a folder named
    ``checkpoint-N`` with its state file is complete)."""
    p = Path(output_dir)
    found = []
    for d in p.glob("checkpoint-*") if p.is_dir() else []:
        step = d.name.split("-")[-1]
        if d.is_dir() and step.isdigit() and (d / STATE_FILE).exists():
            found.append((int(step), d))
    return max(found)[1] if found else None


def save_checkpoint(out: Path, step: int, policy: PolicyWithValue, opt, ctl, keep: int | None) -> Path:
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.lm.save_pretrained(tmp)
    torch.save(policy.v_head.state_dict(), tmp / "value_head.pt")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        rng["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    atomic_write_json(tmp / STATE_FILE, {"step": step, "controller": ctl.state_dict()})
    replace_dir(tmp, final)
    if keep:
        done = sorted((int(d.name.split("-")[-1]), d) for d in out.glob("checkpoint-*")
                      if d.name.split("-")[-1].isdigit() and (d / STATE_FILE).exists())
        for _, d in done[:-keep]:
            shutil.rmtree(d, ignore_errors=True)
    return final


def load_checkpoint(ck: Path, policy: PolicyWithValue, opt, ctl) -> int:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(policy.lm, load_file(str(ck / "adapter_model.safetensors")))
    policy.v_head.load_state_dict(torch.load(ck / "value_head.pt"))
    opt.load_state_dict(torch.load(ck / "optimizer.pt"))
    state = json.loads((ck / STATE_FILE).read_text(encoding="utf-8"))
    ctl.load_state_dict(state["controller"])
    rng = torch.load(ck / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def trim_log(path: Path, step: int) -> None:
    """Keep the log rows of steps ≤ ``step`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    atomic_write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])


# --------------------------------------------------------------------------- plots

def ppo_figure(rows: list[dict], title: str = "PPO"):
    """Reward, KL and value loss against the PPO step (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ax = axes[0]
    ax.plot(steps, [r["score_mean"] for r in rows], "o-", label="RM score")
    ax.plot(steps, [r["reward_mean"] for r in rows], "s--", label="score − β·KL")
    ax.set_title("reward")
    ax.legend()
    ax = axes[1]
    betas = [r["kl_coef"] for r in rows]
    fixed = max(betas) - min(betas) < 1e-12
    ax.plot(steps, [r["kl"] for r in rows], "o-", color="C3",
            label="KL(π‖π_ref) per reply" + (f", β = {betas[0]:.3g}" if fixed else ""))
    ax.set_title("KL to the reference")
    if not fixed:  # adaptive controller: show β on its own axis
        ax2 = ax.twinx()
        ax2.plot(steps, betas, ":", color="gray")
        ax2.set_ylabel("β (dotted)")
    ax.legend(loc="upper left")
    ax = axes[2]
    ax.plot(steps, [r["value_loss"] for r in rows], "o-", color="C2")
    ax.set_title("value loss")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("PPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_ppo(log_path: str | Path, out_png: str | Path, title: str = "PPO") -> Path | None:
    from .callbacks import read_log

    rows = [r for r in read_log(log_path) if "score_mean" in r]
    return atomic_savefig(ppo_figure(rows, title), out_png) if rows else None


# --------------------------------------------------------------------------- the loop

def _amp(enabled: bool | None, device):
    if enabled is None:
        from .sft import native_bf16

        enabled = native_bf16()
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def prompt_order(n: int, step: int, batch: int, seed: int) -> list[int]:
    """Indices of the prompts used at ``step`` (1-based): shuffled passes over the prompt set,
    a pure function of (seed, step) so that a resumed run takes the same prompts."""
    need = step * batch
    order: list[int] = []
    epoch = 0
    while len(order) < need:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order += torch.randperm(n, generator=g).tolist()
        epoch += 1
    return order[need - batch:need]


@torch.no_grad()
def _score_rollout(policy: PolicyWithValue, r: ro.Rollout, s: PPOSettings):
    """Old log-probs and values (adapter on) and reference log-probs (adapter off)."""
    lps, vals, refs = [], [], []
    for i in range(0, len(r.prompts), s.mini_batch):
        part = r.select(range(i, min(i + s.mini_batch, len(r.prompts))))
        ids = part.response_ids.to(policy.lm.device)
        logits, v = policy(part, s.temperature)
        lps.append(ro.gather_logprobs(logits, ids).cpu())
        vals.append(v.float().cpu())
        with policy.lm.disable_adapter():
            ref_logits, _ = ro.forward_response(policy.lm, part, s.temperature)
        refs.append(ro.gather_logprobs(ref_logits, ids).cpu())
    m = r.response_mask
    return torch.cat(lps) * m, torch.cat(vals) * m, torch.cat(refs) * m


def ppo_step(policy: PolicyWithValue, opt, tokenizer, scorer, prompts: list[list[dict]],
             s: PPOSettings, kl_coef: float, step: int) -> dict:
    """One PPO iteration on a batch of prompts; returns the step's statistics."""
    t0 = time.time()
    dev = policy.lm.device
    policy.eval()  # no dropout anywhere: π_old and π must agree on the same batch
    with _amp(s.bf16, dev):
        r = ro.sample(policy.lm, tokenizer, prompts, s.max_new_tokens, greedy=False,
                      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                      batch_size=s.gen_batch_size)
        t_gen = time.time() - t0
        old_logp, old_values, ref_logp = _score_rollout(policy, r, s)
    mask = r.response_mask
    raw = scorer.score(prompts, r.texts).float()
    score = raw.clone()
    if s.missing_eos_penalty:
        score = torch.where(r.ended, score, score - s.missing_eos_penalty)
    if s.score_clip:
        score = score.clamp(-s.score_clip, s.score_clip)
    rewards, kl = shape_rewards(score, old_logp, ref_logp, mask, kl_coef, s.kl_kind)
    if s.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
    if s.whiten_advantages:
        adv = whiten(adv, mask)

    B = len(prompts)
    g = torch.Generator().manual_seed(s.seed * 7919 + step)
    acc: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl",
                                                   "vf_clipfrac", "entropy", "grad_norm")}
    params = policy.trainable_parameters()
    for _epoch in range(s.ppo_epochs):
        perm = torch.randperm(B, generator=g)
        for i in range(0, B, s.mini_batch):
            idx = perm[i:i + s.mini_batch]
            part = r.select(idx)
            m = mask[idx].to(dev)
            with _amp(s.bf16, dev):
                logits, values = policy(part, s.temperature)
            new_logp = ro.gather_logprobs(logits, part.response_ids.to(dev))
            pl, clipfrac, approx_kl = policy_loss(new_logp, old_logp[idx].to(dev), adv[idx].to(dev), m,
                                                  s.cliprange)
            vl, vclip = value_loss(values.float(), old_values[idx].to(dev), returns[idx].to(dev), m,
                                   s.cliprange_value)
            loss = pl + s.vf_coef * vl
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"PPO diverged at step {step}: loss = {float(loss)} (policy loss {float(pl)}, value "
                    f"loss {float(vl)}). Lower learning_rate or kl_coef, clip scores (score_clip) or "
                    f"check the reward model; the last good checkpoint in {s.output_dir} is kept")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            if not torch.isfinite(gn):
                raise TrainingDiverged(f"PPO diverged at step {step}: gradient norm = {float(gn)}; "
                                       f"the last good checkpoint in {s.output_dir} is kept")
            opt.step()
            with torch.no_grad():
                ent = ro.entropy_from_logits(logits.detach().float())
                acc["entropy"].append(float(masked_mean(ent, m)))
            for k, v in (("policy_loss", pl), ("value_loss", vl), ("clipfrac", clipfrac),
                         ("approx_kl", approx_kl), ("vf_clipfrac", vclip), ("grad_norm", gn)):
                acc[k].append(float(v.detach()))
    seq_kl = kl_per_token(old_logp, ref_logp, "k1").mul(mask).sum(1)
    return {
        "score_mean": float(raw.mean()), "score_std": float(raw.std()) if B > 1 else 0.0,
        "reward_mean": float(rewards.sum(1).mean()),
        "non_score_reward": float((-kl_coef * kl).sum(1).mean()),
        "kl": float(seq_kl.mean()), "kl_penalty_mean": float(kl.sum(1).mean()), "kl_coef": kl_coef,
        **{k: sum(v) / max(len(v), 1) for k, v in acc.items()},
        "value_mean": float(masked_mean(old_values, mask)), "returns_mean": float(masked_mean(returns, mask)),
        "response_len": float(mask.sum(1).mean()), "ended_share": float(r.ended.float().mean()),
        "gen_s": round(t_gen, 2), "step_s": round(time.time() - t0, 2),
        "sample": r.texts[0][:200],
    }


def _load_policy(s: PPOSettings, policy, tokenizer):
    from .. import models

    if policy is None:
        policy, tokenizer = models.load_lm(s.model, seed=s.seed)
    elif tokenizer is None:
        raise ConfigError("run_ppo: a policy model was given without its tokenizer")
    torch.manual_seed(s.seed)
    return build_policy(policy, s.lora, s.value_init_std), tokenizer


def run_ppo(s: PPOSettings, policy=None, tokenizer=None, scorer=None) -> dict:
    """Train the policy with PPO against the reward model; see the module docstring.

    ``policy``: None (load ``s.model``), a causal LM (LoRA is added), a PEFT model or a
    :class:`PolicyWithValue`. ``scorer``: None (load ``s.reward_model``) or a
    :class:`llmtech.train.reward.RewardScorer`. Returns a flat result dict (also written to
    ``result.json``) plus ``"policy"``.
    """
    from .align import check_same_tokenizer
    from .reward import RewardScorer

    if s.mini_batch > s.rollout_batch or s.rollout_batch % s.mini_batch:
        raise ConfigError(f"mini_batch ({s.mini_batch}) must divide rollout_batch ({s.rollout_batch})")
    if s.steps < 1 or s.ppo_epochs < 1:
        raise ConfigError("steps and ppo_epochs must be at least 1")
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = ro.load_prompts(s.prompts_file, s.max_prompts, s.system_prompt)
    eval_prompts = (ro.load_prompts(s.eval_prompts_file, s.max_eval_prompts, s.system_prompt)
                    if s.eval_prompts_file else [])
    if scorer is None:
        scorer = RewardScorer.load(s.reward_model, max_length=s.rm_max_length)
    policy, tokenizer = _load_policy(s, policy, tokenizer)
    check_same_tokenizer(scorer.tokenizer, tokenizer, "reward model", "policy")
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=s.learning_rate, eps=s.adam_eps, weight_decay=s.weight_decay)
    ctl = (AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon) if s.target_kl
           else FixedKLController(s.kl_coef))

    log_path = out / "trainer_log.jsonl"
    start = 0
    ck = last_ppo_checkpoint(out) if s.resume else None
    if s.resume and ck is None:
        log.info("resume=true but no checkpoint in %s: starting from scratch", out)
    result: dict = {"output_dir": str(out), "model": s.model, "reward_model": s.reward_model,
                    "prompts": len(prompts), "eval_prompts": len(eval_prompts),
                    "trainable_params": sum(p.numel() for p in params),
                    "total_params": sum(p.numel() for p in policy.parameters())}
    eval_new = s.eval_max_new_tokens or s.max_new_tokens

    before = None
    before_file = out / "eval_before.json"
    if eval_prompts and s.eval_before:
        if ck is not None and before_file.exists():
            before = json.loads(before_file.read_text(encoding="utf-8"))
        else:
            # evaluation runs in full precision whatever `bf16` says: greedy replies change with
            # the precision, and before/after (and PPO vs GRPO) must be compared like for like
            with policy.lm.disable_adapter():  # the adapter switched off = the SFT policy
                before = ro.evaluate_policy(policy.lm, tokenizer, eval_prompts, scorer,
                                            max_new_tokens=eval_new, kl=False, seed=s.seed,
                                            batch_size=s.gen_batch_size)
            before["kl"] = 0.0
            atomic_write_json(before_file, before)

    if ck is not None:
        start = load_checkpoint(ck, policy, opt, ctl)
        trim_log(log_path, start)
        log.info("resumed from %s (step %d)", ck, start)
    elif log_path.exists():
        log_path.unlink()
    result["resumed_from_step"] = start

    def lr_at(step: int) -> float:
        if s.lr_scheduler == "linear":
            return s.learning_rate * (1.0 - (step - 1) / s.steps)
        return s.learning_rate

    t0 = time.time()
    last_row: dict = {}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=start, desc="PPO", disable=None)
    except ImportError:  # pragma: no cover
        bar = None
    for step in range(start + 1, s.steps + 1):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        batch = [prompts[i] for i in prompt_order(len(prompts), step, s.rollout_batch, s.seed)]
        stats = ppo_step(policy, opt, tokenizer, scorer, batch, s, ctl.value, step)
        ctl.update(stats["kl"], len(batch))
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()},
               "lr": lr_at(step), "elapsed_s": round(time.time() - t0, 2)}
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        last_row = row
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{row['score_mean']:.3f}", kl=f"{row['kl']:.3f}")
        if s.logging_steps and step % s.logging_steps == 0:
            log.info("PPO step %d: score %.3f, KL %.3f, β %.4f, policy loss %.4f, value loss %.4f, "
                     "clipfrac %.3f, len %.1f", step, row["score_mean"], row["kl"], row["kl_coef"],
                     row["policy_loss"], row["value_loss"], row["clipfrac"], row["response_len"])
        if s.save_steps and (step % s.save_steps == 0 or step == s.steps):
            save_checkpoint(out, step, policy, opt, ctl, s.save_total_limit)
    if bar is not None:
        bar.close()
    result["train_runtime_s"] = round(time.time() - t0, 2)
    result["global_step"] = s.steps
    result["kl_coef_final"] = ctl.value
    for k in ("score_mean", "kl", "policy_loss", "value_loss", "entropy", "response_len"):
        if k in last_row:
            result[f"last_{k}"] = last_row[k]
    plot_ppo(log_path, out / "ppo_curves.png", title=f"PPO {s.model}")

    if eval_prompts:
        after = ro.evaluate_policy(policy.lm, tokenizer, eval_prompts, scorer, max_new_tokens=eval_new,
                                   kl=s.eval_kl, kl_temperature=s.temperature, seed=s.seed,
                                   batch_size=s.gen_batch_size)  # full precision, like `before`
        fields, samples = ro.before_after(eval_prompts, before, after)
        result.update(fields)
        atomic_write_jsonl(out / "eval_samples.jsonl", samples)
    if s.save_final:
        with staged_dir(out / "final") as tmp:
            policy.lm.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            torch.save(policy.v_head.state_dict(), tmp / "value_head.pt")
        result["final_dir"] = str(out / "final")
    if s.merge:
        result["merged_dir"] = str(merge_and_save(policy.lm, tokenizer, out / "final-merged"))
    atomic_write_json(out / "result.json", result)
    result["policy"] = policy
    return result


def load_trained_policy(folder: str | Path, base_model: str):
    """A saved PPO adapter (``final/`` or ``checkpoint-N/``) on its base model, with its value
    head: returns ``(PolicyWithValue, tokenizer)``."""
    from peft import PeftModel

    from .. import models

    base, tok = models.load_lm(base_model)
    lm = PeftModel.from_pretrained(base, str(folder))
    pol = PolicyWithValue(lm)
    vh = Path(folder) / "value_head.pt"
    if vh.exists():
        pol.v_head.load_state_dict(torch.load(vh))
    return pol, tok

