"""Kill-and-resume gives the uninterrupted result; every stage runs under torchrun with 2 processes."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from incubate.checkpoint import load_training_state
from ..conftest import PROCESS_TIMEOUT_S, ROOT, run_main, write_recipe


def _weights(path):
    return load_file(path)


def test_kill_and_resume_equals_uninterrupted(tmp_path, capsys):
    """The uninterrupted run and the resume in this process (run_main): only the killed run needs its own."""
    recipe = write_recipe(tmp_path / "r.yaml", data__train_fraction=0.5, meta__epochs=12, deterministic=True)
    assert run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "a")[0] == 0

    run_b = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "incubate.cli", "meta", "--recipe", str(recipe), "--out",
                             str(run_b)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_b / "meta/metrics.jsonl"
    deadline = time.time() + 300      # a loaded machine: the start alone can take a minute
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the stage finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((run_b / "meta/manifest.json").read_text())
    assert manifest["finished"] is False
    _, _, state = load_training_state(run_b / "meta/checkpoint.safetensors")   # a complete checkpoint
    killed_after = state["epoch"] + 1
    assert 2 <= killed_after < 12   # metrics may be one epoch ahead of the checkpoint: trimmed on resume

    rc, resumed, err = run_main(capsys, "meta", "--recipe", recipe, "--out", run_b)
    assert rc == 0 and f"resuming after epoch {killed_after}/12" in resumed, err
    a, b = _weights(tmp_path / "a/meta/model.safetensors"), _weights(run_b / "meta/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(l) for l in (run_b / "meta/metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(1, 13))


# torchrun of every stage: test_resnet_pipeline.py (its module fixture), test_lm_tokens.py (an LM)
