"""Run a training stage in N processes with the field's launcher (torchrun), not a home-made one.

``launch_sft(settings, nproc)`` writes the settings to ``<output_dir>/settings.yaml`` and runs

* ``nproc == 1``: ``python -m llmtech.cli train sft --config settings.yaml``
* ``nproc > 1``:  ``python -m torch.distributed.run --nproc_per_node N --master_port P
  -m llmtech.cli train sft --config settings.yaml``

so each process is the same ``llmtech train sft`` a user runs by hand. With ``deepspeed`` set in
the settings the HF Trainer hands the model to DeepSpeed (ZeRO stage, offload, buckets from the
JSON); without it, several processes give plain DDP. On a CPU the processes talk over gloo and
each gets ``cores // N`` threads, so one process and two processes use the same cores.

The run's output folder then holds ``result.json`` (written by rank 0; it carries every rank's
peak RSS), ``trainer_log.jsonl`` and ``launch.log`` (all processes' output).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import LlmtechError


class LaunchFailed(LlmtechError):
    """The launched processes exited with an error; the message carries the log's last lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config_file: str | Path, nproc: int, port: int | None = None) -> list[str]:
    """The command line that runs ``llmtech train sft --config config_file`` in ``nproc``
    processes."""
    stage = ["-m", "llmtech.cli", "train", "sft", "--config", str(config_file)]
    if nproc == 1:
        return [sys.executable, *stage]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), *stage]


def launch_sft(settings, nproc: int = 2, threads: int | None = None,
               timeout: float = 1800) -> dict[str, Any]:
    """Train ``settings`` (an ``SFTSettings``) in ``nproc`` processes; return rank 0's
    ``result.json`` with ``launch_command`` and ``launch_log`` added."""
    import json

    import yaml

    from ..io import atomic_write_text

    if nproc < 1:
        raise LlmtechError(f"nproc must be >= 1 (got {nproc})")
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "settings.yaml"
    atomic_write_text(cfg, yaml.safe_dump(settings.model_dump(mode="json"), allow_unicode=True,
                                          sort_keys=False))
    (out / "result.json").unlink(missing_ok=True)
    cmd = command(cfg, nproc)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    src = str(Path(__file__).resolve().parents[2])  # the llmtech the caller imported
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    log_file = out / "launch.log"
    with open(log_file, "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0 or not (out / "result.json").exists():
        tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        what = "timed out" if rc is None else f"exited with code {rc}"
        raise LaunchFailed(f"{' '.join(cmd[:6])} ... {what} (log: {log_file}):\n" + "\n".join(tail))
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    result.update(launch_command=" ".join(cmd), launch_log=str(log_file))
    return result
