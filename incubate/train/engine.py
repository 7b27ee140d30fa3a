"""The one training loop every stage uses.

`fit` orchestrates typed parts: the trained part and the one place it is wrapped for the ranks
(parallel.py), the training set-up and one micro-step and optimizer step (training.py), the
checkpointer that saves and restores, the clock that says when and the stopwatch (resume.py), the
stage log (stagelog.py), evaluation (validation.py). The task (incubate/tasks: image
classification or causal language modelling) gives the batch transform, the losses and the
metrics. Under torchrun the ranks agree on every step (faults.py), so one failing rank stops them all.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from ..store import resume
from .budget import Budget, plan
from ..data.loaders import make_loader
from ..data.order import Reader
from .dist import Dist
from ..errors import UserError
from .faults import FAILED, StepGuard, Verdict, everywhere, guarded
from .stagelog import StageLog
from ..tasks import get_task
from .parallel import Trainee, check_fsdp, gpu_defaults
from .step import StageRun, Training, clip_grads, count_step_flops, micro_step, optimizer_step, set_up, wrap
from .validation import PeriodicEval, evaluate


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def nonfinite_message(label: str, value: float, where: str, ckpt: Path, allowed: int, what: str = "loss") -> str:
    kept = (f"the last good checkpoint {ckpt} is kept (rerun resumes from it)" if ckpt.exists()
            else "no checkpoint had been written yet")
    skips = f" after {allowed} skipped steps" if allowed else ""
    return (f"{label}: {what} became {value} at {where}{skips}; stopped, {kept}; lower the lr, set clip_grad "
            f"(e.g. --set train.clip_grad=1.0), use bf16 instead of fp16, or allow a few bad steps with "
            f"--set train.max_nonfinite_skips=N")


@dataclass
class Stage:
    """Everything one stage's loop works with: its typed parts."""
    tr: Training
    ckpt: resume.Checkpointer       # saves and restores; its SaveClock says when a save is due
    watch: resume.Stopwatch         # the stage's training seconds
    log: StageLog
    evals: PeriodicEval
    budget: Budget
    train_loader: object
    test_loader: object
    run: StageRun
    guard: StepGuard

    @property
    def pos(self) -> resume.Position:
        return self.ckpt.pos

    @property
    def task(self):
        return self.run.task

    @property
    def label(self) -> str:
        return self.run.label


def fit(part: Trainee, cfg, bundle, data_cfg, run: StageRun) -> dict:
    """Train `part.model`'s parameters through `part.net` (inputs -> logits) for the stage's budget.

    DDP or FSDP (train.parallel) wraps only `part.root`. Returns final metrics and costs; resumes from
    the stage's checkpoint when it has one.
    """
    run.task = run.task or get_task("classification")
    dist, label, task = run.dist, run.label, run.task
    check_fsdp(cfg, part.family)      # the CLI's recipe check says it first; the API's callers meet it here
    gpu_defaults(dist.device, cfg.amp, torch.are_deterministic_algorithms_enabled())
    part.net.to(dist.device)
    loaders = [make_loader(bundle, split, data_cfg, Reader(batch, train, run.seed, dist.rank, dist.world, dist.device))
               for split, batch, train in ((bundle.train, cfg.batch_size, True),
                                           (bundle.test, data_cfg.eval_batch_size, False))]
    context = bundle.spec.context if bundle.spec.modality == "text" else 0    # tokens a sample (a token budget)
    budget = plan(cfg, len(loaders[0]), context, dist.world, label, len(bundle.train))
    tr = set_up(part, cfg, bundle, task, dist)
    log = StageLog(run.stage_dir, cfg, dist, label, task, budget)
    ckpt = resume.Checkpointer(run.stage_dir, tr, cfg, dist, label)
    ckpt.check_format()
    flops = None if ckpt.exists() else measure_flops(tr, loaders[0], label)     # on the plain network
    wrap(tr, budget)
    pos = ckpt.restore(log.path, budget)
    if pos.flops_per_step is None:
        pos.flops_per_step = flops if flops is not None else measure_flops(tr, loaders[0], label)
    flops_per_update = pos.flops_per_step * cfg.accum_steps * dist.world
    log.open_events(pos.num_updates, flops_per_update)
    evals = PeriodicEval(cfg, bundle, data_cfg, run, log, budget, flops_per_update)
    stage = Stage(tr, ckpt, resume.Stopwatch(pos), log, evals, budget, *loaders, run,
                  StepGuard(dist, cfg.accum_steps, ckpt.kept))
    return train_stage(stage, pos.epoch)


