"""The one training loop every stage uses, and evaluation.

timm builds the optimizer and schedule; the task (incubate/tasks: image classification or causal
language modelling) gives the batch transform, the losses and the metrics. This file wires them
with AMP, gradient accumulation and clipping, DDP (only the trained part is wrapped), per-epoch
evaluation, metrics.jsonl and atomic checkpoints (every epoch's end, and inside an epoch with
train.checkpoint_every / checkpoint_minutes: resume.py) from which a killed stage resumes. Under
torchrun the ranks agree on every step (faults.py), so one failing rank stops them all.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import resume
from .budget import Budget, make_scheduler, plan
from .data import make_loader
from .errors import UserError
from .tasks import get_task
from .tblog import Events
from .validation import PeriodicEval
from .faults import StoppedEverywhere, agree, stop_if_any_failed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("recipe asks for device: cuda but no CUDA device is visible; use device: auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        _init_process_group("nccl" if use_cuda else "gloo", rank, world)
    return Dist(rank, world, local, dev)


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """init_process_group, with the keys of a restarted torchrun group apart from its predecessor's.

    With torchrun's static rendezvous (--master-port, one node) the agent keeps one TCPStore across
    `--max-restarts` restarts, and torch's env:// set-up adds no per-attempt prefix (it assumes a new
    store each time, true of the c10d rendezvous only). A restarted rank could then read the address
    a dead rank of the previous group published, and gloo fails connecting to it ("Connection
    refused", then "Connect timeout") when the new peer comes up later: the restarted group never
    forms. Every worker of one agent shares its restart count, so the count names the attempt; on
    several nodes the counts differ between agents, so there torch's own set-up is kept.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("GROUP_WORLD_SIZE") == "1":
        from torch.distributed.constants import default_pg_timeout
        store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                               timeout=default_pg_timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        tdist.init_process_group(backend, store=tdist.PrefixStore(f"incubate/attempt_{attempt}", store),
                                 rank=rank, world_size=world)
    else:
        tdist.init_process_group(backend)


def close_dist(ok: bool) -> None:
    """Leave the process group before the interpreter exits (torch asks for destroy_process_group).

    Left to interpreter teardown, a gloo group's worker threads can still hold tensors while Python
    is being finalised, and the process dies of SIGABRT after its work is done: seen on rank 1 of an
    LM run under torchrun, 1 run in about 10 (pytorch/pytorch#179291 describes the mechanism). After
    success the ranks meet first, so that none leaves while another still talks; after a failure the
    ranks have already agreed to stop (incubate/faults.py), and a gloo group is left locally. An NCCL
    group is then left to torchrun: its destroy is collective and could wait on a rank that is gone.

    destroy_process_group stops gloo's threads only once nothing else holds the group. After a
    failure something does: the failing rank's exception and the training loop's frame refer to each
    other (the frame keeps the exception in a local, the exception's traceback keeps the frame), and
    that cycle holds the DDP model and through it the group until a full garbage collection, in
    practice the one of interpreter finalisation: the mechanism above again, on the failing rank
    (rank 1 aborted with "terminate called without an active exception", now and then under load).
    """
    if not tdist.is_available() or not tdist.is_initialized():
        return
    if ok:
        try:
            tdist.barrier()
        except RuntimeError:        # a peer already gone: nothing left to wait for
            pass
    elif tdist.get_backend() != "gloo":
        return
    gc.collect()        # frees a failure's frame <-> traceback cycle, the group's last holder but ours
    tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.world > 1 and tdist.is_initialized():
        tdist.barrier()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("amp: fp16 needs a CUDA device; use amp: bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(net: nn.Module, loader, dist: Dist, amp: str = "none", task=None) -> dict:
    """The task's metrics on a split (classification: top-1 and loss), summed over every rank."""
    task = task or get_task("classification")
    was_training = net.training
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
    error = None
    try:
        for x, y in loader.epoch(0):
            with autocast(amp, dist.device):
                out = net(x)
            sums += task.eval_sums(out, y)
    except Exception as e:      # noqa: BLE001 -- every rank must hear of it before the all-reduce
        error = e
    stop_if_any_failed(dist, error, where="while evaluating")
    if dist.world > 1:
        tdist.all_reduce(sums)
    net.train(was_training)
    return task.metrics(sums, loader.bundle)


def count_step_flops(net: nn.Module, trained: nn.Module, criterion, x, y) -> int:
    """FLOPs of one training step (forward and backward) measured with FlopCounterMode.

    On the CPU, PyTorch runs scaled_dot_product_attention as a fused kernel that FlopCounterMode has
    no formula for (it would count the attention matmuls as 0 FLOPs: 1.5% of the regime ViT's step,
    a quarter of the LM's); the step is counted through the math backend instead, whose matmuls it
    counts. On CUDA the flash and memory-efficient kernels have formulas of their own.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    math_attention = sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else contextlib.nullcontext()
    with math_attention, FlopCounterMode(display=False) as counter:
        criterion(net(x), y).backward()
    trained.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def enable_grad_checkpointing(net: nn.Module, trained: nn.Module) -> None:
    """timm's set_grad_checkpointing on the network (a hybrid: target module and meta suffix)."""
    for module in (net, trained):
        if hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(True)
            return
    raise UserError(f"train.grad_checkpointing: {type(trained).__name__} has no set_grad_checkpointing; "
                    f"set it to false for this model family")


class _DDPPart:
    """Wraps the trained part in DDP in place (for a hybrid only the target module's runner)."""

    @staticmethod
    def wrap(holder: nn.Module, attr: str | None, dist: Dist):
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        if attr is None:
            return DDP(holder, device_ids=ids), holder
        setattr(holder, attr, DDP(getattr(holder, attr), device_ids=ids))
        return holder, getattr(holder, attr)


def nonfinite_message(label: str, value: float, where: str, ckpt: Path, allowed: int) -> str:
    kept = (f"the last good checkpoint {ckpt} is kept (rerun resumes from it)" if ckpt.exists()
            else "no checkpoint had been written yet")
    skips = f" after {allowed} skipped steps" if allowed else ""
    return (f"{label}: loss became {value} at {where}{skips}; stopped, {kept}; lower the lr, set clip_grad "
            f"(e.g. --set train.clip_grad=1.0), use bf16 instead of fp16, or allow a few bad steps with "
            f"--set train.max_nonfinite_skips=N")


def _kept(ckpt: Path) -> str:
    return f"; the last good checkpoint {ckpt} is kept (rerun resumes from it)" if ckpt.exists() else ""


def fit(net: nn.Module, trained: nn.Module, cfg, bundle, data_cfg, dist: Dist, seed: int,
        stage_dir: Path, ddp_attr: str | None = None, label: str = "", task=None) -> dict:
    """Train `trained`'s parameters through `net` (inputs -> logits) for cfg.epochs epochs.

    `ddp_attr` names the attribute of `net` that holds the trained part when they differ (a
    hybrid); DDP wraps only that part. `task` (default classification) gives the losses and
    metrics. Returns final metrics and costs; resumes from stage_dir/checkpoint.safetensors when
    it exists.
    """
    from timm.optim import create_optimizer_v2

    task = task or get_task("classification")
    net.to(dist.device)
    train_loader = make_loader(bundle, bundle.train, data_cfg, cfg.batch_size, True, seed, dist.rank, dist.world,
                               dist.device)
    test_loader = make_loader(bundle, bundle.test, data_cfg, data_cfg.eval_batch_size, False, seed, dist.rank,
                              dist.world, dist.device)
    budget = plan(cfg, len(train_loader), getattr(bundle, "context", 0), dist.world, label, len(bundle.train))
    lr = cfg.lr * cfg.batch_size * cfg.accum_steps * dist.world / cfg.lr_base_batch
    # torch's fused AdamW runs on CUDA and, since torch 2.4, on CPU (measured 1.1x there: docs/performance.md)
    opt_kwargs = {"fused": True} if cfg.fused else {}
    optimizer = create_optimizer_v2(trained, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **opt_kwargs)
    scheduler = make_scheduler(optimizer, cfg, budget)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    mixup, criterion, flops_criterion = task.criteria(cfg, bundle)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(net, trained)

    ckpt = stage_dir / "checkpoint.safetensors"
    metrics_path = stage_dir / "metrics.jsonl"
    pos = resume.restore(ckpt, trained, optimizer, scheduler, scaler, dist, cfg, label, metrics_path, budget)
    start_epoch = pos.epoch

    if pos.flops_per_step is None:
        error = None
        try:        # reads a batch: an unreadable image on one rank must stop them all (DDP's set-up waits)
            x, y = next(iter(train_loader.epoch(0)))
            pos.flops_per_step = count_step_flops(net, trained, flops_criterion, x, y)
        except Exception as e:      # noqa: BLE001
            error = e
        stop_if_any_failed(dist, error, where="while measuring a step's FLOPs")
    if dist.world > 1:
        net, _ = _DDPPart.wrap(net, ddp_attr, dist)
    ddp_module = (getattr(net, ddp_attr) if ddp_attr else net) if dist.world > 1 else None
    run_net = torch.compile(net) if cfg.compile else net
    flops_per_update = pos.flops_per_step * cfg.accum_steps * dist.world
    tb = Events(stage_dir, cfg.tensorboard and dist.main, pos.num_updates, dist.world, flops_per_update)
    evals = PeriodicEval(cfg, bundle, data_cfg, seed, dist, task, metrics_path, tb, budget, flops_per_update, evaluate,
                         label)

    params = [p for p in trained.parameters() if p.requires_grad]
    last = task.empty()
    clock = resume.SaveClock(cfg, dist.main)
    for epoch in range(start_epoch, budget.epochs):
        t0 = mark = time.perf_counter()     # mark: up to where pos.seconds counts this epoch
        seed_all(seed * 1_000_003 + epoch * 1009 + dist.rank)
        first, loss_sum, seen = pos.step, 0.0, 0
        if first:       # mid-epoch: this rank's RNG and running sums as they were at that step
            loss_sum, seen = resume.restore_rank_state(pos.ranks[dist.rank], dist.device)
        pos.step = 0
        micro_steps = budget.steps_in(epoch)
        net.train()
        optimizer.zero_grad(set_to_none=True)
        show = dist.main and sys.stderr.isatty()
        batches = iter(train_loader.epoch(epoch, start=first))
        if show:
            from tqdm import tqdm
            batches = iter(tqdm(batches, total=micro_steps, initial=first, desc=f"{label} {epoch + 1}/{budget.epochs}",
                                leave=False))
        for step in range(first, micro_steps):
            sync = (step + 1) % cfg.accum_steps == 0
            no_sync = ddp_module.no_sync() if (ddp_module is not None and not sync) else contextlib.nullcontext()
            where = f"epoch {epoch + 1} step {step + 1}"
            with no_sync:
                # Two guarded parts, each followed by the ranks' agreement: reading the batch, then the
                # forward pass (DDP's forward may itself run a collective, so every rank must get there)
                error, n = None, 0
                try:
                    x, y = next(batches)
                    n = len(y)
                    if mixup is not None:
                        x, y = mixup(x, y)
                except StopIteration:
                    break       # fewer batches than planned (data.on_bad_image: skip dropped a whole one)
                except Exception as e:      # noqa: BLE001 -- e.g. an unreadable image on this rank only
                    error = e
                agree(dist, error, 0.0, where=f"at {where}", after=_kept(ckpt))
                error, loss, value = None, None, float("nan")
                try:
                    with autocast(cfg.amp, dist.device):
                        loss = criterion(run_net(x), y)
                    value = loss.item()
                except Exception as e:      # noqa: BLE001
                    error = e
                verdict = agree(dist, error, value, sync and clock.due(pos.num_updates + 1), where=f"at {where}",
                                after=_kept(ckpt))
                if verdict.nonfinite:
                    pos.nonfinite += 1
                    rank, bad = next(iter(verdict.nonfinite.items()))
                    at = f"{where} on rank {rank} of {dist.world}" if dist.world > 1 else where
                    if pos.nonfinite > cfg.max_nonfinite_skips:
                        raise _everywhere(dist, nonfinite_message(label, bad, at, ckpt, cfg.max_nonfinite_skips))
                    if dist.main:
                        print(f"[{label}] warning: loss is {bad} at {at}; skipping this update "
                              f"({pos.nonfinite}/{cfg.max_nonfinite_skips} allowed by max_nonfinite_skips)", flush=True)
                    optimizer.zero_grad(set_to_none=True)   # drop the whole accumulation window
                    continue
                loss = loss / cfg.accum_steps
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += value * n
            seen += n
            if sync:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad
                             else tb.grad_norm(params))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pos.num_updates += 1
                scheduler.step_update(num_updates=pos.num_updates)
                tb.update(pos.num_updates, loss_sum, seen, t0, grad_norm, optimizer.param_groups[0]["lr"])
                if evals.due(pos.num_updates):
                    evals.run(run_net, pos.num_updates, epoch, loss_sum / max(seen, 1),
                              pos.seconds + time.perf_counter() - mark)
                if verdict.save and step + 1 < micro_steps:     # an epoch's end is saved below anyway
                    pos.epoch, pos.step = epoch, step + 1
                    pos.seconds += time.perf_counter() - mark
                    mark = time.perf_counter()
                    resume.save(ckpt, trained, optimizer, scheduler, scaler, dist, pos, epoch, True, loss_sum, seen)
                    pos.step = 0
                    clock.saved()
        if epoch == budget.epochs - 1:      # the curve ends at the stage's last update
            evals.run(run_net, pos.num_updates, epoch, loss_sum / max(seen, 1),
                      pos.seconds + time.perf_counter() - mark, final=True)
        last = evaluate(run_net, test_loader, dist, cfg.amp, task)
        pos.seconds += time.perf_counter() - mark
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), **task.row(last),
               "lr": optimizer.param_groups[0]["lr"], "seconds": pos.seconds}
        skipped = train_loader.take_skipped() + test_loader.take_skipped()
        if skipped:
            row["skipped_images"] = len(skipped)
            print(f"[{label}] epoch {epoch + 1}: skipped {len(skipped)} unreadable images "
                  f"(data.on_bad_image: skip), e.g. {skipped[0]}", flush=True)

        def write_row(row=row):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tb.epoch(pos.num_updates, row)
            print(f"[{label}] epoch {epoch + 1}/{budget.epochs} loss {row['train_loss']:.4f} "
                  f"{task.text(last)} ({pos.seconds:.1f}s)", flush=True)

        resume.save(ckpt, trained, optimizer, scheduler, scaler, dist, pos, epoch, False, first=write_row)
        clock.saved()
    tb.close()
    if budget.epochs == 0 or start_epoch >= budget.epochs:
        last = evaluate(run_net, test_loader, dist, cfg.amp, task)
    steps = budget.micro_steps * dist.world
    seconds, flops_per_step = pos.seconds, pos.flops_per_step
    return {"metrics": task.final(last), "seconds": seconds,
            "process_seconds": seconds * dist.world, "flops_per_step": flops_per_step,
            "steps": steps, "flops": flops_per_step * steps, "epochs": budget.epochs, "updates": budget.updates,
            "tokens": budget.tokens,
            "lr": lr, "train": asdict(cfg)}


def _everywhere(dist: Dist, message: str) -> UserError:
    """An error every rank raises at the same step (they agreed on it): rank 0 alone prints it."""
    return StoppedEverywhere(message, quiet=dist.rank != 0) if dist.world > 1 else UserError(message)
