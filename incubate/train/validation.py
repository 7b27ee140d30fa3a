"""Evaluation during training: every `train.eval_every` optimizer updates, on the held-out split
(for text, the fixed slice `data.eval_tokens`), and once more at the stage's last update, so that a
stage's curve is its metric against its FLOPs and tokens so far.

Each evaluation is a row of metrics.jsonl with "kind": "eval" (beside the epoch rows), and
TensorBoard scalars under eval_slice/. A resumed stage drops the rows after its checkpoint's
update (resume.trim_metrics) and evaluates those updates again.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from ..data.loaders import make_loader
from ..data.order import Reader
from .faults import guarded
from .parallel import sharded
from ..tasks import get_task
from .step import autocast


@torch.no_grad()
def evaluate(net: nn.Module, loader, dist, amp: str = "none", task=None) -> dict:
    """The task's metrics on a split (classification: top-1 and loss), summed over every rank."""
    task = task or get_task("classification")
    was_training = net.training
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
    missing = missing_batches(loader, dist) if dist.world > 1 and sharded(net) else 0

    def sum_split():
        x = None
        for x, y in loader.epoch(0):
            with autocast(amp, dist.device):
                out = net(x)
            sums.add_(task.eval_sums(out, y))
        for _ in range(missing if x is not None else 0):     # FSDP's forward is a collective: match the others'
            with autocast(amp, dist.device):
                net(x)

    guarded(dist, sum_split, where="while evaluating")      # every rank hears of a failure before the all-reduce
    if dist.world > 1:
        tdist.all_reduce(sums)
    net.train(was_training)
    return task.metrics(sums, loader.bundle)


def missing_batches(loader, dist) -> int:
    """How many batches fewer than the rank with the most this rank evaluates (0 or 1)."""
    count = torch.tensor([len(loader)], device=dist.device)
    tdist.all_reduce(count, op=tdist.ReduceOp.MAX)
    return int(count.item()) - len(loader)


class PeriodicEval:
    """`run` (a StageRun) gives the ranks, the seed and the task; `log` the stage log it writes to."""

    def __init__(self, cfg, bundle, data_cfg, run, log, budget, flops_per_update: int):
        dist = run.dist
        self.every, self.amp, self.dist, self.task = cfg.eval_every, cfg.amp, dist, run.task
        self.log, self.budget, self.flops_per_update = log, budget, flops_per_update
        self.last = None
        self.loader = None
        if self.every:     # the bundle's test split is already the slice (text.load_text)
            self.loader = make_loader(bundle, bundle.test, data_cfg, Reader(
                data_cfg.eval_batch_size, False, run.seed, dist.rank, dist.world, dist.device))

    def due(self, updates: int) -> bool:
        return bool(self.every) and updates % self.every == 0

    def run(self, net, updates: int, epoch: int, train_loss: float, seconds: float, final: bool = False) -> None:
        """Evaluate now (every rank: the metrics are summed over ranks) and log the row (rank 0)."""
        if not self.every or updates == self.last or (final and updates == 0):
            return
        metrics = evaluate(net, self.loader, self.dist, self.amp, self.task)
        self.last = updates
        row = {"kind": "eval", "epoch": epoch + 1, "update": updates, "flops": updates * self.flops_per_update,
               "train_loss": train_loss, "seconds": seconds, **self.task.row(metrics)}
        if self.budget.tokens_per_update:
            row["tokens"] = updates * self.budget.tokens_per_update
        self.log.write_eval(updates, row, metrics)
