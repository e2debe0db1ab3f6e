"""KTO on TRL's KTOTrainer: alignment from unpaired thumbs-up / thumbs-down examples.

KTO (Ethayarajh et al. 2024) values a response through a Kahneman–Tversky value function of its
implicit reward β·(log πθ − log πref) relative to a reference point z0 (an estimate of the KL
between policy and reference), with weights λ_D / λ_U for desirable / undesirable examples.
Training data is unpaired (prompt, completion, label); a file of pairs is converted (chosen →
desirable, rejected → undesirable). Held-out measurement uses pairs, like DPO, so the two can
be compared on the same numbers.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path


from .align import AlignSettings, callbacks_for, peft_config, run_stage, training_kwargs
from .dpo import preference_eval

log = logging.getLogger(__name__)


class KTOSettings(AlignSettings):
    train_file: str = "data/support/kto.jsonl"
    output_dir: str = "runs/kto"
    beta: float = 0.1
    # None = balance automatically so that λ_D·n_D / (λ_U·n_U) = 1 (the KTO paper recommends
    # keeping this ratio in [1, 4/3]).
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    batch_size: int = 4  # KTO estimates its KL reference point from mismatched pairs in a batch


def kto_weights(rows: list[dict], s: KTOSettings) -> tuple[float, float]:
    n_d = sum(r["label"] for r in rows)
    n_u = len(rows) - n_d
    if n_d == 0 or n_u == 0:
        from ..errors import DataError

        raise DataError(f"{s.train_file}: KTO needs both desirable and undesirable examples "
                        f"(found {n_d} desirable, {n_u} undesirable)")
    wd, wu = s.desirable_weight, s.undesirable_weight
    if wd is None and wu is None:
        wd, wu = (1.0, n_d / n_u) if n_d >= n_u else (n_u / n_d, 1.0)
    return float(wd if wd is not None else 1.0), float(wu if wu is not None else 1.0)


def build_kto_trainer(s: KTOSettings, model=None, tokenizer=None, callbacks=()):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from .. import models
    from ..data.preference import load_pairs, load_unpaired, split_pairs, trl_rows

    if model is None or tokenizer is None:
        model, tokenizer = models.load_lm(s.model, seed=s.seed)
    train = load_unpaired(s.train_file, s.on_bad, s.system_prompt, limit=s.max_train_samples)
    for p in train.problems:
        log.warning("skipped %s", p)
    reports, rows, eval_pairs = {"train": train.summary()}, train.rows, []
    if s.eval_file:
        ev = load_pairs(s.eval_file, s.on_bad, s.system_prompt, limit=s.max_eval_samples)
        reports["eval"], eval_pairs = ev.summary(), ev.rows
    elif s.eval_fraction > 0:
        rows, held = split_pairs(rows, s.eval_fraction, s.seed)
        eval_pairs = _pairs_from_unpaired(held)
    wd, wu = kto_weights(rows, s)
    reports["train"].update(desirable=sum(r["label"] for r in rows),
                            undesirable=sum(not r["label"] for r in rows),
                            desirable_weight=wd, undesirable_weight=wu)
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    args = KTOConfig(**training_kwargs(s), beta=s.beta, desirable_weight=wd, undesirable_weight=wu)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if s.finetuning == "full" else None
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(trl_rows(rows)),
                         processing_class=tokenizer, peft_config=peft_config(s),
                         callbacks=callbacks_for(s, callbacks))
    trainer.llmtech_data = {"train": rows, "eval": eval_pairs, "reports": reports}
    return trainer


def _pairs_from_unpaired(rows: list[dict]) -> list[dict]:
    """Held-out pairs from unpaired rows: every desirable × undesirable completion of a prompt."""
    by_prompt: dict[str, dict] = {}
    for r in rows:
        g = by_prompt.setdefault(repr(r["prompt"]), {"prompt": r["prompt"], True: [], False: []})
        g[r["label"]].append(r)
    return [{"prompt": g["prompt"], "chosen": d["completion"], "rejected": u["completion"],
             "where": d["where"], "meta": {}}
            for g in by_prompt.values() for d in g[True] for u in g[False]]


def run_kto(s: KTOSettings, model=None, tokenizer=None, callbacks=()) -> dict:
    trainer = build_kto_trainer(s, model, tokenizer, callbacks)
    return run_stage(trainer, s, f"KTO (beta={s.beta}) {s.model}",
                     lambda m, t, rows: preference_eval(m, t, rows, s.beta, s.max_length))
