"""One rank fails, every rank stops: the ranks agree on each step's verdict before the next collective.

Without this, a rank that meets a NaN loss, an unreadable image or an exception leaves the loop
while the other ranks wait in their next collective (DDP's gradient all-reduce, the barrier after
a checkpoint) until the process group's timeout, 30 minutes by default. Instead, every micro-step
each rank contributes its loss and whether it failed to one small all-reduce (riding on the step's
existing synchronisation: the loss is already read back with .item()); when any rank failed, its
message is gathered and every rank raises the same error: rank 0 prints it, the others exit quietly.

Only the part of a step that runs no collective (reading the batch, forward, loss) is guarded: an
exception in backward or in the optimizer step leaves that rank without the others, and then
torchrun's agent, which stops the whole group when one worker exits non-zero, is the safety net.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import UserError


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


@dataclass
class Verdict:
    nonfinite: dict          # {rank: loss value} of the ranks whose loss is NaN or inf
    save: bool               # some rank asked for a checkpoint now (rank 0's clock: checkpoint_minutes)


def _raise_agreed(dist, failed: list[int], messages: list, where: str, after: str,
                  error: BaseException | None) -> None:
    first = failed[0]
    text = messages[first] or "failed"
    if dist.world > 1:
        text = f"rank {first} of {dist.world} failed {where}: {text}; every rank stopped{after}"
    elif after:
        text = f"{text}{after}"
    raise StoppedEverywhere(text, quiet=dist.rank != 0, cause=error)


def agree(dist, error: BaseException | None, loss: float, save: bool = False, where: str = "",
          after: str = "") -> Verdict:
    """Every rank's verdict on one micro-step; raises StoppedEverywhere on every rank if one failed.

    `error` is what this rank raised in the guarded part of the step (or None), `loss` its loss
    value, `save` whether it asks for a checkpoint after this step. One all-reduce of world + 2
    numbers; a second collective (the messages) only when something failed.
    """
    if dist.world == 1:
        if error is not None:
            raise error         # alone, a failure is its own line (or traceback) as always
        return Verdict({0: loss} if not math.isfinite(loss) else {}, save)
    flags = torch.zeros(dist.world + 2, dtype=torch.float64, device=dist.device)
    flags[0] = float(error is not None)
    flags[1] = float(save)
    flags[2 + dist.rank] = 0.0 if error is not None else loss
    tdist.all_reduce(flags)     # SUM: each rank owns its own loss slot; NaN and inf survive the sum
    values = flags.tolist()
    if values[0] > 0:
        messages = [None] * dist.world
        tdist.all_gather_object(messages, describe(error) if error is not None else None)
        failed = [r for r, m in enumerate(messages) if m is not None]
        _raise_agreed(dist, failed, messages, where, after, error)
    losses = values[2:]
    return Verdict({r: v for r, v in enumerate(losses) if not math.isfinite(v)}, values[1] > 0)


def stop_if_any_failed(dist, error: BaseException | None, where: str = "", after: str = "") -> None:
    """A barrier that also carries failures: every rank raises if one failed (evaluation, saving)."""
    if dist.world == 1:
        if error is not None:
            raise error
        return
    agree(dist, error, 0.0, where=where, after=after)


def guarded(dist, part, where: str = "", after: str = "", save: bool = False):
    """Run one part of a step on this rank, then the ranks' agreement on it: (part's result, Verdict).

    part() returns (result, loss value); StopIteration (no batch left) passes through unagreed.
    """
    error, result, value = None, None, 0.0
    try:
        result, value = part()
    except StopIteration:
        raise
    except Exception as e:      # noqa: BLE001 -- every rank must hear of it before its next collective
        error = e
    return result, agree(dist, error, value, save, where, after)


def everywhere(dist, message: str) -> UserError:
    """An error every rank raises at the same step (they agreed on it): rank 0 alone prints it."""
    return StoppedEverywhere(message, quiet=dist.rank != 0) if dist.world > 1 else UserError(message)
