"""Sharded mid-stage checkpoints (train.parallel: fsdp) through torch.distributed.checkpoint.

Every rank writes its own shards of the trained model and its optimizer state; no rank gathers the
whole state. The folder is complete or ignored, as the one-file checkpoints are: the ranks write into
STAGE/checkpoint.dcp.tmp, rank 0 adds state.json (the position, the schedule, the RNG of every rank, the
weights' shapes) and only then renames it to checkpoint.dcp, the one before kept as checkpoint.prev.dcp.
A kill during the write leaves the previous checkpoint in place; a kill between the two renames leaves
only the previous one, which is taken. torch.distributed.checkpoint reshards on load, so a
checkpoint resumes at any number of processes (resume.rescale moves a mid-epoch position to the new count).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as tdist

from .checkpoint import SHARDED_CHECKPOINT, previous_checkpoint, uninterrupted
from ..errors import UserError
from ..train.parallel import reshard

NAME, PREVIOUS, STATE = SHARDED_CHECKPOINT, previous_checkpoint(Path(SHARDED_CHECKPOINT)).name, "state.json"


def folder(stage_dir: Path) -> Path:
    return Path(stage_dir) / NAME


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def complete(path: Path) -> bool:
    """A folder the rename made: its state.json is written last, after every rank's shards."""
    return (path / STATE).is_file() and (path / ".metadata").is_file()


def newest(path: Path) -> Path | None:
    """The checkpoint to resume from: the current one, else the previous one (a kill between the renames)."""
    for candidate in (path, path.with_name(PREVIOUS)):
        if complete(candidate):
            return candidate
    return None


def _states(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    reshard(model)      # a root evaluation left gathered holds full tensors, not its shards
    return get_state_dict(model, optimizer)


def _shapes(model_state: dict) -> dict:
    return {k: list(v.shape) for k, v in model_state.items()}


def _barrier(dist) -> None:
    if tdist.is_initialized() and dist.world > 1:
        tdist.barrier()


def save(path: Path, model, optimizer, state: dict, dist) -> None:
    """Every rank: its shards into the temporary folder; then rank 0 adds `state` and renames it."""
    import torch.distributed.checkpoint as dcp
    tmp = _tmp(path)
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)      # what a killed write left
    _barrier(dist)
    model_state, optim_state = _states(model, optimizer)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    except Exception as e:      # every rank raises it: DCP gathers the ranks' failures
        raise UserError(f"cannot write the sharded checkpoint {tmp}: {e}; the previous checkpoint (if any) is "
                        f"kept; free disk space or fix permissions, then rerun the same command") from None
    if dist.main:
        _publish(path, tmp, dict(state, shapes=_shapes(model_state)))
    _barrier(dist)


def _publish(path: Path, tmp: Path, state: dict) -> None:
    """state.json last, fsynced, then the renames (Ctrl-C held until both are done)."""
    with uninterrupted():
        with open(tmp / STATE, "w") as f:
            f.write(json.dumps(state))
            f.flush()
            os.fsync(f.fileno())
        previous = path.with_name(PREVIOUS)
        if complete(path):
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
        else:
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"sharded checkpoint {path} is unreadable ({e}); move it away to restart this "
                        f"stage") from None


def load(path: Path, model, optimizer) -> dict:
    """Every rank: the shards it holds now (any number of ranks) into model and optimizer; returns
    the state rank 0 saved. A checkpoint of another model is refused before anything is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = read_state(path)
    model_state, optim_state = _states(model, optimizer)
    mine = _shapes(model_state)
    if state.get("shapes") != mine:
        theirs = state.get("shapes") or {}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise UserError(f"sharded checkpoint {path} holds another model than this recipe trains ({len(differ)} "
                        f"weights differ, e.g. {differ[0]}); move it away to restart this stage")
    try:
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    except Exception as e:
        raise UserError(f"sharded checkpoint {path} is unreadable ({type(e).__name__}: {e}); move it away to "
                        f"restart this stage") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    return state


def remove(stage_dir: Path) -> None:
    """A finished stage's sharded checkpoints (its weights are in model.safetensors)."""
    for name in (NAME, PREVIOUS, NAME + ".tmp"):
        shutil.rmtree(Path(stage_dir) / name, ignore_errors=True)
