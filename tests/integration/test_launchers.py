"""`incubate run --launcher local|ray|slurm`: module jobs in parallel, retries, reports, same weights."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from incubate.store import lock
from ..conftest import ROOT, cli, in_process, one_error_line, run_main, write_recipe

STAGES = ("meta", "modules/0", "modules/1", "assembled", "finetune")


def _recipe(path, launch=None, **changes):
    changes = {"meta__epochs": 1, "incubate__epochs": 1, **changes}
    return write_recipe(path, model__division=[2, 2], deterministic=True, launch=launch or {"cpus_per_job": 1},
                        **changes)


def _same_weights(a, b, stages=STAGES):
    for s in stages:
        x, y = load_file(a / s / "model.safetensors"), load_file(b / s / "model.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), s


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same recipe run in one process, stage after stage."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = _recipe(tmp / "r.yaml")
    in_process("run", "--recipe", recipe, "--out", tmp / "run", "--no-e2e", check=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """Every stage a job; launch.stages gives the fine-tune 2 processes: a torchrun job on a port of its own."""
    tmp = tmp_path_factory.mktemp("local")
    recipe = _recipe(tmp / "r.yaml", launch={"cpus_per_job": 1, "stages": {"finetune": {"devices_per_node": 2}}})
    proc = in_process("run", "--recipe", recipe, "--out", tmp / "run", "--no-e2e", "--launcher", "local", "--jobs", "2",
               check=True)
    return recipe, tmp / "run", proc


def test_local_launcher_runs_module_jobs_at_once_with_the_same_weights(local_run, reference):
    recipe, run, proc = local_run
    out = proc.stdout
    # both module jobs start before either ends: they run at the same time
    assert out.index("[module 1] started") < out.index("[module 0] finished")
    assert "  [module 0] epoch 1/1 loss" in out and "  [meta] epoch 1/1 loss" in out   # one progress line a job
    assert "jobs: finished [module 0, module 1]  skipped []  failed []" in out
    for s in STAGES[:-1]:
        assert "(local, 1 process(es), 1 thread(s) each)" in (run / s / "log.txt").read_text()
    assert "[module 1] epoch 1/1" in (run / "modules/1/log.txt").read_text()
    _same_weights(run, reference, STAGES[:-1])      # a 2-process fine-tune rounds otherwise
    assert json.loads((run / "finetune/manifest.json").read_text())["world_size"] == 2
    log = (run / "finetune/log.txt").read_text()
    assert "(local, 2 process(es), 1 thread(s) each)" in log and "[finetune] epoch 1/1" in log


def test_local_rerun_skips_every_finished_job(local_run):
    recipe, run, _ = local_run
    before = {s: (run / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}
    proc = in_process("run", "--recipe", recipe, "--out", run, "--no-e2e", "--launcher", "local", "--jobs", "2",
                      check=True)
    assert "jobs: finished []  skipped [module 0, module 1]  failed []" in proc.stdout
    assert proc.stdout.count("skipped: already finished") == 5
    assert before == {s: (run / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}


def _children(pid):
    """(pid, command line) of each child of `pid`, from /proc/PID/task/*/children: polled every few ms,
    a scan of all of /proc cost the Ray test 20 s of CPU."""
    out = []
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = tasks.read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            try:
                out.append((kid, open(f"/proc/{kid}/cmdline", "rb").read().replace(b"\0", b" ").decode()))
            except OSError:
                continue
    return out


def _descendants(pid):
    found, frontier = [], [pid]
    while frontier:
        kids = _children(frontier.pop())
        found += kids
        frontier += [k for k, _ in kids]
    return found


def _copy_without_module_1(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    for s in ("modules/1", "assembled", "finetune"):
        shutil.rmtree(dst / s)
    return dst


def kill_jobs(match, done, killed: list, most: int | None = None, deadline_s=300):
    """SIGKILL, once each, every process below this one for which match(pid, cmdline) holds, until done is
    set or `most` are killed (run in a thread beside an in-process `incubate run`)."""
    deadline = time.time() + deadline_s
    while not done.is_set() and time.time() < deadline and (most is None or len(killed) < most):
        for pid, cmdline in _descendants(os.getpid()):
            if pid not in killed and match(pid, cmdline):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)


def test_a_failing_job_is_retried_then_reported_and_a_rerun_resumes(local_run, reference, tmp_path):
    """`incubate run` in this process, a thread SIGKILLing module 1's job on every try."""
    recipe, run, _ = local_run
    dst = _copy_without_module_1(run, tmp_path)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_jobs, args=(lambda pid, cmdline: "--module 1" in cmdline, done, killed))
    killer.start()
    try:
        proc = in_process("run", "--recipe", recipe, "--out", dst, "--no-e2e", "--launcher", "local", "--jobs", "2",
                          "--retries", "1")
    finally:
        done.set()
        killer.join()
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 2 and len(killed) == 2, out + err
    assert "[module 0] skipped: already finished" in out
    assert "[module 1] failed (killed by SIGKILL); retrying from its checkpoint" in out
    assert "[module 1] FAILED after 2 tries: killed by SIGKILL; last lines of" in out
    assert "modules/1/log.txt" in out and "    | --- " in out          # the log's last lines
    assert err.strip().splitlines()[-1].startswith("incubate: error: job(s) failed: module 1: killed by SIGKILL")
    assert not (dst / "assembled").exists()                        # nothing after a failed phase ran
    # the rerun trains module 1 (from any checkpoint its killed tries left) and what follows it; here in
    # this process: a rerun through the launcher is test_local_rerun_skips_every_finished_job's
    proc = in_process("run", "--recipe", recipe, "--out", dst, "--no-e2e", check=True)
    assert "[module 0] already finished" in proc.stdout and "[module 1] epoch 1/1" in proc.stdout, proc.stdout
    _same_weights(dst, reference)


def test_a_user_error_in_a_job_is_not_retried_and_names_the_file(local_run, tmp_path):
    recipe, run, _ = local_run
    dst = _copy_without_module_1(run, tmp_path)
    (dst / "modules/1").mkdir()
    # another process writes module 1 (this one holds its lock): the job is refused, a user error
    # (an unreadable checkpoint no longer is one: the stage restarts, docs/errors.md row 14)
    lock.hold(dst / "modules/1", f"module 1 of run directory {dst}")
    try:
        proc = in_process("run", "--recipe", recipe, "--out", dst, "--no-e2e", "--launcher", "local", "--retries", "3")
    finally:
        lock.release(dst / "modules/1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "[module 1] FAILED after 1 tries: exit 2 (a user error: not retried)" in proc.stdout
    assert f"is being written by process {os.getpid()} on " in proc.stdout and f"(lock {dst}/modules/1/.lock)" in proc.stdout
    assert proc.stderr.count("\n") == 1


def _niceness(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16])


@pytest.mark.slow
def test_ray_launcher(reference, tmp_path):
    """Ray tasks run the module jobs at once, to the same weights, at the priority of `incubate run` (Ray's
    own default for its workers, niceness 15, gave a job a few percent of a core beside other work). The
    other stages are copied: a job of one of them goes through the same scheduler, tested above."""
    pytest.importorskip("ray")
    recipe = _recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    for s in ("meta", "assembled", "finetune"):
        shutil.copytree(reference / s, run / s)
    cmd = [sys.executable, "-m", "incubate.cli", "run", "--recipe", str(recipe), "--out", str(run), "--no-e2e",
           "--launcher", "ray", "--jobs", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_worker_niceness", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.nice(2))
    jobs = {}
    try:
        while proc.poll() is None:
            for pid, cmdline in _descendants(proc.pid):
                if "incubate.cli" in cmdline and "--module" in cmdline:
                    try:
                        jobs[pid] = _niceness(pid)
                    except OSError:
                        pass
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert "jobs: finished [module 0, module 1]  skipped []  failed []" in out
    assert "[assembled] skipped: already finished" in out and "[finetune] skipped: already finished" in out
    assert len(jobs) >= 2 and set(jobs.values()) == {min(_niceness(os.getpid()) + 2, 19)}, jobs
    assert "(ray, 1 process(es), 1 thread(s) each)" in (run / "modules/1/log.txt").read_text()
    _same_weights(run, reference)


def test_launcher_options_need_a_launcher(tiny_recipe, tmp_path):
    proc = in_process("run", "--recipe", tiny_recipe, "--out", tmp_path / "run", "--jobs", "2")
    assert proc.returncode == 2 and "--jobs, --retries and --address need --launcher" in proc.stderr


@pytest.mark.parametrize("sets, message", [
    (["launch.stages.metaa.nodes=2"], "unknown stage 'launch.stages.metaa'; valid stages: meta, incubate, assemble, "
                                      "finetune, e2e, grow"),
    (["launch.stages.meta.nodes=0"], "launch.stages.meta.nodes must be >= 1, got 0"),
    (["launch.stages.meta.gpus=8"], "unknown recipe key 'launch.stages.meta.gpus'; valid keys under launch.stages.meta: "
                                    "nodes, devices_per_node, cpus_per_task, time_min"),
    (["launch.stages.incubate=8"], "recipe key 'launch.stages.incubate' must be a mapping, got 8"),
    (["launch.stages.meta.nodes=2"], "launch.stages.meta.nodes is 2 but --launcher local runs each job on one node; "
                                     "use --launcher slurm, or set it to 1"),
])
def test_bad_stage_shapes_are_one_line(tmp_path, capsys, sets, message):
    recipe = _recipe(tmp_path / "r.yaml")
    args = [a for s in sets for a in ("--set", s)]
    rc, _, err = run_main(capsys, "run", "--recipe", recipe, "--out", tmp_path / "run", "--launcher", "local", *args)
    assert rc == 2 and one_error_line(err) == f"incubate: error: {message}"
    assert not (tmp_path / "run" / "meta").exists()


def test_ray_refuses_a_multi_node_stage_in_one_line(tmp_path, capsys):
    recipe = _recipe(tmp_path / "r.yaml", launch={"stages": {"finetune": {"nodes": 4}}})
    rc, _, err = run_main(capsys, "run", "--recipe", recipe, "--out", tmp_path / "run", "--launcher", "ray")
    assert rc == 2 and one_error_line(err) == (
        "incubate: error: launch.stages.finetune.nodes is 4 but --launcher ray runs each job on one node (a Ray "
        "task cannot span nodes here); use --launcher slurm, or set it to 1")
    assert not (tmp_path / "run").exists()
