"""The CUDA paths: bf16 autocast, torch.compile, the whole quick-start pipeline and kill-and-resume.

Marked `gpu`: skipped where torch sees no CUDA device (tests/conftest.py). benchmarks/gpu_run.sh runs
them first on a lent GPU (`pytest -m gpu`); its smoke run (in `make test`) runs the same tests on the
CPU with INCUBATE_GPU_TESTS_ON=cpu (smaller schedules, and torch.compile with the aot_eager backend
instead of inductor, whose CPU build takes minutes), so none of their lines meets the GPU untried.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from incubate.store.checkpoint import load_training_state
from incubate.recipe.schema import DataCfg, TrainCfg
from incubate.data.loaders import load_data
from incubate.train.dist import Dist
from incubate.train.engine import fit
from incubate.train.step import StageRun, autocast

from ..conftest import ROOT, run_main, write_recipe
from ..unit.test_engine import hybrid

pytestmark = pytest.mark.gpu


def _fit(tmp_path, net, trained, device, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = DataCfg(source="digits", img_size=8, train_fraction=0.2, eval_batch_size=512)   # one eval shape
    cfg = TrainCfg(epochs=1, batch_size=32, lr=2e-3, lr_base_batch=32, **train)
    assert trained is net.runner.model
    return fit(net.trainee(), cfg, load_data(data), data, StageRun(Dist(device=device), 0, tmp_path, "gpu-test"))


def test_bf16_autocast_trains_a_hybrid_on_the_device(gpu_device, tmp_path):
    h = hybrid(1).to(gpu_device)
    with autocast("bf16", gpu_device):
        assert h(torch.randn(4, 1, 8, 8, device=gpu_device)).dtype == torch.bfloat16
    before = {k: v.clone() for k, v in h.meta.state_dict().items()}
    start = {k: v.clone() for k, v in h.runner.model.state_dict().items()}
    result = _fit(tmp_path, h, h.runner.model, gpu_device, amp="bf16")
    assert torch.isfinite(torch.tensor(result["metrics"]["loss"]))
    assert all(torch.equal(before[k], v) for k, v in h.meta.state_dict().items())   # frozen, bitwise
    after = h.runner.model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in after.items())
    assert all(v.dtype == torch.float32 and v.device.type == gpu_device.type for v in after.values())
    if gpu_device.type == "cuda":
        assert torch.cuda.max_memory_allocated() > 0


def test_compiled_hybrid_trains_like_eager_on_the_device(gpu_device, tmp_path, monkeypatch):
    backend = "inductor" if gpu_device.type == "cuda" else "aot_eager"
    real, calls = torch.compile, []

    def compile_with_backend(model, **kwargs):
        calls.append(type(model).__name__)
        return real(model, backend=backend)
    monkeypatch.setattr(torch, "compile", compile_with_backend)
    torch._dynamo.reset()
    h, eager = hybrid(0).to(gpu_device), hybrid(0).to(gpu_device)
    before = {k: v.clone() for k, v in h.meta.state_dict().items()}
    t0 = time.perf_counter()
    compiled = _fit(tmp_path / "compiled", h, h.runner.model, gpu_device, compile=True)
    print(f"compiled fit ({backend}) on {gpu_device}: {time.perf_counter() - t0:.1f}s")
    reference = _fit(tmp_path / "eager", eager, eager.runner.model, gpu_device)
    assert calls == ["Hybrid"]
    assert all(torch.equal(before[k], v) for k, v in h.meta.state_dict().items())
    assert all(p.grad is None for p in h.meta.parameters())
    for (k, a), b in zip(h.runner.model.state_dict().items(), eager.runner.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3, msg=k)     # fusion changes rounding only
    assert abs(compiled["metrics"]["loss"] - reference["metrics"]["loss"]) < 1e-2


def test_quickstart_pipeline_on_the_device(gpu_device, tmp_path, capsys):
    sets = [f"device={gpu_device.type}"]
    if gpu_device.type == "cpu":     # the smoke run: the same pipeline, one epoch a stage, less data
        sets += ["meta.epochs=1", "incubate.epochs=1", "finetune.epochs=1", "e2e.epochs=1",
                 "data.train_fraction=0.3", "train.warmup_epochs=0"]
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    rc, out, err = run_main(capsys, "run", "--recipe", ROOT / "recipes/quickstart.yaml", "--out", tmp_path / "q", *args)
    assert rc == 0, err
    print(f"quickstart on {gpu_device}: {time.perf_counter() - t0:.1f}s")
    summary = json.loads((tmp_path / "q/summary.json").read_text())
    assert set(summary) == {"meta", "module_0", "module_1", "module_2", "module_3", "assembled", "finetune", "e2e"}
    assert all(0 <= s["top1"] <= 100 and s["seconds"] >= 0 for s in summary.values())
    if gpu_device.type == "cuda":    # the full recipe: 88.9% (ours) and 76.9% (E2E) on the CPU (README)
        assert summary["finetune"]["top1"] >= 70 and summary["e2e"]["top1"] >= 60, summary


def test_kill_and_resume_on_the_device(gpu_device, tmp_path, capsys, monkeypatch):
    epochs = 40 if gpu_device.type == "cuda" else 8     # a GPU epoch is short: more of them to kill into
    recipe = write_recipe(tmp_path / "r.yaml", device=gpu_device.type, deterministic=True,
                          data__train_fraction=0.5, meta__epochs=epochs)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}     # deterministic cuBLAS where it can be
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", env["CUBLAS_WORKSPACE_CONFIG"])
    assert run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "a")[0] == 0   # uninterrupted
    run_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "incubate.cli", "meta", "--recipe", str(recipe), "--out",
                             str(run_b)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_b / "meta/metrics.jsonl"
    deadline = time.time() + 300      # a loaded machine: the start alone can take a minute
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the stage finished before it could be killed; give it more epochs"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run_b / "meta/manifest.json").read_text())["finished"] is False
    _, _, state = load_training_state(run_b / "meta/checkpoint.safetensors")
    killed_after = state["epoch"] + 1
    assert 1 <= killed_after < epochs

    rc, resumed, err = run_main(capsys, "meta", "--recipe", recipe, "--out", run_b)
    assert rc == 0 and f"resuming after epoch {killed_after}/{epochs}" in resumed, err
    lines = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(1, epochs + 1))
    a, b = load_file(tmp_path / "a/meta/model.safetensors"), load_file(run_b / "meta/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if gpu_device.type == "cpu":
            assert torch.equal(a[k], b[k]), k
        else:      # some CUDA kernels (attention backward) accumulate with atomics: equal up to rounding
            torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3, msg=k)
