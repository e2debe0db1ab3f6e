"""Training-log inspection: read a run's logs, plot them and diagnose what went wrong.

Three formats are read, each tolerantly: a malformed or truncated line (or record) is reported
as ``file:line`` and skipped, and everything else is still read.

* ``trainer_log.jsonl`` -- one JSON object per line, written by
  ``llmtech.train.callbacks.JsonlLogCallback`` (``step``, ``loss``, ``grad_norm``,
  ``learning_rate``, ``num_input_tokens_seen``, ``train_runtime``, ``eval_loss`` ...);
* ``trainer_state.json`` -- Hugging Face Trainer's checkpoint state; its ``log_history`` list
  holds the same rows (a truncated file is read up to the break);
* TensorBoard event files -- read with TensorBoard's own ``EventAccumulator``; they add the wall
  time of every point and the run's ``TrainingArguments`` (the ``args`` text).

``inspect(path, settings)`` merges what it read and runs the detectors (thresholds in
``InspectSettings``): NaN/inf, loss and grad-norm spikes, divergence, plateaus, learning-rate
schedule mistakes (no warmup although one was configured, no decay, jumps, restarts, a zero
learning rate), steps that go backwards, sources that disagree and unreadable input.
``write_outputs`` writes ``diagnosis.md`` (Chinese), ``findings.json`` and
``log_inspection.png``. ``inject_fault`` writes a copy of healthy logs with one known fault, so
the detectors can be shown (and tested) to find it.

CLI: ``python -m llmtech.track.logs RUN_DIR_OR_FILE [--out DIR] [--config F.yaml] [key=value ...]``
prints the inspection as JSON; it exits 2 only when the input cannot be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..config import StrictModel, load_config
from ..errors import DataError, LlmtechError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

JSONL_NAME = "trainer_log.jsonl"
STATE_NAME = "trainer_state.json"
EVENTS_GLOB = "events.out.tfevents.*"
CHECKED = ("loss", "eval_loss", "grad_norm", "learning_rate")  # metrics the detectors use
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
PRIORITY = {"jsonl": 0, "trainer_state": 1, "tensorboard": 2}  # tie-break when merging sources


# --------------------------------------------------------------------------- settings

class InspectSettings(StrictModel):
    """Detection thresholds. The defaults suit logs written every 1-10 steps; each field is a
    ``key=value`` override on the CLI (and ``inspect.<key>=...`` in the L3.04 lab)."""

    min_points: int = 5
    """Curves with fewer finite points are not checked for spikes, divergence or plateaus."""
    spike_window: int = 8
    """A point's baseline is the median of the previous ``spike_window`` points."""
    spike_ratio: float = 1.5
    """A loss spike is at least ``spike_ratio`` x its baseline ..."""
    spike_sigmas: float = 6.0
    """... and ``spike_sigmas`` robust standard deviations (1.4826 x MAD of the baseline window,
    at least 2% of the baseline) above it ..."""
    spike_recover: int = 5
    """... and falls back below halfway within this many points (a jump that stays up is left to
    the divergence check; a jump on the very last point counts as a spike)."""
    grad_spike_ratio: float = 5.0
    """The same test for ``grad_norm``, which is noisier than the loss."""
    smooth: int = 5
    """Width of the trailing median that smooths the loss for the divergence check."""
    diverge_ratio: float = 1.5
    """Divergence: the smoothed loss ends at ``diverge_ratio`` x its minimum or higher ..."""
    diverge_min_points: int = 3
    """... with at least this many points after the minimum."""
    plateau_min_points: int = 8
    plateau_min_fraction: float = 0.25
    """A plateau window spans max(plateau_min_points, plateau_min_fraction x points) points ..."""
    plateau_min_improvement: float = 0.02
    """... in which a straight-line fit of the loss moves by less than this fraction ..."""
    plateau_max_noise: float = 0.05
    """... the scatter around that line is below this fraction of the loss (a noisier curve
    cannot show a plateau; nothing is guessed) ..."""
    plateau_lr_fraction: float = 0.1
    """... and the learning rate is still above this fraction of its peak (a flat loss once the
    schedule has decayed is convergence, not a plateau)."""
    warmup_steps: float | None = None
    """Configured warmup (< 1: fraction of max_steps). None: from the TensorBoard ``args``."""
    scheduler: str | None = None
    """Configured scheduler (cosine, linear, constant ...). None: from the TensorBoard ``args``."""
    max_steps: int | None = None
    """Planned steps. None: from the ``args`` or trainer_state.json's ``max_steps``."""
    warmup_start_fraction: float = 0.9
    """No warmup: in the first half of the configured warmup the learning rate is already at
    least this fraction of its peak."""
    lr_decay_min: float = 0.1
    """No decay: after its peak the learning rate never falls by this fraction (checked once the
    run is past half its planned steps when that is known; constant schedulers are exempt)."""
    lr_jump: float = 0.1
    """LR jump: once decay has begun, a rise between two points of more than this x peak ..."""
    lr_restart_fraction: float = 0.9
    """... and a rise back to this fraction of the peak or more is a schedule restart."""
    lr_min_points: int = 4
    """With fewer learning-rate points only the all-zero check runs."""
    lr_zero: float = 1e-12
    """Learning rates at or below this count as zero."""
    lr_zero_tail_fraction: float = 0.1
    """Zeros at the end of the log are the schedule's end, unless they last this fraction of the
    points (and >= 3 points): then the schedule ended early."""
    mismatch_rel: float = 1e-3
    """Two sources disagree when one step's loss differs by more than this (relative)."""


# --------------------------------------------------------------------------- data

class Point(NamedTuple):
    step: int
    value: float
    wall: float | None  # seconds since the epoch (TensorBoard only)
    where: str  # "file:line" or "events-dir:tag@step"


