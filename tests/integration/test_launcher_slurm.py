"""`incubate run --launcher slurm` through submitit: a failed job's outcome, the sbatch job, refusals
(a whole run through submitit's local executor, a rank killed, is in test_killed_ranks.py)."""
import os

import pytest

from ..conftest import one_error_line, run_main
from .test_launchers import _recipe


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
    from incubate.recipe.schema import load_recipe
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
