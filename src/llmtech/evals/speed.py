"""Generation speed and memory on the CPU: time to first token, decode tokens/s, model bytes, RSS.

One measuring path for every deployment variant a lesson wants to compare:

* a Hugging Face causal LM (fp32, bf16, int8-quantised, pruned, LoRA-merged, ...): pass the
  model and its tokenizer;
* anything else (a llama.cpp model, a server client...): pass an object with a
  ``timed_generate(prompt_ids, max_new_tokens, ignore_eos) -> (new_ids, token_times)`` method
  (``token_times`` are ``time.perf_counter()`` stamps taken as each new token is ready).

Prompts are rendered with the model's chat template (``models.render_chat``) and generated one
at a time (batch 1, greedy), after ``warmup`` untimed passes over all of them (steady state:
per-shape kernel JIT and page faults are paid there). By default EOS is ignored so that every
variant generates exactly ``max_new_tokens`` tokens and the rates compare like with like.

Definitions (per prompt, then averaged over prompts):

* ``first_token_ms``: from the call until the first new token exists = prefill of the whole prompt
  plus the first decode step;
* ``decode_tokens_per_s``: ``(n - 1) / (t_last - t_first)``, the steady one-token-at-a-time rate;
* ``total_tokens_per_s``: ``n / (t_last - t_start)``, what a user waiting for the whole reply sees.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..models import chat_messages, render_chat

log = logging.getLogger(__name__)

MB = 1024 * 1024

DEFAULT_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Give three tips for writing a clear email to a customer.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short, friendly reply to a customer whose parcel is late.",
    "Summarise what a large language model is for a ten-year-old.",
    "List the steps to reset a home Wi-Fi router.",
]


# --------------------------------------------------------------------------- bytes and memory

def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (e.g. torchao's quantised weights)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model: torch.nn.Module) -> int:
    """Parameter + buffer bytes of a model, counting shared (tied) tensors once.

    Modules quantised with ``torch.ao.quantization.quantize_dynamic`` keep their int8 weights in
    packed params that are neither parameters nor buffers; they are counted too.
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
        except (RuntimeError, NotImplementedError):  # quantised / subclass tensors
            key = (id(t), 0)
        if key in seen:
            return
        seen.add(key)
        total += tensor_bytes(t)

    for p in model.parameters():
        add(p)
    for b in model.buffers():
        add(b)
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, bias = packed._weight_bias()
            total += w.numel() * w.element_size()  # int8 values; per-tensor/channel scales are tiny
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += tensor_bytes(w.q_per_channel_scales())
                total += tensor_bytes(w.q_per_channel_zero_points())
            if bias is not None:
                total += tensor_bytes(bias)
    return total


def _busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes have been busy, CPU seconds this process has used)."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


def rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS deltas mean something."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class MemoryMeter:
    """Context manager: RSS at entry and exit and the peak RSS in between (bytes).

    On Linux the kernel's high-water mark (VmHWM) is reset on entry and read on exit, so even a
    short spike is seen; elsewhere a thread samples RSS every few milliseconds.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start = self.end = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _read_hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "MemoryMeter":
        self.start = self.peak = rss_bytes()
        self._hwm = self._reset_hwm() and self._read_hwm() is not None
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.end = rss_bytes()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        hwm = self._read_hwm() if self._hwm else None
        self.peak = max(self.peak, self.end, hwm or 0)

    @property
    def delta(self) -> int:
        return self.end - self.start

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


# --------------------------------------------------------------------------- generation timing

class _TokenClock:
    """A ``generate`` streamer (duck-typed ``put``/``end``) that notes when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def hf_timed_generate(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int,
                      ignore_eos: bool = True) -> tuple[list[int], list[float]]:
    """Greedy generation with a Hugging Face model, stamping each new token's arrival."""
    clock = _TokenClock()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else None, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, streamer=clock)
    return out[0, ids.shape[1]:].tolist(), clock.times


