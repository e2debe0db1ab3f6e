"""Start the service in a child process and stop it again: for the demo pipeline, the RAGFlow
lab, the load benchmark and the tests, which all talk to a real server over HTTP.

    with Server(["generation.model=tiny-llama", "data_dir=/tmp/x"]) as srv:
        requests.get(srv.url + "/health")

The child is ``python -m llmtech.cli serve run`` with the given ``key=value`` overrides on a
free port; ``start`` waits until ``/health`` answers (or the child dies, whose log is then in
the error). ``kill()`` ends it abruptly (SIGKILL), as a crash would. The child's output goes to
``log_file``, or to a temporary file that leaving the ``with`` block deletes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import LlmtechError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, overrides: list[str] | None = None, config: str | Path | None = None,
                 port: int | None = None, timeout_s: float = 180, env: dict | None = None,
                 log_file: str | Path | None = None):
        self.port = port or free_port()
        self.overrides = [*(overrides or []), f"port={self.port}", "host=127.0.0.1"]
        self.config, self.timeout_s = config, timeout_s
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._temp_log = log_file is None
        self.log = Path(log_file) if log_file else \
            Path(tempfile.mkstemp(prefix="llmtech-serve-", suffix=".log")[1])

    def start(self) -> "Server":
        import requests

        cmd = [sys.executable, "-m", "llmtech.cli", "serve", "run"]
        if self.config:
            cmd += ["--config", str(self.config)]
        cmd += self.overrides
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        end = time.time() + self.timeout_s
        while time.time() < end:
            if self.proc.poll() is not None:
                raise LlmtechError(f"the server exited with {self.proc.returncode}:\n"
                                   + self.log_text()[-3000:])
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        text = self.log_text()[-3000:]
        self.stop()
        raise LlmtechError(f"the server did not answer within {self.timeout_s:.0f} s:\n" + text)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)  # graceful: uvicorn finishes and closes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._temp_log:
            self.log.unlink(missing_ok=True)