@dataclass
class Problem:
    """Input that could not be read: ``file:line: message`` (line is None for binary files)."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


@dataclass
class LogSource:
    """What one log file (or one TensorBoard folder) held."""

    path: Path
    kind: str  # "jsonl" | "trainer_state" | "tensorboard"
    series: dict[str, list[Point]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    records: int = 0  # rows, log_history entries or scalar events read
    config: dict[str, Any] = field(default_factory=dict)  # run settings found in the file
    texts: dict[str, str] = field(default_factory=dict)  # TensorBoard text summaries

    def add(self, key: str, step: int, value: float, wall: float | None, where: str) -> None:
        self.series.setdefault(key, []).append(Point(step, value, wall, where))


@dataclass
class Finding:
    """One diagnosis: what, where (steps), how sure (evidence numbers) and what to do."""

    kind: str
    severity: str  # "error" | "warning" | "info"
    metric: str
    step_start: int | None
    step_end: int | None
    message: str
    suggestion: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> str:
        if self.step_start is None:
            return "-"
        if self.step_start == self.step_end:
            return str(self.step_start)
        return f"{self.step_start}-{self.step_end}"

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"kind": self.kind, "severity": self.severity, "metric": self.metric,
                          "step_start": self.step_start, "step_end": self.step_end,
                          "message": self.message, "suggestion": self.suggestion,
                          "evidence": self.evidence})


TITLES = {
    "nan_inf": "NaN / Inf", "loss_spike": "loss 尖峰", "grad_norm_spike": "梯度范数尖峰",
    "divergence": "loss 发散", "plateau": "loss 平台期", "lr_zero": "学习率为 0",
    "lr_no_warmup": "缺少预热", "lr_no_decay": "学习率不衰减", "lr_jump": "学习率跳变",
    "lr_restart": "调度重启", "step_order": "步数倒退", "source_mismatch": "日志来源不一致",
    "unreadable_input": "无法读取的内容",
}

SUGGEST = {
    "nan_inf": "回到最后一个正常的检查点；学习率减半，确认梯度裁剪 max_grad_norm 已开启，fp16 改用 bf16 "
               "或开启 loss scaling；检查该步附近的数据（空回答、超长样本、异常字符）。",
    "loss_spike": "偶发尖峰多来自个别异常 batch：先检查该步的样本；若反复出现，降低学习率或加长 warmup，"
                  "确认梯度裁剪生效，增大 batch 或梯度累积以降低噪声。",
    "grad_norm_spike": "梯度范数突增常先于 loss 尖峰：确认 max_grad_norm 已设置（如 1.0），检查对应 batch 的数据，"
                       "必要时降低学习率。",
    "divergence": "loss 持续上升即训练发散：从最低点之前的检查点恢复，学习率降到原来的 1/2～1/10，加长 warmup，"
                  "开启或收紧梯度裁剪。",
    "plateau": "学习率还不小而 loss 不降：检查可训练参数量（是否误冻结）、标签是否被全部掩码为 -100、数据是否重复；"
               "学习率过小时调大，过大来回震荡时调小，或换用带衰减的调度器。",
    "lr_zero": "学习率为 0 时参数不会更新：检查 learning_rate 配置、调度器总步数（max_steps / num_train_epochs）"
               "是否与实际训练步数一致，续训时是否正确恢复了调度器。",
    "lr_no_warmup": "配置了 warmup 但学习率一开始就是峰值：检查 warmup_steps / warmup_ratio 是否传给了调度器"
                    "（自定义优化器/调度器时常被忽略），续训时是否重建了调度器。",
    "lr_no_decay": "学习率一直停在峰值附近：确认 lr_scheduler_type（cosine/linear）生效、调度器的总步数没有被设得过大，"
                   "自定义训练循环里每步都调用了 scheduler.step()。",
    "lr_jump": "学习率在衰减过程中突然上跳：检查是否中途手动改了学习率，续训时调度器状态是否与优化器一致。",
    "lr_restart": "调度在中途回到峰值重新开始：常见于续训时没有加载 scheduler.pt 或重建了调度器；若并非有意使用 "
                  "cosine_with_restarts，请用 resume_from_checkpoint 从检查点完整续训。",
    "step_order": "同一日志里步数倒退：通常是续训时旧记录没有截断，或两次运行写进了同一目录；以后一次为准，"
                  "或为每次运行使用独立的输出目录。",
    "source_mismatch": "不同日志来源在同一步的数值不一致，它们可能来自不同的运行（输出目录被复用）：清理旧文件后重新分析。",
    "unreadable_input": "这些行/记录无法解析，已跳过，其余内容照常分析；多为进程被杀时写了一半。需要完整曲线时，"
                        "可改读同一运行的 trainer_state.json 或 TensorBoard 事件文件。",
}


def _finding(kind: str, severity: str, metric: str, start, end, message: str, **evidence) -> Finding:
    return Finding(kind, severity, metric, None if start is None else int(start),
                   None if end is None else int(end), message, SUGGEST[kind],
                   {k: _plain(v) for k, v in evidence.items()})


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


def _jsonable(x):
    """Make ``x`` strict JSON: non-finite floats become the strings 'nan', 'inf', '-inf'."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Path):
        return str(x)
    return x


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(_jsonable(v))
    return str(v)


# --------------------------------------------------------------------------- readers

_NONFINITE_WORDS = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"}


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in _NONFINITE_WORDS:
        return float(v.strip().lower().replace("infinity", "inf"))
    return None


def _step(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _read_nonempty(path: Path, what: str) -> str:
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a {what}")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: empty {what} (no records)")
    return text


def jsonl_records(path: str | Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Every JSON-object line of a JSONL log as ``(line number, row)``, plus one Problem
    (``file:line``) per line that is not a JSON object. Raises DataError naming the file when it
    is missing or empty. NaN/Infinity literals (Python's json writes them) are accepted."""
    path = Path(path)
    text = _read_nonempty(path, "log file")
    lines = text.split("\n")
    unterminated = not text.endswith("\n")
    rows: list[tuple[int, dict]] = []
    problems: list[Problem] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if unterminated and i == len(lines):
                why = "truncated last line (no newline at the end: the writer was interrupted)"
            else:
                why = f"malformed JSON ({e.msg}, column {e.colno})"
            problems.append(Problem(str(path), i, f"{why}; line skipped"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(str(path), i, f"expected a JSON object, got {type(obj).__name__}; "
                                                  "line skipped"))
            continue
        rows.append((i, obj))
    return rows, problems


def _add_row(src: LogSource, row: dict, line: int) -> None:
    where = f"{src.path.name}:{line}"
    step = _step(row.get("step"))
    if step is None:
        src.problems.append(Problem(str(src.path), line, f"no integer 'step' ({row.get('step')!r}); "
                                                         "entry skipped"))
        return
    src.records += 1
    for key, v in row.items():
        if key == "step":
            continue
        x = _number(v)
        if x is None:
            if key in CHECKED:
                src.problems.append(Problem(str(src.path), line, f"'{key}' is not a number "
                                                                 f"({str(v)[:40]!r}); value skipped"))
            continue
        src.add(key, step, x, None, where)


def read_jsonl(path: str | Path) -> LogSource:
    """A ``trainer_log.jsonl`` as a LogSource (unreadable lines become its problems)."""
    path = Path(path)
    rows, problems = jsonl_records(path)
    src = LogSource(path, "jsonl", problems=problems)
    for line, row in rows:
        _add_row(src, row, line)
    return src


_STATE_KEYS = ("max_steps", "logging_steps", "eval_steps", "save_steps", "num_train_epochs",
               "train_batch_size", "global_step")


def read_trainer_state(path: str | Path) -> LogSource:
    """Hugging Face ``trainer_state.json``: its ``log_history`` entries, read one by one so a
    truncated or damaged file still yields every entry before the damage (reported as
    ``file:line``)."""
    path = Path(path)
    text = _read_nonempty(path, "trainer state file")
    src = LogSource(path, "trainer_state")
    try:
        doc = json.loads(text)
        broken = None
    except json.JSONDecodeError as e:
        doc, broken = None, e
    if doc is not None and not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object (Trainer state) at the top level, "
                        f"got {type(doc).__name__}")
    if doc is not None:
        src.config = {k: doc[k] for k in _STATE_KEYS if k in doc}
    m = re.search(r'"log_history"\s*:\s*\[', text)
    if not m:
        if broken is not None:
            src.problems.append(Problem(str(path), broken.lineno, f"malformed JSON ({broken.msg}) "
                                                                  "and no 'log_history' before it"))
        else:
            src.problems.append(Problem(str(path), None, "no 'log_history' list"))
        return src
    decoder = json.JSONDecoder()
    pos, n, line, last = m.end(), len(text), text.count("\n", 0, m.end()) + 1, m.end()
    damaged = False
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", last, pos)
        last = pos
        if pos >= n:
            src.problems.append(Problem(str(path), line, "file ends inside 'log_history' (truncated); "
                                                         "entries after this line are lost"))
            damaged = True
            break
        if text[pos] == "]":
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            why = f"malformed or truncated entry ({e.msg}, column {e.colno}); log_history read up to here"
            src.problems.append(Problem(str(path), e.lineno, why))
            damaged = True
            break
        if isinstance(obj, dict):
            _add_row(src, obj, line)
        else:
            src.problems.append(Problem(str(path), line, f"log_history entry is a {type(obj).__name__}, "
                                                         "not an object; skipped"))
        pos = end
    if broken is not None and not damaged:
        why = f"malformed JSON after log_history ({broken.msg}); log_history was read in full"
        src.problems.append(Problem(str(path), broken.lineno, why))
    return src


def _tfrecord_problems(file: Path) -> list[Problem]:
    """Walk an event file's TFRecord framing (length, CRCs) and report where it breaks.

    TensorBoard silently stops at a truncated or corrupt record; this says so, with the record
    number and byte offset."""
    try:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    except ImportError:  # pragma: no cover - tensorboard always ships it
        masked_crc32c = None
    problems: list[Problem] = []
    n = off = 0
    with open(file, "rb") as f:
        while True:
            head = f.read(12)
            if not head:
                break
            where = f"record {n + 1} (byte {off})"
            if len(head) < 12:
                why = f"truncated record header ({len(head)} of 12 bytes); the file ends mid-record"
                problems.append(Problem(str(file), None, f"{where}: {why}"))
                break
            length, head_crc = struct.unpack("<QI", head)
            if masked_crc32c is not None and masked_crc32c(head[:8]) != head_crc:
                problems.append(Problem(str(file), None, f"{where}: corrupt length field; TensorBoard "
                                                         "stops reading this file here"))
                break
            body = f.read(length + 4)
            if len(body) < length + 4:
                why = (f"truncated record ({len(body)} of {length + 4} bytes); "
                       f"events after record {n} are lost")
                problems.append(Problem(str(file), None, f"{where}: {why}"))
                break
            data_crc = struct.unpack("<I", body[length:])[0]
            if masked_crc32c is not None and masked_crc32c(body[:length]) != data_crc:
                problems.append(Problem(str(file), None, f"{where}: checksum mismatch; TensorBoard stops "
                                                         "reading this file here"))
                break
            n += 1
            off += 16 + length
    if n == 0 and not problems:
        problems.append(Problem(str(file), None, "empty event file"))
    return problems


def _event_targets(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted({f.parent for f in path.rglob(EVENTS_GLOB)})
    return []


def _accumulator(target: Path, purge_orphaned: bool):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_log = logging.getLogger("tensorboard")
    if tb_log.level == logging.NOTSET:  # its INFO lines ("directory watcher advancing ...") are noise here
        tb_log.setLevel(logging.WARNING)
    acc = EventAccumulator(str(target), size_guidance={"scalars": 0, "tensors": 0},  # 0 = keep all
                           purge_orphaned_data=purge_orphaned)
    acc.Reload()
    return acc


def tensorboard_scalars(log_dir: str | Path,
                        purge_orphaned: bool = True) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar under ``log_dir`` (searched recursively; or one event file) as
    ``{tag: [(step, value, wall_time), ...]}`` in the order written, read with TensorBoard's
    ``EventAccumulator``. ``purge_orphaned`` is TensorBoard's own rule (a step that goes backwards
    discards the later points, as after a restart). ``{}`` when there is no event file."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for target in _event_targets(Path(log_dir)):
        acc = _accumulator(target, purge_orphaned)
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value, e.wall_time) for e in acc.Scalars(tag))
    return out


