"""Where a stage resumes: which checkpoint (the newest readable one) and the position inside it.

A checkpoint is written at the end of every epoch and, with train.checkpoint_every /
checkpoint_minutes, inside an epoch after an optimizer update. A mid-epoch checkpoint also holds
what the rest of the epoch depends on, for every rank: its RNG states (python, numpy, torch, CUDA),
its running loss sum and sample count; the data order is a function of (seed, epoch, rank), so the
position in it is the micro-step. Resuming there replays the same batches, augmentations and
dropout masks: on the CPU the stage ends bitwise at the uninterrupted weights. Resumed by another
number of processes, the position moves to the new count (rescale; docs/rundir.md says what is exact).

A checkpoint a storage crash left damaged (cut short, or bytes that no longer match the digest
saved with them) is moved aside; the previous checkpoint, kept beside it, is used instead, or the
stage restarts from scratch; one line says which.
"""
from __future__ import annotations

import base64
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from . import sharded
from .checkpoint import CHECKPOINT, jsonable, load_training_state, previous_checkpoint, save_training_state
from ..errors import UserError
from ..train.faults import guarded


@dataclass
class Position:
    """How far a stage got: the next micro-step to run, and what the loop carried up to there."""
    epoch: int = 0              # the epoch to run (0-based)
    step: int = 0               # micro-steps of `epoch` already done
    seconds: float = 0.0
    num_updates: int = 0
    nonfinite: int = 0
    flops_per_step: int | None = None
    ranks: list = field(default_factory=list)   # mid-epoch only: one dict a rank (RNG, loss_sum, seen)
    rescaled: tuple | None = None               # saved by another number of processes: (it, batches read again)


def _b64(a: bytes) -> str:
    return base64.b64encode(a).decode()


def rank_state(loss_sum: float, seen: int, device: torch.device) -> dict:
    """This rank's part of a mid-epoch checkpoint, as JSON-able values."""
    np_state = np.random.get_state()
    version, words, gauss = random.getstate()
    state = {"loss_sum": loss_sum, "seen": seen, "python": [version, list(words), gauss],
             "numpy": [np_state[0], _b64(np_state[1].astype(np.uint32).tobytes()), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "torch": _b64(torch.get_rng_state().numpy().tobytes())}
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device).numpy().tobytes())
    return state


def restore_rank_state(state: dict, device: torch.device) -> tuple[float, int]:
    if "torch" not in state:        # rescaled from another number of processes: the sums alone
        return state["loss_sum"], state["seen"]
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, words_b64, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(base64.b64decode(words_b64), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8),
                                 device)
    return state["loss_sum"], state["seen"]


def gather_rank_states(dist, local: dict) -> list:
    """Every rank's state on every rank (a collective: every rank must call it)."""
    if dist.world == 1:
        return [local]
    states = [None] * dist.world
    tdist.all_gather_object(states, local)
    return states


def extra(pos: Position, mid_epoch: bool) -> dict:
    """The position as checkpoint metadata; `epoch` there is the last finished epoch at an epoch's end."""
    out = {"seconds": pos.seconds, "num_updates": pos.num_updates, "flops_per_step": pos.flops_per_step,
           "nonfinite": pos.nonfinite}
    if mid_epoch:
        out.update(step=pos.step, ranks=pos.ranks)
    return out


def position(meta: dict, world: int, budget, accum: int) -> Position:
    """Where to start: the checkpoint's position, in the terms of `world` processes when it was saved
    by another number of them (its `world`; older checkpoints: the number of rank states, else `world`)."""
    common = dict(seconds=meta["seconds"], num_updates=meta["num_updates"],
                  flops_per_step=meta["flops_per_step"], nonfinite=meta.get("nonfinite", 0))
    if meta.get("step") is None:
        pos = Position(epoch=meta["epoch"] + 1, **common)
    else:
        pos = Position(epoch=meta["epoch"], step=meta["step"], ranks=meta["ranks"], **common)
    saved = len(pos.ranks) if pos.ranks else meta.get("world", world)
    if saved != world:
        rescale(pos, saved, world, budget, accum)
    return pos


