"""Budgets in epochs or tokens: how many micro-steps each epoch runs, and the lr schedule over them."""
import math

import pytest
import torch

from incubate.train.budget import make_scheduler, plan
from incubate.recipe.schema import TrainCfg
from incubate.errors import UserError


def test_an_epoch_budget_is_whole_epochs_of_whole_accumulation_windows():
    b = plan(TrainCfg(epochs=3, batch_size=4, accum_steps=2), batches_per_epoch=11, context=0, world=1,
             label="t", samples=44)
    assert (b.epochs, b.steps_per_epoch, b.last_steps, b.updates, b.micro_steps) == (3, 10, 10, 15, 30)
    assert b.tokens == 0


def test_a_token_budget_stops_the_last_epoch_part_way():
    cfg = TrainCfg(tokens=10_000, batch_size=4, accum_steps=2)       # 4 x 16 x 2 = 128 tokens an update
    b = plan(cfg, batches_per_epoch=20, context=16, world=1, label="t", samples=80)
    assert b.tokens_per_update == 128 and b.updates == 10_000 // 128 == 78
    assert (b.epochs, b.steps_per_epoch, b.last_steps) == (8, 20, 16)  # 7 epochs of 10 updates, then 8
    assert b.micro_steps == 7 * 20 + 16 and [b.steps_in(e) for e in (0, 7)] == [20, 16]
    one_pass = plan(TrainCfg(tokens=128 * 7, batch_size=4, accum_steps=2), 20, 16, 1, "t", 80)
    assert (one_pass.epochs, one_pass.last_steps) == (1, 14)      # less than an epoch: no window read twice
    with pytest.raises(UserError, match="less than one optimizer update, which reads batch_size 4 x data.context 16"):
        plan(TrainCfg(tokens=100, batch_size=4, accum_steps=2), 20, 16, 1, "meta", 80)


def test_the_schedule_spans_the_token_budget_with_its_warm_up():
    cfg = TrainCfg(tokens=128 * 50, warmup_tokens=128 * 10, batch_size=8, lr=1e-2, min_lr=1e-5, warmup_lr=0.0)
    b = plan(cfg, batches_per_epoch=100, context=16, world=1, label="t", samples=800)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, b)
    lrs = []
    for update in range(1, b.updates + 1):
        sched.step_update(num_updates=update)
        lrs.append(opt.param_groups[0]["lr"])
    cosine = lambda t: cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / b.updates))
    assert lrs[4] == pytest.approx(cfg.lr * 5 / 10) and lrs[9] == pytest.approx(cosine(10))    # timm: warm-up inside
    assert lrs[-1] == pytest.approx(cfg.min_lr, abs=1e-4) and max(lrs) <= cfg.lr     # the cosine ends at the budget


def test_epoch_budgets_keep_timms_schedule():
    cfg = TrainCfg(epochs=4, warmup_epochs=1, batch_size=8, lr=1e-2, warmup_lr=0.0)
    b = plan(cfg, batches_per_epoch=10, context=0, world=1, label="t", samples=80)
    from timm.scheduler import create_scheduler_v2
    opts = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr) for _ in range(2)]
    ours = make_scheduler(opts[0], cfg, b)
    timms, _ = create_scheduler_v2(opts[1], sched="cosine", num_epochs=4, warmup_epochs=1, warmup_lr=0.0,
                                   min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=10)
    for u in range(1, 41):
        ours.step_update(num_updates=u)
        timms.step_update(num_updates=u)
        assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
