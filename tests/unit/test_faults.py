"""The step guard alone (one process): failures raise at once, the window's verdict names the
first non-finite loss, a non-finite gradient norm makes the step non-finite, and losses stay on the device."""
import math

import pytest
import torch

from incubate.train.dist import Dist
from incubate.train.faults import StepGuard


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


def _peer_adds(monkeypatch, ran_out: bool):
    """The all-reduce of 2 ranks as this rank sees it: the other rank adds its flags (no failure;
    whether its batches ran out)."""
    from incubate.train import faults
    monkeypatch.setattr(faults.tdist, "all_reduce", lambda t: t.add_(torch.tensor([0.0, float(ran_out)],
                                                                                   dtype=t.dtype)))


@pytest.mark.parametrize("mine, peer_ran_out", [([], False), ([(torch.zeros(1, 2), torch.zeros(1))], True)],
                         ids=["this rank ran out", "the other rank ran out"])
def test_no_batch_left_at_a_stage_s_first_read_ends_the_epoch_on_every_rank(monkeypatch, mine, peer_ran_out):
    """A resume at a rank's last step (a whole batch dropped by data.on_bad_image: skip): no stand-in
    batch yet, so every rank ends the epoch before the forward, where DDP's collectives would start."""
    from types import SimpleNamespace
    from incubate.train.step import micro_step
    _peer_adds(monkeypatch, peer_ran_out)
    forwards = []
    tr = SimpleNamespace(mixup=None, cfg=SimpleNamespace(amp="none", accum_steps=1), dist=Dist(world=2),
                         run_net=forwards.append)
    guard = StepGuard(tr.dist, 1)
    with pytest.raises(StopIteration):
        micro_step(tr, guard, iter(mine), 0, "at epoch 1 step 5")
    assert forwards == [] and not guard.failed and not guard.ran_out
