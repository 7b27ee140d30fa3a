"""The ranks' agreement on every step, priced: the same training (engine.fit on digits, a small
ViT) with the agreement and with it patched to a no-op, alternated fit by fit in the same processes.

A step's time is the interval between two optimizer steps (a global optimizer step hook, so the same
on any tree whose fit has this signature): reading, forward, backward, the agreement, the update;
evaluation and saving come after an epoch's last step and fall outside. Medians over each fit's
intervals after the first WARMUP; the ratio is the median over pairs of adjacent fits. On a loaded
machine that ratio drowns in noise: the agreement is also timed alone (its collectives and host
reads, a step's worth, without training).
The no-op: this tree's StepGuard runs parts bare and agrees on nothing; on a tree with the older
per-micro-step `agree` (main before issue 23) that function answers without a collective.

  python -m benchmarks.step_cost --agreement --ranks 2 --threads 1       # 2 gloo ranks on the CPU
  python -m benchmarks.step_cost --agreement --ranks 1 --device cuda     # one GPU: the host sync alone
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3
WORKER_KEYS = ("device", "threads", "rounds", "width", "depth", "img", "batch", "accum")


def patch_out_agreement() -> str:
    """Make the agreement a no-op on this tree; returns which kind of agreement it had."""
    from incubate.train import engine, faults
    if hasattr(faults, "StepGuard"):
        g = faults.StepGuard
        g.run = lambda self, part, where: part()
        g.record = lambda self, slot, loss: None
        g.check = lambda self: None
        g.agree = lambda self, save, norm: faults.Verdict([0.0] * self.accum)
        return "StepGuard: once an optimizer step"
    engine.agree = lambda dist, error, loss, save=False, where="", after="": faults.Verdict({}, False)
    return "agree: twice a micro-step"


def _fit_once(args, dist, stage_dir: Path) -> None:
    import timm
    import torch
    from incubate.recipe.schema import DataCfg, TrainCfg
    from incubate.data.loaders import load_data
    from incubate.train.engine import fit
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=args.img, patch_size=4, embed_dim=args.width,
                            depth=args.depth, num_heads=max(args.width // 32, 1), in_chans=1, num_classes=10)
    data = DataCfg(source="digits", img_size=args.img, train_fraction=0.9)
    cfg = TrainCfg(epochs=1, batch_size=args.batch, accum_steps=args.accum, lr=1e-3, lr_base_batch=args.batch,
                   warmup_epochs=0, tensorboard=False)
    stage_dir.mkdir(parents=True, exist_ok=True)
    try:        # this tree's fit takes typed parts: the trained part and the StageRun (incubate/train/parallel.py)
        from incubate.families import get_family
        from incubate.train.parallel import Trainee
        from incubate.train.step import StageRun
    except ImportError:     # a tree before them: fit(net, trained, cfg, bundle, data, dist, seed=, stage_dir=, label=)
        fit(net, net, cfg, load_data(data), data, dist, seed=0, stage_dir=stage_dir, label="agree")
        return
    fit(Trainee.whole(net, get_family("vit")), cfg, load_data(data), data, StageRun(dist, 0, stage_dir, "agree"))


def worker(args) -> None:
    """One rank: fits alternately with and without the agreement; rank 0 writes the result."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    if args.threads:
        torch.set_num_threads(args.threads)
    from incubate.train import engine
    pg = importlib.import_module("incubate.train.dist") if importlib.util.find_spec("incubate.train.dist") else engine  # older trees
    dist = pg.setup_dist(args.device)
    stamps: list = []
    hook = register_optimizer_step_pre_hook(lambda opt, a, k: stamps.append(time.perf_counter()))
    try:
        _fits(args, dist, pg, stamps)
    finally:
        hook.remove()        # global: it would outlive this function in a caller's process


def _fits(args, dist, pg, stamps: list) -> None:
    from incubate.train import engine, faults
    saved = {name: getattr(faults.StepGuard, name) for name in ("run", "record", "check", "agree")} \
        if hasattr(faults, "StepGuard") else {"agree": engine.agree}
    kind, rounds = None, []
    for r in range(args.rounds):
        on = r % 2 == 0
        kind = patch_out_agreement() if not on else kind
        stamps.clear()
        try:
            _fit_once(args, dist, Path(args.work) / f"fit{r}")
        finally:
            for name, fn in saved.items():
                setattr(faults.StepGuard if hasattr(faults, "StepGuard") else engine, name, fn)
        steps = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP:]
        rounds.append({"agreement": on, "steps": len(steps), "median_s": statistics.median(steps)})
    alone = agreement_alone(dist, args.accum)
    if dist.main:
        Path(args.out).write_text(json.dumps({"kind": kind, "rounds": rounds, "agreement_alone_s": alone}))
    pg.close_dist(True)


