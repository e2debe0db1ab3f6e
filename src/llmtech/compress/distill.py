"""Knowledge distillation: a smaller student learns to match a teacher's token distributions.

* ``build_student(teacher, layers)`` makes the student from the teacher's own config with fewer
  transformer blocks. With ``init="teacher"`` (default) it is initialised from a subset of the
  teacher: the embedding, final norm and output head are copied, and student block ``j`` is a copy
  of teacher block ``keep[j]``, where ``keep = student_layer_ids(n_teacher, n_student)`` spreads
  the kept blocks evenly from the first to the last (DistilBERT's "take every other layer", for
  any ratio). ``init="random"`` keeps only the architecture.
* ``kd_loss`` is Hinton et al.'s objective per token position::

      p_T = softmax(teacher_logits / T),  q_T = softmax(student_logits / T)
      KD  = T² · KL(p_T ‖ q_T) = T² · Σ_v p_T(v) · (log p_T(v) − log q_T(v))
      CE  = −log softmax(student_logits)[next token]
      loss = α · KD + (1 − α) · CE

  averaged over the token positions that have a label. T > 1 softens both distributions so the
  student also learns how the teacher ranks the wrong tokens ("dark knowledge"); the T² keeps the
  KD gradient's scale independent of T.
* ``distill`` trains the student on packed blocks of text with AdamW (teacher frozen, in eval
  mode), logging each step to a ``trainer_log.jsonl`` that ``train.callbacks.plot_loss`` reads.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LlmtechError
from .prune import decoder_layers

log = logging.getLogger(__name__)


class DistillError(LlmtechError):
    """A distillation request that cannot be carried out (bad layer count, no text...)."""


# --------------------------------------------------------------------------- student

def student_layer_ids(n_teacher: int, n_student: int) -> list[int]:
    """Teacher block indices a student of ``n_student`` blocks is copied from: evenly spread,
    always including the first and the last block (``n_student=1``: the first)."""
    if not 1 <= n_student <= n_teacher:
        raise DistillError(f"student layers must be between 1 and {n_teacher}, got {n_student}")
    if n_student == 1:
        return [0]
    return [round(j * (n_teacher - 1) / (n_student - 1)) for j in range(n_student)]


def build_student(teacher: nn.Module, layers: int | Sequence[int],
                  init: Literal["teacher", "random"] = "teacher", seed: int = 0) -> nn.Module:
    """A causal LM with the teacher's config but only ``layers`` blocks (a count, or the teacher
    block indices to copy), in the teacher's dtype; see the module docstring for ``init``."""
    from transformers import AutoModelForCausalLM

    n_teacher = len(decoder_layers(teacher))
    if isinstance(layers, int):
        keep = student_layer_ids(n_teacher, layers)
    else:
        keep = [int(i) for i in layers]
        if not keep or any(not 0 <= i < n_teacher for i in keep):
            raise DistillError(f"student layer ids must be in [0, {n_teacher}), got {keep}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    config.distilled_from_layers = keep  # provenance, saved in config.json
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding/full...)
        config.layer_types = [config.layer_types[i] for i in keep]
    torch.manual_seed(seed)
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if init == "teacher":
        prefix = _layers_prefix(teacher)
        state = {}
        for k, v in teacher.state_dict().items():
            if k.startswith(prefix):
                i, rest = k[len(prefix):].split(".", 1)
                if int(i) not in keep:
                    continue
                k = f"{prefix}{keep.index(int(i))}.{rest}"
            state[k] = v.detach().clone()
        missing, unexpected = student.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
        if missing or unexpected:
            raise DistillError(f"student/teacher weights do not line up: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        student.tie_weights()
    elif init != "random":
        raise DistillError(f"unknown student init {init!r}; use 'teacher' or 'random'")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name + "."
    raise DistillError("cannot locate the decoder layers in the state dict")


# --------------------------------------------------------------------------- loss

@dataclass
class KDLoss:
    """``total = alpha * kd + (1 - alpha) * ce``; all three are scalar tensors."""

    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None = None, temperature: float = 2.0, alpha: float = 0.5,
            ignore_index: int = -100) -> KDLoss:
    """Distillation loss for logits of shape (..., vocab) aligned position by position (see the
    module docstring). ``labels`` (shape ``...``) are the next tokens; positions equal to
    ``ignore_index`` are left out of both terms. Without labels, ``alpha`` must be 1."""
    if temperature <= 0:
        raise DistillError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise DistillError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise DistillError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} differ in shape")
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    t = teacher_logits.reshape(-1, v).float().detach()
    if labels is None:
        if alpha != 1.0:
            raise DistillError("kd_loss without labels has no CE term: use alpha=1")
        keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        labels = labels.reshape(-1)
        keep = labels != ignore_index
    n = keep.sum().clamp(min=1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # per position
    kd = temperature ** 2 * (kl * keep).sum() / n
    if labels is None:
        ce = torch.zeros((), device=s.device)
    else:
        ce = F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="sum") / n
    return KDLoss(alpha * kd + (1 - alpha) * ce, kd, ce)


