"""A stage's log on rank 0: metrics.jsonl (one row an epoch, one an evaluation during training),
TensorBoard events (tblog.py) and the console lines; the other ranks write nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .tblog import Events


class StageLog:
    def __init__(self, stage_dir: Path, cfg, dist, label: str, task, budget):
        self.stage_dir, self.path = Path(stage_dir), Path(stage_dir) / "metrics.jsonl"
        self.cfg, self.dist, self.label, self.task, self.budget = cfg, dist, label, task, budget
        self.events = Events(stage_dir, False, 0, 1, 0)

    def open_events(self, num_updates: int, flops_per_update: int) -> None:
        """TensorBoard from update `num_updates` on (a resume hides the killed attempt's later steps)."""
        self.events = Events(self.stage_dir, self.cfg.tensorboard and self.dist.main, num_updates, self.dist.world,
                             flops_per_update)

    @property
    def wants_grad_norm(self) -> bool:
        return self.events.writer is not None

    def progress(self, batches, epoch: int, first: int, total: int):
        """The epoch's batches, behind a progress bar when rank 0 writes to a terminal."""
        if not (self.dist.main and sys.stderr.isatty()):
            return iter(batches)
        from tqdm import tqdm
        return iter(tqdm(batches, total=total, initial=first, leave=False,
                         desc=f"{self.label} {epoch + 1}/{self.budget.epochs}"))

    def update(self, num_updates: int, loss_sum: float, seen: int, epoch_start: float, grad_norm, lr: float):
        self.events.update(num_updates, loss_sum, seen, epoch_start, grad_norm, lr)

    def skipping(self, what: str, value: float, at: str, count: int, allowed: int) -> None:
        if self.dist.main:
            print(f"[{self.label}] warning: {what} is {value} at {at}; skipping this update "
                  f"({count}/{allowed} allowed by max_nonfinite_skips)", flush=True)

    def epoch_row(self, epoch: int, train_loss: float, metrics: dict, lr: float, seconds: float,
                  skipped: list) -> dict:
        """The epoch's metrics.jsonl row (written by write_epoch); names the images the ranks skipped."""
        row = {"epoch": epoch + 1, "train_loss": train_loss, **self.task.row(metrics), "lr": lr, "seconds": seconds}
        if skipped:
            row["skipped_images"] = len(skipped)
        if skipped and self.dist.main:
            print(f"[{self.label}] epoch {epoch + 1}: skipped {len(skipped)} unreadable images "
                  f"(data.on_bad_image: skip), e.g. {skipped[0]}", flush=True)
        return row

    def write_epoch(self, row: dict, metrics: dict, num_updates: int) -> None:
        """Rank 0, just before the epoch's checkpoint: the row, its TensorBoard scalars, the console line."""
        self._append(row)
        self.events.epoch(num_updates, row)
        print(f"[{self.label}] epoch {row['epoch']}/{self.budget.epochs} loss {row['train_loss']:.4f} "
              f"{self.task.text(metrics)} ({row['seconds']:.1f}s)", flush=True)

    def write_eval(self, updates: int, row: dict, metrics: dict) -> None:
        """Rank 0: an evaluation during training (train.eval_every)."""
        if not self.dist.main:
            return
        self._append(row)
        self.events.eval(updates, row)
        read = f", {row['tokens']:,} tokens" if "tokens" in row else ""
        print(f"[{self.label}] update {updates}/{self.budget.updates}{read}: held-out {self.task.text(metrics)}",
              flush=True)

    def close(self) -> None:
        self.events.close()

    def _append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
