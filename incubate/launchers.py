"""Run jobs (a stage, or one module) as separate processes: here (local), on Ray, or on SLURM.

Every job is the same command, `python -m incubate.cli STAGE --recipe RUN/recipe.yaml --out RUN`
(under `torchrun` when it gets more than one device; on SLURM, one task a rank), writing
RUN/<stage>/log.txt. Each stage has its own shape (`launch.stages.<stage>`: nodes, devices a
node, CPUs, time), so the meta model can train on several nodes while each module job gets one.
The run directory is the only hand-off: a job that dies is rerun and resumes from its checkpoint, a job
whose stage already finished is skipped. One scheduler (`run_jobs`) drives every launcher; a
launcher only knows how to start a job, ask whether it ended and stop it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .rundir import StageDir

LAUNCHERS = ("local", "ray", "slurm")
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)   # so every job runs this very code
TAIL = 5


@dataclass
class Job:
    """One stage command against a run directory. `stage` is the CLI's name (meta, incubate, ...)."""
    stage: str
    run: Path
    module: int | None = None

    @property
    def dir(self) -> StageDir:
        return StageDir(self.run, "assembled" if self.stage == "assemble" else self.stage, self.module)

    @property
    def label(self) -> str:
        return self.dir.label

    @property
    def log(self) -> Path:
        return self.dir.path / "log.txt"

    def args(self) -> list[str]:
        extra = ["--module", str(self.module)] if self.module is not None else []
        return [self.stage, "--recipe", str(self.run / "recipe.yaml"), "--out", str(self.run), *extra]


@dataclass
class Resources:
    procs: int = 1                       # processes of the job a node (torchrun when > 1, SLURM: tasks)
    threads: int = 1                     # CPU threads a process
    gpus: int = 0                        # GPUs a node the job asks its engine for (ray, slurm)
    gpu_ids: list = field(default_factory=list)   # GPUs of this machine it gets (local)
    nodes: int = 1                       # nodes of the job (slurm)

    def describe(self, launcher: str) -> str:
        nodes = f"{self.nodes} node(s) x " if self.nodes > 1 else ""
        return f"({launcher}, {nodes}{self.procs} process(es), {self.threads} thread(s) each)"


def one_node_only(recipe, launcher: str) -> None:
    """Refuse, before any job starts, a stage shape over several nodes on a launcher that cannot run one."""
    for stage, shape in recipe.launch.stages.items():
        if shape.nodes > 1:
            raise UserError(f"launch.stages.{stage}.nodes is {shape.nodes} but --launcher {launcher} runs each job "
                            f"on one node{' (a Ray task cannot span nodes here)' if launcher == 'ray' else ''}; "
                            f"use --launcher slurm, or set it to 1")


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


def job_env(res: Resources, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(res.threads)
    if res.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, res.gpu_ids))
    return env


def _die_with_parent() -> None:
    """Linux: the job gets SIGKILL when the process that started it dies, so no job outlives `run`."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(args: list[str], res: Resources, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(command(args, res.procs), stdout=f, stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT,
                                env=job_env(res), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


def execute(args: list[str], res: Resources, log: str) -> int:
    """Run one job to its end where this function runs (a Ray worker, a SLURM task); returns its exit code."""
    proc = spawn(args, res, Path(log))
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


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
        return spawn(job.args(), res, job.log), ids

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

    def close(self) -> None:
        pass


def reason(rc: int, note: str = "") -> str:
    if note:
        return note
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit {rc}" + (" (a user error: not retried)" if rc == 2 else "")


def last_lines(path: Path, n: int = TAIL) -> list[str]:
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 8192))
        lines = f.read().decode(errors="replace").splitlines()
    return [line for line in lines if line.strip()][-n:]


class _Tail:
    """Echo each job's own progress lines ('[module 2] epoch 1/5 ...') as they reach its log."""

    def __init__(self):
        self.offsets: dict[Path, int] = {}

    def start(self, log: Path) -> None:
        self.offsets[log] = log.stat().st_size if log.exists() else 0

    def echo(self, log: Path, out) -> None:
        if not log.exists():
            return
        with open(log, "rb") as f:
            f.seek(self.offsets.get(log, 0))
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offsets[log] = self.offsets.get(log, 0) + end
        for line in data[:end].decode(errors="replace").splitlines():
            if line.startswith("[") or line.startswith("incubate: error"):
                print(f"  {line}", file=out, flush=True)


