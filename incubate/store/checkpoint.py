"""Weights in safetensors, metadata in JSON, every write atomic (temporary name, fsync, rename).

Nothing here unpickles: the training state (weights, optimizer, scheduler, scaler, epoch) is one
safetensors file whose JSON metadata holds the non-tensor parts.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import threading
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import UserError
from .safe_read import read_json  # noqa: F401  (the one JSON reader; imported from here by older code)


# torch on first use: a process that only reads manifests (a launcher's job wrapper) starts 3 s sooner
def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file as save
    save(tensors, filename, metadata=metadata)


def load_file(filename: str) -> dict:
    from safetensors.torch import load_file as load
    return load(filename)


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


_depth = 0     # nesting of `uninterrupted` blocks in this process


@contextlib.contextmanager
def uninterrupted():
    """Hold Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt.

    A write in flight when the user presses Ctrl-C is finished, so the run directory never holds
    half of a stage's hand-off (e.g. its weights without its manifest). Re-entrant.
    """
    global _depth
    if _depth or threading.current_thread() is not threading.main_thread():
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Ctrl-C was ignored when the process started (a background job of a script, nohup ... &):
        # it stays ignored, here too, rather than turning into a KeyboardInterrupt after the write
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):      # the process's own handler decides (the CLI's ignores the presses after it)
            previous(signal.SIGINT, None)
        raise KeyboardInterrupt


def _tmp_name(path: Path) -> Path:
    # one temporary name a process, so concurrent writers (parallel module jobs updating
    # summary.json) never write into each other's temporary file
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_failed(path: Path, e: OSError) -> UserError:
    if e.errno == errno.EROFS:
        return UserError(read_only_message(path))
    return UserError(f"cannot write {path}: {e.strerror or e}; the previous {path.name} (if any) is kept "
                     f"intact; free disk space or fix permissions, then rerun the same command")


def read_only_message(path: Path) -> str:
    return (f"cannot write {path}: the file system holding it is read-only (mounted read-only, or remounted "
            f"read-only after a storage error); files already there are intact: remount it read-write or copy "
            f"the run directory to writable storage and pass that as --out, then rerun the same command")


def _atomic(path: Path, write, keep_previous: Path | None = None) -> None:
    """write(tmp) then fsync and rename over `path`: `path` is always the old or the new file.

    With `keep_previous`, the old `path` is first renamed to it: a fallback if the new file is later
    found damaged (a storage crash that lost what the fsync claimed was written). A kill between the
    two renames leaves only `keep_previous`, which resuming takes (see previous_checkpoint()).
    """
    path = Path(path)
    tmp = _tmp_name(path)
    with uninterrupted():
        try:
            write(tmp)
            if keep_previous is not None and path.exists():
                os.replace(path, keep_previous)
            _fsync_replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_failed(path, e) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def umask_mode(path) -> None:
    """Give `path` the mode any new file gets under this process's umask: safetensors' writer makes
    its file 0600, so an export shared with a team (umask 022) would be unreadable to it."""
    try:
        mask = int(re.search(r"Umask:\s*(\d+)", Path("/proc/self/status").read_text()).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)      # no /proc: the only portable way to read it is to set it
        os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _save_file(tensors: dict, filename: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are (a full disk's
    ENOSPC, a read-only mount's EROFS), so that they get their one line (_write_failed)."""
    try:
        save_file(tensors, str(filename), metadata=metadata)
        umask_mode(filename)
    except SafetensorError as e:
        found = re.search(r"\(os error (\d+)\)", str(e))      # its Rust io::Error, only as text
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(filename)) from e


def save_weights(state: dict, path: Path, metadata: dict | None = None, keep_previous: Path | None = None) -> str:
    """Write a state dict atomically; returns the file's SHA-256."""
    path = Path(path)
    plain = _plain(state)
    _atomic(path, lambda tmp: _save_file(plain, tmp, metadata=metadata), keep_previous)
    return sha256_file(path)


def load_weights(path: Path, sha256: str | None = None) -> dict:
    """Load a safetensors file; with `sha256`, refuse a file whose bytes changed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if sha256 is not None and sha256_file(path) != sha256:
        raise UserError(f"weights file {path} does not match the SHA-256 in its manifest (truncated "
                        f"or corrupt); delete its stage folder and rerun that stage")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"weights file {path} is not a readable safetensors file ({e}); delete its "
                        f"stage folder and rerun that stage") from None


def jsonable(obj):
    try:
        json.dumps(obj)
        return True
    except (TypeError, ValueError):
        return False


def tensor_digest(tensors: dict) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: catches bytes a storage fault changed
    inside a file that still parses (safetensors itself only checks the header and the length)."""
    import torch
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before `path` is kept (checkpoint.safetensors -> checkpoint.prev.safetensors)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


# a stage's mid-training checkpoint: one file (train.parallel: ddp), or a sharded folder (fsdp: sharded.py)
CHECKPOINT, SHARDED_CHECKPOINT = "checkpoint.safetensors", "checkpoint.dcp"


def training_checkpoint(stage_dir: Path) -> Path | None:
    """The mid-training checkpoint a stage folder holds, of either format, or the one kept before it (a
    kill between a save's renames leaves only that): the stage is in training. None: no checkpoint."""
    for name in (CHECKPOINT, SHARDED_CHECKPOINT):
        for path in (Path(stage_dir) / name, previous_checkpoint(Path(stage_dir) / name)):
            if path.exists():
                return path
    return None


def save_training_state(path: Path, model_state: dict, optimizer, scheduler, scaler,
                        epoch: int, extra: dict) -> None:
    """Everything needed to resume at the point `extra` names (after `epoch`, or inside it at
    extra["step"]), in one atomic file; the file it replaces is kept as previous_checkpoint(path)."""
    import torch
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    opt = optimizer.state_dict()
    opt_meta: dict = {"param_groups": opt["param_groups"], "state": {}}
    for idx, entry in opt["state"].items():
        opt_meta["state"][str(idx)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
                opt_meta["state"][str(idx)][name] = "__tensor__"
            else:
                opt_meta["state"][str(idx)][name] = value
    sched = {k: v for k, v in scheduler.state_dict().items() if jsonable(v)} if scheduler else None
    plain = _plain(tensors)
    meta = {"epoch": epoch, "optimizer": opt_meta, "scheduler": sched,
            "scaler": scaler.state_dict() if scaler is not None else None, **extra,
            "digest": tensor_digest(plain)}
    _atomic(Path(path), lambda tmp: _save_file(plain, tmp, metadata={"state": json.dumps(meta)}),
            keep_previous=previous_checkpoint(path))


def load_training_state(path: Path) -> tuple[dict, dict, dict]:
    """Returns (model_state, optimizer_state_dict, metadata); a damaged file is a UserError."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"training checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if "digest" in meta and tensor_digest(tensors) != meta["digest"]:
        raise UserError(f"training checkpoint {path} is unreadable (its tensors do not match the digest "
                        f"saved with them: bytes changed on disk)")
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_meta = meta["optimizer"]
    state = {}
    for idx, entry in opt_meta["state"].items():
        state[int(idx)] = {name: tensors[f"optim.{idx}.{name}"] if value == "__tensor__" else value
                           for name, value in entry.items()}
    return model_state, {"state": state, "param_groups": opt_meta["param_groups"]}, meta
