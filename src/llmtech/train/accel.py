"""Training acceleration tricks, measured one at a time and combined (lab L3.03).

An *arm* is a set of tricks applied to the same short SFT run (TRL ``SFTTrainer`` through
``llmtech.train.sft.build_trainer``; LoRA by default, same data order and seed in every arm).
The baseline arm has none: fp32, eager attention, no gradient checkpointing, padded batches,
no ``torch.compile``. The tricks (``TRICKS``):

* ``sdpa`` — ``attn_implementation="sdpa"``: PyTorch's fused ``scaled_dot_product_attention``
  instead of transformers' eager attention (explicit ``softmax(QKᵀ)V`` with the score matrix
  materialised).
* ``flash_attention_2`` — ``attn_implementation="flash_attention_2"``: the flash-attn package's
  CUDA kernels; needs a CUDA GPU with flash-attn installed (elsewhere the arm is a status row,
  never a number). Runs in bf16 autocast, which FlashAttention requires.
* ``checkpointing`` — gradient (activation) checkpointing: keep only each decoder layer's input
  in the forward pass and recompute the layer during backward (less memory, more compute).
* ``bf16`` — bf16 autocast (fp32 master weights): matmuls in bf16, native on CPUs with
  AVX-512 BF16 / AMX and on recent GPUs (``sft.native_bf16``).
* ``packing`` — TRL's best-fit-decreasing packing: several examples per row, padding-free
  (position ids restart per example, so attention does not cross examples). To keep the work
  per step comparable, a packed step holds about as many real tokens as a padded step
  (``pack_length``: one row of ``batch_size`` × mean example length, ``pack_length_for``).
* ``compile`` — ``torch.compile`` (Inductor) of the model's forward and backward; its first
  step includes compilation, measured separately from the steady-state step time.

Measurements per arm (``run_arm``): per-step wall time, real (non-padding) and total tokens per
step (counted on the collated batches), per-step training loss, peak memory, and the loss on
held-out examples after training (fp32, every arm scored the same way).

Memory and speed come from two phases of the same run. The peak covers loading and the first
``memory_steps`` steps (optimizer states exist from step 1 on, so step 2 is the steady state):
the process RSS high-water mark (reset with ``MemoryMeter``) minus the RSS before the model was
loaded, with glibc returning every freed block at once so that RSS follows the live tensors
(``torch.cuda.max_memory_allocated`` on a GPU). That costs page faults, so the later steps run
with glibc's usual thresholds and only they are timed. Steady-state throughput is the median
over the timed steps of each step's real tokens / its wall time (the median shrugs off a step
slowed by another process on a shared machine); ``overhead_s`` is what all steps took beyond
that steady pace: warm-up, the memory phase and, for ``compile``, the (re)compilations.
``run_arm_subprocess`` runs an arm in a fresh interpreter (a clean high-water mark; a fresh,
empty Inductor cache, so ``compile`` pays a cold compilation; a timeout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ..config import StrictModel
from ..errors import ConfigError, LlmtechError
from ..models import DEFAULT_LM

log = logging.getLogger(__name__)

MB = 1024 ** 2

TRICKS: dict[str, str] = {
    "sdpa": "fused scaled_dot_product_attention instead of eager attention",
    "flash_attention_2": "flash-attn CUDA kernels (with bf16 autocast)",
    "checkpointing": "gradient checkpointing: recompute each layer during backward",
    "bf16": "bf16 autocast (fp32 master weights)",
    "packing": "pack several examples per row, padding-free (TRL bfd)",
    "compile": "torch.compile (Inductor) of forward and backward",
}
# named combinations; any arm may also be written as tricks joined by "+" ("bf16+packing")
PRESETS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "fastest": ("bf16", "sdpa", "packing"),
    "leanest": ("bf16", "sdpa", "packing", "checkpointing"),
}
DEFAULT_ARMS = ["baseline", "sdpa", "checkpointing", "bf16", "packing", "compile", "fastest",
                "leanest", "flash_attention_2"]
FLASH_UNAVAILABLE = "needs a CUDA GPU with flash-attn installed"


def parse_arm(spec: str) -> tuple[str, ...]:
    """Tricks of an arm: a preset name (``PRESETS``), a trick name, or tricks joined by ``+``.
    Unknown names and contradictory combinations are a ``ConfigError`` naming them."""
    key = str(spec).strip()
    if key in PRESETS:
        return tuple(t for t in TRICKS if t in PRESETS[key])
    parts = [p.strip() for p in key.split("+")]
    bad = [p for p in parts if p not in TRICKS]
    if not key or bad:
        raise ConfigError(f"unknown trick {', '.join(repr(b) for b in bad) or repr(key)} in arm "
                          f"'{spec}'; known tricks: {', '.join(TRICKS)}; presets: "
                          f"{', '.join(PRESETS)} (combine tricks with '+', e.g. bf16+packing)")
    if "sdpa" in parts and "flash_attention_2" in parts:
        raise ConfigError(f"arm '{spec}': sdpa and flash_attention_2 are two attention "
                          "implementations; an arm uses one")
    return tuple(t for t in TRICKS if t in parts)  # canonical order, duplicates dropped


def attn_implementation(tricks: tuple[str, ...]) -> str:
    if "flash_attention_2" in tricks:
        return "flash_attention_2"
    return "sdpa" if "sdpa" in tricks else "eager"


def unavailable(tricks: tuple[str, ...]) -> str | None:
    """Why an arm cannot run on this machine (None when it can)."""
    if "flash_attention_2" in tricks and not (
            torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None):
        return FLASH_UNAVAILABLE
    return None


class AccelSettings(StrictModel):
    """One short SFT run that every arm repeats with its tricks switched on."""

    model: str = DEFAULT_LM
    train_file: str = "data/support/sft_train.jsonl"
    eval_file: str = "data/support/sft_test.jsonl"
    max_eval_samples: int = Field(16, ge=1)
    finetuning: Literal["lora", "full"] = "lora"
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(256, ge=8)
    steps: int = Field(8, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    seed: int = 0
    # None: batch_size x mean example length (pack_length_for)
    pack_length: int | None = Field(None, ge=8)
    memory_steps: int = Field(2, ge=1)  # peak memory over load + these first steps; speed after
    output_dir: str | None = None  # trainer scratch folder (None: a temporary folder)


# --------------------------------------------------------------------------- measuring helpers

class _CountingCollator:
    """Wraps the trainer's collator and notes, per collated batch, the tokens in the tensor, the
    real (non-padding) tokens and the loss-carrying tokens. Batches are collated in training
    order (the dataloader may fetch one ahead; callers keep the first ``steps`` entries)."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, examples):
        b = self.inner(examples)
        ids = b["input_ids"]
        # padding-free batches (packing) have no attention mask and no padding
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else int(ids.numel())
        self.batches.append((int(ids.numel()), real, int((b["labels"] != -100).sum())))
        return b


