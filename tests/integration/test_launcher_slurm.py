"""`incubate run --launcher slurm` through submitit: stage shapes, a killed rank, the sbatch job, refusals.

Its own file (pytest-xdist's --dist loadfile keeps a file on one worker): beside the other launchers'
tests it would make one worker's share longer than the whole suite's half."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from incubate.launchers import command
from ..conftest import PROCESS_TIMEOUT_S, ROOT, in_process, one_error_line, run_main
from .test_launchers import _children, _recipe


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

    proc = in_process(*args, check=True)
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


def test_slurm_size_in_launch_slurm_is_refused(tmp_path, capsys):
    pytest.importorskip("submitit")
    recipe = _recipe(tmp_path / "r.yaml", launch={"slurm": {"cluster": "local", "nodes": 2}})
    rc, _, err = run_main(capsys, "run", "--recipe", recipe, "--out", tmp_path / "run", "--launcher", "slurm")
    assert rc == 2 and one_error_line(err) == (
        "incubate: error: launch.slurm.nodes: a job's shape is set per stage, launch.stages.<stage>.nodes "
        "(or launch.devices_per_job / launch.cpus_per_job for every stage)")
    assert not (tmp_path / "run").exists()
