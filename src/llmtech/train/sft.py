"""Supervised fine-tuning on TRL's SFTTrainer: full or LoRA, response-only loss, packing.

``run_sft(SFTSettings(...))`` is what ``llmtech train sft --config ...`` and the Lesson 1 labs
call. A run folder holds ``trainer_log.jsonl``, ``loss.png``, ``checkpoint-*`` folders (for
``resume=true``), the final adapter/model in ``final/`` and ``result.json``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch

from ..config import StrictModel
from ..errors import ConfigError
from ..io import atomic_write_json
from ..models import DEFAULT_LM
from .callbacks import JsonlLogCallback, NanGuardCallback, plot_loss
from .lora import LoraSettings, lora_config

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = None  # keep the model's own default system prompt unless a run sets one


class SFTSettings(StrictModel):
    model: str = DEFAULT_LM
    train_file: str = "data/support/sft_train.jsonl"
    eval_file: str | None = "data/support/sft_test.jsonl"
    format: str = "auto"
    system_prompt: str | None = DEFAULT_SYSTEM
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    output_dir: str = "runs/sft"
    finetuning: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    loss_on: Literal["response", "full"] = "response"
    packing: bool = False
    group_by_length: bool = False
    max_length: int = 256
    pad_to_multiple_of: int | None = None  # e.g. = max_length for fixed-shape batches
    num_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.0  # < 1: fraction of the total steps; >= 1: number of steps
    weight_decay: float = 0.0
    # transformers' optimizer name (adamw_torch, adamw_bnb_8bit, paged_adamw_32bit ...); None =
    # the Trainer's default
    optim: str | None = None
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    logging_steps: int = 5
    eval_steps: int | None = None
    save_steps: int = 50
    save_total_limit: int | None = 2  # None = keep every checkpoint
    seed: int = 0
    # None = auto: bf16 autocast where the hardware has native bf16 (CUDA with bf16, or a CPU with
    # AVX-512 BF16 / AMX). Measured here by bench/bf16_vs_fp32.py: 1.52x fp32 tokens/s, loss curves
    # within 0.8% on average, so it is the default where it is native.
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    resume: bool = False
    deepspeed: str | None = None
    tensorboard: bool = False
    eval_before: bool = True
    # TRL logs per-step entropy and token accuracy through a chunked LM head; on a CPU that costs
    # a sizeable share of each step (bench/sft_vs_plain_loop.py), so by default training steps use
    # the model's own loss and these two metrics are computed at evaluation only.
    token_metrics: bool = False
    save_final: bool = True


def native_bf16() -> bool:
    """True when bf16 matmuls run natively (CUDA bf16, or x86 CPU flags avx512_bf16/amx_bf16)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_datasets(s: SFTSettings):
    """Load + validate the records and convert them to TRL conversational prompt/completion."""
    from datasets import Dataset

    from ..data import load, to_prompt_completion

    train = load(s.train_file, fmt=s.format, limit=s.max_train_samples)
    rows = [to_prompt_completion(r, s.system_prompt) for r in train]
    train_ds = Dataset.from_list(rows)
    eval_ds = None
    if s.eval_file:
        ev = load(s.eval_file, fmt=s.format, limit=s.max_eval_samples)
        eval_ds = Dataset.from_list([to_prompt_completion(r, s.system_prompt) for r in ev])
    return train_ds, eval_ds


def plain_forward(model):
    """Undo the autocast wrapper that accelerate puts around ``model.forward`` for bf16/fp16
    training (the trained model keeps it, so evaluating it afterwards would silently run in
    bf16). Returns the same model, whose forward is its class's again (float32)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def save_final(trainer, path: str | Path) -> Path:
    """The trained adapter (or model) and its tokenizer, written to a temporary folder that
    replaces ``path`` only when complete."""
    from ..io import staged_dir

    if trainer.args.world_size > 1:
        # several processes: every rank takes part in saving (under ZeRO-3 the weights are
        # gathered from all of them) and the Trainer lets only the main process write
        trainer.save_model(str(path))
        if trainer.is_world_process_zero():
            trainer.processing_class.save_pretrained(str(path))
        return Path(path)
    with staged_dir(path) as tmp:
        trainer.save_model(str(tmp))
        trainer.processing_class.save_pretrained(str(tmp))
    return Path(path)


def peak_rss_per_rank() -> list[float]:
    """This process's peak RSS in MB (the kernel's high-water mark), one entry per rank when
    running under torch.distributed (gathered from every process), else one entry."""
    import resource

    import torch.distributed as dist

    mine = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    if dist.is_available() and dist.is_initialized():
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone
    return [mine]


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (one whose trainer_state.json was written; a run killed while
    saving leaves an incomplete folder behind, which is skipped)."""
    p = Path(output_dir)
    if not p.is_dir():
        return None
    found = []
    for d in p.glob("checkpoint-*"):
        step = d.name.split("-")[-1]
        if d.is_dir() and step.isdigit() and (d / "trainer_state.json").exists():
            found.append((int(step), d))
    return max(found)[1] if found else None