def _tb_key(tag: str) -> str:
    """TensorBoard tag -> the key Trainer logged it under (``train/loss`` -> ``loss``,
    ``eval/loss`` -> ``eval_loss``), the inverse of transformers' ``rewrite_logs``."""
    head, _, rest = tag.partition("/")
    if not rest:
        return tag
    return rest if head == "train" else f"{head}_{rest}"


def read_tensorboard(target: str | Path) -> LogSource:
    """One TensorBoard run (a folder's own event files, or one event file) as a LogSource.

    Keeps every point (no purging, so a restart shows up as steps going backwards), the wall
    time of each, and the ``args`` text (TrainingArguments as JSON) as ``config``."""
    target = Path(target)
    if not target.exists():
        raise DataError(f"{target}: TensorBoard event file or folder not found")
    src = LogSource(target, "tensorboard")
    files = [target] if target.is_file() else sorted(target.glob(EVENTS_GLOB))
    if not files:
        raise DataError(f"{target}: no TensorBoard event files ({EVENTS_GLOB})")
    for f in files:
        src.problems += _tfrecord_problems(f)
    try:
        acc = _accumulator(target, purge_orphaned=False)
    except Exception as e:  # a damaged file can break TensorBoard's parser in many ways
        src.problems.append(Problem(str(target), None, f"TensorBoard could not read the events "
                                                       f"({type(e).__name__}: {e})"))
        return src
    tags = acc.Tags()
    for tag in tags.get("scalars", []):
        key = _tb_key(tag)
        for e in acc.Scalars(tag):
            src.add(key, int(e.step), float(e.value), float(e.wall_time), f"{target.name}:{tag}@{e.step}")
            src.records += 1
    for tag in tags.get("tensors", []):
        if not tag.endswith("/text_summary"):
            continue
        try:
            text = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode("utf-8")
        except (IndexError, UnicodeDecodeError):
            continue
        name = tag.split("/")[0]
        src.texts[name] = text
        if name == "args":
            try:
                cfg = json.loads(text)
                src.config = cfg if isinstance(cfg, dict) else {}
            except json.JSONDecodeError:
                src.problems.append(Problem(str(target), None, "the 'args' text is not JSON; "
                                                               "run settings unknown"))
    return src


READERS = {"jsonl": read_jsonl, "trainer_state": read_trainer_state, "tensorboard": read_tensorboard}


def _newest_checkpoint_state(run_dir: Path) -> Path | None:
    found = []
    for d in run_dir.glob("checkpoint-*"):
        step = d.name.rsplit("-", 1)[-1]
        if step.isdigit() and (d / STATE_NAME).is_file():
            found.append((int(step), d / STATE_NAME))
    return max(found)[1] if found else None


def discover(path: str | Path) -> list[tuple[str, Path]]:
    """The logs to read for ``path``: ``(kind, path)`` pairs.

    A file is read by its name (``*.jsonl``, ``*.json`` = trainer state, ``events.out.tfevents.*``);
    a run folder gives its ``trainer_log.jsonl``, ``trainer_state.json`` (or the newest
    ``checkpoint-*/trainer_state.json``) and every folder of TensorBoard event files below it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: not found (expected a run folder, {JSONL_NAME}, {STATE_NAME} or a "
                        "TensorBoard event file)")
    if p.is_file():
        if p.name.startswith("events.out.tfevents"):
            return [("tensorboard", p)]
        if p.suffix == ".jsonl":
            return [("jsonl", p)]
        if p.suffix == ".json":
            return [("trainer_state", p)]
        raise DataError(f"{p}: unsupported file type (expected *.jsonl, {STATE_NAME} or {EVENTS_GLOB})")
    found: list[tuple[str, Path]] = []
    if (p / JSONL_NAME).is_file():
        found.append(("jsonl", p / JSONL_NAME))
    state = p / STATE_NAME if (p / STATE_NAME).is_file() else _newest_checkpoint_state(p)
    if state is not None:
        found.append(("trainer_state", state))
    found += [("tensorboard", d) for d in _event_targets(p)]
    if not found:
        raise DataError(f"{p}: no training logs found (looked for {JSONL_NAME}, {STATE_NAME}, "
                        f"checkpoint-*/{STATE_NAME} and TensorBoard {EVENTS_GLOB})")
    return found


def load_sources(path: str | Path) -> list[LogSource]:
    """Read every log ``discover`` finds. In a folder, an unreadable file is reported and the
    others are still read; a DataError only when nothing at all could be read."""
    single = Path(path).is_file()
    sources = []
    for kind, target in discover(path):
        try:
            sources.append(READERS[kind](target))
        except DataError as e:
            if single:
                raise
            msg = str(e).removeprefix(f"{target}: ")
            sources.append(LogSource(target, kind, problems=[Problem(str(target), None, msg)]))
    if not any(s.series for s in sources):
        details = "; ".join(str(pr) for s in sources for pr in s.problems[:3])
        raise DataError(f"{path}: no readable log records" + (f" ({details})" if details else ""))
    return sources


# --------------------------------------------------------------------------- merging

def merge(sources: list[LogSource]) -> tuple[dict[str, list[Point]], dict[str, str]]:
    """One series per metric: from the source that covers the most distinct steps of it (ties go
    to jsonl, then trainer_state, then TensorBoard). Returns ``(series, {metric: source path})``."""
    series: dict[str, list[Point]] = {}
    chosen: dict[str, str] = {}
    for key in sorted({k for s in sources for k in s.series}):
        best = min((s for s in sources if s.series.get(key)),
                   key=lambda s: (-len({p.step for p in s.series[key]}), PRIORITY[s.kind]))
        series[key], chosen[key] = best.series[key], str(best.path)
    return series, chosen


def ordered(points: list[Point]) -> list[Point]:
    """Sorted by step, one point per step (a later write of the same step wins)."""
    by_step: dict[int, Point] = {}
    for p in points:
        by_step[p.step] = p
    return [by_step[s] for s in sorted(by_step)]


def run_config(sources: list[LogSource]) -> dict[str, Any]:
    """Run settings found in the logs: TensorBoard's TrainingArguments, then trainer_state's
    counters (whose ``max_steps`` is the real one when the arguments say -1)."""
    cfg: dict[str, Any] = {}
    for s in sources:
        if s.kind == "tensorboard":
            cfg.update(s.config)
    for s in sources:
        if s.kind == "trainer_state":
            for k, v in s.config.items():
                if k not in cfg or (k == "max_steps" and (cfg.get(k) or 0) <= 0):
                    cfg[k] = v
    return cfg


# --------------------------------------------------------------------------- detectors

def _arrays(points: list[Point]):
    fin = [p for p in points if math.isfinite(p.value)]
    return (np.array([p.step for p in fin], dtype=np.int64), np.array([p.value for p in fin], dtype=float),
            [p.where for p in fin])


def _runs(mask) -> list[tuple[int, int]]:
    """Inclusive index ranges where ``mask`` is true."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def check_nonfinite(series: dict[str, list[Point]]) -> list[Finding]:
    out = []
    for key in CHECKED:
        pts = series.get(key, [])
        bad = [p for p in pts if not math.isfinite(p.value)]
        if not bad:
            continue
        before = [p for p in pts if p.step < bad[0].step and math.isfinite(p.value)]
        values = sorted({_fmt(p.value) for p in bad})
        msg = (f"{key} 出现 {len(bad)} 个非有限值（{'/'.join(values)}），首次在第 {bad[0].step} 步"
               f"（{bad[0].where}）")
        if before:
            msg += f"；此前最后一个正常值 {before[-1].value:.4g}（第 {before[-1].step} 步）"
        out.append(_finding("nan_inf", "error", key, bad[0].step, bad[-1].step, msg, count=len(bad),
                            first_step=bad[0].step, first_value=_fmt(bad[0].value), first_at=bad[0].where,
                            last_finite=before[-1].value if before else None))
    return out