def train_stage(s: "Stage", start_epoch: int) -> dict:
    """The epochs from `start_epoch` on, then the stage's summary."""
    last = None
    for epoch in range(start_epoch, s.budget.epochs):
        loss_sum, seen = train_epoch(s, epoch)
        last = end_epoch(s, epoch, loss_sum / max(seen, 1))
    s.log.close()
    if last is None:        # nothing left to train: the metrics of the weights as they are
        last = evaluate(s.tr.run_net, s.test_loader, s.tr.dist, s.tr.cfg.amp, s.task)
    return summary(s, last)


def measure_flops(tr: Training, loader, label: str) -> int:
    """FLOPs of one step, on the epoch's first batch (read on every rank: DDP's set-up waits for all)."""
    def count():
        batch = next(iter(loader.epoch(0)), None)
        if batch is None:
            where = " on this rank" if tr.dist.world > 1 else ""
            raise UserError(f"{label + ': ' if label else ''}no batch of the training data is readable "
                            f"(data.on_bad_image: skip left none{where}); replace the unreadable images")
        return count_step_flops(tr.net, tr.trained, tr.flops_criterion, batch[0], batch[1])
    return guarded(tr.dist, count, where="while measuring a step's FLOPs")


def train_epoch(s: Stage, epoch: int) -> tuple[float, int]:
    """One epoch's micro-steps (on a resume from a mid-epoch checkpoint's step): (loss sum, samples)."""
    tr, pos, dist = s.tr, s.pos, s.tr.dist
    s.watch.start_epoch()
    seed_all(s.run.seed * 1_000_003 + epoch * 1009 + dist.rank)
    first, loss_sum, seen = pos.step, 0.0, 0
    if first:       # mid-epoch: this rank's RNG and running sums as they were at that step
        loss_sum, seen = resume.restore_rank_state(pos.ranks[dist.rank], dist.device)
    pos.step = 0
    micro_steps = s.budget.steps_in(epoch)
    tr.net.train()
    tr.optimizer.zero_grad(set_to_none=True)
    batches = s.log.progress(s.train_loader.epoch(epoch, start=first), epoch, first, micro_steps)
    samples = []        # of each micro-step of the accumulation window so far
    for step in range(first, micro_steps):
        sync = (step + 1) % tr.cfg.accum_steps == 0
        with tr.no_sync(sync):
            try:
                samples.append(micro_step(tr, s.guard, batches, step % tr.cfg.accum_steps,
                                          f"at epoch {epoch + 1} step {step + 1}"))
            except StopIteration:       # fewer batches than planned (data.on_bad_image: skip dropped a whole one)
                return _add_losses(s.guard.losses.tolist(), samples, loss_sum, seen)
        if sync:
            loss_sum, seen, ran_out = end_window(s, epoch, step + 1, micro_steps, samples, loss_sum, seen)
            samples = []
            if ran_out:     # some rank had no batch left (under torchrun): every rank ends the epoch here
                break
    return loss_sum, seen


def _add_losses(losses: list, samples: list, loss_sum: float, seen: int) -> tuple[float, int]:
    """The window's finite losses into the epoch's running sums, micro-step by micro-step."""
    for value, n in zip(losses, samples):
        if math.isfinite(value):
            loss_sum += value * n
            seen += n
    return loss_sum, seen


def end_window(s: Stage, epoch: int, steps_done: int, micro_steps: int, samples: list, loss_sum: float,
               seen: int) -> tuple[float, int, bool]:
    """The ranks' agreement on an accumulation window, then its optimizer update or its skip;
    returns the running sums and whether a rank ran out of batches (the window is then dropped)."""
    tr, pos, guard = s.tr, s.pos, s.guard
    norm = None     # with a GradScaler the norm comes after unscaling, and inf steps are the scaler's to skip
    if tr.scaler is None:
        norm = guard.run(lambda: clip_grads(tr), f"at epoch {epoch + 1} step {steps_done}")
        norm = None if norm is FAILED else norm
    verdict = guard.agree(s.ckpt.due(pos.num_updates + 1), norm)
    loss_sum, seen = _add_losses(verdict.losses, samples, loss_sum, seen)
    if verdict.ran_out:     # as one process drops the partial window its batches ran out in
        tr.optimizer.zero_grad(set_to_none=True)
    elif verdict.nonfinite:
        skip_nonfinite(s, verdict, epoch, steps_done - len(samples))
    else:
        update(s, epoch, verdict.save and steps_done < micro_steps, steps_done, loss_sum, seen, norm)
    return loss_sum, seen, verdict.ran_out


