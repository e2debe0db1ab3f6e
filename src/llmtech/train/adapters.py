"""Several LoRA adapters on one base model: continue, replay, merge, switch.

The machinery behind incremental learning (lab L4.05):

* ``continue_training`` — sequential fine-tuning: keep training an *existing* adapter on new data
  (no new adapter is created; only that adapter's LoRA matrices move);
* ``replay_mix`` — new-task records plus a share of old-task records (experience replay);
* ``load_adapters`` / ``save_adapter`` — several saved adapters in one ``PeftModel``, each under
  its own name, and one of them saved on its own;
* ``merge_adapters`` — PEFT's ``add_weighted_adapter`` (linear / cat / svd / TIES / DARE …) with
  its preconditions checked up front and DARE's random drop made reproducible;
* ``active_adapter`` / ``AdapterRouter`` — switch the active adapter (by task label) and restore
  the previous state afterwards.

How PEFT combines LoRA factors matters for what a merge means. With ``ΔW_i = s_i·B_i·A_i``
(``s_i = alpha_i / r_i``) and weights ``w_i``:

* ``cat`` stacks the factors: ``ΔW = Σ w_i·ΔW_i`` exactly (rank Σ r_i);
* ``svd`` / ``*_svd`` form ``Σ w_i·ΔW_i`` (or its TIES/DARE version) and truncate it by SVD to
  ``svd_rank`` (default: the largest r — lossy when the sum has a higher rank);
* ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` combine A's and B's *separately*
  (``A = Σ √(w_i s_i)·A_i``, ``B = Σ √(w_i s_i)·B_i``), so ``ΔW = B·A`` also holds the cross terms
  ``√(w_i s_i w_j s_j)·B_i·A_j``; these need equal ranks. See ``factor_merge_delta``.
"""

from __future__ import annotations

import logging
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import ConfigError, DataError
from ..io import replace_dir

log = logging.getLogger(__name__)

# combination types of PEFT 0.21 LoraModel.add_weighted_adapter
MERGE_METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
# methods that combine the A and B factors separately (PEFT requires equal ranks for them)
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# methods that prune (TIES / magnitude) or randomly drop (DARE) entries: they need a density
DENSITY_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                   "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


def _require_peft(model, what: str):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ConfigError(f"{what} needs a PeftModel (a model with LoRA adapters), got "
                          f"{type(model).__name__}")
    return model


def adapter_names(model) -> list[str]:
    """Names of the adapters a PeftModel holds, in loading order."""
    return list(_require_peft(model, "adapter_names").peft_config)


def _check_adapter(model, name: str) -> None:
    if name not in model.peft_config:
        raise ConfigError(f"unknown adapter '{name}'; this model has {list(model.peft_config)}")


# --------------------------------------------------------------------------- load / save

def load_adapters(model, adapters: dict[str, str | Path], trainable: bool = False):
    """Load saved LoRA adapters into one model, each under its own name.

    ``model`` is a plain model (wrapped here; the first adapter becomes the active one) or a
    PeftModel (the adapters are added; the active adapter does not change). An adapter saved from
    a different base (missing layers, other shapes) is a ``ConfigError``. Returns the PeftModel.
    """
    from peft import PeftModel

    if not adapters:
        raise ConfigError("load_adapters: no adapters given")
    from .peft_methods import check_adapter_base

    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise DataError(f"{path}: not a saved adapter (no adapter_config.json) for '{name}'")
        check_adapter_base(model, path)  # layer names and shapes must match this base
    items = list(adapters.items())
    if not isinstance(model, PeftModel):
        name, path = items.pop(0)
        model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    for name, path in items:
        if name in model.peft_config:
            raise ConfigError(f"adapter name '{name}' is already loaded in this model")
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    return model


