"""`torchrun --max-restarts`: a worker killed mid-training, the restarted group resumes from the checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from incubate.launchers import free_port
from ..conftest import ROOT, write_recipe
from .test_launchers import _children


def _torchrun(recipe, out):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "--max-restarts=2", "-m", "incubate.cli", "meta",
            "--recipe", str(recipe), "--out", str(out)]


# Passed 4 of 5 tries on a loaded 2-core machine; once the restarted gloo group hung. Opt in until fixed.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("INCUBATE_SLOW") != "1", reason="set INCUBATE_SLOW=1: a restarted gloo group "
                    "hung once in 5 tries here")
def test_torchrun_max_restarts_resume_from_the_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", deterministic=True, train__batch_size=16, meta__epochs=6)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_torchrun(recipe, tmp_path / "a"), cwd=ROOT, env=env, check=True, capture_output=True)

    run = tmp_path / "b"
    proc = subprocess.Popen(_torchrun(recipe, run), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 300, None
    while proc.poll() is None and time.time() < deadline and killed is None:
        if (run / "meta/checkpoint.safetensors").exists():
            workers = [pid for pid, cmd in _children(proc.pid) if "incubate.cli" in cmd]
            if workers:
                os.kill(workers[0], signal.SIGKILL)     # one rank dies: torchrun restarts the whole group
                killed = workers[0]
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=300)
    assert killed is not None and proc.returncode == 0, out[-3000:]
    assert "[meta] resuming after epoch" in out
    a, b = load_file(tmp_path / "a/meta/model.safetensors"), load_file(run / "meta/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
