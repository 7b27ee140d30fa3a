"""A job as a process where it runs: the stage command (under torchrun when it has several
processes), its environment, its log, and what it tells `incubate run` (incubate/console.py)."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .. import console
from .job import Job, Resources

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # so every job runs this very code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: list[str], procs: int) -> list[str]:
    if procs <= 1:
        return [sys.executable, "-m", "incubate.cli", *args]
    # A fresh rendezvous port a job: jobs sharing a machine never collide. Static rendezvous, as
    # gloo groups re-formed after a restart through the c10d backend fail to connect (torch 2.14).
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "incubate.cli", *args]


def job_env(res: Resources, job: Job, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(res.threads)
    env[console.ENV] = str(job.console)
    if res.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, res.gpu_ids))
    return env


def _die_with_parent() -> None:
    """Linux: the job gets SIGKILL when the process that started it dies, so no job outlives `run`."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(job: Job, res: Resources) -> subprocess.Popen:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "ab") as f:
        return subprocess.Popen(command(job.args(), res.procs), stdout=f, stderr=subprocess.STDOUT,
                                cwd=PACKAGE_ROOT, env=job_env(res, job), stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)


def execute(job: Job, res: Resources) -> int:
    """Run one job to its end where this function runs (a Ray worker, a SLURM task); returns its exit code."""
    proc = spawn(job, res)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