def rescale(pos: Position, saved: int, world: int, budget, accum: int) -> int:
    """A position `saved` processes reached, for `world` processes: every rank reads batches of the
    same size from one permutation of the epoch dealt out rank by rank (data/order.py), so `saved`
    ranks' `step` batches are the permutation's first step x saved batches; the new ranks go on from
    there, at a whole update (rounded down: the batches in between are read again). The schedule's
    update count becomes the new ranks' own; each new rank r takes the running loss sums of the old
    ranks r, r + world, ...; the RNG streams restart from the epoch's seed. Returns the batches read again."""
    read = pos.step * saved
    pos.step = read // (world * accum) * accum
    again = read - pos.step * world
    pos.ranks = [{"loss_sum": sum(r["loss_sum"] for r in pos.ranks[new::world]),
                  "seen": sum(r["seen"] for r in pos.ranks[new::world])} for new in range(world)] if pos.step else []
    pos.num_updates = (pos.epoch * budget.steps_per_epoch + pos.step) // accum
    pos.rescaled = (saved, again)
    return again


def _choose(ckpt: Path, label: str) -> tuple | None:
    """Rank 0: the newest readable checkpoint, moving a damaged one aside; None: start from scratch."""
    prev = previous_checkpoint(ckpt)
    damaged = None
    for path in (ckpt, prev):
        if not path.exists():
            continue
        try:
            loaded = load_training_state(path)
        except UserError as e:
            if damaged is None:
                damaged = (path, str(e))
            continue
        if damaged is not None:
            print(f"[{label}] warning: {damaged[1]}; it is kept as {_set_aside(damaged[0])} and this stage "
                  f"resumes from the previous checkpoint {path}", flush=True)
        if path != ckpt:     # the one kept becomes the checkpoint again (the next save keeps it as previous)
            os.replace(path, ckpt)
        return loaded
    if damaged is not None:
        print(f"[{label}] warning: {damaged[1]}; it is kept as {_set_aside(damaged[0])} and no earlier checkpoint "
              f"is readable: this stage restarts from scratch", flush=True)
    return None


def _set_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)     # kept, not deleted: it may still be worth a look
    return aside


def load(ckpt: Path, label: str, dist) -> tuple | None:
    """(model_state, optimizer_state, meta) to resume from, the same on every rank, or None.

    Rank 0 chooses (and repairs the folder) before the others read, so every rank loads one file.
    """
    loaded = _choose(ckpt, label) if dist.main else None
    if dist.world > 1:
        tdist.barrier()
        if not dist.main:
            loaded = load_training_state(ckpt) if ckpt.exists() else None
    return loaded


def trim_metrics(path: Path, epochs_done: int, updates_done: int | None = None) -> None:
    """After a resume, drop metric lines the checkpoint does not cover: epochs after `epochs_done`,
    and evaluations during training (train.eval_every) after update `updates_done`."""
    if not path.exists():
        return
    keep = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            if row.get("kind") == "eval" and updates_done is not None:
                if row["update"] <= updates_done:
                    keep.append(line)
            elif row["epoch"] <= epochs_done:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError):
            continue
    path.write_text("".join(k + "\n" for k in keep))


class SaveClock:
    """When a mid-epoch checkpoint is due: every N updates, or M minutes after the last save."""

    def __init__(self, cfg, main: bool):
        self.every, self.minutes, self.main = cfg.checkpoint_every, cfg.checkpoint_minutes, main
        self.last = time.monotonic()

    def due(self, updates_after_step: int) -> bool:
        if self.every and updates_after_step % self.every == 0:
            return True
        # rank 0's clock alone decides (agree() hands its wish to every rank): ranks' clocks differ
        return bool(self.minutes and self.main and time.monotonic() - self.last >= 60 * self.minutes)

    def saved(self) -> None:
        self.last = time.monotonic()


