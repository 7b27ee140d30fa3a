"""Run jobs (a stage, or one module) as separate processes: here (local), on Ray, or on SLURM.

Every job is the same command, `python -m incubate.cli STAGE --recipe RUN/recipe.yaml --out RUN`
(under `torchrun` when it gets more than one device; on SLURM, one task a rank), writing
RUN/<stage>/log.txt. Each stage has its own shape (`launch.stages.<stage>`: nodes, devices a
node, CPUs, time), so the meta model can train on several nodes while each module job gets one.
The run directory is the only hand-off: a job that dies is rerun and resumes from its checkpoint, a job
whose stage already finished is skipped. One scheduler (`run_jobs`) drives every launcher; a
launcher only knows how to start a job, ask whether it ended and stop it (the `Launcher` Protocol).

  job.py        a job (one stage command against a run directory) and what it gets
  process.py    the job as a process where it runs (a torchrun when it has several devices)
  base.py       the Launcher Protocol
  scheduler.py  run_jobs: slots, retries, what a person sees of each job
  local.py, ray.py, slurm.py   one back-end each
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Launcher
from .job import Job, Resources
from .local import LocalLauncher
from .process import command, free_port
from .ray import RayLauncher
from .scheduler import run_jobs
from .slurm import SlurmLauncher

__all__ = ["LAUNCHERS", "Job", "Launcher", "Resources", "command", "free_port", "make_launcher", "run_jobs"]
LAUNCHERS = ("local", "ray", "slurm")


def one_node_only(recipe, launcher: str) -> None:
    """Refuse, before any job starts, a stage shape over several nodes on a launcher that cannot run one."""
    for stage, shape in recipe.launch.stages.items():
        if shape.nodes > 1:
            raise UserError(f"launch.stages.{stage}.nodes is {shape.nodes} but --launcher {launcher} runs each job "
                            f"on one node{' (a Ray task cannot span nodes here)' if launcher == 'ray' else ''}; "
                            f"use --launcher slurm, or set it to 1")


def make_launcher(name: str, recipe, run: Path, address: str | None = None) -> Launcher:
    if name in ("local", "ray"):
        one_node_only(recipe, name)
    if name == "local":
        return LocalLauncher(recipe)
    if name == "ray":
        return RayLauncher(recipe, address)
    if name == "slurm":
        return SlurmLauncher(recipe, run)
    raise UserError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