def agreement_alone(dist, accum: int, calls: int = 50, repeats: int = 7) -> float:
    """Seconds of one step's agreement by itself (this tree's collectives and host reads, no training):
    the median of `repeats` means over `calls` steps."""
    import torch
    from incubate.train import faults
    means, guard, norm = [], getattr(faults, "StepGuard", None), torch.zeros(())
    guard = guard and guard(dist, accum)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            if guard is not None:
                guard.agree(False, norm)
            else:       # after reading the batch, after the forward (its loss read with .item()), every micro-step
                for _ in range(accum):
                    faults.agree(dist, None, 0.0)
                    faults.agree(dist, None, torch.zeros(()).item())
        means.append((time.perf_counter() - t0) / calls)
    return statistics.median(means)


def summarize(args, raw: dict) -> dict:
    on = [r["median_s"] for r in raw["rounds"] if r["agreement"]]
    off = [r["median_s"] for r in raw["rounds"] if not r["agreement"]]
    pairs = [a["median_s"] / b["median_s"] for a, b in zip(raw["rounds"][::2], raw["rounds"][1::2])]
    return {"command": "python -m benchmarks.step_cost " + " ".join(sys.argv[1:]), "ranks": args.ranks,
            "device": args.device, "threads": args.threads, "agreement_kind": raw["kind"],
            "model": {"width": args.width, "depth": args.depth, "img": args.img, "batch": args.batch,
                      "accum": args.accum}, "rounds": raw["rounds"],
            "median_step_s": {"with": statistics.median(on), "without": statistics.median(off)},
            "ratio_with_over_without": statistics.median(pairs), "agreement_alone_s": raw["agreement_alone_s"],
            "load_avg": os.getloadavg(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def run(args) -> dict:
    """Start the ranks (the environment torchrun gives them), wait, and summarize rank 0's result."""
    from incubate.launchers import free_port
    procs, work = [], tempfile.mkdtemp(prefix="agreement_")
    port, raw = free_port(), Path(work) / "rank0.json"       # rank 0's rounds, summarized below; not kept
    if args.ranks == 1:     # no group to form: this process is the rank (a second would only import again)
        worker(argparse.Namespace(out=str(raw), work=work, **{k: getattr(args, k) for k in WORKER_KEYS}))
        result = json.loads(raw.read_text())
        shutil.rmtree(work, ignore_errors=True)
        return summarize(args, result)
    for rank in range(args.ranks):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1))
        if args.ranks > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.ranks), RANK=str(rank),
                       LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(args.ranks))
        cmd = [sys.executable, "-m", "benchmarks.agreement_cost", "--out", str(raw), "--work", work]
        cmd += _worker_args(args)
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    result = None if any(codes) else json.loads(raw.read_text())
    shutil.rmtree(work, ignore_errors=True)
    if any(codes):
        raise SystemExit(f"agreement benchmark: a rank failed (exit codes {codes})")
    return summarize(args, result)


def _worker_args(args) -> list:
    return [f"--{k}={getattr(args, k)}" for k in WORKER_KEYS]


def add_arguments(ap) -> None:
    ap.add_argument("--ranks", type=int, default=2, help="--agreement: processes (gloo on the CPU)")
    ap.add_argument("--rounds", type=int, default=6, help="--agreement: fits, alternately with and without")
    ap.add_argument("--width", type=int, default=64, help="--agreement: the ViT's width")
    ap.add_argument("--depth", type=int, default=4, help="--agreement: the ViT's depth")
    ap.add_argument("--img", type=int, default=16, help="--agreement: image size (digits, resized)")
    ap.add_argument("--accum", type=int, default=1, help="--agreement: accum_steps")


def markdown(res: dict) -> str:
    m = res["model"]
    return "\n".join([
        f"Agreement cost ({res['agreement_kind']}), {res['ranks']} rank(s) on {res['device']}, ViT width "
        f"{m['width']} depth {m['depth']}, {m['img']} px, batch {m['batch']}, accum {m['accum']}: `{res['command']}`",
        "", "| | median step (s) |", "|---|---|",
        f"| with the agreement | {res['median_step_s']['with']:.4f} |",
        f"| without (no-op) | {res['median_step_s']['without']:.4f} |",
        f"| ratio with / without (median of paired fits) | {res['ratio_with_over_without']:.3f} |",
        f"| the agreement alone, a step (s) | {res['agreement_alone_s']:.6f} |", ""])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    add_arguments(ap)
    worker(ap.parse_args())
