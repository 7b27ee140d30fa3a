"""The data-wait part of benchmarks/step_cost.py: the share of an E2E step spent waiting on the
real Loader (batched in-memory path, and the per-image path with workers), across epoch boundaries."""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.step_jobs import make_job, step, sync
from incubate.recipe.schema import DataCfg
from incubate.data.loaders import DataBundle, Loader, Reader, Split
from incubate.data.spec import ImageSpec


def data_wait(p: dict, args, device, amp: str) -> list:
    """Share of E2E step time spent waiting on the real Loader, in-memory images, over epochs."""
    n = p["batch"] * 8        # 8 steps an epoch: the run crosses epoch boundaries
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, p["img"], p["img"]), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, p["classes"], (n,), generator=g)
    split = Split(images, labels)
    bundle = DataBundle(split, split, ImageSpec.unnamed(3, p["img"], p["classes"]), (0.5,) * 3, (0.25,) * 3,
                        "synthetic in-memory")
    settings = [("batched (in-memory default: shift+flip)", dict(), dict(shift=4, hflip=True))]
    per_image = dict(auto_augment="rand-m9-mstd0.5-inc1", hflip=True)
    for workers, persistent, pin in ((0, False, False), (2, False, False), (2, True, False), (2, True, True)):
        if pin and device.type != "cuda":
            continue
        label = f"per-image (RandAugment), {workers} workers" + (", persistent" if persistent else "") + \
            (", pinned" if pin else "")
        settings.append((label, dict(num_workers=workers, persistent_workers=persistent, pin_memory=pin), per_image))
    if device.type == "cuda":
        settings.insert(1, ("batched, pinned", dict(pin_memory=True), dict(shift=4, hflip=True)))
    rows = []
    job = make_job("e2e", "base", p, amp, device)
    for label, data_kw, aug_kw in settings:
        cfg = DataCfg(source="synthetic", img_size=p["img"], **data_kw)
        for key, value in aug_kw.items():
            setattr(cfg.augment, key, value)
        loader = Loader(bundle, split, cfg, Reader(p["batch"], True, 0, 0, 1, device))

        def batches():
            epoch = 0
            while True:
                yield from loader.epoch(epoch)
                epoch += 1
        it = batches()
        waits, totals = [], []
        for i in range(args.warmup + args.data_steps):
            sync(device)
            t0 = time.perf_counter()
            x, y = next(it)
            sync(device)
            t1 = time.perf_counter()
            step(job, x, y, device)
            sync(device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                waits.append(t1 - t0)
                totals.append(t2 - t0)
        rows.append({"loader": label, "steps": len(totals), "epochs_crossed": (args.warmup + args.data_steps) // 8,
                     "wait_share": sum(waits) / sum(totals), "median_wait_ms": 1e3 * statistics.median(waits),
                     "max_wait_ms": 1e3 * max(waits), "median_step_s": statistics.median(totals)})
        print(f"  data wait {label}: {100 * rows[-1]['wait_share']:.2f}%", flush=True)
        del it, loader
    return rows
