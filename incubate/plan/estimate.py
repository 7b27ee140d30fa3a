"""`incubate plan`: what each stage and module job of a recipe needs before any GPU is rented.

For the meta model, every module job (hybrid i), the fine-tune, E2E and growth: parameters, FLOPs a
token (text) or a sample (images) and for the stage's budget, peak memory a device under DDP and
under FSDP at 1, 2, 4, ... 64 devices (incubate/plan/memory.py: a fake-tensor training step at the
recipe's batch and context, nothing allocated), the fewest devices each stage needs, and its cost in
GPU-hours and wall-clock at a given MFU. Nothing is read from the data: the vocabulary comes from the
tokenizer setting, an image recipe's classes and an epoch's samples from --classes / --train-samples
(without a dataset size, the budget of an epoch-budgeted stage stays unpriced: FLOPs a sample only).

A network deeper than 2 blocks in its scaled part (the trained module of a hybrid, the whole target)
is traced at 1 and 2 equal blocks (memory.SCALE_DEPTHS) and extrapolated (every byte and FLOP grows by the same amount a
block): tracing time grows faster than the depth. Families whose blocks differ (ResNet's stages) are
traced whole.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from ..errors import UserError
from ..stage_registry import E2E, FINETUNE, GROW, META
from .jobs import WORLDS, Job, Setting, trace_jobs

UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


@dataclass(frozen=True)
class Options:
    device_memory: int = 80 * 2 ** 30       # bytes a device
    devices_per_node: int = 8
    device_tflops: float = 989.0            # dense bf16 peak of one device (H100 SXM)
    mfu: float = 0.4
    classes: int | None = None              # image recipes: classes (else from a known source)
    train_samples: int | None = None        # training samples an epoch (images, or text windows)


def parse_memory(text: str) -> int:
    """'80GiB', '80 GB', '81920MiB' -> bytes; refused in one line otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise UserError(f"--device-memory '{text}' is not a size; write e.g. 80GiB or 80GB (units: "
                        f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    if value <= 0:
        raise UserError(f"--device-memory '{text}' must be more than 0")
    return int(value)


def check_options(o: Options) -> None:
    if not 0 < o.mfu <= 1:
        raise UserError(f"--mfu {o.mfu} must lie in (0, 1], e.g. 0.4 for 40% of the peak")
    for name, v in (("--device-tflops", o.device_tflops), ("--devices-per-node", o.devices_per_node),
                    ("--classes", o.classes), ("--train-samples", o.train_samples)):
        if v is not None and v <= 0:
            raise UserError(f"{name} {v} must be more than 0")


def plan(recipe, options: Options) -> dict:
    """The plan of `recipe` as a dict (what --json prints); `table(plan)` renders it."""
    check_options(options)
    t0 = time.time()
    setting = Setting.of(recipe, options.classes, options.train_samples)
    jobs = trace_jobs(setting)
    for job in jobs:
        job.run = placement(job, options)
    return {"recipe": recipe.name, "options": options.__dict__, "notes": setting.notes,
            "jobs": [job_dict(j) for j in jobs], "methods": methods(jobs, len(recipe.model.division)),
            "seconds": round(time.time() - t0, 1)}


def placement(job: Job, o: Options) -> dict:
    """DDP where a device holds the whole step (with DDP's buckets when there are several), else FSDP
    over the fewest devices that hold it; on whole nodes of --devices-per-node devices."""
    fits = [w for w in WORLDS if job.fsdp[w] <= o.device_memory]
    if job.ddp[2] <= o.device_memory:
        mode, fewest = "ddp", 1
    elif fits:
        mode, fewest = "fsdp", fits[0]
    else:
        return {"mode": "none", "fewest": None, "devices": None, "gpu_hours": _gpu_hours(job, o), "hours": None}
    devices = math.ceil(fewest / o.devices_per_node) * o.devices_per_node
    hours = _gpu_hours(job, o)
    return {"mode": mode, "fewest": fewest, "devices": devices, "gpu_hours": hours,
            "hours": None if hours is None else hours / devices}


def _gpu_hours(job: Job, o: Options) -> float | None:
    return None if job.flops is None else job.flops / (o.device_tflops * 1e12 * o.mfu) / 3600


def methods(jobs: list, k: int) -> dict:
    """GPU-hours and wall-clock of ours (meta + K jobs in parallel + fine-tune), E2E and growth (meta + grow)."""
    by = {j.name: j for j in jobs}
    hybrids = [by[f"hybrid {i}"] for i in range(k)]
    rows = {"ours": ([by[META], *hybrids, by[FINETUNE]], [by[META], max(hybrids, key=_hours), by[FINETUNE]]),
            E2E: ([by[E2E]], [by[E2E]])}
    if GROW in by:
        rows["growth"] = ([by[META], by[GROW]], [by[META], by[GROW]])
    return {name: {"gpu_hours": _sum(j.run["gpu_hours"] for j in cost), "hours": _sum(j.run["hours"] for j in wall),
                   "flops": _sum(j.flops for j in cost)} for name, (cost, wall) in rows.items()}


def _hours(job: Job) -> float:
    return job.run["hours"] or 0.0


def _sum(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def job_dict(j: Job) -> dict:
    return {"job": j.name, "stage": j.stage, "params": j.params, "trained": j.trained, "frozen": j.frozen,
            "unit": j.unit, "flops_per_unit": j.flops_per_unit, "budget_units": j.budget_units, "flops": j.flops,
            "state_bytes": j.state,
            "ddp_peak_bytes": {str(w): v for w, v in j.ddp.items()},      # string keys, as JSON has them
            "fsdp_peak_bytes": {str(w): v for w, v in j.fsdp.items()}, "scaled": j.scaled,
            "run": j.run}


def run_cli(load, options: Options, as_json: bool) -> None:
    """The command: options checked first (no recipe read for a bad one), then `load()`'s recipe planned."""
    import json
    from .table import table
    check_options(options)
    result = plan(load(), options)
    print(json.dumps(result, indent=1) if as_json else table(result))