@dataclass
class SpeedResult:
    """What ``measure_generation`` found; ``as_metrics(prefix)`` flattens it for metrics.json."""

    first_token_ms: float
    decode_tokens_per_s: float
    total_tokens_per_s: float
    new_tokens: int  # generated tokens over all timed prompts
    prompt_tokens: float  # mean prompt length in tokens
    prompts: int
    peak_rss_mb: float  # process peak RSS during the timed runs
    gen_rss_delta_mb: float  # extra RSS the timed runs needed at their peak (KV cache, activations)
    other_cpu_pct: float  # share of all cores OTHER processes used while timing (>10: timings skewed)
    model_mb: float | None  # parameter + buffer bytes (None when the object is not an nn.Module)
    wall_s: float
    texts: list[str] = field(default_factory=list, repr=False)

    def as_metrics(self, prefix: str = "") -> dict[str, Any]:
        d = asdict(self)
        d.pop("texts")
        p = f"{prefix}_" if prefix else ""
        return {p + k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def render_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Chat-render each prompt (generation prompt added) and tokenize it."""
    out = []
    for p in prompts:
        text = render_chat(tokenizer, chat_messages(p, system=system), add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def measure_generation(model, tokenizer, prompts: Sequence[str] = DEFAULT_PROMPTS[:3],
                       max_new_tokens: int = 32, warmup: int = 1, ignore_eos: bool = True,
                       system: str | None = None,
                       timed_generate: Callable | None = None) -> SpeedResult:
    """Time greedy generation of ``max_new_tokens`` for each prompt (see module docstring).

    ``model`` is a Hugging Face causal LM or an object with a ``timed_generate`` method; pass
    ``timed_generate`` explicitly to override both.
    """
    if max_new_tokens < 2:
        raise ValueError("max_new_tokens must be >= 2 to separate first-token time and decode rate")
    if not prompts:
        raise ValueError("measure_generation needs at least one prompt")
    if timed_generate is None:
        if hasattr(model, "timed_generate"):
            timed_generate = model.timed_generate
        else:
            def timed_generate(ids, n, ignore_eos):
                return hf_timed_generate(model, tokenizer, ids, n, ignore_eos)
    if isinstance(model, torch.nn.Module):
        model.eval()
    prompt_ids = render_prompts(tokenizer, prompts, system)
    # Untimed passes over every prompt: first calls fault in weights, allocate buffers and build
    # kernels per matrix shape (fbgemm JIT-compiles int8 GEMMs per shape, oneDNN caches bf16
    # primitives per shape) — seconds on a new prompt length. We time the steady state.
    for _ in range(warmup):
        for ids in prompt_ids:
            timed_generate(ids, min(8, max_new_tokens), ignore_eos)

    ttft, decode, total, texts = [], [], [], []
    n_tokens = 0
    release_memory()
    t_wall = time.perf_counter()
    busy0, own0 = _busy_cpu_s()
    with MemoryMeter() as mem:
        for ids in prompt_ids:
            t0 = time.perf_counter()
            new_ids, times = timed_generate(ids, max_new_tokens, ignore_eos)
            if not times:
                raise RuntimeError("the generator returned no tokens")
            n = len(times)
            n_tokens += n
            ttft.append(times[0] - t0)
            if n > 1 and times[-1] > times[0]:
                decode.append((n - 1) / (times[-1] - times[0]))
            total.append(n / max(times[-1] - t0, 1e-9))
            texts.append(tokenizer.decode(new_ids, skip_special_tokens=True).strip())
    wall = time.perf_counter() - t_wall
    busy1, own1 = _busy_cpu_s()
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
    log.info("generation: first token %.0f ms, decode %.1f tokens/s (%d prompts x %d tokens; "
             "other processes used %.0f%% of the CPU meanwhile)", 1000 * statistics.mean(ttft),
             statistics.mean(decode) if decode else float("nan"), len(prompt_ids),
             max_new_tokens, 100 * other)
    mbytes = model_bytes(model) if isinstance(model, torch.nn.Module) else getattr(
        model, "nbytes", lambda: None)()
    return SpeedResult(
        first_token_ms=1000 * statistics.mean(ttft),
        decode_tokens_per_s=statistics.mean(decode) if decode else float("nan"),
        total_tokens_per_s=statistics.mean(total),
        new_tokens=n_tokens,
        prompt_tokens=statistics.mean(len(i) for i in prompt_ids),
        prompts=len(prompt_ids),
        peak_rss_mb=mem.peak / MB,
        gen_rss_delta_mb=mem.peak_delta / MB,
        other_cpu_pct=100 * min(other, 1.0),
        model_mb=None if mbytes is None else mbytes / MB,
        wall_s=wall,
        texts=texts,
    )


def warm_runtime() -> None:
    """Run one tiny generation so one-time costs (lazy imports, thread pools, allocator arenas:
    ~150 MB and seconds here) are paid before the first variant is measured, not charged to it."""
    from ..models import load_lm

    model, tok = load_lm("tiny-llama")
    measure_generation(model, tok, DEFAULT_PROMPTS[:1], max_new_tokens=4, warmup=1)
    del model
    release_memory()


def threads() -> int:
    """Threads torch uses for CPU ops (other backends should use the same for a fair race)."""
    return torch.get_num_threads() or (os.cpu_count() or 1)
