"""Weights in safetensors, metadata in JSON, every write atomic (temporary name, fsync, rename).

Nothing here unpickles: the training state (weights, optimizer, scheduler, scaler, epoch) is one
safetensors file whose JSON metadata holds the non-tensor parts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import UserError


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


def _tmp_name(path: Path) -> Path:
    """A temporary name of this process: jobs running at once never write each other's."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text)
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                        f"delete the stage folder and rerun the stage") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_weights(state: dict, path: Path, metadata: dict | None = None) -> str:
    """Write a state dict atomically; returns the file's SHA-256."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        save_file(_plain(state), str(tmp), metadata=metadata)
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


def _jsonable(obj):
    try:
        json.dumps(obj)
        return True
    except (TypeError, ValueError):
        return False


def save_training_state(path: Path, model_state: dict, optimizer, scheduler, scaler,
                        epoch: int, extra: dict) -> None:
    """Everything needed to resume after `epoch` finished, in one atomic file."""
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
    sched = {k: v for k, v in scheduler.state_dict().items() if _jsonable(v)} if scheduler else None
    meta = {"epoch": epoch, "optimizer": opt_meta, "scheduler": sched,
            "scaler": scaler.state_dict() if scaler is not None else None, **extra}
    save_weights(tensors, path, metadata={"state": json.dumps(meta)})


def load_training_state(path: Path) -> tuple[dict, dict, dict]:
    """Returns (model_state, optimizer_state_dict, metadata)."""
    tensors = load_weights(path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["state"])
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_meta = meta["optimizer"]
    state = {}
    for idx, entry in opt_meta["state"].items():
        state[int(idx)] = {name: tensors[f"optim.{idx}.{name}"] if value == "__tensor__" else value
                           for name, value in entry.items()}
    return model_state, {"state": state, "param_groups": opt_meta["param_groups"]}, meta