# --------------------------------------------------------------------------- data

def pack_blocks(tokenizer, texts: Sequence[str], block_size: int = 128) -> torch.Tensor:
    """Tokenise the texts (each followed by EOS), concatenate, and cut into full blocks:
    a (n_blocks, block_size) tensor of token ids. The incomplete tail is dropped."""
    if block_size < 2:
        raise DistillError(f"block_size must be >= 2, got {block_size}")
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise DistillError(f"the distillation text has {len(ids)} tokens: fewer than one block "
                           f"of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


# --------------------------------------------------------------------------- training

@dataclass
class DistillSettings:
    steps: int = 30
    batch_size: int = 4
    block_size: int = 128
    lr: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    freeze_embeddings: bool = True  # keep the (tied) embedding/output head = the teacher's
    seed: int = 0


@dataclass
class DistillResult:
    steps: int
    tokens: int  # training tokens seen
    seconds: float
    blocks: int  # distinct training blocks
    history: list[dict] = field(default_factory=list)  # per step: step, loss, kd, ce

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def first(self, key: str = "loss") -> float:
        return self.history[0][key]

    def last(self, key: str = "loss", n: int = 3) -> float:
        """Mean of the last ``n`` steps' values (less noisy than the final step alone)."""
        tail = [h[key] for h in self.history[-n:]]
        return sum(tail) / len(tail)


def _logits_pair(teacher, student, batch):
    with torch.no_grad():
        t = teacher(input_ids=batch, use_cache=False).logits[:, :-1]
    s = student(input_ids=batch, use_cache=False).logits[:, :-1]
    return s, t, batch[:, 1:]


def distill(teacher: nn.Module, student: nn.Module, tokenizer, texts: Sequence[str],
            settings: DistillSettings | None = None, log_file: str | Path | None = None,
            progress: bool = True) -> DistillResult:
    """Train ``student`` in place to imitate ``teacher`` on ``texts`` (see ``kd_loss``)."""
    s = settings or DistillSettings()
    if s.steps < 1 or s.batch_size < 1:
        raise DistillError(f"steps and batch_size must be >= 1 (got {s.steps}, {s.batch_size})")
    blocks = pack_blocks(tokenizer, texts, s.block_size)
    gen = torch.Generator().manual_seed(s.seed)
    teacher.eval()
    student.train()
    if s.freeze_embeddings:
        for m in (student.get_input_embeddings(), student.get_output_embeddings()):
            if m is not None:
                m.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    order: list[int] = []
    history: list[dict] = []
    logf = open(log_file, "w", encoding="utf-8") if log_file else None
    from tqdm.auto import tqdm

    bar = tqdm(range(1, s.steps + 1), desc="distill", disable=not progress)
    t0 = time.perf_counter()
    try:
        for step in bar:
            if len(order) < s.batch_size:  # a new shuffled pass over the blocks
                order += torch.randperm(len(blocks), generator=gen).tolist()
            idx, order = order[: s.batch_size], order[s.batch_size:]
            s_logits, t_logits, labels = _logits_pair(teacher, student, blocks[idx])
            loss = kd_loss(s_logits, t_logits, labels, s.temperature, s.alpha)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            if not math.isfinite(loss.total.item()):
                from ..errors import TrainingDiverged

                raise TrainingDiverged(f"distillation loss became {float(loss.total)} at step {step}")
            opt.step()
            row = {"step": step, "loss": loss.total.item(), "kd": loss.kd.item(),
                   "ce": loss.ce.item(), "grad_norm": float(gnorm), "lr": s.lr}
            history.append(row)
            if logf:
                logf.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", kd=f"{row['kd']:.3f}")
    finally:
        if logf:
            logf.close()
    secs = time.perf_counter() - t0
    student.eval()
    res = DistillResult(s.steps, s.steps * s.batch_size * s.block_size, secs, len(blocks), history)
    log.info("distilled %d steps (%d tokens, %.0f tokens/s): loss %.3f -> %.3f", res.steps,
             res.tokens, res.tokens_per_s, res.first(), res.last())
    return res


@torch.no_grad()
def kd_eval(teacher: nn.Module, student: nn.Module, blocks: torch.Tensor, temperature: float = 2.0,
            batch_size: int = 4) -> float:
    """Mean per-token KD term (T² · KL(p_T ‖ q_T)) of ``student`` vs ``teacher`` on ``blocks``."""
    teacher.eval()
    was = student.training
    student.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size]
        s_logits, t_logits, _ = _logits_pair(teacher, student, b)
        n = s_logits.shape[0] * s_logits.shape[1]
        total += float(kd_loss(s_logits, t_logits, None, temperature, 1.0).kd) * n
        count += n
    student.train(was)
    return total / max(count, 1)
