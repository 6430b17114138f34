"""Preparation is exclusive (data/lock.py): of several processes opening a missing dataset, one
tokenizes and the others wait for it, then reuse its result. Real processes, on Shakespeare."""

import errno
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from omegaconf import OmegaConf

from conftest import ROOT
from data.dataset import dataset_dir, prepare_dataset_unlocked
from data import lock
from data.lock import lock_path, preparation_lock
from configs import compose

# Opens the dataset as training does and prints its token counts.
OPEN = """
import sys
from omegaconf import OmegaConf
import data
from configs import compose
cfg = compose([f"paths.cache_dir={sys.argv[1]}"]).data
tokens = data.open_dataset(OmegaConf.to_container(cfg, resolve=True))
print("opened", len(tokens.splits["train"]), len(tokens.splits["val"]), flush=True)
"""
TOKENIZED = "tokens in"  # write_split's line: "train: 1 documents, 304,223 tokens in 1 shard(s)"


def start_open(cache) -> tuple[subprocess.Popen, object]:
    """`python -c OPEN cache` with its output in a file (readable while it runs)."""
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-c", OPEN, str(cache)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, log


def output(log) -> str:
    log.seek(0)
    return log.read()


def shakespeare(cache):
    return OmegaConf.to_container(compose([f"paths.cache_dir={cache}"]).data, resolve=True)


def test_a_process_waits_for_the_lock_holder_and_reuses_its_result(tmp_path):
    cfg = shakespeare(tmp_path)
    directory = dataset_dir(cfg)
    with preparation_lock(directory):
        process, log = start_open(tmp_path)
        deadline = time.time() + 60
        while "waiting for another process" not in output(log) and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # it stays blocked while the lock is held
        assert process.poll() is None, output(log)
        assert f"waiting for another process to finish preparing {directory} (lock {lock_path(directory)})" in output(log)
        prepare_dataset_unlocked(cfg)
        mtimes = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.bin")}
    assert process.wait(timeout=120) == 0, output(log)
    out = output(log)
    assert TOKENIZED not in out and out.count("waiting for another process") == 1
    assert "opened 304223 33803" in out
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("*.bin")} == mtimes and len(mtimes) == 2


def test_two_processes_started_together_tokenize_once(tmp_path):
    started = [start_open(tmp_path) for _ in range(2)]
    codes = [process.wait(timeout=120) for process, _ in started]
    outs = [output(log) for _, log in started]
    assert codes == [0, 0], outs
    assert sum(out.count(TOKENIZED) for out in outs) == 2  # one process wrote train and val, the other none
    assert sum(TOKENIZED in out for out in outs) == 1
    assert all("opened 304223 33803" in out for out in outs)


def flock_unsupported(*args):
    raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted without -o flock


def test_without_flock_an_owner_file_excludes_and_is_removed_on_release(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fcntl, "flock", flock_unsupported)
    monkeypatch.setattr(lock, "POLL_S", 0.05)
    directory = tmp_path / "dataset"
    owner = lock_path(directory).with_name(lock_path(directory).name + ".owner")
    order = []

    def second():
        with preparation_lock(directory):
            order.append("second")

    with preparation_lock(directory):
        assert owner.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert order == [] and waiter.is_alive()  # blocked while the owner file exists
        order.append("first")
    waiter.join(timeout=10)
    assert order == ["first", "second"] and not owner.exists()
    out = capsys.readouterr().out
    assert out.count("waiting for another process") == 1
    assert f"flock is unsupported here, so if that process is gone, delete {owner}" in out


def test_without_flock_the_owner_file_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fcntl, "flock", flock_unsupported)
    directory = tmp_path / "dataset"
    owner = lock_path(directory).with_name(lock_path(directory).name + ".owner")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")  # left by a killed holder
    def no_waiting(seconds):
        raise AssertionError(f"polled (slept {seconds} s) instead of taking the dead holder's file over at once")

    monkeypatch.setattr(time, "sleep", no_waiting)
    with preparation_lock(directory):
        assert owner.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert "waiting for another process" not in capsys.readouterr().out
    assert not owner.exists()
