"""One preparation at a time per dataset: an exclusive `flock` on <cache_dir>/<dataset dir name>.lock.

Every rank of a job, and every job of a sweep sharing the cache, prepares a dataset on first use. Under
the lock the first process tokenizes; the others block, then find its complete result and reuse it.
The kernel drops the lock when its holder exits, killed or not, so a crashed preparation leaves no stale
lock: the next process takes it and rewrites the partial result. The lock file itself is left in place
(deleting it could let two processes lock two different files). Not reentrant: a second acquisition in
the same process blocks on the first. On NFS, Linux clients emulate flock with POSIX byte-range locks.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def lock_path(directory: Path) -> Path:
    """The lock file beside a dataset directory: <cache_dir>/<dataset dir name>.lock."""
    directory = Path(directory)
    return directory.parent / f"{directory.name}.lock"


@contextmanager
def preparation_lock(directory: Path) -> Iterator[Path]:
    """Hold the exclusive lock of `directory`'s preparation; if another process holds it, say so once
    on stdout and wait for it. Yields the lock file's path."""
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # "a": created if missing, never truncated
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish preparing {directory} (lock {path})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
