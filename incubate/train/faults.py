"""One rank fails, every rank stops: the ranks agree on each optimizer step before the next one.

Without this, a rank that meets a NaN, an unreadable image or an exception leaves the loop while
the other ranks wait in their next collective (DDP's gradient all-reduce, the barrier after a
checkpoint) until the process group's timeout, 30 minutes by default.

A step's parts (reading the batch, forward, loss, backward, the optimizer step) run under a
StepGuard. A rank whose part fails keeps the failure and still makes every collective the others
make in that accumulation window (training.micro_step: a stand-in batch, a zero loss); the losses
stay on the device. Once a window, before its optimizer step, the ranks all-reduce one small
tensor (failures, every micro-step's loss on every rank, the gradient norm, whether a checkpoint
is due) and read it back: the one host sync of a step. When a rank failed, its message is gathered
and every rank raises the same error: rank 0 prints it, the others exit quietly. A failure in the
optimizer step is agreed on at the next agreement (the next window's, or before an evaluation or
a save), so nothing is written after it. A rank whose batches run out before the others' (a batch
data.on_bad_image: skip dropped whole) steps on its stand-in with a zero loss until the window's
agreement, where every rank ends the epoch. A rank whose stand-in fails too stops alone (torchrun's
agent then stops the others, without rank 0's line).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from ..errors import UserError

FAILED = object()       # what StepGuard.run returns for a part that raised (under torchrun)
RAN_OUT = object()      # what it returns for a read that found no batch left (under torchrun)


class StoppedEverywhere(UserError):
    """An error every rank raises; only rank 0 prints it (`quiet` on the others)."""

    def __init__(self, message: str, quiet: bool, cause: BaseException | None = None):
        super().__init__(message)
        self.quiet, self.cause = quiet, cause


def describe(error: BaseException) -> str:
    """The message a rank sends to rank 0: a UserError as is, anything else with its type."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(error).__name__}: {error}"


def everywhere(dist, message: str) -> UserError:
    """An error every rank raises at the same step (they agreed on it): rank 0 alone prints it."""
    return StoppedEverywhere(message, quiet=dist.rank != 0) if dist.world > 1 else UserError(message)


def _raise_agreed(dist, error: BaseException | None, where: str, after: str) -> None:
    """Every rank: gather the failing ranks' (where, message) and raise the first rank's."""
    messages = [None] * dist.world
    tdist.all_gather_object(messages, (where, describe(error)) if error is not None else None)
    first = next(r for r, m in enumerate(messages) if m is not None)
    at, text = messages[first]
    raise StoppedEverywhere(f"rank {first} of {dist.world} failed {at}: {text}; every rank stopped{after}",
                            quiet=dist.rank != 0, cause=error)


def stop_if_any_failed(dist, error: BaseException | None, where: str = "", after: str = "",
                       ran_out: bool = False) -> bool:
    """A barrier that also carries failures: every rank raises if one failed (evaluation, saving);
    returns whether any rank said it ran out of batches."""
    if dist.world == 1:
        if error is not None:
            raise error         # alone, a failure is its own line (or traceback) as always
        return ran_out
    flags = torch.tensor([float(error is not None), float(ran_out)], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(flags)
    failed, any_ran_out = flags.tolist()
    if failed > 0:
        _raise_agreed(dist, error, where, after)
    return any_ran_out > 0


def guarded(dist, part, where: str = "", after: str = ""):
    """part() on this rank, then the ranks' agreement on it (every rank raises if one failed)."""
    error, result = None, None
    try:
        result = part()
    except Exception as e:      # noqa: BLE001 -- every rank must hear of it before its next collective
        error = e
    stop_if_any_failed(dist, error, where, after)
    return result


@dataclass
class Verdict:
    """What the ranks agreed on for one accumulation window."""
    losses: list                        # this rank's loss of each micro-step of the window
    bad_loss: tuple | None = None       # (micro-step in the window, rank, value): the first NaN/inf loss
    grad_norm: float = 0.0              # the gradient norm (0 with a GradScaler: it skips inf steps itself)
    save: bool = False                  # some rank asked for a checkpoint now (rank 0's clock: checkpoint_minutes)
    ran_out: bool = False               # some rank's batches ran out in this window: every rank ends the epoch
    nonfinite: bool = field(init=False)

    def __post_init__(self):
        self.nonfinite = self.bad_loss is not None or not math.isfinite(self.grad_norm)


class StepGuard:
    """This rank's failures and losses of one accumulation window, until the ranks agree on them."""

    def __init__(self, dist, accum_steps: int, kept=lambda: ""):
        self.dist, self.accum, self.kept = dist, accum_steps, kept     # kept(): what a failure's line adds
        self.losses = torch.zeros(accum_steps, dtype=torch.float64, device=dist.device)
        self.error, self.where = None, ""
        self.ran_out = False        # this rank's batches ran out in this window
        self.stand_in = None        # the last batch this rank read: what it steps on after a failure

    @property
    def failed(self) -> bool:
        return self.error is not None

    def run(self, part, where: str):
        """part(); a failure raises at once alone, under torchrun it is kept (the first) and FAILED
        returned; a StopIteration (no batch left) likewise raises alone and returns RAN_OUT under torchrun."""
        try:
            return part()
        except StopIteration:
            if self.dist.world == 1:
                raise
            self.ran_out = True
            return RAN_OUT
        except Exception as e:      # noqa: BLE001 -- agreed on at the window's end, where every rank meets
            if self.dist.world == 1:
                raise
            if self.error is None:
                self.error, self.where = e, where
            return FAILED

    def record(self, slot: int, loss: torch.Tensor) -> None:
        self.losses[slot] = loss.detach()       # stays on the device: no host sync a micro-step

    def check(self) -> None:
        """Agree now on the failures kept so far (before an evaluation or a save)."""
        if self.dist.world > 1:
            stop_if_any_failed(self.dist, self.error, self.where, self.kept())

    def agree_on_first_read(self) -> bool:
        """The stage's first read in this process (no stand-in batch yet), agreed on at once: every
        rank raises if one failed; True when one had no batch left (a resume at its last step), so
        that every rank ends the epoch before a forward that rank could not stand in for."""
        if self.dist.world == 1:
            return False
        ran_out = stop_if_any_failed(self.dist, self.error, self.where, self.kept(), self.ran_out)
        self.ran_out = False
        return ran_out

    def agree(self, save: bool, grad_norm) -> Verdict:
        """Every rank's verdict on the window: one all-reduce of 4 + world x accum_steps numbers,
        read back once; a second collective (the messages) only when a rank failed."""
        d, a = self.dist, self.accum
        flags = torch.zeros(4 + d.world * a, dtype=torch.float64, device=d.device)
        flags[0], flags[1], flags[3] = float(self.failed), float(save), float(self.ran_out)
        if grad_norm is not None:
            flags[2] = grad_norm.detach()       # alike on every rank after DDP's all-reduce: summed, finite or not
        flags[4 + d.rank * a: 4 + (d.rank + 1) * a] = self.losses
        if d.world > 1:
            tdist.all_reduce(flags)     # SUM: each rank owns its own loss slots; NaN and inf survive the sum
        values = flags.tolist()
        if values[0] > 0:
            _raise_agreed(d, self.error, self.where, self.kept())
        self.ran_out = False
        per_rank = [values[4 + r * a: 4 + (r + 1) * a] for r in range(d.world)]
        bad = next(((i, r, per_rank[r][i]) for i in range(a) for r in range(d.world)
                    if not math.isfinite(per_rank[r][i])), None)
        return Verdict(per_rank[d.rank], bad, values[2], values[1] > 0, values[3] > 0)
