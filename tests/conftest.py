"""Shared fixtures: configs composed from the real tree, shrunk to a tiny model and short runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """The paper settings pin t5, llama2 and llama3, whose files come from the hub: offline, every test (and
    every train.py it starts) finds tiny ones in their id layouts under $MUONLAB_TOKENIZERS (configs' tokenizer_dir)."""
    if "MUONLAB_TOKENIZERS" in os.environ:
        return
    import tokenizer_files

    root = Path(tempfile.mkdtemp(prefix="muonlab-tokenizers-"))
    for name, make in (("t5", tokenizer_files.t5_model), ("llama2", tokenizer_files.llama2_model),
                       ("llama3", tokenizer_files.bpe_json)):
        (root / name).mkdir()
        make(root / name)
    os.environ["MUONLAB_TOKENIZERS"] = str(root)

# A tiny GPT-2 on Shakespeare: 128-token steps of 2 accumulated micro-batches, 20 steps.
TINY = [
    "model=gpt2_tiny", "data.seq_len=32", "data.micro_batch=2", "data.batch_tokens=128",
    "budget.tokens=2560", "eval.every_tokens=640", "eval.tokens=1024", "checkpoint.every_tokens=640",
    "callbacks=none",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenized Shakespeare for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """make_cfg(*overrides) -> the composed config of a tiny run in a fresh run dir."""
    from configs import compose

    def make(*overrides: str, run_dir: Path | None = None):
        run_dir = run_dir or tmp_path / "run"
        return compose(TINY + [f"run_dir={run_dir}", f"paths.cache_dir={cache_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The run dir of one tiny run (TINY), trained once for the tests of what comes after training."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run_cli("train.py", *TINY, f"run_dir={run_dir}", f"paths.cache_dir={run_dir.parent / 'cache'}")
    assert result.returncode == 0, result.stderr
    return run_dir


def load_script(name: str):
    """Import scripts/<name>.py as a module (the scripts folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command-line entry point of the repository (train.py, scripts/...) as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def start_and_signal(args: list[str], run_dir: Path, rows: int, sig: int = signal.SIGKILL, env: dict | None = None) -> tuple[int, str]:
    """Start `python train.py args`, send `sig` once metrics.csv has more than `rows` rows (SIGKILL: no
    chance to clean up), wait for it; returns (exit code, stdout)."""
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would block the run
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    csv, deadline = Path(run_dir) / "metrics.csv", time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if csv.is_file() and len(csv.read_text().splitlines()) > rows:
            break
        time.sleep(0.1)
    os.kill(process.pid, sig)
    process.wait(timeout=300)
    log.seek(0)
    return process.returncode, log.read()
