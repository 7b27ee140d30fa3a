"""TensorBoard event files of one stage: RUN/tensorboard/<stage> (a module: RUN/tensorboard/module_<i>).

The stage log (stagelog.py) calls an `Events` object at each optimizer update and after each
epoch's evaluation. It is a no-op unless `train.tensorboard` is on and this is rank 0, so other
ranks never touch the files.

Every tag uses one step axis, the number of optimizer updates so far. TensorBoard hides a resumed
run's repeated steps through `purge_step`, which applies to every tag of the folder at once: a
second axis (e.g. FLOPs as the step) would be wiped by it, and ViT-H's total FLOPs (~1e20) do not
fit TensorBoard's int64 step anyway. So FLOPs so far is a scalar, `train/flops`.
"""
from __future__ import annotations

import atexit
import time
from pathlib import Path

TAGS = ("train/loss", "train/lr", "train/samples_per_s", "train/grad_norm", "train/flops",
        "train/epoch_loss", "eval/top1", "eval/loss")


def tensorboard_dir(stage_dir: Path) -> Path:
    """RUN/meta -> RUN/tensorboard/meta; RUN/modules/2 -> RUN/tensorboard/module_2."""
    stage_dir = Path(stage_dir)
    if stage_dir.parent.name == "modules":
        return stage_dir.parent.parent / "tensorboard" / f"module_{stage_dir.name}"
    return stage_dir.parent / "tensorboard" / stage_dir.name


def _wait_for_a_later_file_name(folder: Path) -> None:
    """Event files are read in name order and their names start with the whole second they were
    opened in; a resumed writer opened in the same second as the last one could sort before it, and
    its purge would then come before the stale events it must hide. Wait out that second."""
    stamps = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*")
              if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    deadline = time.time() + 2.0          # a file from a node whose clock runs ahead: do not wait for it
    while stamps and int(time.time()) <= max(stamps) and time.time() < deadline:
        time.sleep(0.05)


class Events:
    def __init__(self, stage_dir: Path, enabled: bool, num_updates: int, world: int, flops_per_update: int):
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        folder = tensorboard_dir(stage_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _wait_for_a_later_file_name(folder)
        # Steps after the checkpoint's last update (all of them on a fresh start) belong to an
        # attempt that was killed or is being redone: purge_step hides them in TensorBoard.
        # max_queue: the default 10 makes add_scalar wait on the writer thread every few updates
        self.writer = SummaryWriter(str(folder), purge_step=num_updates + 1, max_queue=1000)
        self.world, self.flops_per_update = world, flops_per_update
        self.epoch_start, self.last = None, (0.0, 0, 0.0)     # (loss sum, samples, time) at the last update
        # A stage stopped by an error (e.g. a NaN loss) still gets its last steps on disk: they are
        # what one looks at to see why.
        atexit.register(self.close)

    def update(self, num_updates: int, loss_sum: float, seen: int, epoch_start: float, grad_norm, lr: float):
        """After an optimizer update: loss_sum and seen are the epoch's running (this rank's) totals."""
        if self.writer is None:
            return
        now = time.perf_counter()
        if epoch_start != self.epoch_start:      # a new epoch: its totals start again from zero
            self.epoch_start, self.last = epoch_start, (0.0, 0, epoch_start)
        d_loss, d_seen, d_time = loss_sum - self.last[0], seen - self.last[1], now - self.last[2]
        self.last = (loss_sum, seen, now)
        w = self.writer
        if d_seen:
            w.add_scalar("train/loss", d_loss / d_seen, num_updates)
        w.add_scalar("train/lr", lr, num_updates)
        if d_time > 0:
            w.add_scalar("train/samples_per_s", d_seen * self.world / d_time, num_updates)
        if grad_norm is not None:
            w.add_scalar("train/grad_norm", float(grad_norm), num_updates)
        w.add_scalar("train/flops", float(num_updates * self.flops_per_update), num_updates)

    def epoch(self, num_updates: int, row: dict):
        """After an epoch's evaluation, at the step of its last update; flushed, so that what the
        epoch's checkpoint covers is on disk (later steps are purged on resume anyway)."""
        if self.writer is None:
            return
        self.writer.add_scalar("train/epoch_loss", row["train_loss"], num_updates)
        for key, value in row.items():      # the task's metrics: eval/top1, eval/loss (or eval/bpb, eval/acc)
            if key.startswith("test_"):
                self.writer.add_scalar(f"eval/{key[5:]}", value, num_updates)
        self.writer.flush()

    def eval(self, num_updates: int, row: dict):
        """An evaluation during training (train.eval_every), on the held-out slice: eval_slice/<metric>."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key.startswith("test_"):
                self.writer.add_scalar(f"eval_slice/{key[5:]}", value, num_updates)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            atexit.unregister(self.close)
