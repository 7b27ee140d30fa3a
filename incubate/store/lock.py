"""One writer a stage folder: an exclusive flock held until the stage finishes or the process ends.

Different stages of one run directory may be written at once (the K module jobs are meant to run
in parallel); two processes writing the same stage may not. The lock file holds the holder's pid,
host and start time, one a line (what `incubate status` shows from any node), and is never
deleted (deleting a held lock file would let a third process lock a new inode).
The kernel drops the lock when the process exits, however it exits.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import read_only_message
from ..errors import UserError

_held: dict[str, int] = {}


def read_holder(path: Path) -> dict:
    """What the lock file says of its last holder: {pid, host, started} (missing items are None).

    Only reads: the holder may still be writing its stage (`incubate status` calls this)."""
    try:        # any bytes: a damaged lock file reads as no holder, never as an error
        lines = Path(path).read_bytes()[:4096].decode("utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    lines += [""] * 3
    pid = lines[0].strip()
    ok = pid.isascii() and pid.isdigit() and 0 < int(pid) < 1 << 22      # Linux's pid_max at most
    return {"pid": int(pid) if ok else None, "host": lines[1].strip()[:255] or None,
            "started": lines[2].strip()[:64] or None}


def _holder(path: Path) -> str:
    h = read_holder(path)
    if h["pid"] is None:
        return "another process"
    return f"process {h['pid']}" + (f" on {h['host']}" if h["host"] else "") + (
        f" (since {h['started']})" if h["started"] else "")


def _open_lock_file(path: Path) -> int:
    """A descriptor of the lock file `path` (created if missing), or one line saying why not."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno == errno.EROFS:
            raise UserError(read_only_message(path)) from None
        raise UserError(f"cannot create the lock file {path}: {e.strerror}; choose a writable --out") from None


def hold(folder: Path, what: str) -> None:
    """Lock `folder`/.lock for this process, or refuse with a line naming the process holding it."""
    path = Path(folder) / ".lock"
    key = str(path.resolve())
    if key in _held:
        return
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{what} is being written by {_holder(path)} (lock {path}); wait for it to finish, "
                        f"or stop it, or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{socket.gethostname()}\n{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    _held[key] = fd


def release(folder: Path) -> None:
    """Drop this process's lock on `folder` (its stage finished: others may read or skip it)."""
    fd = _held.pop(str((Path(folder) / ".lock").resolve()), None)
    if fd is not None:
        os.close(fd)


@contextmanager
def waiting(path: Path):
    """An exclusive flock on `path` (created if missing) for the `with` block, waiting for any other
    holder: for a short write that every process may want to make once (RUN/tokenizer.json)."""
    path = Path(path)
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
