import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SUPPORT = ROOT / "data" / "support"


def run_cli(*args, timeout=600, env=None, cwd=ROOT):
    """Run the `llmtech` CLI in a subprocess; returns CompletedProcess with text output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "llmtech.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=e)


def run_script(path, *args, timeout=900):
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny():
    from llmtech import models

    return models.load_lm("tiny-llama")


@pytest.fixture(scope="session")
def smol():
    from llmtech import models

    return models.load_lm("smollm2-135m")


def shared_or_skip(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"public dataset ../shared/data/{name} is not present on this machine")
    return p


def load_lab_module(path, name: str):
    """Import a lab script as a module (its ``Config`` and ``main``) without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