def _step_clock(label: str, memory_phase: "_MemoryPhase"):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall-clock time at the start of training and at the end of every optimizer step; ends
        the memory phase after its steps; a progress bar (the Trainer's own one also prints
        every logged dict)."""

        def __init__(self):
            self.start = 0.0
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=label, leave=False, dynamic_ncols=True)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if len(self.ends) + 1 == memory_phase.steps:
                memory_phase.end()  # not timed: the next step starts when the clock is read
            self.ends.append(time.perf_counter())
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and "train_loss" not in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return StepClock()


# glibc: every freed block of >= 64 KB goes back to the OS at once during the memory phase (RSS
# then follows live tensors, see dist.memory.set_mmap_threshold) — exact, but each large
# allocation then page-faults fresh memory, which nearly halves training speed here. The timed
# steps run with glibc's own steady state instead: 32 MB mmap threshold, 64 MB trim threshold.
EXACT_MMAP_THRESHOLD = 64 * 1024
STEADY_MMAP_THRESHOLD = 32 * MB


def _glibc_thresholds(mmap_bytes: int) -> bool:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(mmap_bytes)) and libc.mallopt(-1, int(2 * mmap_bytes)))
    except (OSError, AttributeError):  # not glibc
        return False


class _MemoryPhase:
    """Peak memory from entry (before the model is loaded) to the end of the first ``steps``
    training steps, in bytes above the memory in use at entry: the process RSS high-water mark
    (reset on entry) on the CPU, allocated CUDA memory on a GPU."""

    def __init__(self, steps: int):
        self.steps = steps
        self.cuda = torch.cuda.is_available()
        self.base = self.peak = 0
        self._meter = None
        self.open = False

    def __enter__(self) -> "_MemoryPhase":
        from ..evals.speed import MemoryMeter, release_memory, rss_bytes

        if not self.cuda:
            _glibc_thresholds(EXACT_MMAP_THRESHOLD)
        release_memory()
        if self.cuda:
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = rss_bytes()
            self._meter = MemoryMeter().__enter__()
        self.open = True
        return self

    def end(self) -> None:
        if not self.open:
            return
        self.open = False
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._meter.__exit__(None, None, None)
            self.peak = self._meter.peak - self.base
            _glibc_thresholds(STEADY_MMAP_THRESHOLD)

    def __exit__(self, *exc) -> None:
        self.end()


def _resolve(path: str) -> str:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        root = Path(__file__).resolve().parents[3]
        if (root / p).exists():
            return str(root / p)
    return str(p)


def example_lengths(s: AccelSettings, tokenizer=None) -> list[int]:
    """Tokens of each training example as the chat template renders it (truncated to
    ``max_length``), the same text TRL trains on."""
    from .. import data, models
    from ..evals.lm import encode_chat_example

    tok = tokenizer or models.load_tokenizer(s.model)
    recs = data.load(_resolve(s.train_file))
    return [len(encode_chat_example(tok, data.to_messages(r), s.max_length)["input_ids"])
            for r in recs]


def pack_length_for(s: AccelSettings, tokenizer=None) -> int:
    """Row length of a packed step: ``batch_size`` × the mean example length, rounded up to a
    multiple of 8 and at least ``max_length`` (so every example fits) — a packed step then
    carries about the real tokens of a padded step, without the padding."""
    if s.pack_length:
        return s.pack_length
    lengths = example_lengths(s, tokenizer)
    n = math.ceil(s.batch_size * statistics.fmean(lengths) / 8) * 8
    return max(n, s.max_length)


def saved_activation_bytes(model, input_ids, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one training-mode forward pass with labels (unique
    storages, parameters excluded; ``dist.memory.saved_tensor_bytes``), with or without
    gradient checkpointing — a deterministic count of what checkpointing saves. With
    checkpointing the layers' own activations are not kept (they are recomputed in backward);
    the layer inputs checkpointing stores are not counted. The model's checkpointing setting is
    restored afterwards."""
    from ..dist.memory import saved_tensor_bytes

    was_on, was_training = bool(model.is_activation_checkpointing), model.training
    kw = {"use_reentrant": False}
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.activation_checkpointing_disable()
    try:
        return saved_tensor_bytes(model, input_ids)
    finally:
        if was_on != checkpointing:
            if was_on:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.activation_checkpointing_disable()
        model.train(was_training)


