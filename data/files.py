"""Files a killed process never leaves half-written: write a temporary sibling, fsync it, rename it.

    with atomic_file(path) as tmp:
        tmp.write_bytes(payload)            # or trainer.save_checkpoint(tmp), open(tmp, "w"), ...

Until the rename, `path` keeps its previous content (or stays absent), whenever the process dies.
Standard library only, so anything may import it cheaply (trainer/metrics.py, the analysis scripts).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path, rename: bool = True) -> Iterator[Path]:
    """Yield `.<name>.tmp` beside `path` to be written; when the block succeeds, fsync it and rename it
    over `path`; when it raises, delete it. The temporary name is fixed, so one left by a killed process
    is overwritten by the next write: one writer per path at a time (the preparation lock, rank 0).

    rename=False is for the other ranks of a save that rank 0 writes (Lightning's save_checkpoint):
    they pass the same path but neither fsync, rename nor delete anything."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if not rename:
        yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
