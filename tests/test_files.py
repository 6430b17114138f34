"""data/files.py: atomic_file replaces a file whole or not at all, and imports nothing heavy."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from data.files import atomic_file


def test_the_block_s_writes_replace_the_file_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "sub" / "meta.json"  # the parent is created
    with atomic_file(path) as tmp:
        assert tmp == path.with_name(".meta.json.tmp") and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["meta.json"]


def test_an_exception_keeps_the_previous_file_and_deletes_the_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_text("previous")
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_fsync_comes_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    with atomic_file(tmp_path / "x") as tmp:
        tmp.write_bytes(b"1")
    assert calls == ["fsync", "replace"]


KILLED = """
import os, signal, sys
from data.files import atomic_file
with atomic_file(sys.argv[1]) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_the_previous_file_and_the_next_write_overwrites_its_temporary(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("previous")
    result = subprocess.run([sys.executable, "-c", KILLED, str(path)], cwd=ROOT)
    assert result.returncode == -9
    assert path.read_text() == "previous" and path.with_name(".metrics.csv.tmp").read_text() == "half"
    with atomic_file(path) as tmp:
        tmp.write_text("complete")
    assert path.read_text() == "complete"
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_rename_false_yields_the_same_temporary_and_touches_nothing(tmp_path):
    """The non-zero ranks of a checkpoint save that rank 0 writes."""
    path = tmp_path / "last.ckpt"
    path.write_text("previous")
    with atomic_file(path, rename=False) as tmp:
        assert tmp == path.with_name(".last.ckpt.tmp")
        tmp.write_text("rank 0's file")  # stands in for rank 0 writing it meanwhile
    assert path.read_text() == "previous" and tmp.read_text() == "rank 0's file"


def test_the_atomic_writer_and_metrics_csv_import_no_torch_numpy_or_tiktoken():
    probe = "import sys, data.files, trainer.metrics; print(sorted({'torch', 'numpy', 'tiktoken'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