# --------------------------------------------------------------------------- one arm

@dataclass
class ArmResult:
    """What one arm measured (``status``: ok | unavailable | failed | timeout)."""

    arm: str
    tricks: list[str]
    status: str = "ok"
    note: str = ""
    attn_implementation: str = ""
    bf16: bool = False
    device: str = "cpu"
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tensor_tokens: list[int] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)
    loss_tokens: list[int] = field(default_factory=list)
    rows_per_step: int = 0
    row_length: int = 0
    load_s: float = 0.0
    setup_s: float = 0.0
    peak_mb: float = 0.0
    memory_steps: int = 0
    model_mb: float = 0.0
    heldout_loss: float | None = None
    eval_s: float = 0.0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def first_step_s(self) -> float:
        return self.step_s[0] if self.step_s else float("nan")

    @property
    def timed_from(self) -> int:
        """Index of the first timed step: after the memory phase (its allocator setting is
        exact but slow) and never the first step (warm-up, compilation) unless it is the only
        one."""
        n = len(self.step_s)
        return self.memory_steps if n > self.memory_steps else (1 if n > 1 else 0)

    @property
    def tokens_per_s(self) -> float:
        """Steady-state real (non-padding) tokens per second: the median over the timed steps of
        each step's real tokens / its wall time."""
        k = self.timed_from
        r = [n / t for n, t in zip(self.real_tokens[k:], self.step_s[k:]) if t > 0]
        return statistics.median(r) if r else float("nan")

    @property
    def steady_step_s(self) -> float:
        """Median wall time of the timed steps."""
        rest = self.step_s[self.timed_from:]
        return statistics.median(rest) if rest else float("nan")

    @property
    def overhead_s(self) -> float:
        """Seconds all steps took beyond the steady pace (real tokens / ``tokens_per_s``): the
        first step's warm-up, the memory phase and, with ``compile``, every (re)compilation."""
        rate = self.tokens_per_s
        if not self.step_s or not rate or math.isnan(rate):
            return float("nan")
        return sum(self.step_s) - sum(self.real_tokens[: len(self.step_s)]) / rate

    @property
    def padding_share(self) -> float:
        """Share of the batch tensors' tokens that were padding."""
        total = sum(self.tensor_tokens)
        return 1 - sum(self.real_tokens) / total if total else float("nan")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ArmResult":
        return cls(**d)