def save_adapter(model, name: str, path: str | Path) -> Path:
    """Save one adapter (config + weights) to ``path`` itself and return ``path``.

    PEFT writes adapters not called "default" into ``path/<name>``; this saves into a temporary
    folder next to ``path`` and renames the adapter's folder into place.
    """
    _require_peft(model, "save_adapter")
    _check_adapter(model, name)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[name])
    replace_dir(tmp if name == "default" else tmp / name, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- switching

@contextmanager
def active_adapter(model, name: str) -> Iterator:
    """Make adapter ``name`` the active one inside the ``with`` block, then restore the previous
    active adapter and every parameter's ``requires_grad`` flag."""
    _require_peft(model, "active_adapter")
    _check_adapter(model, name)
    prev = model.active_adapter
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    try:
        yield model
    finally:
        model.set_adapter(prev)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


class AdapterRouter:
    """Multi-adapter serving: one base model, one adapter per task, picked by the task label."""

    def __init__(self, model, routes: dict[str, str]):
        _require_peft(model, "AdapterRouter")
        for adapter in routes.values():
            _check_adapter(model, adapter)
        self.model, self.routes = model, dict(routes)

    def adapter_for(self, task: str) -> str:
        if task not in self.routes:
            raise ConfigError(f"no adapter routed for task '{task}'; routes: {self.routes}")
        return self.routes[task]

    def use(self, task: str):
        """Context manager: the task's adapter is active inside the block."""
        return active_adapter(self.model, self.adapter_for(task))


# --------------------------------------------------------------------------- ΔW

def lora_layers(model) -> dict[str, torch.nn.Module]:
    """Module name -> LoRA layer (every layer that holds LoRA adapters)."""
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")}


def delta_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A of adapter ``adapter`` for every layer that carries it (detached)."""
    _check_adapter(_require_peft(model, "delta_weights"), adapter)
    return {n: m.get_delta_weight(adapter).detach() for n, m in lora_layers(model).items()
            if adapter in m.lora_A}


def factor_merge_delta(layer, adapters: Sequence[str], weights: Sequence[float]) -> torch.Tensor:
    """The ΔW that PEFT's ``linear`` merge gives one layer, from the definition:
    ``B = Σ √(w_i s_i)·B_i``, ``A = Σ sign(w_i)·√|w_i s_i|·A_i``, ΔW = B·A (merged scaling 1)."""
    A = sum(_sign(w * layer.scaling[a]) * abs(w * layer.scaling[a]) ** 0.5 * layer.lora_A[a].weight
            for a, w in zip(adapters, weights))
    B = sum(abs(w * layer.scaling[a]) ** 0.5 * layer.lora_B[a].weight for a, w in zip(adapters, weights))
    return (B @ A).detach()


def _sign(x: float) -> float:
    return 1.0 if x >= 0 else -1.0


# --------------------------------------------------------------------------- merging

def merge_adapters(model, adapters: Sequence[str], weights: Sequence[float], method: str,
                   name: str, density: float | None = None, svd_rank: int | None = None,
                   seed: int | None = 0, replace: bool = False) -> str:
    """Add adapter ``name`` = a weighted combination of ``adapters`` (PEFT add_weighted_adapter).

    Checks PEFT's preconditions with clear errors: known method, one weight per adapter, equal
    ranks for the factor-wise methods, a density in (0, 1] for TIES/DARE/magnitude pruning.
    DARE drops entries at random: ``seed`` makes a merge reproducible without touching the global
    RNG. The new adapter is added but not activated. Returns ``name``.
    """
    _require_peft(model, "merge_adapters")
    if method not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method '{method}'; use one of {', '.join(MERGE_METHODS)}")
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters:
        raise ConfigError("merge_adapters: no adapters to merge")
    if len(weights) != len(adapters):
        raise ConfigError(f"merge weights: {len(weights)} weights for {len(adapters)} adapters "
                          f"{adapters}")
    for a in adapters:
        _check_adapter(model, a)
    if method in FACTOR_METHODS:
        ranks = {a: model.peft_config[a].r for a in adapters}
        if len(set(ranks.values())) > 1 or any(model.peft_config[a].rank_pattern for a in adapters):
            raise ConfigError(f"merge method '{method}' combines LoRA factors and needs adapters of "
                              f"equal rank, got {ranks}; use 'cat' or 'svd' for different ranks")
    if method in DENSITY_METHODS:
        if density is None or not 0 < density <= 1:
            raise ConfigError(f"merge method '{method}' needs a density in (0, 1], got {density}")
    if name in model.peft_config:
        if not replace:
            raise ConfigError(f"an adapter named '{name}' already exists")
        if model.active_adapter == name:
            model.set_adapter(adapters[0])
        model.delete_adapter(name)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model.add_weighted_adapter(adapters, weights, name, combination_type=method,
                                   density=density, svd_rank=svd_rank)
    log.info("merged %s with weights %s (%s, density=%s) into adapter '%s'",
             adapters, weights, method, density, name)
    return name


# --------------------------------------------------------------------------- continual training

def replay_mix(new: Sequence[dict], old: Sequence[dict], share: float, seed: int = 0) -> list[dict]:
    """All ``new`` records plus old-task records so that ``share`` of the mix is old data.

    ``n_old = round(len(new) · share / (1 − share))`` old records are drawn without repetition from
    a seeded shuffle of ``old`` (cycling through it again only when ``old`` is too small); the
    mix is shuffled with the same seed. ``share = 0`` returns the new records (shuffled).
    """
    if not 0 <= share < 1:
        raise ConfigError(f"replay share must be in [0, 1), got {share}")
    if not new:
        raise DataError("replay_mix: no new-task records")
    n_old = round(len(new) * share / (1 - share))
    if n_old and not old:
        raise DataError("replay_mix: a replay share > 0 needs old-task records")
    rng = random.Random(seed)
    pool = list(old)
    rng.shuffle(pool)
    if n_old > len(pool):
        log.warning("replay: %d old records requested, %d available: some repeat", n_old, len(pool))
    mix = list(new) + [pool[i % len(pool)] for i in range(n_old)]
    rng.shuffle(mix)
    return mix


def trainable_lora(model, adapter: str) -> None:
    """Exactly the LoRA matrices of ``adapter`` require grad; everything else is frozen."""
    _check_adapter(_require_peft(model, "trainable_lora"), adapter)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n and f".{adapter}." in n)


def train_adapter(s, model, tokenizer, callbacks=()) -> tuple:
    """Train a new LoRA adapter (``s.lora``) on ``s.train_file`` from the plain ``model``.

    Returns ``(peft_model, run_sft result)``; the model's forward is plain again (fp32 eval)."""
    from .sft import run_sft

    if s.finetuning != "lora":
        raise ConfigError("train_adapter trains a LoRA adapter: finetuning must be 'lora'")
    res = run_sft(s, model=model, tokenizer=tokenizer, callbacks=callbacks)
    return res["trainer"].model, res  # run_sft already restored the plain (fp32) forward


def continue_training(s, model, tokenizer, adapter: str | None = None, callbacks=()) -> dict:
    """Sequential fine-tuning: keep training an existing LoRA adapter on ``s.train_file``.

    ``model`` is a PeftModel (e.g. from ``load_adapters(..., trainable=True)``); ``adapter``
    (default: the active one) becomes active and is the only thing that trains. The SFT trainer
    gets the PeftModel without a new LoRA config, so it optimises exactly the parameters that
    require grad. ``s`` is an ``SFTSettings`` (its ``lora`` block is ignored). Returns
    ``run_sft``'s result dict (with ``adapter`` added).
    """
    from .sft import run_sft

    _require_peft(model, "continue_training")
    adapter = adapter or model.active_adapter
    _check_adapter(model, adapter)
    model.set_adapter(adapter)
    trainable_lora(model, adapter)
    # finetuning="full" here means: no new PEFT wrapper, train whatever requires grad
    res = run_sft(s.model_copy(update={"finetuning": "full"}), model=model, tokenizer=tokenizer,
                  callbacks=callbacks)
    res["adapter"] = adapter
    return res