def skip_nonfinite(s: Stage, verdict: Verdict, epoch: int, window_start: int) -> None:
    """A NaN/inf loss (on any rank) or gradient norm: drop the window, or stop past max_nonfinite_skips."""
    pos, cfg, world = s.pos, s.tr.cfg, s.tr.dist.world
    pos.nonfinite += 1
    if verdict.bad_loss is not None:
        slot, rank, value = verdict.bad_loss
        what, at = "loss", f"epoch {epoch + 1} step {window_start + slot + 1}"
        at += f" on rank {rank} of {world}" if world > 1 else ""
    else:
        what, value = "the gradient norm", verdict.grad_norm
        at = f"epoch {epoch + 1} step {window_start + cfg.accum_steps}"
    if pos.nonfinite > cfg.max_nonfinite_skips:
        raise everywhere(s.tr.dist, nonfinite_message(s.label, value, at, s.ckpt.path, cfg.max_nonfinite_skips, what))
    s.log.skipping(what, value, at, pos.nonfinite, cfg.max_nonfinite_skips)
    s.tr.optimizer.zero_grad(set_to_none=True)      # drop the whole accumulation window


def update(s: Stage, epoch: int, save: bool, steps_done: int, loss_sum: float, seen: int, norm) -> None:
    """One optimizer update, then what is due after it: its log, an evaluation, a mid-epoch save."""
    tr, pos, guard = s.tr, s.pos, s.guard
    pos.num_updates += 1
    stepped = guard.run(lambda: optimizer_step(tr, pos.num_updates, norm, s.log.wants_grad_norm),
                        f"at epoch {epoch + 1} step {steps_done}, in the optimizer step")
    s.log.update(pos.num_updates, loss_sum, seen, s.watch.epoch_start, None if stepped is FAILED else stepped,
                 tr.optimizer.param_groups[0]["lr"])
    evaluate_now = s.evals.due(pos.num_updates)
    if evaluate_now or save:
        guard.check()       # a failed optimizer step is agreed on before anything is evaluated or written
    if evaluate_now:
        s.evals.run(tr.run_net, pos.num_updates, epoch, loss_sum / max(seen, 1), s.watch.seconds())
    if save:        # an epoch's end is saved by end_epoch anyway
        s.watch.bank()
        s.ckpt.save_mid_epoch(epoch, steps_done, loss_sum, seen)


def end_epoch(s: Stage, epoch: int, train_loss: float) -> dict:
    """The epoch's evaluation, its metrics row and its checkpoint; returns the metrics."""
    tr, pos = s.tr, s.pos
    s.guard.check()
    if epoch == s.budget.epochs - 1:      # the curve ends at the stage's last update
        s.evals.run(tr.run_net, pos.num_updates, epoch, train_loss, s.watch.seconds(), final=True)
    metrics = evaluate(tr.run_net, s.test_loader, tr.dist, tr.cfg.amp, s.task)
    s.watch.bank()
    row = s.log.epoch_row(epoch, train_loss, metrics, tr.optimizer.param_groups[0]["lr"], pos.seconds,
                           skipped_images(s))
    s.ckpt.save_epoch_end(epoch, first=lambda: s.log.write_epoch(row, metrics, pos.num_updates))
    return metrics


def skipped_images(s: Stage) -> list:
    """The distinct unreadable files every rank skipped this epoch (data.on_bad_image: skip)."""
    skipped = s.train_loader.take_skipped() + s.test_loader.take_skipped()
    if s.tr.dist.world > 1:
        every = [None] * s.tr.dist.world
        tdist.all_gather_object(every, skipped)
        skipped = sorted({f for files in every for f in files})
    return skipped


def summary(s: Stage, metrics: dict) -> dict:
    """What a stage's manifest records of its training: final metrics and costs."""
    pos, world, budget = s.pos, s.tr.dist.world, s.budget
    steps = budget.micro_steps * world
    return {"metrics": s.task.final(metrics), "seconds": pos.seconds, "process_seconds": pos.seconds * world,
            "flops_per_step": pos.flops_per_step, "steps": steps, "flops": pos.flops_per_step * steps,
            "epochs": budget.epochs, "updates": budget.updates, "tokens": budget.tokens, "lr": s.tr.lr,
            "train": asdict(s.tr.cfg)}