def save(ckpt: Path, tr, dist, meta: dict, first=None) -> None:
    """The one-file checkpoint: rank 0 runs `first` (the epoch's metrics line) and writes; `meta` holds
    the epoch (saved inside, or just finished) and the position."""
    def write():
        if dist.main:
            if first is not None:
                first()
            rest = {k: v for k, v in meta.items() if k != "epoch"}
            save_training_state(ckpt, dict(tr.trained.state_dict()), tr.optimizer, tr.scheduler, tr.scaler,
                                meta["epoch"], rest)
    guarded(dist, write, where="while saving a checkpoint")      # the other ranks must not wait for rank 0 forever


def restore(ckpt: Path, tr, dist, label: str, metrics_path: Path, budget):
    """The Position to start from: the newest readable checkpoint's, or the start of the stage."""
    loaded = load(ckpt, label, dist)
    if loaded is None:
        return _from_scratch(dist, metrics_path)
    model_state, opt_state, meta = loaded
    tr.trained.load_state_dict(model_state, strict=True)
    tr.optimizer.load_state_dict(opt_state)
    return _resumed(meta, tr, dist, label, ckpt, metrics_path, budget)


def restore_sharded(ckpt: Path, tr, dist, label: str, metrics_path: Path, budget):
    """restore, from a sharded checkpoint (train.parallel: fsdp), at any number of processes."""
    found = sharded.newest(ckpt)
    if found is None:
        return _from_scratch(dist, metrics_path)
    meta = sharded.load(found, tr.trained, tr.optimizer)
    return _resumed(meta, tr, dist, label, found, metrics_path, budget)


def _from_scratch(dist, metrics_path: Path) -> Position:
    if dist.main:
        metrics_path.write_text("")
    return Position()


def _resumed(meta: dict, tr, dist, label: str, ckpt: Path, metrics_path: Path, budget) -> Position:
    """The schedule and scaler of a loaded checkpoint, its position, and the metrics it covers."""
    pos = position(meta, dist.world, budget, tr.cfg.accum_steps)
    if pos.rescaled:        # the saved schedule counts another world's updates: this one's, from its own count
        tr.scheduler.step_update(num_updates=pos.num_updates)
    elif meta.get("scheduler"):
        tr.scheduler.load_state_dict(meta["scheduler"])
    if tr.scaler is not None and meta.get("scaler"):
        tr.scaler.load_state_dict(meta["scaler"])
    if dist.main:
        trim_metrics(metrics_path, pos.epoch, meta["num_updates"])     # the metrics count the saved world's updates
        where = (f"in epoch {pos.epoch + 1}/{budget.epochs} after step {pos.step}/{budget.steps_in(pos.epoch)}"
                 if pos.step else f"after epoch {pos.epoch}/{budget.epochs}")
        print(f"[{label}] resuming {where} from {ckpt}{_rescaled_note(pos, dist.world, tr.cfg.batch_size)}",
              flush=True)
    return pos


def _rescaled_note(pos: Position, world: int, batch: int) -> str:
    if not pos.rescaled:
        return ""
    saved, again = pos.rescaled
    note = (f", saved by {saved} process{'es' * (saved > 1)} and resumed by {world}: the epoch's order goes on "
            f"where they left it, the schedule at update {pos.num_updates}")
    return note + (f"; {again * batch} samples before that point are read again (a whole update at {world} "
                   f"processes)" if again else "")


def save_sharded(ckpt: Path, tr, dist, meta: dict, first=None) -> None:
    """Every rank writes its shards (sharded.save); rank 0 runs `first` (the epoch's metrics line) before."""
    def run_first():
        if dist.main and first is not None:
            first()
    guarded(dist, run_first, where="while saving a checkpoint")
    sched = tr.scheduler.state_dict() if tr.scheduler else None
    state = {"scheduler": {k: v for k, v in sched.items() if jsonable(v)} if sched else None,
             "scaler": tr.scaler.state_dict() if tr.scaler is not None else None, **meta}
    sharded.save(ckpt, tr.trained, tr.optimizer, state, dist)


