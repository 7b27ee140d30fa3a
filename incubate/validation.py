"""Evaluation during training: every `train.eval_every` optimizer updates, on the held-out split
(for text, the fixed slice `data.eval_tokens`), and once more at the stage's last update, so that a
stage's curve is its metric against its FLOPs and tokens so far.

Each evaluation is a row of metrics.jsonl with "kind": "eval" (beside the epoch rows), and
TensorBoard scalars under eval_slice/. A resumed stage drops the rows after its checkpoint's
update (resume.trim_metrics) and evaluates those updates again.
"""
from __future__ import annotations

from .data import make_loader


class PeriodicEval:
    def __init__(self, cfg, bundle, data_cfg, seed: int, dist, task, log, budget, flops_per_update: int, evaluate):
        self.every, self.amp, self.dist, self.task = cfg.eval_every, cfg.amp, dist, task
        self.log, self.budget, self.flops_per_update = log, budget, flops_per_update
        self.evaluate, self.last = evaluate, None
        self.loader = None
        if self.every:     # the bundle's test split is already the slice (text_data.load_text)
            self.loader = make_loader(bundle, bundle.test, data_cfg, data_cfg.eval_batch_size, False, seed,
                                      dist.rank, dist.world, dist.device)

    def due(self, updates: int) -> bool:
        return bool(self.every) and updates % self.every == 0

    def run(self, net, updates: int, epoch: int, train_loss: float, seconds: float, final: bool = False) -> None:
        """Evaluate now (every rank: the metrics are summed over ranks) and log the row (rank 0)."""
        if not self.every or updates == self.last or (final and updates == 0):
            return
        metrics = self.evaluate(net, self.loader, self.dist, self.amp, self.task)
        self.last = updates
        row = {"kind": "eval", "epoch": epoch + 1, "update": updates, "flops": updates * self.flops_per_update,
               "train_loss": train_loss, "seconds": seconds, **self.task.row(metrics)}
        if self.budget.tokens_per_update:
            row["tokens"] = updates * self.budget.tokens_per_update
        self.log.write_eval(updates, row, metrics)
