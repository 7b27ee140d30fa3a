"""The local launcher: jobs as child processes of `run`, GPUs and CPU threads split between the
jobs running at once."""
from __future__ import annotations

import os
import subprocess

from ..errors import UserError
from .job import Job, Resources
from .process import spawn


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LocalLauncher:
    """Jobs as child processes of `run`: GPUs and CPU threads split between the jobs running at once."""
    name = "local"

    def __init__(self, recipe):
        self.launch = recipe.launch
        gpus = 0
        if recipe.device != "cpu":
            import torch
            gpus = torch.cuda.device_count()
        self.free_gpus = list(range(gpus))

    def plan(self, stage: str, n_jobs: int, parallel: int) -> tuple[int, Resources]:
        slots = max(1, min(parallel, n_jobs))
        shape = self.launch.shape(stage)
        g = shape.devices_per_node
        if self.free_gpus:
            total = len(self.free_gpus)
            g = g or max(1, total // slots)
            if g > total:
                raise UserError(f"{stage} jobs want {g} GPUs (launch.devices_per_job or launch.stages.{stage}."
                                f"devices_per_node) but this machine shows {total}; lower it")
            slots = min(slots, total // g)
        procs = max(1, g)
        threads = shape.cpus_per_task or max(1, cpu_count() // (slots * procs))
        return slots, Resources(procs=procs, threads=threads, gpus=g if self.free_gpus else 0)

    def submit(self, job: Job, res: Resources):
        ids, self.free_gpus = self.free_gpus[:res.gpus], self.free_gpus[res.gpus:]
        res = Resources(res.procs, res.threads, res.gpus, ids)
        return spawn(job, res), ids

    def poll(self, handle) -> tuple[int | None, str]:
        proc, ids = handle
        rc = proc.poll()
        if rc is not None:
            self.free_gpus = sorted(self.free_gpus + ids)
        return rc, ""

    def stop(self, handle) -> None:
        proc, _ = handle
        if proc.poll() is None:
            proc.terminate()        # torchrun passes SIGTERM on to its workers
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
