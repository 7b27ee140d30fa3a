"""The parts of a training step: the set-up a stage trains with, one micro-step (read, forward,
loss, backward) and one optimizer step (clip, step, schedule)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .budget import make_scheduler
from ..errors import UserError
from .faults import FAILED, RAN_OUT
from .parallel import Trainee, replicate, shard


@dataclass
class StageRun:
    """Where and as what a stage trains: its ranks, its seed, its folder, its name in lines, its task
    (the losses and metrics; default classification)."""
    dist: object
    seed: int
    stage_dir: object
    label: str = ""
    task: object = None


@dataclass
class Training:
    """What one stage trains with: built by set_up, wrapped for the ranks (and its optimizer made) by wrap."""
    cfg: object
    dist: object
    part: Trainee
    scaler: object
    criterion: object
    flops_criterion: object
    mixup: object
    lr: float
    optimizer: object = None
    scheduler: object = None
    run_net: nn.Module = None       # net, compiled with train.compile
    ddp: nn.Module = None           # the DDP wrapper of the trained part, under torchrun
    fsdp: nn.Module = None          # the trained part's root, sharded, under train.parallel: fsdp

    @property
    def net(self) -> nn.Module:
        """Inputs -> logits (DDP-wrapped where the trained part is the whole net)."""
        return self.part.net

    @property
    def trained(self) -> nn.Module:
        return self.part.model

    @property
    def params(self) -> list:
        return [p for p in self.trained.parameters() if p.requires_grad]

    def no_sync(self, sync: bool):
        """The gradient all-reduce (DDP) or reduce-scatter (FSDP) only on the micro-step that ends an
        accumulation window."""
        if self.fsdp is not None:
            self.fsdp.set_requires_gradient_sync(sync)
        return self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()


def scaled_lr(cfg, world: int) -> float:
    """The linear scaling rule: lr is given for lr_base_batch samples an update."""
    return cfg.lr * cfg.batch_size * cfg.accum_steps * world / cfg.lr_base_batch


def set_up(part: Trainee, cfg, bundle, task, dist) -> Training:
    """The fp16 scaler, the task's losses and mixup, gradient checkpointing: what a step needs
    before the trained part is wrapped (its FLOPs are counted on the plain network)."""
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    mixup, criterion, flops_criterion = task.criteria(cfg, bundle)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(part.net, part.model, part.family)
    return Training(cfg, dist, part, scaler, criterion, flops_criterion, mixup, scaled_lr(cfg, dist.world),
                    run_net=part.net)


def wrap(tr: Training, budget) -> None:
    """The one place the trained part meets the ranks: FSDP shards it (train.parallel: fsdp, in any
    number of processes), DDP replicates it under torchrun; then timm's optimizer and schedule over
    the trained model's parameters (FSDP's, once sharded), then compile."""
    from timm.optim import create_optimizer_v2
    cfg, dist = tr.cfg, tr.dist
    if cfg.parallel == "fsdp":
        tr.fsdp = shard(tr.part, cfg.amp, dist.device)
    elif dist.world > 1:
        tr.ddp = replicate(tr.part, dist)
    # torch's fused AdamW runs on CUDA and, since torch 2.4, on CPU (measured 1.1x there: docs/performance.md)
    opt_kwargs = {"fused": True} if cfg.fused else {}
    tr.optimizer = create_optimizer_v2(tr.trained, opt=cfg.opt, lr=tr.lr, weight_decay=cfg.weight_decay,
                                       **opt_kwargs)
    tr.scheduler = make_scheduler(tr.optimizer, cfg, budget)
    tr.run_net = torch.compile(tr.net) if cfg.compile else tr.net


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("amp: fp16 needs a CUDA device; use amp: bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def read_batch(batches, mixup):
    """The next batch (mixup applied) and its number of samples; StopIteration when none is left."""
    x, y = next(batches)
    n = len(y)
    if mixup is not None:
        x, y = mixup(x, y)
    return x, y, n


def micro_step(tr: Training, guard, batches, slot: int, where: str) -> int:
    """Read, forward, loss and backward of one micro-step (the loss kept in guard, on the device);
    returns the batch's samples. Under torchrun a part that fails is kept for the window's agreement
    and this rank still makes the collectives the others make: a rank that could not read its batch
    (or had none left) runs the forward (DDP's broadcasts buffers) on its last batch, a zero loss
    stands for one that failed, and its backward makes DDP's all-reduce."""
    last = guard.stand_in
    batch = guard.run(lambda: read_batch(batches, tr.mixup), where)
    if last is None and guard.agree_on_first_read():    # no stand-in yet (the stage's first micro-step here)
        raise StopIteration     # a rank had no batch left: every rank ends the epoch here, as one process does
    ran_out = batch is RAN_OUT      # its samples count as none, its loss as zero
    if batch is FAILED or ran_out:
        batch = last
    guard.stand_in = batch
    x, y, n = batch
    with autocast(tr.cfg.amp, tr.dist.device):
        out = guard.run(lambda: tr.run_net(x), where)
        if out is FAILED:
            x, y, _ = last or batch
            out = _forward_again(tr, x)
        loss = guard.run(lambda: tr.criterion(out, y), where)
    if loss is FAILED or ran_out:
        loss = zero_loss(out)
    guard.record(slot, loss)
    if guard.run(lambda: backward(tr, loss), f"{where}, in backward") is FAILED:
        zero_loss(out).backward()       # DDP's all-reduce, through the graph the failed backward left whole
    return 0 if ran_out else n


def _forward_again(tr: Training, x):
    """A stand-in forward after this rank's raised: its DDP pre-forward (buffer broadcast) already ran."""
    if tr.ddp is not None:
        tr.ddp.require_forward_param_sync = False
    return tr.run_net(x)


def zero_loss(out) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    return logits.float().sum() * 0.0


def backward(tr: Training, loss: torch.Tensor) -> None:
    loss = loss / tr.cfg.accum_steps
    (tr.scaler.scale(loss) if tr.scaler is not None else loss).backward()


def grad_norm(params):
    """The global L2 norm clip_grad_norm_ would report, without its multiply of every gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    total = getattr(torch.nn.utils, "get_total_norm", None)      # torch >= 2.6: foreach kernels
    if total is not None:
        return total(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def clip_grads(tr: Training):
    """clip_grad_norm_ with train.clip_grad, else the norm alone: a tensor on the device (or None)."""
    if tr.fsdp is not None:
        return clip_sharded(tr.params, tr.cfg.clip_grad)
    if tr.cfg.clip_grad:
        return torch.nn.utils.clip_grad_norm_(tr.params, tr.cfg.clip_grad)
    return grad_norm(tr.params)


def clip_sharded(params, max_norm):
    """clip_grad_norm_ for FSDP's sharded gradients: the norm of every rank's shards together (one
    all-reduce), then every shard scaled by the same factor."""
    from torch.distributed.tensor import DTensor
    norm = grad_norm(params)
    if norm is None:
        return None
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def optimizer_step(tr: Training, num_updates: int, norm, want_norm: bool):
    """Step (through the fp16 scaler: unscale and clip first), clear the gradients and move the
    schedule to update `num_updates`; returns the gradient norm (a tensor) or None."""
    if tr.scaler is not None:
        tr.scaler.unscale_(tr.optimizer)
        norm = clip_grads(tr) if (tr.cfg.clip_grad or want_norm) else None
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scheduler.step_update(num_updates=num_updates)
    return norm


def count_step_flops(net: nn.Module, trained: nn.Module, criterion, x, y) -> int:
    """FLOPs of one training step (forward and backward) measured with FlopCounterMode; on the CPU
    through the math attention backend, since the fused CPU kernel has no FLOP formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    math_attention = sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else contextlib.nullcontext()
    with math_attention, FlopCounterMode(display=False) as counter:
        criterion(net(x), y).backward()
    trained.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def enable_grad_checkpointing(net: nn.Module, trained: nn.Module, family=None) -> None:
    """Recompute block activations in backward: the network's own set_grad_checkpointing (timm's, or a
    hybrid's: target module and meta suffix), else the family's on the trained model (causal_lm)."""
    for module in (net, trained):
        if hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(True)
            return
    if family is not None:
        family.set_grad_checkpointing(trained, True)
        return
    raise UserError(f"train.grad_checkpointing: {type(trained).__name__} has no set_grad_checkpointing; "
                    f"set it to false for this model family")
