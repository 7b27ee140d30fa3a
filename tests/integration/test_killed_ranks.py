"""A rank SIGKILLed in a 2-process meta model, under torchrun --max-restarts and in a 2-task SLURM job
(submitit's local executor); both end at the weights of one plain, uninterrupted 2-process torchrun run.

torchrun: two kills a run, the second in the restarted group; checkpoints every 2 updates, so a kill
usually lands after a mid-epoch checkpoint (every rank's RNG state in it). In each restarted group
rank 1 starts 4 s late (tests/integration/rank_fault.py slow-restart): that is what made a restarted
group fail to form (engine._init_process_group says why), now every time instead of now and then on a
loaded machine.

Their own file (pytest-xdist's --dist loadfile keeps a file on one worker), so that the reference is
trained once for both."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from incubate.launchers import command, free_port
from ..conftest import PROCESS_TIMEOUT_S, ROOT, in_process, one_error_line
from .test_launchers import _children, _recipe, kill_jobs
from .test_rank_faults import gloo_gone

KILLS = 2
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _meta_recipe(path, **changes):
    return _recipe(path, train__batch_size=16, train__checkpoint_every=2, meta__epochs=2, **changes)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The meta model of plain 2-process torchrun, no kill. Its ranks also say whether the CLI left the process
    group itself (tests/integration/rank_fault.py, no fault): left to interpreter teardown, a gloo group can
    kill a finished rank with SIGABRT (it did, on rank 1 of an LM run under torchrun)."""
    tmp = tmp_path_factory.mktemp("ref")
    stamp = tmp / "stamp"
    cmd = command(["meta", "--recipe", str(_meta_recipe(tmp / "r.yaml")), "--out", str(tmp / "run")], 2)
    cmd[cmd.index("incubate.cli"):cmd.index("incubate.cli") + 1] = ["tests.integration.rank_fault", "none", str(stamp)]
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=PROCESS_TIMEOUT_S)
    return load_file(tmp / "run/meta/model.safetensors"), stamp


def test_ranks_leave_the_process_group_when_the_command_ends(reference):
    _, stamp = reference
    assert [Path(f"{stamp}.group.{r}").read_text() for r in (0, 1)] == ["left", "left"]
    gloo_gone(stamp)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_torchrun_max_restarts_resume_to_the_uninterrupted_weights(reference, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "meta/checkpoint.safetensors"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}", f"--max-restarts={KILLS}", "-m",
                "tests.integration.rank_fault", "slow-restart", "-", "meta", "--recipe",
                str(_meta_recipe(tmp_path / "r.yaml")), "--out", str(run)]
    proc = subprocess.Popen(torchrun, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed, last = time.time() + 300, [], None
    while proc.poll() is None and time.time() < deadline and len(killed) < KILLS:
        seen = _mtime(ckpt)
        if seen is not None and seen != last:       # a checkpoint newer than the one the last kill left
            workers = [pid for pid, cmd in _children(proc.pid) if "rank_fault" in cmd]
            if len(workers) == 2:
                victim = workers[len(killed) % 2]        # one rank, then the other
                os.kill(victim, signal.SIGKILL)          # torchrun stops the group and restarts it
                killed.append(victim)
                last = seen
        time.sleep(0.01)
    try:
        out, _ = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish after {len(killed)} kills:\n{out[-6000:]}")
    assert len(killed) == KILLS and proc.returncode == 0, out[-6000:]
    assert out.count("[meta] resuming ") == KILLS, out[-6000:]     # every restarted group reconnected and resumed
    assert _equal(load_file(run / "meta/model.safetensors"), reference[0])


def _environ(pid):
    try:
        return dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in kv)
    except OSError:
        return {}


@pytest.mark.slow
def test_slurm_launcher_with_submitits_local_executor_and_stage_shapes(reference, tmp_path):
    """launch.stages through submitit's local executor: the meta model as a 2-task job (2 ranks of one gloo
    group), the modules as 1-task jobs at once. Rank 1 of the meta job is killed after its first checkpoint: the
    job ends with one line naming it, and the rerun resumes; its meta model equals a plain 2-process torchrun run."""
    pytest.importorskip("submitit")
    stages = {"meta": {"devices_per_node": 2}, "finetune": {"time_min": 5}}
    recipe = _meta_recipe(tmp_path / "r.yaml", launch={"cpus_per_job": 1, "stages": stages,
                                                       "slurm": {"cluster": "local", "timeout_min": 10}})
    run = tmp_path / "run"
    args = ["run", "--recipe", recipe, "--out", run, "--no-e2e", "--launcher", "slurm", "--jobs", "2"]
    done, killed = threading.Event(), []
    def rank_1_after_a_checkpoint(pid, cmdline):      # its stage process, once the first checkpoint is on disk
        return ("incubate.cli" in cmdline and _environ(pid).get(b"RANK") == b"1"
                and (run / "meta/checkpoint.safetensors").exists())
    killer = threading.Thread(target=kill_jobs, args=(rank_1_after_a_checkpoint, done, killed, 1))
    killer.start()
    try:
        proc = in_process(*args)
    finally:
        done.set()
        killer.join()
    line = one_error_line(proc.stderr)
    assert killed and proc.returncode == 2 and line.startswith(
        "incubate: error: job(s) failed: meta: rank 1 of 2: killed by SIGKILL (SLURM job "), proc.stdout + proc.stderr
    assert "[meta] FAILED after 1 tries: rank 1 of 2: killed by SIGKILL" in proc.stdout
    assert json.loads((run / "meta/manifest.json").read_text())["finished"] is False

    proc = in_process(*args, check=True)
    assert "[meta] resuming " in (run / "meta/log.txt").read_text()
    assert "jobs: finished [module 0, module 1]  skipped []  failed []" in proc.stdout
    assert proc.stdout.index("[module 1] started") < proc.stdout.index("[module 0] finished")
    assert any((run / "slurm").iterdir())          # submitit's own job folders
    for s, world in (("meta", 2), ("modules/0", 1), ("modules/1", 1), ("finetune", 1)):
        assert json.loads((run / s / "manifest.json").read_text())["world_size"] == world, s
        assert f"(slurm, {world} process(es), 1 thread(s) each)" in (run / s / "log.txt").read_text()
    assert _equal(load_file(run / "meta/model.safetensors"), reference[0])