def run_jobs(launcher, jobs: list[Job], parallel: int, retries: int, out=sys.stdout) -> dict:
    """Run `jobs` (one phase: one stage), at most `parallel` at once, each retried up to `retries`
    times, in that stage's shape; report every job.

    Returns {"finished": [...], "skipped": [...], "failed": {label: reason}}; raises UserError
    naming each failed job once every job has ended.
    """
    result = {"finished": [], "skipped": [], "failed": {}}
    pending = deque()
    for job in jobs:
        if job.dir.finished():
            print(f"[{job.label}] skipped: already finished in {job.dir.path}", file=out, flush=True)
            result["skipped"].append(job.label)
        else:
            pending.append(job)
    slots, res = launcher.plan(jobs[0].stage, len(pending), parallel) if jobs else (1, Resources())
    tries, running, tail = {}, {}, _Tail()
    try:
        while pending or running:
            while pending and len(running) < slots:
                job = pending.popleft()
                tries[job.label] = tries.get(job.label, 0) + 1
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with open(job.log, "a") as f:
                    f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} try {tries[job.label]}/{retries + 1} "
                            f"{res.describe(launcher.name)}\n")
                tail.start(job.log)
                running[job.label] = (job, launcher.submit(job, res), time.perf_counter())
                print(f"[{job.label}] started, try {tries[job.label]}/{retries + 1}; log {job.log}",
                      file=out, flush=True)
            for label, (job, handle, t0) in list(running.items()):
                tail.echo(job.log, out)
                rc, note = launcher.poll(handle)
                if rc is None:
                    continue
                tail.echo(job.log, out)
                del running[label]
                secs = time.perf_counter() - t0
                if rc == 0 and job.dir.finished():
                    print(f"[{label}] finished in {secs:.1f}s", file=out, flush=True)
                    result["finished"].append(label)
                    continue
                why = reason(rc, note) if rc != 0 else "exited 0 but its stage is not finished"
                if tries[label] <= retries and rc != 2:
                    print(f"[{label}] failed ({why}); retrying from its checkpoint", file=out, flush=True)
                    pending.appendleft(job)
                else:
                    result["failed"][label] = why
                    lines = "\n".join(f"    | {x}" for x in last_lines(job.log))
                    print(f"[{label}] FAILED after {tries[label]} tries: {why}; last lines of {job.log}:\n{lines}",
                          file=out, flush=True)
            if running:
                time.sleep(0.2)
    except BaseException:
        for job, handle, _ in running.values():
            launcher.stop(handle)
        raise
    order = {job.label: i for i, job in enumerate(jobs)}
    result["finished"].sort(key=order.get)
    print(f"jobs: finished [{', '.join(result['finished'])}]  skipped [{', '.join(result['skipped'])}]  "
          f"failed [{', '.join(f'{k} ({v})' for k, v in result['failed'].items())}]", file=out, flush=True)
    if result["failed"]:
        raise UserError("job(s) failed: " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items())
                        + " (see each job's log.txt; rerun the same command to resume)")
    return result


def make_launcher(name: str, recipe, run: Path, address: str | None = None):
    if name in ("local", "ray"):
        one_node_only(recipe, name)
    if name == "local":
        return LocalLauncher(recipe)
    if name == "ray":
        from .cluster import RayLauncher
        return RayLauncher(recipe, address)
    if name == "slurm":
        from .cluster import SlurmLauncher
        return SlurmLauncher(recipe, run)
    raise UserError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
