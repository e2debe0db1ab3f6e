"""Reward model: a scalar head on the LM, trained on preference pairs with TRL's RewardTrainer.

The loss is Bradley–Terry: −log σ(r(x, y_chosen) − r(x, y_rejected)). ``run_reward`` trains it
(LoRA on the body + the new ``score`` head, or full), then saves ``final/`` as one plain
sequence-classification model (adapter merged) that ``RewardScorer`` loads to score any
(prompt, response): PPO's reward, win rates, the data audit.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..errors import DataError, ModelNotAvailable
from ..models import render_chat
from .align import AlignSettings, callbacks_for, load_split, peft_config, run_stage, training_kwargs

log = logging.getLogger(__name__)


class RewardSettings(AlignSettings):
    output_dir: str = "runs/rm"
    learning_rate: float = 1e-4
    # Adds c·mean((r_c + r_r)²) to the loss so rewards stay centred on 0 (Eisenstein et al. 2023).
    center_rewards_coefficient: float | None = 0.01
    merge: bool = True  # RewardScorer and PPO read one plain model folder


def build_reward_trainer(s: RewardSettings, model=None, tokenizer=None, callbacks=()):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from .. import models
    from ..data.preference import trl_rows

    if model is None or tokenizer is None:
        model, tokenizer = models.load_reward_lm(s.model, seed=s.seed)
    train_rows, eval_rows, reports = load_split(s, "pairs")
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    args = RewardConfig(**training_kwargs(s), center_rewards_coefficient=s.center_rewards_coefficient,
                        disable_dropout=True)
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(trl_rows(train_rows)),
        eval_dataset=Dataset.from_list(trl_rows(eval_rows)) if eval_rows and s.eval_steps else None,
        processing_class=tokenizer, peft_config=peft_config(s, "SEQ_CLS"),
        callbacks=callbacks_for(s, callbacks))
    # RewardTrainer drops (does not truncate) pairs longer than max_length: say how many
    dropped = len(train_rows) - len(trainer.train_dataset)
    reports["train"]["dropped_over_max_length"] = dropped
    if dropped:
        log.warning("%s: %d of %d pairs are longer than max_length=%d tokens and were left out",
                    s.train_file, dropped, len(train_rows), s.max_length)
    if len(trainer.train_dataset) == 0:
        raise DataError(f"{s.train_file}: every pair is longer than max_length={s.max_length} tokens; "
                        "raise max_length")
    trainer.llmtech_data = {"train": train_rows, "eval": eval_rows, "reports": reports}
    return trainer


def run_reward(s: RewardSettings, model=None, tokenizer=None, callbacks=()) -> dict:
    """Train the reward model; held-out pairwise accuracy and calibration before and after."""
    trainer = build_reward_trainer(s, model, tokenizer, callbacks)
    return run_stage(trainer, s, f"reward model {s.model}",
                     lambda m, t, rows: evaluate_pairs(RewardScorer(m, t, s.max_length), rows))


# --------------------------------------------------------------------------- scoring

class RewardScorer:
    """Scores (prompt messages, response text) pairs with a sequence-classification model."""

    def __init__(self, model, tokenizer, max_length: int = 512, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def load(cls, path: str | Path, max_length: int = 512, batch_size: int = 8) -> "RewardScorer":
        from .. import models

        p = Path(path)
        if not (p / "config.json").exists():
            raise ModelNotAvailable(f"{p}: not a reward model folder (no config.json); train one "
                                    "with `llmtech train rm` and pass its final-merged/ folder")
        model, tok = models.load_reward_lm(str(p))
        model.eval()
        return cls(model, tok, max_length, batch_size)

    def texts(self, prompts: list[list[dict]], responses: list[str]) -> list[str]:
        return [render_chat(self.tokenizer, list(p) + [{"role": "assistant", "content": r}])
                for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        """One reward per (prompt, response), float32 on the CPU."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        was_training = self.model.training
        self.model.eval()
        tok, out = self.tokenizer, []
        # right padding; cut long inputs from the left so the reply being scored is kept
        old_side, tok.padding_side = tok.padding_side, "right"
        old_trunc, tok.truncation_side = tok.truncation_side, "left"
        try:
            texts = self.texts(prompts, responses)
            for i in range(0, len(texts), self.batch_size):
                enc = tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                          truncation=True, max_length=self.max_length, add_special_tokens=False)
                enc = enc.to(self.model.device)
                out.append(self.model(**enc).logits[:, 0].float().cpu())
        finally:
            tok.padding_side, tok.truncation_side = old_side, old_trunc
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts, completions, **_) -> list[float]:
        """TRL reward-function signature (GRPO/RLOO): conversational completions or plain text."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        msgs = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        return self.score(msgs, texts).tolist()


def score_pairs(scorer: RewardScorer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data.preference import text_of

    prompts = [r["prompt"] for r in rows]
    rc = scorer.score(prompts, [text_of(r["chosen"]) for r in rows])
    rr = scorer.score(prompts, [text_of(r["rejected"]) for r in rows])
    return rc, rr


def calibration(margins: torch.Tensor, bins: int = 10) -> dict:
    """How well σ(r_c − r_r) works as the probability that the chosen answer wins.

    Each pair is counted in both orders — (p, won) and (1 − p, lost) — so the outcome is not
    always 1. ``ece``: expected calibration error over ``bins`` equal-width bins; ``brier``: mean
    squared error of the probability; ``nll``: mean −log p of the observed order;
    ``temperature``: the T that minimises the NLL of σ(Δ/T) (T > 1: over-confident).
    """
    m = margins.double().flatten()
    if m.numel() == 0:
        return {}
    probs, won = _both_orders(m)
    rel = reliability(m, bins)
    ece = sum(r["n"] / len(probs) * abs(r["mean_p"] - r["win_rate"]) for r in rel)
    temps = torch.logspace(-1.5, 1.5, 121, dtype=torch.float64)
    nll_t = torch.stack([-torch.nn.functional.logsigmoid(m / t).mean() for t in temps])
    return {"ece": ece, "brier": float(((probs - won) ** 2).mean()),
            "nll": float(-torch.nn.functional.logsigmoid(m).mean()),
            "temperature": float(temps[int(nll_t.argmin())])}


def _both_orders(margins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.sigmoid(margins.double().flatten())
    return torch.cat([p, 1 - p]), torch.cat([torch.ones_like(p), torch.zeros_like(p)])


def reliability(margins: torch.Tensor, bins: int = 10) -> list[dict]:
    """Reliability-diagram data: each pair counted in both orders, (p, won) and (1 − p, lost),
    grouped into ``bins`` equal-width bins of p; per non-empty bin its count, mean predicted
    probability and observed win rate."""
    probs, won = _both_orders(margins)
    rows = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        sel = (probs >= lo) & ((probs < hi) if k < bins - 1 else (probs <= hi))
        if sel.any():
            rows.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": int(sel.sum()),
                         "mean_p": float(probs[sel].mean()), "win_rate": float(won[sel].mean())})
    return rows


def evaluate_pairs(scorer: RewardScorer, rows: list[dict]) -> dict:
    """Held-out pairwise accuracy (ties count half), mean margin, calibration and the rewards'
    correlation with response length (a reward model that mostly rewards length is suspect)."""
    from ..data.preference import text_of

    rc, rr = score_pairs(scorer, rows)
    margins = rc - rr
    acc = float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())
    lengths = torch.tensor([len(text_of(r[k])) for k in ("chosen", "rejected") for r in rows],
                           dtype=torch.float64)
    rewards = torch.cat([rc, rr]).double()
    return {"pairwise_accuracy": acc, "mean_margin": float(margins.mean()), "pairs": len(rows),
            "reward_length_corr": pearson(rewards, lengths), **calibration(margins),
            "margins": margins}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else math.nan