def _train_and_score(tricks: tuple[str, ...], s: AccelSettings, out: Path, res: ArmResult,
                     pack_len: int | None) -> None:
    """Load a fresh model, train ``s.steps`` steps with ``tricks``, score held-out examples;
    fills ``res``. Memory: peak above the memory in use before the model was loaded."""
    from transformers.trainer_callback import ProgressCallback

    from .. import models
    from ..data import load, to_messages
    from ..evals.lm import response_loss
    from ..evals.speed import model_bytes, release_memory
    from .sft import SFTSettings, build_trainer, plain_forward

    phase = _MemoryPhase(min(s.memory_steps, s.steps))
    with phase:
        t0 = time.perf_counter()
        model, tok = models.load_lm(s.model, seed=s.seed)
        if torch.cuda.is_available():
            model.to("cuda")
        model.set_attn_implementation(res.attn_implementation)
        res.model_mb = round(model_bytes(model) / MB, 1)
        res.load_s = round(time.perf_counter() - t0, 2)
        packing = "packing" in tricks
        settings = SFTSettings(
            model=s.model, train_file=_resolve(s.train_file), eval_file=None,
            output_dir=str(out), finetuning=s.finetuning, packing=packing,
            max_length=pack_len if packing else s.max_length,
            batch_size=1 if packing else s.batch_size, max_steps=s.steps,
            learning_rate=s.learning_rate, lr_scheduler="constant", logging_steps=1,
            save_steps=10 ** 6, save_final=False, eval_before=False, seed=s.seed,
            bf16=res.bf16, gradient_checkpointing="checkpointing" in tricks)
        clock = _step_clock(res.arm, phase)
        trainer = build_trainer(settings, model, tok, callbacks=[clock])
        trainer.remove_callback(ProgressCallback)  # it prints every step's log dict
        counter = _CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        if "compile" in tricks:
            trainer.model.compile()  # nn.Module.compile: the trainer's calls go through Inductor
        res.setup_s = round(time.perf_counter() - t0 - res.load_s, 2)
        trainer.train()
    res.peak_mb = round(phase.peak / MB, 1)
    res.memory_steps = phase.steps
    n = len(clock.ends)
    marks = [clock.start, *clock.ends]
    res.step_s = [round(b - a, 4) for a, b in zip(marks, marks[1:])]
    res.losses = [round(x, 5) for x in clock.losses[:n]]
    used = counter.batches[:n]
    res.tensor_tokens = [b[0] for b in used]
    res.real_tokens = [b[1] for b in used]
    res.loss_tokens = [b[2] for b in used]
    res.rows_per_step, res.row_length = settings.batch_size, settings.max_length
    # held-out loss: the trained model in fp32 (autocast wrapper removed), scored the same way in
    # every arm (response tokens only, right-padded rows, no packing)
    t1 = time.perf_counter()
    model = plain_forward(trainer.model)
    ev = load(_resolve(s.eval_file), limit=s.max_eval_samples)
    res.heldout_loss = round(response_loss(model, tok, [to_messages(r) for r in ev],
                                           max_length=s.max_length), 5)
    res.eval_s = round(time.perf_counter() - t1, 2)
    del trainer, model, counter
    release_memory()