def _lean_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        """SFTTrainer whose training steps take the loss from the model's forward (labels already
        hold -100 on prompt and padding, so response-only masking is unchanged)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return LeanSFTTrainer


def build_trainer(s: SFTSettings, model=None, tokenizer=None, callbacks=()):
    """Everything up to (not including) ``trainer.train()`` — labs use this to look inside."""
    from trl import SFTConfig, SFTTrainer

    from .. import models

    if s.deepspeed and not Path(s.deepspeed).exists():
        raise ConfigError(f"deepspeed: config file {s.deepspeed} not found")
    if model is None or tokenizer is None:
        model, tokenizer = models.load_lm(s.model, seed=s.seed)
    train_ds, eval_ds = build_datasets(s)
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=s.num_epochs,
        max_steps=s.max_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup,
        weight_decay=s.weight_decay,
        **({"optim": s.optim} if s.optim else {}),
        max_grad_norm=s.max_grad_norm,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # let the NaN guard see a diverged loss
        eval_strategy="steps" if (eval_ds is not None and s.eval_steps) else "no",
        # under DeepSpeed the engine is built when training starts (an evaluate() before that leaves
        # the Trainer without a training engine), so the "before" evaluation runs as train()'s
        # first act instead
        eval_on_start=bool(s.deepspeed and eval_ds is not None and s.eval_before and not s.resume),
        eval_steps=s.eval_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        seed=s.seed,
        data_seed=s.seed,
        bf16=native_bf16() if s.bf16 is None else s.bf16,
        activation_checkpointing=s.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),  # lets bf16 autocast run on a CPU
        deepspeed=s.deepspeed,
        report_to=["tensorboard"] if s.tensorboard else "none",
        max_length=s.max_length,
        packing=s.packing,
        pad_to_multiple_of=s.pad_to_multiple_of,
        completion_only_loss=(s.loss_on == "response"),
        train_sampling_strategy="group_by_length" if s.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    peft_cfg = lora_config(s.lora) if s.finetuning == "lora" else None
    if s.tensorboard:
        # transformers 5 takes TensorBoard's folder from this variable (read when the callback is
        # built, inside SFTTrainer.__init__); otherwise it invents output_dir/runs/<date_host>.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    trainer_cls = SFTTrainer if s.token_metrics else _lean_trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=peft_cfg,
                          callbacks=[JsonlLogCallback(out / "trainer_log.jsonl"), NanGuardCallback(),
                                     *callbacks])
    return trainer


def run_sft(s: SFTSettings, model=None, tokenizer=None, callbacks=()) -> dict:
    """Train and return a flat result dict (losses, steps, tokens/s, paths)."""
    trainer = build_trainer(s, model, tokenizer, callbacks)
    out = Path(s.output_dir)
    resume_from = None
    if s.resume:
        resume_from = last_checkpoint(out)
        if resume_from:
            log.info("resuming from checkpoint %s", resume_from)
        else:
            log.info("resume=true but no checkpoint in %s: starting from scratch", out)
    result: dict = {"output_dir": str(out), "resumed_from_step": 0}
    if resume_from:
        result["resumed_from_step"] = int(resume_from.name.split("-")[-1])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    result.update(trainable_params=trainable, total_params=total)
    if trainer.eval_dataset is not None and s.eval_before and not resume_from and not s.deepspeed:
        result["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.time() - t0
    metrics = train_out.metrics
    if trainer.args.eval_on_start:
        result["eval_loss_before"] = next(x["eval_loss"] for x in trainer.state.log_history
                                          if "eval_loss" in x)
    result["train_loss"] = metrics.get("train_loss")
    result["global_step"] = trainer.state.global_step
    result["train_runtime_s"] = round(wall, 2)
    tokens = trainer.state.num_input_tokens_seen
    result["tokens_seen"] = int(tokens)
    if not resume_from and wall > 0:
        result["tokens_per_s"] = round(tokens / wall, 1)
    if trainer.eval_dataset is not None:
        result["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    if result.get("train_loss") is not None and not math.isfinite(result["train_loss"]):
        from ..errors import TrainingDiverged

        raise TrainingDiverged(f"training ended with a non-finite loss ({result['train_loss']})")
    if s.save_final:
        result["final_dir"] = str(save_final(trainer, out / "final"))
    result["world_size"] = trainer.args.world_size
    result["peak_rss_mb_per_rank"] = peak_rss_per_rank()
    if trainer.is_world_process_zero():  # one writer when several processes train together
        plot_loss(out / "trainer_log.jsonl", out / "loss.png", title=f"SFT {s.model}")
        atomic_write_json(out / "result.json", result)
    plain_forward(trainer.model)  # callers measure the trained model in float32
    result["trainer"] = trainer
    return result


# --------------------------------------------------------------------------- looking inside

def loss_token_counts(trainer, batch_size: int = 32) -> dict:
    """How many real (non-padding) training tokens carry loss, exactly as the collator labels them.

    A token carries loss when it is a next-token target: ``labels[1:] != -100`` (the model's
    loss shifts labels by one, so the first token of a sequence is never a target).
    """
    ds, collate = trainer.train_dataset, trainer.data_collator
    loss_tokens = real_tokens = 0
    for i in range(0, len(ds), batch_size):
        batch = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
        loss_tokens += int((batch["labels"][:, 1:] != -100).sum())
        real_tokens += int(batch["attention_mask"].sum())
    return {"loss_tokens": loss_tokens, "real_tokens": real_tokens,
            "share": loss_tokens / max(real_tokens, 1), "examples": len(ds)}


def format_loss_mask(tokenizer, input_ids, loss_mask, mark: tuple[str, str] = ("⟦", "⟧")) -> str:
    """Decode ``input_ids`` with the spans whose ``loss_mask`` is true wrapped in ``mark``.

    ``loss_mask`` holds one truthy/falsy value per token (e.g. ``[l != -100 for l in labels]``).
    """
    ids, flags = [int(x) for x in input_ids], [bool(x) for x in loss_mask]
    if len(ids) != len(flags):
        raise ValueError(f"{len(ids)} tokens but {len(flags)} mask values")
    parts, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or flags[k] != flags[start]:
            text = tokenizer.decode(ids[start:k], skip_special_tokens=False)
            parts.append(f"{mark[0]}{text}{mark[1]}" if flags[start] else text)
            start = k
    return "".join(parts)