def check_spikes(points: list[Point], s: InspectSettings, metric: str = "loss") -> list[Finding]:
    """Isolated upward jumps against a rolling-median baseline that come back down."""
    steps, v, where = _arrays(points)
    n = len(v)
    if n < s.min_points:
        return []
    ratio = s.spike_ratio if metric == "loss" else s.grad_spike_ratio
    kind = "loss_spike" if metric == "loss" else "grad_norm_spike"
    hits: list[dict] = []
    for i in range(3, n):
        prior = v[max(0, i - s.spike_window):i]
        base = float(np.median(prior))
        if base <= 0:
            continue
        sigma = max(1.4826 * float(np.median(np.abs(prior - base))), 0.02 * base)
        if v[i] < base * ratio or v[i] - base < s.spike_sigmas * sigma:
            continue
        half = base + (v[i] - base) / 2
        back = next((j for j in range(i + 1, min(n, i + 1 + s.spike_recover)) if v[j] < half), None)
        if back is None and i < n - 1:
            continue  # stays up: a level shift or divergence, not a spike
        hits.append({"i": i, "base": base, "sigma": sigma, "back": back})
    groups: list[list[dict]] = []
    for h in hits:
        if groups and h["i"] - groups[-1][-1]["i"] <= 1:
            groups[-1].append(h)
        else:
            groups.append([h])
    out = []
    for g in groups:
        top = max(g, key=lambda h: v[h["i"]])
        i, base = top["i"], top["base"]
        back = g[-1]["back"]
        msg = (f"第 {steps[i]} 步 {metric} = {v[i]:.4g}，是前 {s.spike_window} 个点中位数 {base:.4g} 的 "
               f"{v[i] / base:.2f} 倍（高出 {(v[i] - base) / top['sigma']:.1f} 个稳健标准差）")
        msg += f"，第 {steps[back]} 步回落" if back is not None else "，日志在此结束，无法确认是否回落"
        out.append(_finding(kind, "warning", metric, steps[g[0]["i"]], steps[g[-1]["i"]], msg,
                            value=float(v[i]), baseline=base, ratio=float(v[i] / base),
                            robust_sigma=top["sigma"], at=where[i],
                            recovered_at_step=int(steps[back]) if back is not None else None))
    return out


def _trailing_median(v, width: int):
    return np.array([np.median(v[max(0, i - width + 1):i + 1]) for i in range(len(v))])


def check_divergence(points: list[Point], s: InspectSettings) -> list[Finding]:
    """The smoothed loss climbs well above its minimum and stays there until the end."""
    steps, v, _ = _arrays(points)
    if len(v) < s.min_points:
        return []
    sm = _trailing_median(v, s.smooth)
    imin = int(np.argmin(sm))
    low, end = float(sm[imin]), float(sm[-1])
    if low <= 0 or len(v) - 1 - imin < s.diverge_min_points or end < low * s.diverge_ratio:
        return []
    cross = next(i for i in range(imin, len(v)) if sm[i] >= low * s.diverge_ratio)
    msg = (f"平滑后的 loss 在第 {steps[imin]} 步最低（{low:.4g}），之后持续上升，第 {steps[cross]} 步起超过 "
           f"{s.diverge_ratio:g} 倍，结束时为 {end:.4g}（{end / low:.2f} 倍）")
    return [_finding("divergence", "error", "loss", steps[imin], steps[-1], msg, best_smoothed=low,
                     final_smoothed=end, ratio=end / low, crossed_at_step=int(steps[cross]),
                     smooth_window=s.smooth)]


def _lr_at(lr_points: list[Point], lo: int, hi: int) -> float | None:
    vals = [p.value for p in lr_points if lo <= p.step <= hi and math.isfinite(p.value)]
    if vals:
        return float(np.median(vals))
    if not lr_points:
        return None
    xs = [p.step for p in lr_points]
    return float(np.interp((lo + hi) / 2, xs, [p.value for p in lr_points]))


def check_plateau(points: list[Point], lr_points: list[Point], s: InspectSettings) -> list[Finding]:
    """A long stretch where a line fit of the loss is flat and clean while the LR is still high."""
    steps, v, _ = _arrays(points)
    n = len(v)
    width = max(s.plateau_min_points, math.ceil(s.plateau_min_fraction * n))
    if n < max(width, s.min_points):
        return []
    lr_fin = [p for p in lr_points if math.isfinite(p.value)]
    peak = max((p.value for p in lr_fin), default=0.0)
    flagged = np.zeros(n, dtype=bool)
    for a in range(0, n - width + 1):
        x, y = steps[a:a + width].astype(float), v[a:a + width]
        mean = abs(float(y.mean()))
        if mean == 0 or x[-1] == x[0]:
            continue
        slope, icpt = np.polyfit(x, y, 1)
        move = abs(slope * (x[-1] - x[0])) / mean
        noise = float(np.std(y - (slope * x + icpt))) / mean
        if move >= s.plateau_min_improvement or noise >= s.plateau_max_noise:
            continue
        if peak > 0:
            lr = _lr_at(lr_fin, int(x[0]), int(x[-1]))
            if lr is not None and lr < s.plateau_lr_fraction * peak:
                continue
        flagged[a:a + width] = True
    out = []
    for a, b in _runs(flagged):
        x, y = steps[a:b + 1].astype(float), v[a:b + 1]
        slope, icpt = np.polyfit(x, y, 1)
        mean = float(y.mean())
        change = float(slope * (x[-1] - x[0]) / abs(mean))
        noise = float(np.std(y - (slope * x + icpt)) / abs(mean))
        lr = _lr_at(lr_fin, int(x[0]), int(x[-1])) if peak > 0 else None
        msg = (f"第 {steps[a]}-{steps[b]} 步共 {b - a + 1} 个点 loss 基本不动：均值 {mean:.4g}，直线拟合的总变化 "
               f"{change:+.2%}，波动 {noise:.2%}")
        if lr is not None:
            msg += f"；这段学习率中位数仍为峰值的 {lr / peak:.0%}"
        out.append(_finding("plateau", "warning", "loss", steps[a], steps[b], msg, points=b - a + 1,
                            mean_loss=mean, fitted_change=change, noise=noise,
                            lr_over_peak=None if lr is None else lr / peak))
    return out