def run_arm(arm: str, s: AccelSettings, pack_len: int | None = None) -> ArmResult:
    """Measure one arm in this process (see the module docstring). ``arm`` is a preset, a trick
    or tricks joined by ``+`` (unknown names: ConfigError). An arm that cannot run here comes
    back with ``status="unavailable"`` and the reason, one whose training fails with
    ``status="failed"`` and the error (logged with its traceback); nothing is made up."""
    from ..labs import seed_everything
    from .sft import native_bf16

    tricks = parse_arm(arm)
    res = ArmResult(arm=arm, tricks=list(tricks), attn_implementation=attn_implementation(tricks),
                    bf16="bf16" in tricks or "flash_attention_2" in tricks,
                    device="cuda" if torch.cuda.is_available() else "cpu")
    why = unavailable(tricks)
    if why:
        res.status, res.note = "unavailable", why
        return res
    if res.bf16 and not native_bf16():
        res.note = "bf16 is emulated on this hardware (no native bf16 matmuls)"
    if "packing" in tricks and pack_len is None:
        pack_len = pack_length_for(s)
    import datasets

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Tokenizing train dataset" bars, once per arm
    seed_everything(s.seed)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="accel-") as tmp:
            out = Path(s.output_dir) / arm if s.output_dir else Path(tmp)
            _train_and_score(tricks, s, out, res, pack_len)
    except LlmtechError:
        raise  # the user's input (data file, model id): the caller reports it
    except Exception as e:  # noqa: BLE001 — one arm failing must not hide the others' numbers
        log.exception("arm %s failed", arm)
        res.status, res.note = "failed", f"{type(e).__name__}: {e}"
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    res.wall_s = round(time.perf_counter() - t0, 2)
    return res


def warm_up(model: str = "tiny-llama") -> None:
    """Two short arms on a tiny model (the baseline path and bf16 + SDPA + packing +
    checkpointing), so one-time costs — lazy imports, thread pools, allocator arenas, kernel
    caches — are paid before the first measured arm rather than charged to it."""
    s = AccelSettings(model=model, steps=2, max_eval_samples=2, max_length=64)
    for arm in ("baseline", "leanest"):
        run_arm(arm, s, pack_len=128)


