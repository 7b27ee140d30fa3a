"""How long a stage trains: its budget in epochs or, for text, in tokens, as micro-steps per epoch.

A token budget becomes a whole number of optimizer updates (tokens / (batch x context x
accum_steps x processes), rounded down); the loop runs whole epochs and stops the last one part-way,
so a budget of at most one epoch reads every window at most once. The lr schedule spans the budget
either way: per update, over the epochs' updates or over the token budget's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Budget:
    epochs: int                 # epochs the loop enters (the last may stop part-way)
    steps_per_epoch: int        # micro-steps of a whole epoch
    last_steps: int             # micro-steps of the last epoch
    updates: int                # optimizer updates in all
    tokens_per_update: int = 0  # text: training tokens an update reads (every process); 0 for images

    def steps_in(self, epoch: int) -> int:
        return self.last_steps if epoch == self.epochs - 1 else self.steps_per_epoch

    @property
    def micro_steps(self) -> int:
        """Micro-steps of the whole stage, one process."""
        return self.steps_per_epoch * max(self.epochs - 1, 0) + (self.last_steps if self.epochs else 0)

    @property
    def tokens(self) -> int:
        return self.updates * self.tokens_per_update


def plan(cfg, batches_per_epoch: int, context: int, world: int, label: str, samples: int) -> Budget:
    """The stage's budget from its settings and its loader (`batches_per_epoch` micro-steps a process;
    `context`: tokens a window, 0 for images; `samples`: training samples, for the message)."""
    steps = (batches_per_epoch // cfg.accum_steps) * cfg.accum_steps
    if steps == 0:
        raise UserError(f"{label}: batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps} x {world} "
                        f"processes exceeds the {samples} training samples (images or text windows); "
                        f"lower batch_size")
    per_epoch = steps // cfg.accum_steps
    per_update = cfg.batch_size * context * cfg.accum_steps * world
    if not cfg.tokens:
        return Budget(cfg.epochs, steps, steps, per_epoch * cfg.epochs, per_update)
    updates = cfg.tokens // per_update
    if updates == 0:
        raise UserError(f"{label}: tokens {cfg.tokens} is less than one optimizer update, which reads batch_size "
                        f"{cfg.batch_size} x data.context {context} x accum_steps {cfg.accum_steps} x {world} "
                        f"processes = {per_update} tokens; raise tokens or lower batch_size")
    epochs = math.ceil(updates / per_epoch)
    return Budget(epochs, steps, (updates - (epochs - 1) * per_epoch) * cfg.accum_steps, updates, per_update)


def make_scheduler(optimizer, cfg, budget: Budget):
    """timm's scheduler, stepped every update: over the epochs of an epoch budget (as timm's
    train.py sets it up), over the updates of a token budget."""
    from timm.scheduler import create_scheduler_v2
    milestones = {} if cfg.decay_milestones is None else {"decay_milestones": cfg.decay_milestones}
    if cfg.tokens:
        warmup = cfg.warmup_tokens // budget.tokens_per_update
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=budget.updates,
                                           warmup_epochs=warmup, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                           step_on_epochs=False, updates_per_epoch=1, **milestones)
        return scheduler
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=max(cfg.epochs, 1),
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                       min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=budget.steps_per_epoch // cfg.accum_steps, **milestones)
    return scheduler