def check_format(stage_dir: Path, parallel: str) -> None:
    """A stage resumes with the checkpoint format it was saved in: refuse the other one in one line."""
    plain = Path(stage_dir) / CHECKPOINT
    has_plain = plain.exists() or previous_checkpoint(plain).exists()
    has_sharded = sharded.newest(sharded.folder(stage_dir)) is not None
    if parallel == "fsdp" and has_plain:
        raise UserError(f"{stage_dir} holds a checkpoint of train.parallel: ddp ({plain.name}); resume it with "
                        f"--set train.parallel=ddp, or move it away to restart this stage under fsdp")
    if parallel == "ddp" and has_sharded:
        raise UserError(f"{stage_dir} holds a sharded checkpoint of train.parallel: fsdp ({sharded.NAME}); "
                        f"resume it with --set train.parallel=fsdp, or move it away to restart this stage")


class Stopwatch:
    """A stage's training seconds: earlier processes' (in the Position) and this one's, counted from
    `mark` and banked into the Position before a save."""

    def __init__(self, pos: Position):
        self.pos, self.epoch_start, self.mark = pos, 0.0, 0.0

    def start_epoch(self) -> None:
        self.epoch_start = self.mark = time.perf_counter()

    def seconds(self) -> float:
        return self.pos.seconds + time.perf_counter() - self.mark

    def bank(self) -> None:
        now = time.perf_counter()
        self.pos.seconds += now - self.mark
        self.mark = now


class Checkpointer:
    """A stage's checkpoint (one safetensors file, or a sharded folder under fsdp): it restores and
    saves the training state; its SaveClock says when a save inside an epoch is due."""

    def __init__(self, stage_dir: Path, tr, cfg, dist, label: str):
        self.stage_dir, self.tr, self.dist, self.label = Path(stage_dir), tr, dist, label
        self.sharded = cfg.parallel == "fsdp"
        self.path = sharded.folder(stage_dir) if self.sharded else self.stage_dir / CHECKPOINT
        self.clock = SaveClock(cfg, dist.main)
        self.pos = None

    def check_format(self) -> None:
        check_format(self.stage_dir, self.tr.cfg.parallel)

    def exists(self) -> bool:
        if self.sharded:
            return sharded.newest(self.path) is not None
        return self.path.exists() or previous_checkpoint(self.path).exists()

    def restore(self, metrics_path: Path, budget) -> Position:
        how = restore_sharded if self.sharded else restore
        self.pos = how(self.path, self.tr, self.dist, self.label, metrics_path, budget)
        return self.pos

    def kept(self) -> str:
        """What a failure's line says of the checkpoint on disk."""
        return (f"; the last good checkpoint {self.path} is kept (rerun resumes from it)"
                if self.path.exists() else "")

    def due(self, updates_after_step: int) -> bool:
        return self.clock.due(updates_after_step)

    def save_mid_epoch(self, epoch: int, step: int, loss_sum: float, seen: int) -> None:
        """After an update inside `epoch`, `step` micro-steps into it (every rank calls this): every
        rank's RNG and running sums go with it."""
        pos = self.pos
        pos.epoch, pos.step = epoch, step
        pos.ranks = gather_rank_states(self.dist, rank_state(loss_sum, seen, self.dist.device))
        self._save({"epoch": epoch, **extra(pos, True)})
        pos.step = 0

    def save_epoch_end(self, epoch: int, first) -> None:
        """At the end of `epoch`; rank 0 runs `first` (the epoch's log row) just before writing."""
        self._save({"epoch": epoch, **extra(self.pos, False)}, first)

    def _save(self, meta: dict, first=None) -> None:
        meta["world"] = self.dist.world     # a resume by another number of processes rescales the position
        (save_sharded if self.sharded else save)(self.path, self.tr, self.dist, meta, first)
        self.clock.saved()