def _steps_done(stderr, arm: str) -> tuple[int, int] | None:
    """The last ``<arm>: ... N/M`` progress-bar reading in a (partial) stderr, if any."""
    import re

    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else (stderr or "")
    found = re.findall(re.escape(arm) + r":\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def run_arm_subprocess(arm: str, s: AccelSettings, pack_len: int | None = None,
                       timeout: float | None = None, warm: bool = True) -> ArmResult:
    """``run_arm`` in a fresh interpreter (a clean memory high-water mark; a fresh, empty
    Inductor cache, so ``compile`` pays a cold compilation; ``warm``: ``warm_up`` first; a
    timeout covering start-up, load, training and scoring). A failure or timeout comes back as
    a result with ``status`` "failed" / "timeout" and the error in ``note``; a bad arm name is a
    ConfigError."""
    tricks = parse_arm(arm)
    cmd = [sys.executable, "-m", "llmtech.train.accel", "--arm", arm,
           "--settings", s.model_dump_json()] + (["--warm-up"] if warm else [])
    if pack_len:
        cmd += ["--pack-length", str(pack_len)]
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])  # the llmtech the caller imported
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = ArmResult(arm=arm, tricks=list(tricks), attn_implementation=attn_implementation(tricks),
                    bf16="bf16" in tricks or "flash_attention_2" in tricks,
                    device="cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="accel-inductor-") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            res.status, res.note = "timeout", (f"not finished after {timeout:g} s (process "
                                               "start-up, load, training steps and scoring)")
            done = _steps_done(e.stderr, arm)
            if done is not None:
                res.note += f"; training steps finished by then: {done[0]} of {done[1]}"
            res.wall_s = round(time.perf_counter() - t0, 1)
            return res
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        errs = [x.strip() for x in r.stderr.splitlines() if x.strip().startswith("error:")]
        tail = errs[-1:] or [x for x in r.stderr.strip().splitlines() if x.strip()][-2:]
        res.status, res.note = "failed", f"exit {r.returncode}: " + " | ".join(tail)
        res.wall_s = round(time.perf_counter() - t0, 1)
        return res
    return ArmResult.from_json(json.loads(lines[-1]))


# --------------------------------------------------------------------------- comparisons

def loss_agreement(base: ArmResult, arm: ArmResult) -> dict[str, float]:
    """Per-step training losses of an arm against the baseline's (same data order and seed):
    mean and max of |arm − base| / |base| over the common steps."""
    n = min(len(base.losses), len(arm.losses))
    if n == 0:
        return {"mean_rel_diff": float("nan"), "max_rel_diff": float("nan"), "steps": 0}
    rel = [abs(a - b) / abs(b) for a, b in zip(arm.losses[:n], base.losses[:n])]
    return {"mean_rel_diff": statistics.fmean(rel), "max_rel_diff": max(rel), "steps": n}


def heldout_rel_diff(base: ArmResult, arm: ArmResult) -> float:
    """|held-out loss of the arm − baseline's| / baseline's."""
    if base.heldout_loss is None or arm.heldout_loss is None:
        return float("nan")
    return abs(arm.heldout_loss - base.heldout_loss) / abs(base.heldout_loss)


def compare(base: ArmResult, arm: ArmResult, tolerance: float = 0.05) -> dict[str, Any]:
    """An arm against the baseline: speed-up (steady real tokens/s), memory ratio (peak), real
    tokens trained, and loss agreement. Arms without packing see the same batches in the same
    order as the baseline, so their per-step losses are compared (``agree``: mean relative
    difference <= ``tolerance``). Packing puts other examples in each step, so packed arms are
    compared by the held-out loss after the same number of steps, which carry about the same
    number of real tokens (``tokens_ratio``; ``agree``: relative difference <= ``tolerance``)."""
    out: dict[str, Any] = {
        "speedup": arm.tokens_per_s / base.tokens_per_s,
        "memory_ratio": arm.peak_mb / base.peak_mb if base.peak_mb > 0 else float("nan"),
        "tokens_ratio": sum(arm.real_tokens) / max(sum(base.real_tokens), 1),
        "heldout_rel_diff": heldout_rel_diff(base, arm),
    }
    if "packing" in arm.tricks:
        out.update(loss_check="held-out", agree=bool(out["heldout_rel_diff"] <= tolerance))
    else:
        la = loss_agreement(base, arm)
        out.update(loss_check="per-step", loss_mean_rel_diff=la["mean_rel_diff"],
                   loss_max_rel_diff=la["max_rel_diff"],
                   agree=bool(la["steps"] > 0 and la["mean_rel_diff"] <= tolerance))
    return out


def summary_row(r: ArmResult, base: ArmResult | None, tolerance: float = 0.05) -> dict[str, Any]:
    """One table row: speed and memory relative to the baseline, loss agreement."""
    row: dict[str, Any] = {"arm": r.arm, "tricks": "+".join(r.tricks) or "-", "status": r.status}
    if not r.ok:
        row["note"] = r.note
        return row
    row.update({"tokens/s": round(r.tokens_per_s, 1), "step_s": round(r.steady_step_s, 2),
                "overhead_s": round(r.overhead_s, 1), "padding": round(r.padding_share, 3),
                "peak_MB": r.peak_mb})
    if base is not None and base.ok:
        c = compare(base, r, tolerance)
        row.update({"speedup": round(c["speedup"], 2), "memory": round(c["memory_ratio"], 2),
                    "loss_check": c["loss_check"],
                    "loss_diff": round(c.get("loss_mean_rel_diff", c["heldout_rel_diff"]), 4),
                    "agree": c["agree"]})
    row["heldout_loss"] = r.heldout_loss
    if r.note:
        row["note"] = r.note
    return row


def metric_key(arm: str) -> str:
    """``bf16+packing`` -> ``bf16_packing`` (metrics.json keys)."""
    return arm.replace("+", "_").replace("-", "_")


def arm_metrics(results: list[ArmResult], tolerance: float = 0.05) -> dict[str, Any]:
    """Flat metrics for every arm (``<name>_<arm>``), relative to the arm named ``baseline``."""
    base = next((r for r in results if r.arm == "baseline" and r.ok), None)
    m: dict[str, Any] = {}
    for r in results:
        k = metric_key(r.arm)
        m[f"status_{k}"] = r.status
        if not r.ok:
            m[f"note_{k}"] = r.note
            continue
        m.update({f"tokens_per_s_{k}": round(r.tokens_per_s, 1),
                  f"step_s_{k}": round(r.steady_step_s, 3),
                  f"first_step_s_{k}": round(r.first_step_s, 2),
                  f"overhead_s_{k}": round(r.overhead_s, 1),
                  f"peak_mb_{k}": r.peak_mb, f"padding_share_{k}": round(r.padding_share, 4),
                  f"heldout_loss_{k}": r.heldout_loss})
        if base is None or r is base:
            continue
        c = compare(base, r, tolerance)
        m.update({f"speedup_{k}": round(c["speedup"], 3),
                  f"memory_ratio_{k}": round(c["memory_ratio"], 3),
                  f"tokens_ratio_{k}": round(c["tokens_ratio"], 3),
                  f"heldout_rel_diff_{k}": round(c["heldout_rel_diff"], 5),
                  f"losses_agree_{k}": c["agree"]})
        if c["loss_check"] == "per-step":
            m[f"loss_mean_rel_diff_{k}"] = round(c["loss_mean_rel_diff"], 5)
            m[f"loss_max_rel_diff_{k}"] = round(c["loss_max_rel_diff"], 5)
    return m


# --------------------------------------------------------------------------- command line

def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmtech.train.accel",
                                description="measure one training-acceleration arm, print JSON")
    p.add_argument("--arm", required=True, help="preset, trick, or tricks joined by '+'")
    p.add_argument("--settings", default="{}", help="AccelSettings as JSON")
    p.add_argument("--pack-length", type=int, default=None)
    p.add_argument("--warm-up", action="store_true", help="warm_up() on tiny-llama first")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        s = AccelSettings.model_validate_json(a.settings)
        if a.warm_up:
            warm_up()
        res = run_arm(a.arm, s, a.pack_length)
    except LlmtechError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 — reported to the parent as the arm's failure
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
