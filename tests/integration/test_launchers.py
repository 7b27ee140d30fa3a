"""`incubate run --launcher local|ray|slurm`: module jobs in parallel, retries, reports, same weights."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from incubate import lock
from incubate.launchers import command
from ..conftest import PROCESS_TIMEOUT_S, ROOT, cli, one_error_line, run_main, write_recipe

STAGES = ("meta", "modules/0", "modules/1", "assembled", "finetune")


def _recipe(path, launch=None, **changes):
    changes = {"meta__epochs": 1, "incubate__epochs": 1, **changes}
    return write_recipe(path, model__division=[2, 2], deterministic=True, launch=launch or {"cpus_per_job": 1},
                        **changes)


def _same_weights(a, b):
    for s in STAGES:
        x, y = load_file(a / s / "model.safetensors"), load_file(b / s / "model.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), s


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same recipe run in one process, stage after stage."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = _recipe(tmp / "r.yaml")
    cli("run", "--recipe", recipe, "--out", tmp / "run", "--no-e2e", check=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    recipe = _recipe(tmp / "r.yaml")
    proc = cli("run", "--recipe", recipe, "--out", tmp / "run", "--no-e2e", "--launcher", "local", "--jobs", "2",
               check=True)
    return recipe, tmp / "run", proc


def test_local_launcher_runs_module_jobs_at_once_with_the_same_weights(local_run, reference):
    recipe, run, proc = local_run
    out = proc.stdout
    # both module jobs start before either ends: they run at the same time
    assert out.index("[module 1] started") < out.index("[module 0] finished")
    assert "  [module 0] epoch 1/1 loss" in out and "  [meta] epoch 1/1 loss" in out   # one progress line a job
    assert "jobs: finished [module 0, module 1]  skipped []  failed []" in out
    for s in STAGES:
        assert "(local, 1 process(es), 1 thread(s) each)" in (run / s / "log.txt").read_text()
    assert "[module 1] epoch 1/1" in (run / "modules/1/log.txt").read_text()
    _same_weights(run, reference)


def test_local_rerun_skips_every_finished_job(local_run):
    recipe, run, _ = local_run
    before = {s: (run / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}
    proc = cli("run", "--recipe", recipe, "--out", run, "--no-e2e", "--launcher", "local", "--jobs", "2", check=True)
    assert "jobs: finished []  skipped [module 0, module 1]  failed []" in proc.stdout
    assert proc.stdout.count("skipped: already finished") == 5
    assert before == {s: (run / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(entry), open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _copy_without_module_1(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    for s in ("modules/1", "assembled", "finetune"):
        shutil.rmtree(dst / s)
    return dst


def test_a_failing_job_is_retried_then_reported_and_a_rerun_resumes(local_run, reference, tmp_path):
    recipe, run, _ = local_run
    dst = _copy_without_module_1(run, tmp_path)
    cmd = [sys.executable, "-m", "incubate.cli", "run", "--recipe", str(recipe), "--out", str(dst), "--no-e2e",
           "--launcher", "local", "--jobs", "2", "--retries", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed, deadline = set(), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        for pid, cmdline in _children(proc.pid):      # SIGKILL module 1's job on every try
            if "--module 1" in cmdline and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2 and len(killed) == 2, out + err
    assert "[module 0] skipped: already finished" in out
    assert "[module 1] failed (killed by SIGKILL); retrying from its checkpoint" in out
    assert "[module 1] FAILED after 2 tries: killed by SIGKILL; last lines of" in out
    assert "modules/1/log.txt" in out and "    | --- " in out          # the log's last lines
    assert err.strip().splitlines()[-1].startswith("incubate: error: job(s) failed: module 1: killed by SIGKILL")
    assert not (dst / "assembled").exists()                        # nothing after a failed phase ran
    proc = cli("run", "--recipe", recipe, "--out", dst, "--no-e2e", "--launcher", "local", check=True)
    assert "jobs: finished [module 1]  skipped [module 0]  failed []" in proc.stdout
    _same_weights(dst, reference)


def test_a_user_error_in_a_job_is_not_retried_and_names_the_file(local_run, tmp_path):
    recipe, run, _ = local_run
    dst = _copy_without_module_1(run, tmp_path)
    (dst / "modules/1").mkdir()
    # another process writes module 1 (this one holds its lock): the job is refused, a user error
    # (an unreadable checkpoint no longer is one: the stage restarts, docs/errors.md row 14)
    lock.hold(dst / "modules/1", f"module 1 of run directory {dst}")
    try:
        proc = cli("run", "--recipe", recipe, "--out", dst, "--no-e2e", "--launcher", "local", "--retries", "3")
    finally:
        lock.release(dst / "modules/1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "[module 1] FAILED after 1 tries: exit 2 (a user error: not retried)" in proc.stdout
    assert f"is being written by process {os.getpid()} on " in proc.stdout and f"(lock {dst}/modules/1/.lock)" in proc.stdout
    assert proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_local_launcher_runs_torchrun_jobs_on_their_own_ports(tmp_path):
    """launch.devices_per_job 2 (torchrun) for the meta model; launch.stages gives the module jobs and the
    fine-tune 1: one torchrun job checks the command and its own port; a second would repeat it."""
    recipe = _recipe(tmp_path / "r.yaml", train__batch_size=16, launch={
        "cpus_per_job": 1, "devices_per_job": 2,
        "stages": {"incubate": {"devices_per_node": 1}, "finetune": {"devices_per_node": 1}}})
    run = tmp_path / "run"
    proc = cli("run", "--recipe", recipe, "--out", run, "--no-e2e", "--launcher", "local", "--jobs", "2", check=True)
    assert "jobs: finished [module 0, module 1]" in proc.stdout
    for s, world in (("meta", 2), ("modules/0", 1), ("modules/1", 1), ("finetune", 1)):
        assert json.loads((run / s / "manifest.json").read_text())["world_size"] == world
        assert f"(local, {world} process(es), 1 thread(s) each)" in (run / s / "log.txt").read_text()


@pytest.mark.slow
def test_ray_launcher(reference, tmp_path):
    pytest.importorskip("ray")
    recipe = _recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    proc = cli("run", "--recipe", recipe, "--out", run, "--no-e2e", "--launcher", "ray", "--jobs", "2", check=True,
               env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    assert "jobs: finished [module 0, module 1]  skipped []  failed []" in proc.stdout
    assert "(ray, 1 process(es), 1 thread(s) each)" in (run / "modules/1/log.txt").read_text()
    _same_weights(run, reference)


def test_launcher_options_need_a_launcher(tiny_recipe, tmp_path):
    proc = cli("run", "--recipe", tiny_recipe, "--out", tmp_path / "run", "--jobs", "2")
    assert proc.returncode == 2 and "--jobs, --retries and --address need --launcher" in proc.stderr


def _environ(pid):
    try:
        return dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in kv)
    except OSError:
        return {}


def _descendants(pid):
    found, frontier = [], [pid]
    while frontier:
        kids = _children(frontier.pop())
        found += kids
        frontier += [k for k, _ in kids]
    return found


def _kill_rank_when(proc, rank, ready, deadline_s=300):
    """SIGKILL the stage process (incubate.cli) of `rank` under proc once ready() holds; its pid."""
    deadline = time.time() + deadline_s
    while proc.poll() is None and time.time() < deadline:
        if ready():
            for pid, cmdline in _descendants(proc.pid):
                if "incubate.cli" in cmdline and _environ(pid).get(b"RANK") == str(rank).encode():
                    os.kill(pid, signal.SIGKILL)
                    return pid
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} to kill: {proc.poll()=}")


@pytest.mark.slow
def test_slurm_launcher_with_submitits_local_executor_and_stage_shapes(tmp_path):
    """launch.stages through submitit's local executor: the meta model as a 2-task job (2 ranks of one gloo
    group), the modules as 1-task jobs at once. Rank 1 of the meta job is killed after its first checkpoint: the
    job ends with one line naming it, and the rerun resumes; its meta model equals a plain 2-process torchrun run."""
    pytest.importorskip("submitit")
    stages = {"meta": {"devices_per_node": 2}, "finetune": {"time_min": 5}}
    recipe = _recipe(tmp_path / "r.yaml", train__batch_size=16, train__checkpoint_every=2, meta__epochs=2,
                     launch={"cpus_per_job": 1, "stages": stages, "slurm": {"cluster": "local", "timeout_min": 10}})
    run = tmp_path / "run"
    args = ["run", "--recipe", recipe, "--out", run, "--no-e2e", "--launcher", "slurm", "--jobs", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "incubate.cli", *map(str, args)], cwd=ROOT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _kill_rank_when(proc, 1, (run / "meta/checkpoint.safetensors").exists)
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    finally:
        proc.kill()
    line = one_error_line(err)
    assert proc.returncode == 2 and line.startswith(
        "incubate: error: job(s) failed: meta: rank 1 of 2: killed by SIGKILL (SLURM job "), out + err
    assert "[meta] FAILED after 1 tries: rank 1 of 2: killed by SIGKILL" in out
    assert json.loads((run / "meta/manifest.json").read_text())["finished"] is False

    proc = cli(*args, check=True)
    assert "[meta] resuming " in (run / "meta/log.txt").read_text()
    assert "jobs: finished [module 0, module 1]  skipped []  failed []" in proc.stdout
    assert proc.stdout.index("[module 1] started") < proc.stdout.index("[module 0] finished")
    assert any((run / "slurm").iterdir())          # submitit's own job folders
    for s, world in (("meta", 2), ("modules/0", 1), ("modules/1", 1), ("finetune", 1)):
        assert json.loads((run / s / "manifest.json").read_text())["world_size"] == world, s
        assert f"(slurm, {world} process(es), 1 thread(s) each)" in (run / s / "log.txt").read_text()
    ref = tmp_path / "ref"
    subprocess.run(command(["meta", "--recipe", str(recipe), "--out", str(ref)], 2), cwd=ROOT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True)
    x, y = load_file(run / "meta/model.safetensors"), load_file(ref / "meta/model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class _Task:
    """A submitit job or task: its exit code, or None for a task that died without a result."""
    def __init__(self, rc, job_id="7_0", tasks=()):
        self.rc, self.job_id, self.state, self.tasks = rc, job_id, "NODE_FAIL", list(tasks)
        self.num_tasks = len(self.tasks) or 1

    def task(self, i):
        return self.tasks[i] if self.tasks else self

    def result(self):
        if self.rc is None:
            raise RuntimeError("Job 7 (task: 1) has not produced any output (state: NODE_FAIL)")
        return self.rc


@pytest.mark.parametrize("codes, expected", [
    ([0, 0], (0, "")),
    ([1, -9], (-9, "rank 1 of 2: killed by SIGKILL (SLURM job 7; then rank 0: exit 1)")),
    ([1, None, 0], (1, "rank 1 of 3: ended without a result (SLURM task 7_1, state NODE_FAIL) (SLURM job 7; "
                       "then rank 0: exit 1)")),
    ([2, 2], (2, "rank 0 of 2: exit 2 (a user error: not retried) (SLURM job 7; then rank 1: exit 2 (a user "
                 "error: not retried))")),
])
def test_a_failed_slurm_job_names_the_rank_that_failed_first(codes, expected):
    from incubate.launchers.slurm import job_outcome
    job = _Task(0, "7", [_Task(rc, f"7_{i}") for i, rc in enumerate(codes)])
    assert job_outcome(job) == expected
    assert job_outcome(_Task(None)) == (1, "ended without a result (SLURM task 7_0, state NODE_FAIL)")


def test_slurm_multi_node_shape_becomes_the_sbatch_job(tmp_path, monkeypatch):
    """What SLURM is asked for (no cluster here: the sbatch file submitit would submit)."""
    pytest.importorskip("submitit")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/srun").write_text("#!/bin/sh\nexit 1\n")     # submitit's SLURM executor wants srun on PATH
    (tmp_path / "bin/srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    from incubate.launchers.slurm import SlurmLauncher, execute, execute_rank
    from incubate.config import load_recipe
    recipe = load_recipe(_recipe(tmp_path / "r.yaml", device="cuda", launch={
        "devices_per_job": 8, "cpus_per_job": 10, "slurm": {"cluster": "slurm", "slurm_partition": "gpu"},
        "stages": {"meta": {"nodes": 4, "time_min": 600}, "assemble": {"devices_per_node": 1}}}))
    launcher = SlurmLauncher(recipe, tmp_path / "run")
    for stage, want in (("meta", ("4", "8", "8", "600")), ("incubate", ("1", "8", "8", "4320")),
                        ("assemble", ("1", "1", "1", "4320"))):
        _, res = launcher.plan(stage, 4, 4)
        text = launcher.executor._executor._make_submission_file_text("CMD", "uid")
        got = tuple(next(line.split("=")[1] for line in text.splitlines() if line.startswith(f"#SBATCH --{key}="))
                    for key in ("nodes", "ntasks-per-node", "gpus-per-node", "time"))
        assert got == want and "#SBATCH --cpus-per-task=10" in text and "#SBATCH --partition=gpu" in text, stage
        assert res.nodes * res.procs == int(want[0]) * int(want[1])
        assert launcher.task is (execute_rank if stage != "assemble" else execute)     # one task a rank


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


def test_slurm_size_in_launch_slurm_is_refused(tmp_path, capsys):
    pytest.importorskip("submitit")
    recipe = _recipe(tmp_path / "r.yaml", launch={"slurm": {"cluster": "local", "nodes": 2}})
    rc, _, err = run_main(capsys, "run", "--recipe", recipe, "--out", tmp_path / "run", "--launcher", "slurm")
    assert rc == 2 and one_error_line(err) == (
        "incubate: error: launch.slurm.nodes: a job's shape is set per stage, launch.stages.<stage>.nodes "
        "(or launch.devices_per_job / launch.cpus_per_job for every stage)")
    assert not (tmp_path / "run").exists()
