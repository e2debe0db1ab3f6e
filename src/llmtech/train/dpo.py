"""DPO on TRL's DPOTrainer, and the measurements that show what it did.

DPO's implicit reward of a response is r(x, y) = β·(log πθ(y|x) − log πref(y|x)); the sigmoid
loss is −log σ(r(x, y_c) − r(x, y_r)). IPO replaces it with the squared distance of the
length-averaged log-ratio margin from 1/(2β); hinge with max(0, 1 − β·margin). With LoRA the
reference is the same model with its adapter switched off, so only one model sits in memory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch

from .align import AlignSettings, callbacks_for, load_split, peft_config, run_stage, training_kwargs


class DPOSettings(AlignSettings):
    output_dir: str = "runs/dpo"
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1
    sft_weight: float = 0.0  # > 0 adds an SFT (NLL) term on the chosen answers with this weight
    label_smoothing: float = 0.0  # conservative DPO: the share of labels assumed flipped


def build_dpo_trainer(s: DPOSettings, model=None, tokenizer=None, callbacks=()):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from .. import models
    from ..data.preference import trl_rows

    if model is None or tokenizer is None:
        model, tokenizer = models.load_lm(s.model, seed=s.seed)
    train_rows, eval_rows, reports = load_split(s, "pairs")
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    losses, weights = [s.loss_type], [1.0]
    if s.sft_weight > 0:
        losses.append("sft")
        weights.append(s.sft_weight)
    args = DPOConfig(**training_kwargs(s), beta=s.beta, loss_type=losses, loss_weights=weights,
                     label_smoothing=s.label_smoothing)
    # LoRA: the reference is the same model with the adapter off. Full fine-tuning needs a frozen
    # copy of the starting model.
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if s.finetuning == "full" else None
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(trl_rows(train_rows)),
        eval_dataset=Dataset.from_list(trl_rows(eval_rows)) if eval_rows else None,
        processing_class=tokenizer, peft_config=peft_config(s), callbacks=callbacks_for(s, callbacks))
    trainer.llmtech_data = {"train": train_rows, "eval": eval_rows, "reports": reports}
    return trainer


def run_dpo(s: DPOSettings, model=None, tokenizer=None, callbacks=()) -> dict:
    """Train; report held-out preference measurements of the reference and of the policy."""
    trainer = build_dpo_trainer(s, model, tokenizer, callbacks)
    return run_stage(trainer, s, f"DPO ({s.loss_type}, beta={s.beta}) {s.model}",
                     lambda m, t, rows: preference_eval(m, t, rows, s.beta, s.max_length))


# --------------------------------------------------------------------------- measurements

def pair_logprobs(model, tokenizer, rows: list[dict], max_length: int = 512,
                  batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Summed log-probabilities (and token counts) of each pair's chosen and rejected answers."""
    from ..evals.lm import response_logprobs

    out = {}
    for k in ("chosen", "rejected"):
        convs = [r["prompt"] + r[k] for r in rows]
        out[k], out[f"{k}_tokens"] = response_logprobs(model, tokenizer, convs, max_length, batch_size)
    return out


def preference_eval(policy, tokenizer, rows: list[dict], beta: float = 0.1, max_length: int = 512,
                    ref=None, batch_size: int = 8) -> dict:
    """Held-out preference measurements of a policy against its reference.

    * ``preference_accuracy``: share of pairs where the policy itself gives the chosen answer the
      higher log-likelihood, log π(y_c|x) > log π(y_r|x) — defined for any model, so the SFT
      reference and each aligned policy can be compared on it (ties count half);
    * ``preference_accuracy_per_token``: the same with length-averaged log-probabilities;
    * ``reward_accuracy`` / ``reward_margin``: DPO's implicit rewards β·(log π − log πref) —
      how often and by how much r(chosen) > r(rejected). ``ref=None`` uses the policy with its
      adapter disabled; for the reference itself they are 0.5 and 0 by construction.
    """
    from .rollout import reference_of

    lp = pair_logprobs(policy, tokenizer, rows, max_length, batch_size)
    if ref is None and not hasattr(policy, "disable_adapter"):
        lr = lp  # a plain model with no reference given is its own reference
    else:
        with reference_of(policy, ref) as r:
            lr = pair_logprobs(r, tokenizer, rows, max_length, batch_size)

    def share(x):  # ties count half
        return float(((x > 0).double() + 0.5 * (x == 0).double()).mean())

    rc = beta * (lp["chosen"] - lr["chosen"])
    rr = beta * (lp["rejected"] - lr["rejected"])
    per_tok = lp["chosen"] / lp["chosen_tokens"] - lp["rejected"] / lp["rejected_tokens"]
    return {"pairs": len(rows),
            "preference_accuracy": share(lp["chosen"] - lp["rejected"]),
            "preference_accuracy_per_token": share(per_tok),
            "logp_chosen": float(lp["chosen"].mean()), "logp_rejected": float(lp["rejected"].mean()),
            "reward_accuracy": share(rc - rr), "reward_margin": float((rc - rr).mean()),
            "reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()),
            "rewards_chosen": rc, "rewards_rejected": rr}
