"""`torchrun --max-restarts`: a worker killed mid-training, the restarted group resumes and ends at the
uninterrupted weights. Two kills a run, the second in the restarted group; checkpoints every 2
updates, so a kill usually lands after a mid-epoch checkpoint (every rank's RNG state in it).

In each restarted group rank 1 starts 4 s late (tests/integration/rank_fault.py slow-restart): that
is what made a restarted group fail to form (engine._init_process_group says why), now every time
instead of now and then on a loaded machine."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from incubate.launchers import free_port
from ..conftest import PROCESS_TIMEOUT_S, ROOT, write_recipe
from .test_launchers import _children

KILLS = 2


def _torchrun(recipe, out):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", f"--max-restarts={KILLS}", "-m", "tests.integration.rank_fault",
            "slow-restart", "-", "meta", "--recipe", str(recipe), "--out", str(out)]


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_torchrun_max_restarts_resume_to_the_uninterrupted_weights(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", deterministic=True, train__batch_size=16, meta__epochs=2,
                          train__checkpoint_every=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_torchrun(recipe, tmp_path / "a"), cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=PROCESS_TIMEOUT_S)

    run = tmp_path / "b"
    ckpt = run / "meta/checkpoint.safetensors"
    proc = subprocess.Popen(_torchrun(recipe, run), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
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
    a, b = load_file(tmp_path / "a/meta/model.safetensors"), load_file(run / "meta/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