def warmup_steps(s: InspectSettings, cfg: dict[str, Any]) -> float | None:
    """Configured warmup in steps (HF's rule: < 1 is a fraction of max_steps, rounded up)."""
    w = s.warmup_steps if s.warmup_steps is not None else cfg.get("warmup_steps")
    if not w and cfg.get("warmup_ratio"):
        w = cfg["warmup_ratio"]
    if not isinstance(w, (int, float)) or w <= 0:
        return None
    if w < 1:
        total = _max_steps(s, cfg)
        return float(math.ceil(total * w)) if total else None
    return float(w)


def _max_steps(s: InspectSettings, cfg: dict[str, Any]) -> int | None:
    m = s.max_steps if s.max_steps is not None else cfg.get("max_steps")
    return int(m) if isinstance(m, (int, float)) and m > 0 else None


def check_lr(points: list[Point], s: InspectSettings, cfg: dict[str, Any]) -> list[Finding]:
    """Learning-rate schedule mistakes: all zero / zero spans, no warmup although one was
    configured, no decay, jumps and restarts after decay began."""
    steps, lr, where = _arrays(points)
    n = len(lr)
    if n == 0:
        return []
    peak = float(lr.max())
    if peak <= s.lr_zero:
        if n < 2:
            return []
        return [_finding("lr_zero", "error", "learning_rate", steps[0], steps[-1],
                         f"全部 {n} 个记录点的学习率都是 0（第 {steps[0]}-{steps[-1]} 步），参数根本没有更新",
                         points=n, max_lr=peak)]
    out = []
    for a, b in _runs(lr <= s.lr_zero):
        length = b - a + 1
        if b == n - 1:
            if length >= 3 and length >= s.lr_zero_tail_fraction * n:
                out.append(_finding("lr_zero", "warning", "learning_rate", steps[a], steps[b],
                                    f"学习率在第 {steps[a]} 步提前降到 0，最后 {length} 个点不再训练"
                                    "（调度器总步数比实际训练少）", points=length, peak_lr=peak))
        elif length >= 2:
            out.append(_finding("lr_zero", "error", "learning_rate", steps[a], steps[b],
                                f"第 {steps[a]}-{steps[b]} 步学习率为 0（{length} 个点），这段没有训练",
                                points=length, peak_lr=peak))
    if n < s.lr_min_points:
        return out
    sched = str(s.scheduler or cfg.get("lr_scheduler_type") or "")
    warm = warmup_steps(s, cfg)
    if warm and warm >= 2:
        early = [i for i in range(n) if steps[i] <= max(1.0, warm / 2)]
        if early and lr[early[0]] >= s.warmup_start_fraction * peak:
            i = early[0]
            out.append(_finding("lr_no_warmup", "warning", "learning_rate", steps[i], steps[early[-1]],
                                f"配置了 {warm:g} 步 warmup，但第 {steps[i]} 步的学习率已是峰值的 "
                                f"{lr[i] / peak:.0%}（{lr[i]:.3g}，峰值 {peak:.3g}）；正常预热此时应约为 "
                                f"{min(1.0, steps[i] / warm):.0%}", warmup_steps=warm, lr=float(lr[i]),
                                peak_lr=peak, at=where[i]))
    ip = int(np.argmax(lr >= 0.999 * peak))
    post = lr[ip:]
    total = _max_steps(s, cfg)
    far_enough = total is None or steps[-1] >= 0.5 * total
    if (not sched.startswith("constant") and far_enough and len(post) >= s.lr_min_points
            and post.min() >= (1 - s.lr_decay_min) * peak):
        msg = (f"学习率在第 {steps[ip]} 步到达峰值 {peak:.3g} 后，{len(post)} 个点中最低仍为峰值的 "
               f"{post.min() / peak:.0%}，从未衰减")
        if sched:
            msg += f"（配置的调度器是 {sched}）"
        if total:
            msg += f"；已训练到第 {steps[-1]} / {total} 步"
        out.append(_finding("lr_no_decay", "warning", "learning_rate", steps[ip], steps[-1], msg,
                            peak_lr=peak, min_after_peak=float(post.min()), points=len(post),
                            scheduler=sched or None))
    decay = next((i for i in range(ip + 1, n) if lr[i] < lr[i - 1] * (1 - 1e-6)), None)
    if decay is not None:
        for i in range(decay + 1, n):
            rise = lr[i] - lr[i - 1]
            if rise <= s.lr_jump * peak:
                continue
            kind = "lr_restart" if lr[i] >= s.lr_restart_fraction * peak else "lr_jump"
            if kind == "lr_restart" and "restart" in sched:
                continue  # cosine_with_restarts does this on purpose
            what = "回到峰值附近，调度重新开始" if kind == "lr_restart" else "突然上跳"
            out.append(_finding(kind, "warning", "learning_rate", steps[i - 1], steps[i],
                                f"衰减开始后，学习率在第 {steps[i - 1]}→{steps[i]} 步从 {lr[i - 1]:.3g}（峰值的 "
                                f"{lr[i - 1] / peak:.0%}）{what}到 {lr[i]:.3g}（{lr[i] / peak:.0%}）",
                                before=float(lr[i - 1]), after=float(lr[i]), peak_lr=peak, at=where[i]))
    return out


def check_step_order(src: LogSource) -> list[Finding]:
    pts = src.series.get("loss") or []
    back = [(a, b) for a, b in zip(pts, pts[1:]) if b.step <= a.step]
    if not back:
        return []
    a, b = back[0]
    return [_finding("step_order", "warning", "loss", b.step, a.step,
                     f"{src.path.name} 里 loss 的步数倒退 {len(back)} 次，首次从第 {a.step} 步回到第 {b.step} 步"
                     f"（{b.where}）；分析时同一步以后写入的为准", count=len(back), first_at=b.where)]


def check_sources(sources: list[LogSource], s: InspectSettings) -> list[Finding]:
    out = []
    have = [x for x in sources if x.series.get("loss")]
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            va = {p.step: p.value for p in ordered(a.series["loss"])}
            vb = {p.step: p.value for p in ordered(b.series["loss"])}
            common = [st for st in sorted(va.keys() & vb.keys())
                      if math.isfinite(va[st]) and math.isfinite(vb[st])]
            diff = [st for st in common
                    if abs(va[st] - vb[st]) > s.mismatch_rel * max(abs(va[st]), abs(vb[st]), 1e-12)]
            if diff:
                st = diff[0]
                out.append(_finding("source_mismatch", "warning", "loss", diff[0], diff[-1],
                                    f"{a.path.name} 与 {b.path.name} 在 {len(diff)}/{len(common)} 个共同步上 loss "
                                    f"不一致，如第 {st} 步 {va[st]:.6g} vs {vb[st]:.6g}", differing=len(diff),
                                    common=len(common), first_step=st))
    return out


