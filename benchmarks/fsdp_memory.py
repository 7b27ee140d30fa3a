"""Memory and time of one training step under train.parallel ddp and fsdp, at 1 and 2 ranks.

A ViT (timm; ViT-B/16's width and depth by default, 86M parameters) trains a few AdamW steps on random
images, wrapped the way the stages wrap it (incubate/train/parallel.py: DDP, or FSDP2 on each block then the
root). Per rank: the model state it holds (its parameters, gradients and AdamW state: the local shards
under fsdp), counted exactly from the tensors; its peak memory (CUDA: max_memory_allocated; CPU: the
growth of the process's peak RSS over the moment before the model was built); the median step time
after one warm-up step. Each (parallel, ranks) runs in its own processes, so that a peak is its own;
the fsdp/ddp time ratio compares runs of the same invocation.

  python -m benchmarks.fsdp_memory                             # ~86M parameters (ViT-B/16 width and depth)
  python -m benchmarks.fsdp_memory --width 192 --depth 4       # the quick check
  python -m benchmarks.fsdp_memory --hybrid --depth 16         # a module job: its frozen meta parts replicated or sharded
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _state_bytes(net, model, optimizer) -> dict:
    """This rank's bytes of the trained model's parameters, gradients and AdamW state, and of the
    frozen parameters beside it (a hybrid's meta parts)."""
    import torch
    params = list(model.parameters())
    trained = {id(p) for p in params}
    opt = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _local_bytes(opt),
            "frozen": _local_bytes(p for p in net.parameters() if id(p) not in trained)}


def _vit(args, depth: int):
    from incubate.families import get_family     # its build records the arguments a meta model needs
    return get_family("vit").build("vit_base_patch16_224", dict(
        img_size=args.img, patch_size=args.patch, embed_dim=args.width, depth=depth,
        num_heads=max(args.width // 64, 1), num_classes=1000))


def _part(args):
    """The whole ViT, or (--hybrid) module 1 of K = 4 inside a meta model of 2 blocks a module."""
    from incubate import api
    from incubate.families import get_family
    from incubate.train.parallel import Trainee
    if not args.hybrid:
        model = _vit(args, args.depth)
        return Trainee.whole(model, get_family("vit"))
    k = args.depth // 4
    target = _vit(args, args.depth)
    meta = api.meta_model(target, [k] * 4, "vit", meta_division=[max(k // 4, 1)] * 4)
    return api.hybrid(meta, target, 1).trainee()


def _build(args, dist):
    """The trained part, wrapped as a stage wraps it (fsdp-meta: the hybrid's frozen meta blocks sharded
    too), the module that holds it all, and the trained model's AdamW."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from incubate.train.parallel import replicate, shard
    torch.manual_seed(0)
    part = _part(args)
    part.net.to(dist.device)
    if args.parallel.startswith("fsdp"):
        shard(part, "none", dist.device)
    elif dist.world > 1:
        replicate(part, dist)
    if args.parallel == "fsdp-meta":
        for block in part.net.meta.blocks:
            fully_shard(block, reshard_after_forward=True)
    return part.net, part.model, torch.optim.AdamW(part.model.parameters(), lr=1e-4)


def worker(args) -> None:
    """One rank: build, step, measure; rank 0 writes every rank's figures to args.out."""
    import torch
    import torch.distributed as tdist
    import timm  # noqa: F401  (imported before the baseline: its import is not the step's memory)
    from incubate.train.dist import setup_dist
    from incubate.families import get_family
    from incubate.train.parallel import shard  # noqa: F401
    get_family("vit")
    dist = setup_dist("auto")
    base = _rss_mib()
    net, model, optimizer = _build(args, dist)
    x = torch.randn(args.batch, 3, args.img, args.img, device=dist.device)
    y = torch.randint(0, 1000, (args.batch,), device=dist.device)
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        state = _state_bytes(net, model, optimizer)      # gradients still held: the step's high point
        optimizer.zero_grad(set_to_none=True)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dist.device.type == "cuda" else _rss_mib() - base)
    mine = {"rank": dist.rank, **state, "peak_mib": peak, "step_s": statistics.median(times[1:])}
    every = [mine]
    if dist.world > 1:
        every = [None] * dist.world
        tdist.all_gather_object(every, mine)
    if dist.main:
        n = sum(p.numel() for p in model.parameters())     # a DTensor's numel is its whole tensor's
        frozen = sum(p.numel() for p in net.parameters()) - n
        Path(args.out).write_text(json.dumps({"params": n, "frozen_params": frozen, "ranks": every}))
    if tdist.is_initialized():
        tdist.destroy_process_group()


def _launch(args, parallel: str, ranks: int, out: Path) -> dict:
    from incubate.launchers import free_port
    own = [f"--{k}={getattr(args, k)}" for k in ("width", "depth", "img", "patch", "batch", "steps")]
    own += ["--hybrid"] if args.hybrid else []
    tail = ["-m", "benchmarks.fsdp_memory", "--worker", f"--parallel={parallel}", f"--out={out}", *own]
    cmd = [sys.executable, *tail] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", *tail]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def table(results: dict) -> str:
    mib = 2 ** 20
    lines = ["| parallel | ranks | model state a rank (params + grads + AdamW), MiB | frozen params a rank, MiB | "
             "peak a rank, MiB | step, s (median) | step time / ddp's |", "|---|---|---|---|---|---|---|"]
    for (parallel, ranks), r in results.items():
        worst = max(r["ranks"], key=lambda x: x["params"] + x["grads"] + x["optimizer"])
        state = (worst["params"] + worst["grads"] + worst["optimizer"]) / mib
        parts = f"{state:.0f} ({worst['params'] / mib:.0f} + {worst['grads'] / mib:.0f} + {worst['optimizer'] / mib:.0f})"
        step = max(x["step_s"] for x in r["ranks"])
        ratio = ""
        if parallel != "ddp" and ("ddp", ranks) in results:
            ratio = f"{step / max(x['step_s'] for x in results[('ddp', ranks)]['ranks']):.2f}"
        lines.append(f"| {parallel} | {ranks} | {parts} | {max(x['frozen'] for x in r['ranks']) / mib:.0f} | "
                     f"{max(x['peak_mib'] for x in r['ranks']):.0f} | {step:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="images a rank a step")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="CPU threads a rank")
    p.add_argument("--hybrid", action="store_true", help="a module job instead (module 1 of K = 4): its frozen "
                   "meta parts replicated (fsdp, ours) or sharded too (fsdp-meta)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    results = {}
    runs = [(p, 2) for p in ("ddp", "fsdp", "fsdp-meta")] if args.hybrid else \
        [(p, r) for r in (1, 2) for p in ("ddp", "fsdp")]
    with tempfile.TemporaryDirectory() as tmp:
        for parallel, ranks in runs:
            results[(parallel, ranks)] = _launch(args, parallel, ranks, Path(tmp) / f"{parallel}{ranks}.json")
    first = next(iter(results.values()))
    what = f"module 1 of 4 inside a meta model ({first['frozen_params'] / 1e6:.1f}M frozen)" if args.hybrid else "whole"
    print(f"ViT width {args.width} depth {args.depth}, {what}: {first['params'] / 1e6:.1f}M trained parameters, "
          f"batch {args.batch} a rank, {args.img}px patch {args.patch}, fp32, AdamW; {args.steps} timed steps\n")
    print(table(results))


if __name__ == "__main__":
    main()
