"""The one scheduler every launcher runs under: jobs of a phase in slots, retries, and what a
person sees of each job (its console file as it grows; its log's last lines when it fails)."""
from __future__ import annotations

import signal
import sys
import time
from collections import deque
from pathlib import Path

from ..errors import UserError
from .base import Launcher
from .job import Job, Resources

TAIL = 5


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


class _Echo:
    """Show each job's console file (what the job says to a person, incubate/console.py) as it grows."""

    def __init__(self):
        self.offsets: dict[Path, int] = {}

    def start(self, path: Path) -> None:
        self.offsets[path] = path.stat().st_size if path.exists() else 0

    def show(self, path: Path, out) -> None:
        if not path.exists():
            return
        with open(path, "rb") as f:
            f.seek(self.offsets.get(path, 0))
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offsets[path] = self.offsets.get(path, 0) + end
        for line in data[:end].decode(errors="replace").splitlines():
            print(f"  {line}", file=out, flush=True)


def run_jobs(launcher: Launcher, jobs: list[Job], parallel: int, retries: int, out=None) -> dict:
    """Run `jobs` (one phase: one stage), at most `parallel` at once, each retried up to `retries`
    times, in that stage's shape; report every job.

    Returns {"finished": [...], "skipped": [...], "failed": {label: reason}}; raises UserError
    naming each failed job once every job has ended. `out`: where it reports (default: sys.stdout at
    the call, so that a caller's redirection holds).
    """
    out = out or sys.stdout
    result = {"finished": [], "skipped": [], "failed": {}}
    pending = deque()
    for job in jobs:
        if job.dir.finished():
            print(f"[{job.label}] skipped: already finished in {job.dir.path}", file=out, flush=True)
            result["skipped"].append(job.label)
        else:
            pending.append(job)
    slots, res = launcher.plan(jobs[0].stage, len(pending), parallel) if jobs else (1, Resources())
    tries, running, echo = {}, {}, _Echo()
    try:
        while pending or running:
            while pending and len(running) < slots:
                job = pending.popleft()
                tries[job.label] = tries.get(job.label, 0) + 1
                running[job.label] = _start(launcher, job, res, tries[job.label], retries, echo, out)
            for label, (job, handle, t0) in list(running.items()):
                echo.show(job.console, out)
                polled = launcher.poll(handle)
                if polled[0] is None:
                    continue
                echo.show(job.console, out)
                del running[label]
                if not _ended(job, polled, time.perf_counter() - t0, tries[label], retries, result, out):
                    pending.appendleft(job)
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


def _start(launcher: Launcher, job: Job, res, attempt: int, retries: int, echo, out) -> tuple:
    """Submit one try of a job (its log opened with a header line); returns its entry of `running`."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} try {attempt}/{retries + 1} {res.describe(launcher.name)}\n")
    echo.start(job.console)
    entry = (job, launcher.submit(job, res), time.perf_counter())
    print(f"[{job.label}] started, try {attempt}/{retries + 1}; log {job.log}", file=out, flush=True)
    return entry


def _ended(job: Job, polled: tuple[int, str], secs: float, attempt: int, retries: int, result: dict, out) -> bool:
    """Record how a try ended (`polled`: the launcher's poll, exit code and why); False when the job
    should be tried again (from its checkpoint)."""
    (rc, note), label = polled, job.label
    if rc == 0 and job.dir.finished():
        print(f"[{label}] finished in {secs:.1f}s", file=out, flush=True)
        result["finished"].append(label)
        return True
    why = reason(rc, note) if rc != 0 else "exited 0 but its stage is not finished"
    if attempt <= retries and rc != 2:
        print(f"[{label}] failed ({why}); retrying from its checkpoint", file=out, flush=True)
        return False
    result["failed"][label] = why
    lines = "\n".join(f"    | {x}" for x in last_lines(job.log))
    print(f"[{label}] FAILED after {attempt} tries: {why}; last lines of {job.log}:\n{lines}", file=out, flush=True)
    return True
