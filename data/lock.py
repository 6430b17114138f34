"""One preparation at a time per dataset: an exclusive lock on <cache_dir>/<dataset dir name>.lock.

Every rank of a job, and every job of a sweep sharing the cache, prepares a dataset on first use. Under
the lock the first process tokenizes; the others block, then find its complete result and reuse it.

The lock is an `flock` on the .lock file: the kernel drops it when its holder exits, killed or not, so
a crashed preparation leaves no stale lock, and the next process takes it and rewrites the partial
result. The lock file itself is left in place (deleting it could let two processes lock two different
files). On NFS, Linux clients emulate flock with POSIX byte-range locks.

Some cluster file systems refuse flock (Lustre mounted without `-o flock`: ENOSYS). There the lock is
an owner file, `<name>.lock.owner`, created with O_EXCL (atomic on every POSIX file system) and
holding the owner's host and pid; it is deleted on release. A holder killed with SIGKILL leaves it
behind: a waiter on the same host sees that the pid is gone and takes the lock over; from another host
the file says which process to check before deleting it. (Two waiters taking over the same stale
file at the same instant could both proceed; only a crash leaves such a file.)

Not reentrant: a second acquisition in the same process blocks on the first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FLOCK_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
POLL_S = 1.0  # how often a waiter looks at an owner file
EMPTY_STALE_S = 60.0  # an owner file still empty after this long lost its writer


def lock_path(directory: Path) -> Path:
    """The lock file beside a dataset directory: <cache_dir>/<dataset dir name>.lock."""
    directory = Path(directory)
    return directory.parent / f"{directory.name}.lock"


def _waiting(directory: Path, lock: Path, owner: str = "") -> None:
    print(f"waiting for another process{owner} to finish preparing {directory} (lock {lock})", flush=True)


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
            _waiting(directory, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in FLOCK_UNSUPPORTED:
                raise
            with owner_file_lock(directory, path):
                yield path
            return
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _owner_alive(text: str) -> bool | None:
    """Whether the owner a lock file names is running: None when it is on another host (unknowable)."""
    host, _, pid = text.strip().rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return None if host != socket.gethostname() else False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def owner_file_lock(directory: Path, lock: Path) -> Iterator[None]:
    """The O_EXCL owner-file lock (`<lock>.owner`), for file systems without flock."""
    owner = lock.with_name(lock.name + ".owner")
    said = False
    while True:
        try:
            fd = os.open(owner, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                text = owner.read_text()
            except FileNotFoundError:  # released between our open and read
                continue
            dead = _owner_alive(text) is False if text else time.time() - owner.stat().st_mtime > EMPTY_STALE_S
            if dead:  # a holder on this host that died (or one killed before it wrote its name): take over
                owner.unlink(missing_ok=True)
                continue
            if not said:
                elsewhere = " on another host" if _owner_alive(text) is None else ""
                _waiting(directory, owner, f" ({text.strip() or 'starting'}{elsewhere}; flock is unsupported here, so "
                                           f"if that process is gone, delete {owner})")
                said = True
            time.sleep(POLL_S)
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield
    finally:
        owner.unlink(missing_ok=True)
