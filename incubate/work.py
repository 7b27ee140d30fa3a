"""The work a script does on a hybrid, measured as the CLI's stages measure theirs, so that
`incubate report` and `status` count it: `with incubate.track(net): <any loop>` times the loop,
counts the samples (and tokens) of every training forward and measures one step's FLOPs with
FlopCounterMode (training.count_step_flops, the stages' own); `save_module` writes them to the
module's manifest."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import UserError
from .modular import Hybrid

ATTR = "incubate_work"


@dataclass
class Work:
    seconds: float = 0.0
    steps: int = 0               # training forwards (with autograd, in train mode)
    samples: int = 0
    tokens: int = 0              # token ids seen (a language model's inputs), 0 for images
    flops: int = 0               # forward + backward FLOPs of all steps
    flops_per_step: int = 0      # of the first step (its batch), as the stages count a step

    def manifest(self) -> dict:
        """What a stage's manifest says of its cost (rundir's summary and the report read it)."""
        return {"seconds": self.seconds, "process_seconds": self.seconds, "flops": self.flops,
                "flops_per_step": self.flops_per_step, "steps": self.steps,
                "samples": self.samples, "tokens": self.tokens}


def _input(args, kwargs):
    return next((v for v in (*args[:1], kwargs.get("x"), kwargs.get("input_ids"), kwargs.get("pixel_values"))
                 if v is not None), None)


@contextmanager
def track(net: Hybrid):
    """Measure the training of hybrid `net` inside the block; `save_module(net, run)` records it."""
    if not isinstance(net, Hybrid):
        raise UserError("incubate.track takes a hybrid made by incubate.hybrid(meta, target, i)")
    work, first = getattr(net, ATTR, None) or Work(), []

    def count(module, args, kwargs):
        x = _input(args, kwargs)
        if module.training and torch.is_grad_enabled() and x is not None:
            work.steps, work.samples = work.steps + 1, work.samples + x.shape[0]
            work.tokens += x.numel() if not x.is_floating_point() else 0
            first[:] = first or [x.detach()]

    hook, start = net.register_forward_pre_hook(count, with_kwargs=True), time.perf_counter()
    try:
        yield work
    finally:
        work.seconds += time.perf_counter() - start
        hook.remove()
    if first:
        _measure(net, work, first[0])
    object.__setattr__(net, ATTR, work)      # a plain attribute: no submodule, no state-dict key


def _measure(net: Hybrid, work: Work, x: torch.Tensor) -> None:
    from .train.step import count_step_flops
    was = net.training
    net.train()
    step = count_step_flops(net, net.runner, lambda out, y: out.float().pow(2).mean(), x, None)
    net.train(was)
    work.flops_per_step = work.flops_per_step or step
    work.flops = work.flops_per_step * work.samples // x.shape[0]     # every sample costs the first batch's share
