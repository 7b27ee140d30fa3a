"""`incubate status RUN`: which stages finished, which are running, which have not started.

Read-only by design: it takes no lock and writes nothing, so it can watch a run from another
terminal or node while the run's jobs write it. A running stage is one whose lock is held
(lock.py): on the holder's own host the kernel's lock table says so for certain; from another host
only the lock file (pid, host, start time) and the age of the last metrics line can.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from .recipe.schema import load_recipe
from .errors import UserError
from .store.lock import read_holder
from .report import run_task
from .store.rundir import StageDir, run_modules, run_recipe, stage_dirs
from .store.safe_read import read_json_lines
from .stage_registry import stage as registered


def _flock_holders(path: Path) -> set[int] | None:
    """Pids holding a lock on `path` per the kernel's lock table, /proc/locks (None: none to read)."""
    try:
        ino = path.stat().st_ino
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    pids = set()
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts:          # a process waiting for the lock, not holding it
            continue
        # any lock type: on NFS the kernel emulates flock with a POSIX lock
        if len(parts) >= 6 and parts[5].rsplit(":", 1)[-1] == str(ino) and parts[4].lstrip("-").isdigit():
            pids.add(int(parts[4]))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(sd: StageDir) -> dict | None:
    """The process writing this stage now, or None. `checked` is False when it runs on another host
    (then only its lock file and its last metrics line vouch for it)."""
    lock = sd.path / ".lock"
    if not lock.exists():
        return None
    h = read_holder(lock)
    if h["pid"] is None:
        return None
    if h["host"] not in (None, socket.gethostname()):
        return dict(h, checked=False)
    held = _flock_holders(lock)
    alive = h["pid"] in held if held is not None else _pid_alive(h["pid"])
    return dict(h, host=h["host"] or socket.gethostname(), checked=True) if alive else None


def last_epoch(sd: StageDir) -> dict | None:
    """The stage's last metrics line, with `written`: when the file was last written (epoch seconds)."""
    try:
        written = sd.metrics.stat().st_mtime
    except OSError:
        return None
    # the writer may be half-way through the last line; a damaged line is passed over too
    rows = [r for r in read_json_lines(sd.metrics) if isinstance(r.get("epoch"), int)
            and (r.get("kind") != "eval" or isinstance(r.get("update"), int))]
    return dict(rows[-1], written=written) if rows else None


def _metric(values: dict, task, prefix: str = "") -> str:
    """The stage's headline metric as its task writes it, else the test loss."""
    value = values.get(f"{prefix}{task.headline}")
    if isinstance(value, (int, float)):
        return task.headline_text.format(value)
    loss = values.get(f"{prefix}loss")
    return f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "no metric"


def _where(row: dict, of: str) -> str:
    """How far a metrics row is: an epoch, or an update of an evaluation during training."""
    if row.get("kind") == "eval":
        tokens = f", {row['tokens']:,} tokens" if "tokens" in row else ""
        return f"update {row['update']}{tokens} (held-out slice)"
    return f"epoch {row['epoch']}{of}"


def _stamp(t: float, now: float) -> str:
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(t))} ({max(0, now - t):.0f}s ago)"


def stage_status(sd: StageDir, epochs: int | None, now: float, task) -> dict:
    """The stage's row; a file of it that does not read makes it "damaged", the line naming that file."""
    try:
        return _stage_status(sd, epochs, now, task)
    except UserError as e:
        return {"stage": sd.label, "path": str(sd.path), "state": "damaged", "detail": str(e)}


def _stage_status(sd: StageDir, epochs: int | None, now: float, task) -> dict:
    m = sd.manifest() if sd.manifest_path.exists() else None
    row = {"stage": sd.label, "path": str(sd.path)}
    if sd.finished():
        met = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
        return dict(row, state="finished", **{task.headline: met.get(task.headline)}, loss=met.get("loss"),
                    epochs=m.get("epochs"), finished_at=m.get("finished_at"),
                    detail=f"{_metric(met, task)}" + (f" after {m['epochs']} epoch(s)" if m.get("epochs") else "")
                           + f", finished {m.get('finished_at', '?')}")
    last, h = last_epoch(sd), holder(sd)
    of = f"/{epochs}" if epochs is not None else ""
    progress = "no epoch finished yet" if last is None else (
        f"{_where(last, of)} test {_metric(last, task, 'test_')}, written {_stamp(last['written'], now)}")
    row.update(epoch=last["epoch"] if last else 0, epochs=epochs, written=last["written"] if last else None)
    if h is not None:
        who = f"pid {h['pid']} on {h['host']}, started {h['started'] or '?'}"
        if not h["checked"]:
            who += " (another host: not checked from here; see how recent the last epoch is)"
        return dict(row, state="running", pid=h["pid"], host=h["host"], started=h["started"],
                    detail=f"{progress}; {who}")
    if last is not None or sd.training_checkpoint() is not None:
        return dict(row, state="stopped", detail=f"{progress}; no process holds it: rerun to resume")
    return dict(row, state="not started", detail="")


def status(run, out=None) -> list[dict]:
    """Print and return one row a stage of run directory `run`."""
    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no recipe.yaml); pass the --out of a run")
    damaged = ""
    try:
        run_recipe(run)
        recipe = load_recipe(run / "recipe.yaml", family_checks=False)
        k = len(recipe.model.division)
    except UserError as e:   # damaged, or of another version: K from the file or the folders, no epoch totals
        recipe, k = None, run_modules(run)
        damaged = f"; {e}" if "recipe.yaml" in str(e) and "unknown recipe key" not in str(e) else ""
    task, now = run_task(run), time.time()
    rows = []
    for sd in stage_dirs(run, k):
        stage = registered(sd.stage)
        if stage.in_run == "opt-in" and not sd.path.exists():     # not in a plain `incubate run`: listed once begun
            continue
        budget = recipe.stage(sd.stage) if recipe is not None and stage.trains else None
        epochs = budget.epochs if budget is not None and not budget.tokens else None
        rows.append(stage_status(sd, epochs, now, task))
    print(f"run {run} (recipe {recipe.name if recipe else '?'}, K={k}), as of {_stamp(now, now).split(' ')[0]}"
          f"{damaged}", file=out, flush=True)
    width = max(len(r["stage"]) for r in rows)
    for r in rows:
        print(f"  {r['stage']:<{width}}  {r['state']:<11}  {r['detail']}".rstrip(), file=out, flush=True)
    return rows
