"""What the preference-training stages (reward model, DPO, KTO) share.

One settings base, one way to turn it into TRL/transformers training arguments, one run loop
(resume from the last complete checkpoint, JSONL log + NaN guard, loss plot, final adapter,
optional merged model, ``result.json``). ``reward.py``, ``dpo.py`` and ``kto.py`` only add their
own knobs and datasets.
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
from ..io import atomic_write_json
from ..models import DEFAULT_LM
from .callbacks import JsonlLogCallback, NanGuardCallback, plot_loss
from .lora import LoraSettings, merge_and_save
from .sft import last_checkpoint, native_bf16, plain_forward, save_final

log = logging.getLogger(__name__)


class AlignSettings(StrictModel):
    model: str = DEFAULT_LM  # the SFT model the stage starts from (registry name, folder, hf:/ms:)
    train_file: str = "data/support/preference.jsonl"
    eval_file: str | None = "data/support/preference_test.jsonl"
    eval_fraction: float = 0.0  # eval_file unset: hold out this share of the training prompts
    on_bad: Literal["skip", "error"] = "skip"  # bad records: report and skip, or stop
    system_prompt: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    output_dir: str = "runs/align"
    finetuning: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    max_length: int = 256
    num_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    lr_scheduler: str = "cosine"
    warmup: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 2
    grad_accum: int = 1
    logging_steps: int = 5
    eval_steps: int | None = None
    save_steps: int = 50
    save_total_limit: int | None = 2
    seed: int = 0
    bf16: bool | None = None  # None = on where the hardware has native bf16
    gradient_checkpointing: bool = False
    resume: bool = False
    save_final: bool = True
    merge: bool = False  # also save base + adapter folded into one plain model (final-merged/)


def training_kwargs(s: AlignSettings) -> dict:
    """The TrainingArguments fields every stage sets the same way."""
    return dict(
        output_dir=s.output_dir, num_train_epochs=s.num_epochs, max_steps=s.max_steps,
        learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, logging_steps=s.logging_steps,
        logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy="steps" if s.eval_steps else "no", eval_steps=s.eval_steps,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        seed=s.seed, data_seed=s.seed, bf16=native_bf16() if s.bf16 is None else s.bf16,
        activation_checkpointing=s.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
        report_to="none", dataloader_num_workers=0, max_length=s.max_length)


def load_split(s: AlignSettings, kind: Literal["pairs", "unpaired"] = "pairs"):
    """Train/eval rows (canonical form) and the load reports. ``kind="unpaired"`` reads KTO rows
    (a pair file is converted). The eval side falls back to a prompt-disjoint share of train."""
    from ..data.preference import load_pairs, load_unpaired, split_pairs

    loader = load_pairs if kind == "pairs" else load_unpaired
    train = loader(s.train_file, s.on_bad, s.system_prompt, limit=s.max_train_samples)
    reports = {"train": train.summary()}
    for p in train.problems:
        log.warning("skipped %s", p)
    train_rows, eval_rows = train.rows, []
    if s.eval_file:
        ev = loader(s.eval_file, s.on_bad, s.system_prompt, limit=s.max_eval_samples)
        reports["eval"] = ev.summary()
        eval_rows = ev.rows
    elif s.eval_fraction > 0:
        train_rows, eval_rows = split_pairs(train_rows, s.eval_fraction, s.seed)
    return train_rows, eval_rows, reports


def peft_config(s: AlignSettings, task_type: str = "CAUSAL_LM"):
    from .lora import lora_config

    return lora_config(s.lora, task_type) if s.finetuning == "lora" else None


def callbacks_for(s: AlignSettings, extra=()) -> list:
    return [JsonlLogCallback(Path(s.output_dir) / "trainer_log.jsonl"), NanGuardCallback(), *extra]


def train_and_save(trainer, s: AlignSettings, title: str) -> dict:
    """Train (resuming if asked), then save the final adapter/model, plot and ``result.json``."""
    out = Path(s.output_dir)
    resume_from = last_checkpoint(out) if s.resume else None
    if s.resume and not resume_from:
        log.info("resume=true but no checkpoint in %s: starting from scratch", out)
    result: dict = {"output_dir": str(out),
                    "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else 0}
    model = trainer.model
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["total_params"] = sum(p.numel() for p in model.parameters())
    t0 = time.time()
    out_metrics = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics
    result["train_runtime_s"] = round(time.time() - t0, 2)
    result["train_loss"] = out_metrics.get("train_loss")
    result["global_step"] = trainer.state.global_step
    if result["train_loss"] is not None and not math.isfinite(result["train_loss"]):
        raise TrainingDiverged(f"{title}: training ended with a non-finite loss ({result['train_loss']}); "
                               f"the last good checkpoint in {out} is kept")
    if s.save_final:
        result["final_dir"] = str(save_final(trainer, out / "final"))
    plot_loss(out / "trainer_log.jsonl", out / "loss.png", title=title)
    atomic_write_json(out / "result.json", result)
    return result


def check_same_tokenizer(a, b, what_a: str = "reward model", what_b: str = "policy") -> None:
    """Raise a clear error when two tokenizers would not map text to the same ids."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = len(set(va) - set(vb))
        raise ConfigError(
            f"the {what_a}'s tokenizer differs from the {what_b}'s ({len(va)} vs {len(vb)} tokens, "
            f"{only_a} tokens only in the {what_a}'s): train the {what_a} from the same base model "
            f"as the {what_b}")
    for name in ("eos_token", "pad_token", "bos_token"):
        if getattr(a, name, None) != getattr(b, name, None):
            raise ConfigError(f"the {what_a}'s {name} ({getattr(a, name, None)!r}) differs from the "
                              f"{what_b}'s ({getattr(b, name, None)!r})")
    if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        raise ConfigError(f"the {what_a}'s chat template differs from the {what_b}'s")


def run_stage(trainer, s: AlignSettings, title: str, evaluate) -> dict:
    """Measure on the held-out rows, train, measure again; one ``result.json``.

    ``evaluate(model, tokenizer, rows) -> dict`` is the stage's own measurement; values that
    are tensors (per-example numbers) are kept out of the result file. ``trainer.llmtech_data``
    holds ``{"train", "eval", "reports"}`` (set by the stage's ``build_*_trainer``).
    """
    data, tok = trainer.llmtech_data, trainer.processing_class

    def flat(d: dict, suffix: str) -> dict:
        return {f"eval_{k}{suffix}": v for k, v in d.items() if not isinstance(v, torch.Tensor)}

    before = evaluate(trainer.model, tok, data["eval"]) if data["eval"] and not s.resume else {}
    result = train_and_save(trainer, s, title)
    result["data"] = data["reports"]
    # With bf16 training, accelerate wraps the model's forward in autocast; measure in float32
    # like any later user of the saved model does.
    model = plain_forward(trainer.model)
    if data["eval"]:
        result.update(flat(before, "_before"))
        result.update(flat(evaluate(model, tok, data["eval"]), ""))
    # merge last: DPO/KTO measure against the reference = the same model with its adapter
    # switched off, which no longer exists once the adapter is folded in
    if s.merge:
        result["merged_dir"] = str(merge_and_save(trainer.model, tok,
                                                  Path(s.output_dir) / "final-merged"))
    atomic_write_json(Path(s.output_dir) / "result.json", result)
    result["trainer"] = trainer
    return result
