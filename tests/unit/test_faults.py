"""The step guard alone (one process): failures raise at once, the window's verdict names the
first non-finite loss, a non-finite gradient norm makes the step non-finite, and losses stay on the device."""
import math

import pytest
import torch

from incubate.dist import Dist
from incubate.faults import StepGuard


def _guard(losses, norm=None, save=False):
    guard = StepGuard(Dist(), len(losses))
    for slot, value in enumerate(losses):
        guard.record(slot, torch.tensor(value, dtype=torch.float32))
    return guard.agree(save, None if norm is None else torch.tensor(norm))


def test_the_verdict_names_the_first_nonfinite_loss_of_the_window():
    v = _guard([1.5, float("nan"), float("inf")], norm=2.0, save=True)
    assert v.losses[0] == 1.5 and math.isnan(v.losses[1]) and v.losses[2] == float("inf")
    assert v.bad_loss[:2] == (1, 0) and math.isnan(v.bad_loss[2]) and v.nonfinite and v.save


def test_a_nonfinite_gradient_norm_with_finite_losses_is_a_nonfinite_step():
    assert not _guard([1.0, 2.0], norm=3.0).nonfinite
    v = _guard([1.0, 2.0], norm=float("inf"))
    assert v.nonfinite and v.bad_loss is None and v.grad_norm == float("inf")


def test_alone_a_failing_part_raises_at_once_and_a_working_one_returns_its_result():
    guard = StepGuard(Dist(), 1)
    assert guard.run(lambda: 7, "at step 1") == 7
    with pytest.raises(ZeroDivisionError):
        guard.run(lambda: 1 / 0, "at step 1")
    with pytest.raises(StopIteration):
        guard.run(lambda: next(iter([])), "at step 1")
    assert not guard.failed
