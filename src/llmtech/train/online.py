"""Online RL with TRL's GRPOTrainer and the reward model as the reward function — to compare
with our own PPO (``ppo.py``) on the same prompts, reward model and evaluation.

GRPO (Shao et al. 2024) drops the value head: it samples ``num_generations`` replies per prompt
and uses each reply's score minus its group's mean (divided by the group's std) as the
advantage of every token; the KL to the reference is a loss term (β · k3) instead of a reward
penalty. The run folder looks like the other TRL stages: ``trainer_log.jsonl`` (our JSONL
callback + NaN guard), ``checkpoint-*`` (``resume=true``), ``final/``, ``result.json``, and the
same before/after evaluation as PPO (``rollout.evaluate_policy``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch

from ..config import StrictModel
from ..errors import ConfigError, TrainingDiverged
from ..io import atomic_write_json, atomic_write_jsonl
from ..models import DEFAULT_LM
from . import rollout as ro
from .callbacks import JsonlLogCallback, NanGuardCallback, plot_loss
from .lora import LoraSettings, lora_config, merge_and_save
from .sft import last_checkpoint, save_final, native_bf16

log = logging.getLogger(__name__)


class GRPOSettings(StrictModel):
    model: str = DEFAULT_LM  # the SFT model
    reward_model: str = "runs/rm/final-merged"  # folder written by run_reward (its merged_dir)
    prompts_file: str = "data/support/preference.jsonl"
    eval_prompts_file: str | None = "data/support/sft_test.jsonl"
    system_prompt: str | None = None
    max_prompts: int | None = None
    max_eval_prompts: int | None = 16
    steps: int = 20
    prompts_per_step: int = 2
    num_generations: int = 4  # replies per prompt (the group); at least 2
    max_new_tokens: int = 48
    eval_max_new_tokens: int | None = None
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    beta: float = 0.05  # KL coefficient (0 = no reference model at all)
    epsilon: float = 0.2  # clip range of the ratio
    num_iterations: int = 1  # optimisation passes per generated batch (μ)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: str | None = None  # None = TRL's default
    lora: LoraSettings = LoraSettings(dropout=0.0)
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None = where the hardware has native bf16
    gradient_checkpointing: bool = False
    rm_max_length: int = 512
    gen_batch_size: int = 16
    output_dir: str = "runs/grpo"
    logging_steps: int = 1
    save_steps: int = 10
    save_total_limit: int | None = 2
    resume: bool = False
    seed: int = 0
    eval_before: bool = True
    eval_kl: bool = True
    save_final: bool = True
    merge: bool = False


def reward_function(scorer, name: str = "reward_model"):
    """A plain function with TRL's reward signature around a RewardScorer (TRL names each reward
    column after the callable's ``__name__``)."""

    def fn(prompts, completions, **kwargs) -> list[float]:
        return scorer(prompts, completions, **kwargs)

    fn.__name__ = name
    return fn


def build_grpo_trainer(s: GRPOSettings, model=None, tokenizer=None, scorer=None, callbacks=()):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from .. import models
    from .align import check_same_tokenizer
    from .reward import RewardScorer

    if s.num_generations < 2:
        raise ConfigError("num_generations must be at least 2 (GRPO compares replies within a group)")
    prompts = ro.load_prompts(s.prompts_file, s.max_prompts, s.system_prompt)
    eval_prompts = (ro.load_prompts(s.eval_prompts_file, s.max_eval_prompts, s.system_prompt)
                    if s.eval_prompts_file else [])
    if scorer is None:
        scorer = RewardScorer.load(s.reward_model, max_length=s.rm_max_length)
    if model is None or tokenizer is None:
        model, tokenizer = models.load_lm(s.model, seed=s.seed)
    check_same_tokenizer(scorer.tokenizer, tokenizer, "reward model", "policy")
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = s.prompts_per_step * s.num_generations
    kw = {} if s.loss_type is None else {"loss_type": s.loss_type}
    args = GRPOConfig(
        output_dir=str(out), max_steps=s.steps, learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=s.num_generations, max_completion_length=s.max_new_tokens,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, beta=s.beta, epsilon=s.epsilon,
        num_iterations=s.num_iterations, scale_rewards=s.scale_rewards, max_grad_norm=s.max_grad_norm,
        logging_steps=s.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        seed=s.seed, data_seed=s.seed, bf16=native_bf16() if s.bf16 is None else s.bf16, gradient_checkpointing=s.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(), report_to="none", dataloader_num_workers=0,
        disable_dropout=True, use_vllm=False, **kw)
    trainer = GRPOTrainer(
        model=model, reward_funcs=[reward_function(scorer)], args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
        peft_config=lora_config(s.lora), callbacks=[JsonlLogCallback(out / "trainer_log.jsonl"),
                                                   NanGuardCallback(), *callbacks])
    trainer.llmtech_data = {"prompts": prompts, "eval_prompts": eval_prompts, "scorer": scorer,
                            "base_model": model}
    return trainer


def run_grpo(s: GRPOSettings, model=None, tokenizer=None, scorer=None, callbacks=()) -> dict:
    """Train with GRPO against the reward model; evaluate before/after like ``run_ppo``."""
    trainer = build_grpo_trainer(s, model, tokenizer, scorer, callbacks)
    data = trainer.llmtech_data
    tok, scorer, eval_prompts = trainer.processing_class, data["scorer"], data["eval_prompts"]
    out = Path(s.output_dir)
    eval_new = s.eval_max_new_tokens or s.max_new_tokens
    resume_from = last_checkpoint(out) if s.resume else None
    if s.resume and not resume_from:
        log.info("resume=true but no checkpoint in %s: starting from scratch", out)
    result: dict = {"output_dir": str(out), "model": s.model, "reward_model": s.reward_model,
                    "prompts": len(data["prompts"]), "eval_prompts": len(eval_prompts),
                    "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else 0}
    policy = trainer.model
    result["trainable_params"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    before = None
    if eval_prompts and s.eval_before:
        with policy.disable_adapter():  # the adapter switched off = the SFT model
            before = ro.evaluate_policy(policy, tok, eval_prompts, scorer, max_new_tokens=eval_new,
                                        kl=False, seed=s.seed, batch_size=s.gen_batch_size)
    t0 = time.time()
    metrics = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics
    result["train_runtime_s"] = round(time.time() - t0, 2)
    result["train_loss"] = metrics.get("train_loss")
    result["global_step"] = trainer.state.global_step
    if result["train_loss"] is not None and not math.isfinite(result["train_loss"]):
        raise TrainingDiverged(f"GRPO: training ended with a non-finite loss ({result['train_loss']}); "
                               f"the last good checkpoint in {out} is kept")
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    if rewards:
        result.update(train_reward_first=rewards[0], train_reward_last=rewards[-1])
    if eval_prompts:
        after = ro.evaluate_policy(policy, tok, eval_prompts, scorer, max_new_tokens=eval_new,
                                   kl=s.eval_kl, kl_temperature=s.temperature, seed=s.seed,
                                   batch_size=s.gen_batch_size)
        fields, samples = ro.before_after(eval_prompts, before, after)
        result.update(fields)
        atomic_write_jsonl(out / "eval_samples.jsonl", samples)
    if s.save_final:
        result["final_dir"] = str(save_final(trainer, out / "final"))
    if s.merge:
        result["merged_dir"] = str(merge_and_save(trainer.model, tok, out / "final-merged"))
    plot_loss(out / "trainer_log.jsonl", out / "loss.png", title=f"GRPO {s.model}")
    atomic_write_json(out / "result.json", result)
    result["trainer"] = trainer
    return result