def check_problems(src: LogSource) -> list[Finding]:
    if not src.problems:
        return []
    shown = "；".join(f"{Path(p.file).name}:{p.line}: {p.message}" if p.line else
                     f"{Path(p.file).name}: {p.message}" for p in src.problems[:5])
    shown += "；……" if len(src.problems) > 5 else ""
    locations = ", ".join(f"{Path(p.file).name}:{p.line}" if p.line else Path(p.file).name
                          for p in src.problems)
    return [_finding("unreadable_input", "warning", "-", None, None,
                     f"{src.path} 有 {len(src.problems)} 处无法读取（其余 {src.records} 条已读入）：{shown}",
                     count=len(src.problems), records_read=src.records, locations=locations)]


# --------------------------------------------------------------------------- throughput + summary

def throughput(series: dict[str, list[Point]], sources: list[LogSource]) -> dict[str, Any]:
    """Steps/s and tokens/s per logging interval, evaluation time excluded.

    Time comes from Trainer's cumulative ``train_runtime`` (in every training log row), else from
    TensorBoard wall times; tokens from ``num_input_tokens_seen``."""
    clock: dict[int, float] = {}
    how = ""
    for p in series.get("train_runtime", []):
        if math.isfinite(p.value):
            clock.setdefault(p.step, p.value)  # first row of a step: the training log, not the summary
    if len(clock) >= 2:
        how = "train_runtime"
    else:
        clock = {}
        tb = [x for x in sources if x.kind == "tensorboard" and x.series.get("loss")]
        if tb:
            for p in max(tb, key=lambda x: len(x.series["loss"])).series["loss"]:
                if p.wall is not None:
                    clock[p.step] = p.wall
            how = "tensorboard wall_time"
    tokens = {p.step: p.value for p in ordered(series.get("num_input_tokens_seen", []))}
    out: dict[str, Any] = {"clock": how or None}
    tok_steps = sorted(tokens)
    if len(tok_steps) >= 2:
        per_step = [(tokens[b] - tokens[a]) / (b - a) for a, b in zip(tok_steps, tok_steps[1:]) if b > a]
        out["tokens_per_step"] = float(np.median(per_step)) if per_step else None
    if len(clock) < 2:
        return out
    evals: dict[int, float] = {}
    for p in series.get("eval_runtime", []):
        if math.isfinite(p.value):
            evals[p.step] = evals.get(p.step, 0.0) + p.value
    steps = sorted(clock)
    curve, total_t, total_steps, total_tok = [], 0.0, 0, 0.0
    for a, b in zip(steps, steps[1:]):
        dt = clock[b] - clock[a] - evals.get(a, 0.0)  # an evaluation at step a runs after its log
        if dt <= 0:
            continue
        row = {"step": b, "steps_per_s": (b - a) / dt}
        total_t, total_steps = total_t + dt, total_steps + (b - a)
        if a in tokens and b in tokens:
            row["tokens_per_s"] = (tokens[b] - tokens[a]) / dt
            total_tok += tokens[b] - tokens[a]
        curve.append(row)
    if total_t > 0:
        out["steps_per_s"] = total_steps / total_t
        if total_tok:
            out["tokens_per_s"] = total_tok / total_t
    out["curve"] = curve
    return out


