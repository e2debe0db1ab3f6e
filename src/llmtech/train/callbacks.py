"""Trainer callbacks: JSONL log, NaN/inf guard, loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from ..errors import DataError, TrainingDiverged
from ..io import atomic_savefig, atomic_write_text


class JsonlLogCallback(TrainerCallback):
    """Append every log event (loss, lr, grad norm, eval loss...) to ``trainer_log.jsonl``.

    On resume, entries past the checkpoint's step are dropped first, so the log never holds
    the same step twice.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path.exists() and state.global_step > 0 and state.is_world_process_zero:
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            atomic_write_text(self.path, "".join(x + "\n" for x in kept))
        elif state.global_step == 0 and self.path.exists() and state.is_world_process_zero:
            self.path.unlink()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class NanGuardCallback(TrainerCallback):
    """Stop with a clear message as soon as a logged loss or grad norm is NaN or infinite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss", "grad_norm"):
            v = (logs or {}).get(key)
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise TrainingDiverged(
                    f"training diverged at step {state.global_step}: {key} = {v}. Lower the "
                    "learning rate, enable gradient clipping (max_grad_norm) or check the data; "
                    f"the last good checkpoint in {args.output_dir} is kept")


def read_log(path: str | Path) -> list[dict]:
    """Every row of a ``trainer_log.jsonl`` ([] when the file is missing or empty). A malformed
    line is a DataError naming ``file:line``; ``llmtech.track.logs`` reads past such lines."""
    from ..track.logs import jsonl_records

    path = Path(path)
    if not path.exists() or not path.read_bytes().strip():
        return []
    rows, problems = jsonl_records(path)
    if problems:
        bad = problems[0]
        raise DataError(f"{bad.file}:{bad.line}: {bad.message.removesuffix('; line skipped')} "
                        f"(`python -m llmtech.track.logs {path}` reads past bad lines)")
    return [row for _, row in rows]


def plot_loss(log_path: str | Path, out_png: str | Path, title: str = "loss") -> Path | None:
    rows = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not ev:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return atomic_savefig(fig, out_png)


def loss_figure(runs: dict[str, str | Path], eval_loss: bool = True, title: str = "loss"):
    """One matplotlib figure with the train (and eval) loss curves of several runs' logs.

    ``runs`` maps a label to a ``trainer_log.jsonl`` path; returns the figure (caller saves it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, path in runs.items():
        rows = read_log(path)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            line, = ax.plot(*zip(*train), label=f"{label} train loss")
            if eval_loss and ev:
                ax.plot(*zip(*ev), "o--", color=line.get_color(), label=f"{label} eval loss")
        elif eval_loss and ev:
            ax.plot(*zip(*ev), "o--", label=f"{label} eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def read_tensorboard_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read every scalar back from the TensorBoard event files under ``log_dir``.

    Returns ``{tag: [(step, value), ...]}`` (e.g. ``"train/loss"``, ``"eval/loss"``), the same
    numbers the TensorBoard web page draws.
    """
    from ..track.logs import tensorboard_scalars

    return {tag: [(step, value) for step, value, _ in pts]
            for tag, pts in tensorboard_scalars(log_dir).items()}