def summarize(series: dict[str, list[Point]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    loss = [p for p in ordered(series.get("loss", [])) if math.isfinite(p.value)]
    if loss:
        out.update(first_step=loss[0].step, last_step=loss[-1].step, loss_points=len(loss),
                   loss_first=loss[0].value, loss_last=loss[-1].value,
                   loss_min=min(p.value for p in loss))
    ev = [p for p in ordered(series.get("eval_loss", [])) if math.isfinite(p.value)]
    if ev:
        out.update(eval_points=len(ev), eval_loss_first=ev[0].value, eval_loss_last=ev[-1].value)
    lr = [p.value for p in series.get("learning_rate", []) if math.isfinite(p.value)]
    if lr:
        out.update(lr_peak=max(lr), lr_last=lr[-1])
    return out


# --------------------------------------------------------------------------- inspect

@dataclass
class Inspection:
    """Everything ``inspect`` found about one run (or one log file)."""

    path: Path
    sources: list[LogSource]
    series: dict[str, list[Point]]
    chosen: dict[str, str]
    config: dict[str, Any]
    findings: list[Finding]
    throughput: dict[str, Any]
    summary: dict[str, Any]
    settings: InspectSettings

    def counts(self) -> dict[str, int]:
        return {sev: sum(f.severity == sev for f in self.findings) for sev in SEVERITY_RANK}

    def kinds(self, severity: str | None = None) -> set[str]:
        return {f.kind for f in self.findings if severity is None or f.severity == severity}

    def problems(self) -> list[Problem]:
        return [p for s in self.sources for p in s.problems]

    def to_dict(self) -> dict[str, Any]:
        cfg_keys = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_steps",
                    "num_train_epochs", "max_grad_norm", "logging_steps")
        return _jsonable({
            "path": str(self.path),
            "sources": [{"path": str(s.path), "kind": s.kind, "records": s.records,
                         "problems": [str(p) for p in s.problems]} for s in self.sources],
            "metric_sources": {k: v for k, v in self.chosen.items() if k in CHECKED},
            "config": {k: self.config[k] for k in cfg_keys if k in self.config},
            "summary": self.summary,
            "throughput": {k: v for k, v in self.throughput.items() if k != "curve"},
            "counts": self.counts(),
            "findings": [f.to_dict() for f in self.findings],
        })


def inspect(path: str | Path, settings: InspectSettings | None = None) -> Inspection:
    """Read the logs at ``path`` (a run folder or one log file) and diagnose them."""
    s = settings or InspectSettings()
    sources = load_sources(path)
    series, chosen = merge(sources)
    cfg = run_config(sources)
    findings: list[Finding] = []
    for src in sources:
        findings += check_problems(src) + check_step_order(src)
    findings += check_sources(sources, s)
    clean = {k: ordered(v) for k, v in series.items()}
    findings += check_nonfinite(clean)
    loss, lr = clean.get("loss", []), clean.get("learning_rate", [])
    findings += check_spikes(loss, s, "loss") + check_spikes(clean.get("grad_norm", []), s, "grad_norm")
    findings += check_divergence(loss, s) + check_plateau(loss, lr, s) + check_lr(lr, s, cfg)
    findings.sort(key=lambda f: (SEVERITY_RANK[f.severity], -1 if f.step_start is None else f.step_start))
    return Inspection(Path(path), sources, clean, chosen, cfg, findings, throughput(series, sources),
                      summarize(series), s)


# --------------------------------------------------------------------------- outputs

def _evidence_text(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in ev.items() if v is not None and k != "locations")


def report_markdown(insp: Inspection) -> str:
    """The diagnosis report (Chinese): sources, overview, findings with evidence and advice."""
    c = insp.counts()
    lines = ["# 训练日志诊断报告", "", f"输入：`{insp.path}`", "", "## 读取的日志", "",
             "| 文件 | 类型 | 读入记录 | 无法读取 |", "|---|---|---|---|"]
    for src in insp.sources:
        lines.append(f"| `{src.path}` | {src.kind} | {src.records} | {len(src.problems)} |")
    used = {k: Path(v).name for k, v in insp.chosen.items() if k in CHECKED}
    if used:
        lines += ["", "各指标采用的来源：" + "，".join(f"{k} ← {v}" for k, v in used.items())]
    t, sm = insp.throughput, insp.summary
    several = lambda *keys: "/".join(_fmt(sm.get(k, "-")) for k in keys)  # noqa: E731
    rows = [("步数", f"{sm.get('first_step', '-')}–{sm.get('last_step', '-')}"
                     f"（{sm.get('loss_points', 0)} 个 loss 点）"),
            ("loss 首/末/最低", several("loss_first", "loss_last", "loss_min")),
            ("eval loss 首/末", several("eval_loss_first", "eval_loss_last")),
            ("学习率 峰值/最后", several("lr_peak", "lr_last")),
            ("吞吐 tokens/s", _fmt(t.get("tokens_per_s", "-"))),
            ("吞吐 steps/s", _fmt(t.get("steps_per_s", "-"))),
            ("每步 tokens", _fmt(t.get("tokens_per_step", "-"))), ("计时来源", t.get("clock") or "无")]
    lines += ["", "## 概况", "", "| 项目 | 值 |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines += ["", f"## 诊断结果：错误 {c['error']}，警告 {c['warning']}，提示 {c['info']}", ""]
    if not insp.findings:
        lines.append("未发现问题。")
    else:
        lines += ["| 严重度 | 问题 | 指标 | 步范围 | 说明与证据 | 建议 |", "|---|---|---|---|---|---|"]
        for f in insp.findings:
            cell = (f.message + "（" + _evidence_text(f.evidence) + "）").replace("|", "\\|")
            lines.append(f"| {f.severity} | {TITLES[f.kind]} | {f.metric} | {f.steps} | {cell} | "
                         f"{f.suggestion.replace('|', '/')} |")
    probs = insp.problems()
    if probs:
        lines += ["", "## 无法读取的内容（文件:行）", ""] + [f"- `{p}`" for p in probs]
    return "\n".join(lines) + "\n"


def figure(insp: Inspection):
    """Loss (+ eval loss), grad norm, learning rate and throughput, with findings shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    panels = {"loss": axes[0, 0], "grad_norm": axes[0, 1], "learning_rate": axes[1, 0]}
    for key, ax in panels.items():
        pts = insp.series.get(key, [])
        fin = [p for p in pts if math.isfinite(p.value)]
        if fin:
            ax.plot([p.step for p in fin], [p.value for p in fin], ".-", ms=3, label=f"train {key}")
        bad = [p for p in pts if not math.isfinite(p.value)]
        if bad:
            top = max((p.value for p in fin), default=1.0)
            ax.plot([p.step for p in bad], [top] * len(bad), "rx", ms=9, label="NaN/inf")
        if key == "loss":
            ev = [p for p in insp.series.get("eval_loss", []) if math.isfinite(p.value)]
            if ev:
                ax.plot([p.step for p in ev], [p.value for p in ev], "o--", label="eval loss")
        if key == "grad_norm" and len(fin) > 1 and min(p.value for p in fin) > 0 and \
                max(p.value for p in fin) / min(p.value for p in fin) > 100:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        if not pts:
            ax.text(0.5, 0.5, f"no {key} in the logs", ha="center", transform=ax.transAxes)
    for f in insp.findings:
        ax = panels.get(f.metric)
        if ax is None or f.step_start is None:
            continue
        color = "red" if f.severity == "error" else "orange"
        lo, hi = f.step_start - 0.5, f.step_end + 0.5
        ax.axvspan(lo, hi, color=color, alpha=0.15)
        ax.text(lo, 1.0, f.kind, transform=ax.get_xaxis_transform(), va="top", fontsize=7, color=color)
    ax = axes[1, 1]
    curve = insp.throughput.get("curve") or []
    key = "tokens_per_s" if curve and all("tokens_per_s" in r for r in curve) else "steps_per_s"
    if curve:
        ax.plot([r["step"] for r in curve], [r[key] for r in curve], ".-", ms=3)
        ax.set_title(f"throughput ({key.replace('_per_s', '/s')}, clock: {insp.throughput.get('clock')})")
        ax.set_xlabel("step")
    else:
        ax.text(0.5, 0.5, "no timing in the logs", ha="center", transform=ax.transAxes)
        ax.set_title("throughput")
    for a in panels.values():
        if a.lines:
            a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_outputs(insp: Inspection, out_dir: str | Path) -> dict[str, Path]:
    """``diagnosis.md``, ``findings.json`` and ``log_inspection.png`` in ``out_dir``."""
    from ..io import atomic_savefig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": atomic_write_text(out / "diagnosis.md", report_markdown(insp)),
             "json": atomic_write_json(out / "findings.json", insp.to_dict()),
             "figure": atomic_savefig(figure(insp), out / "log_inspection.png", dpi=100)}
    return paths


# --------------------------------------------------------------------------- fault injection

FAULTS: dict[str, tuple[str, ...]] = {
    # fault -> the finding kinds that count as detecting it
    "spike": ("loss_spike", "grad_norm_spike"),
    "nan": ("nan_inf",),
    "divergence": ("divergence",),
    "plateau": ("plateau",),
    "lr_no_warmup": ("lr_no_warmup",),
    "lr_no_decay": ("lr_no_decay",),
    "lr_restart": ("lr_restart", "lr_jump"),
    "lr_zero": ("lr_zero",),
    "malformed_lines": ("unreadable_input",),
    "truncated_file": ("unreadable_input",),
}


@dataclass
class InjectedFault:
    fault: str
    path: Path
    steps: tuple[int, int] | None  # where the fault is, for step-based faults
    lines: list[int]  # lines that must be reported, for line faults
    note: str  # what was done (Chinese)

    @property
    def expect(self) -> tuple[str, ...]:
        return FAULTS[self.fault]


def _kind_of(path: Path) -> str:
    if path.is_dir() or path.name.startswith("events.out.tfevents"):
        return "tensorboard"
    return "jsonl" if path.suffix == ".jsonl" else "trainer_state"


def _mutate_rows(fault: str, rows: list[dict], at: float, warmup: float | None, seed: int):
    """Apply a step-based fault to log rows in place; returns (rows, (first, last step), note)."""
    train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    lrs = [r for r in rows if isinstance(r.get("learning_rate"), (int, float))]
    if len(train) < 8:
        raise DataError(f"need at least 8 logged training steps to inject '{fault}', got {len(train)}")
    k = min(max(int(at * len(train)), 3), len(train) - 3)
    r0 = train[k]
    if fault == "spike":
        r0["loss"] *= 3.0
        if "grad_norm" in r0:
            r0["grad_norm"] *= 20.0
        return rows, (r0["step"], r0["step"]), f"第 {r0['step']} 步 loss ×3、grad_norm ×20"
    if fault == "nan":
        r0["loss"] = float("nan")
        if "grad_norm" in r0:
            r0["grad_norm"] = float("inf")
        kept = [r for r in rows if r.get("step", 0) <= r0["step"]]
        return kept, (r0["step"], r0["step"]), f"第 {r0['step']} 步 loss=NaN、grad_norm=inf，之后训练停止"
    if fault == "divergence":
        base = r0["loss"]
        for j, r in enumerate(train[k:]):
            r["loss"] = base * 1.25 ** j
            if "grad_norm" in r:
                r["grad_norm"] *= 1.3 ** j
        return rows, (r0["step"], train[-1]["step"]), f"从第 {r0['step']} 步起 loss 每步 ×1.25"
    if fault == "plateau":
        k = min(max(int(0.3 * len(train)), 2), len(train) - 3)
        r0, base = train[k], train[k]["loss"]
        noise = np.random.default_rng(seed).standard_normal(len(train) - k)
        for r, e in zip(train[k:], noise):
            r["loss"] = base * (1 + 0.003 * float(e))
        return rows, (r0["step"], train[-1]["step"]), f"从第 {r0['step']} 步起 loss 固定在 {base:.4g}（±0.3% 噪声）"
    if not lrs:
        raise DataError(f"no learning_rate in the logs: cannot inject '{fault}'")
    peak = max(r["learning_rate"] for r in lrs)
    ip = next(i for i, r in enumerate(lrs) if r["learning_rate"] >= 0.999 * peak)
    if fault == "lr_no_warmup":
        if not warmup:
            raise DataError("lr_no_warmup needs the configured warmup (warmup_steps)")
        hit = [r for r in lrs if r["step"] <= warmup]
        for r in hit:
            r["learning_rate"] = peak
        return rows, (hit[0]["step"], hit[-1]["step"]), f"预热期（前 {warmup:g} 步）学习率直接设为峰值 {peak:.3g}"
    if fault == "lr_no_decay":
        for r in lrs[ip:]:
            r["learning_rate"] = peak
        return rows, (lrs[ip]["step"], lrs[-1]["step"]), f"第 {lrs[ip]['step']} 步后学习率一直保持峰值"
    if fault == "lr_restart":
        kk = min(max(int(at * len(lrs)), ip + 2), len(lrs) - 2)
        orig = [r["learning_rate"] for r in lrs]
        for j, r in enumerate(lrs[kk:]):
            r["learning_rate"] = orig[min(ip + j, len(orig) - 1)]
        return rows, (lrs[kk]["step"], lrs[-1]["step"]), f"第 {lrs[kk]['step']} 步学习率调度从峰值重新开始"
    if fault == "lr_zero":
        for r in lrs:
            r["learning_rate"] = 0.0
        return rows, (lrs[0]["step"], lrs[-1]["step"]), "学习率全部设为 0"
    raise ValueError(f"unknown fault '{fault}'")


def _inject_lines(src: Path, dest: Path) -> InjectedFault:
    lines = src.read_text(encoding="utf-8").splitlines()
    if len(lines) < 8:
        raise DataError(f"{src}: need at least 8 lines to inject malformed lines")
    out = list(lines)
    i1, i2, i3 = len(out) // 4, len(out) // 2, (3 * len(out)) // 4
    row = json.loads(out[i2])
    row["loss"] = "0.5.1"
    out[i2] = json.dumps(row)  # a value that is not a number
    out[i1] = out[i1][: len(out[i1]) // 2]  # a half-written line followed by more records
    out.insert(i3, "[1, 2, 3]")  # valid JSON, not an object
    bad = [i1 + 1, i2 + 1, i3 + 1, len(out)]
    text = "\n".join(out[:-1]) + "\n" + out[-1][: len(out[-1]) // 2]  # truncated last line
    atomic_write_text(dest, text)
    return InjectedFault("malformed_lines", dest, None, bad,
                         f"第 {', '.join(map(str, bad))} 行分别是：半行、非数字 loss、非对象 JSON、被截断的最后一行")


def _truncate(src: Path, dest: Path) -> InjectedFault:
    data = src.read_bytes()
    cut = int(len(data) * 0.6)
    kind = _kind_of(src)
    if kind != "tensorboard":  # cut in the middle of a line, as a killed writer leaves it
        start = data.rfind(b"\n", 0, cut) + 1
        end = data.find(b"\n", start)
        cut = start + max(1, ((end if end >= 0 else len(data)) - start) // 2)
    atomic_write_bytes(dest, data[:cut])
    if kind == "tensorboard" and not _tfrecord_problems(dest):  # landed on a record boundary
        cut -= 5
        atomic_write_bytes(dest, data[:cut])
    line = data[:cut].count(b"\n") + 1
    if kind == "tensorboard":
        return InjectedFault("truncated_file", dest, None, [], f"事件文件在第 {cut} 字节处被截断（原 {len(data)} 字节）")
    if kind == "jsonl":  # the cut line is a truncated last line
        return InjectedFault("truncated_file", dest, None, [line], f"文件在第 {line} 行中间被截断")
    return InjectedFault("truncated_file", dest, None, [line], f"JSON 文件在第 {line} 行中间被截断")


def write_tensorboard(scalars: dict[str, list[tuple[int, float, float]]], out_dir: str | Path,
                      texts: dict[str, str] | None = None) -> Path:
    """Write scalars (``{tag: [(step, value, wall_time)]}``) and text summaries as a TensorBoard
    event file in ``out_dir``, with torch's SummaryWriter (the writer Trainer uses)."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(out))
    try:
        for name, text in (texts or {}).items():
            writer.add_text(name, text)
        events = sorted((wall, step, tag, value) for tag, pts in scalars.items()
                        for step, value, wall in pts)
        for wall, step, tag, value in events:
            writer.add_scalar(tag, value, global_step=step, walltime=wall)
    finally:
        writer.close()
    return out


def inject_fault(fault: str, source: str | Path, dest: str | Path, at: float = 0.5,
                 warmup_steps: float | None = None, seed: int = 0) -> InjectedFault:
    """Write a copy of the healthy log ``source`` (trainer_log.jsonl, trainer_state.json or a
    TensorBoard folder / event file) to ``dest`` with one fault of kind ``fault`` (see FAULTS).

    ``dest`` is a file for jsonl / trainer_state and for a truncated event file, else a folder.
    ``at`` places the fault (fraction of the logged steps); ``warmup_steps`` is the configured
    warmup that ``lr_no_warmup`` removes."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault '{fault}'; known: {', '.join(FAULTS)}")
    source, dest = Path(source), Path(dest)
    kind = _kind_of(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fault == "malformed_lines":
        if kind != "jsonl":
            raise ValueError("malformed_lines applies to a JSONL log")
        return _inject_lines(source, dest)
    if fault == "truncated_file":
        if kind == "tensorboard" and source.is_dir():
            source = max(source.glob(EVENTS_GLOB), key=lambda f: f.stat().st_size)
        return _truncate(source, dest)
    if kind == "jsonl":
        rows = [r for _, r in jsonl_records(source)[0]]
        rows, steps, note = _mutate_rows(fault, rows, at, warmup_steps, seed)
        atomic_write_jsonl(dest, rows)
    elif kind == "trainer_state":
        doc = json.loads(source.read_text(encoding="utf-8"))
        doc["log_history"], steps, note = _mutate_rows(fault, doc["log_history"], at, warmup_steps, seed)
        atomic_write_text(dest, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        texts = read_tensorboard(source).texts
        scalars = tensorboard_scalars(source)
        walls = {(tag, st): w for tag, pts in scalars.items() for st, _, w in pts}
        by_step: dict[int, dict] = {}
        for tag, pts in scalars.items():
            for st, val, _ in pts:
                by_step.setdefault(st, {"step": st})[_tb_key(tag)] = val
        rows = [by_step[st] for st in sorted(by_step)]
        rows, steps, note = _mutate_rows(fault, rows, at, warmup_steps, seed)
        kept = {r["step"]: r for r in rows}
        changed = {"loss", "grad_norm", "learning_rate"}  # the keys faults touch; others as written
        new = {tag: [(st, kept[st][_tb_key(tag)] if _tb_key(tag) in changed else val, walls[(tag, st)])
                     for st, val, _ in pts if st in kept and _tb_key(tag) in kept[st]]
               for tag, pts in scalars.items()}
        if dest.exists():
            shutil.rmtree(dest)
        write_tensorboard(new, dest, texts)
    return InjectedFault(fault, dest, (int(steps[0]), int(steps[1])), [], note)


def detected(insp: Inspection, fault: InjectedFault) -> list[Finding]:
    """The findings that detect ``fault``: an expected kind whose step range overlaps the fault's
    steps; for line faults, only if every injected line is reported as ``file:line``."""
    hits = [f for f in insp.findings if f.kind in fault.expect and (
        fault.steps is None or f.step_start is None
        or (f.step_start <= fault.steps[1] and f.step_end >= fault.steps[0]))]
    if fault.lines:
        reported = {p.line for p in insp.problems() if Path(p.file).name == fault.path.name}
        if not set(fault.lines) <= reported:
            return []
    return hits


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmtech.track.logs",
                                 description="Diagnose a training run's logs (trainer_log.jsonl, "
                                             "trainer_state.json, TensorBoard events); prints JSON.")
    ap.add_argument("path", help="run folder or one log file")
    ap.add_argument("--out", help="also write diagnosis.md, findings.json and log_inspection.png here")
    ap.add_argument("--config", help="YAML file with InspectSettings thresholds")
    ap.add_argument("overrides", nargs="*", help="threshold overrides, e.g. spike_ratio=2 warmup_steps=10")
    args = ap.parse_intermixed_args(argv)  # PATH, --out and key=value in any order
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_config(InspectSettings, args.config, args.overrides)
        insp = inspect(args.path, settings)
        if args.out:
            write_outputs(insp, args.out)
    except LlmtechError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(insp.to_dict(), ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
