"""benchmarks/gpu_run.sh --smoke: the GPU run's script end to end on the CPU, every file and its content.

The smoke run executes every part's code (the CUDA tests on the CPU, step cost in bf16 eager and
compiled, the accuracy study with every variant) at tiny sizes, so the first GPU run cannot die of a
typo, a missing file or a code path never executed. Cheaper tests of the driver's own logic follow.
"""
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import gpu_accuracy, gpu_run
from incubate.families import FAMILIES

from ..conftest import ROOT


SMOKE_LIMIT_S = 1500


def fake_fashion_mnist(root, n_train=320, n_test=100):
    """Fashion-MNIST's four IDX files (28x28, 10 classes), random pixels: the reader's real path."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + labels.tobytes())
    return root


@pytest.mark.slow
def test_smoke_run_writes_every_file_with_its_content(tmp_path):
    data, out = fake_fashion_mnist(tmp_path / "fmnist"), tmp_path / "out"
    # the GPU's 9 minutes are no limit for the smoke run: a loaded 2-core machine takes longer (docs/performance.md)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPU_RUN_HARD_LIMIT_S=str(SMOKE_LIMIT_S + 30))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_run.sh"), "--smoke", str(out), "--work",
                           str(tmp_path / "work"), "--data", str(data), "--limit", str(SMOKE_LIMIT_S)], env=env,
                          capture_output=True, text=True, timeout=SMOKE_LIMIT_S + 60)
    assert proc.returncode == 0, (proc.stdout[-6000:], proc.stderr[-3000:])
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_run.FILES)      # nothing else: 8 files at most

    run = json.loads((out / "run.json").read_text())
    assert run["env"]["packages"]["torch"] and run["env"]["packages"]["timm"] and run["env"]["smoke"]
    assert [p["status"] for p in run["parts"]] == ["ok", "ok", "ok"]
    assert "| 3 accuracy vs cost | ok |" in (out / "run.md").read_text()

    tests = json.loads((out / "1_tests.json").read_text())["tests"]
    names = {t["test"].rsplit("::", 1)[1]: t["outcome"] for t in tests}
    assert names == {"test_bf16_autocast_trains_a_hybrid_on_the_device": "passed",
                     "test_compiled_hybrid_trains_like_eager_on_the_device": "passed",
                     "test_quickstart_pipeline_on_the_device": "passed",
                     "test_kill_and_resume_on_the_device": "passed"}

    runs = json.loads((out / "2_step_cost.json").read_text())["runs"]
    assert [(r["preset"], r["mode"]) for r in runs] == [("smoke", "eager"), ("smoke", "compile")]
    eager, compiled = ({r["job"]: r for r in run_["rows"]} for run_ in runs)
    assert set(eager) == {"e2e", "meta"} | {f"{j}{i}" for j in ("hybrid", "official") for i in range(4)}
    assert all(r["flops"] > 0 and 0 < r["peak_fraction"] for r in eager.values())
    assert "sum hybrid / sum official" in runs[0]["bars"] and runs[0]["amp"] == "bf16"
    assert {j for j in compiled if j.endswith("+compile")} == {f"{j}+compile" for j in gpu_run.SMOKE_COMPILED.split(",")}
    for job in gpu_run.SMOKE_COMPILED.split(","):
        assert compiled[f"{job}+compile"]["compile_s"] > 0 and compiled[f"{job}+compile"]["speedup_vs_base"]
    md = (out / "2_step_cost.md").read_text()
    assert "MFU" in md and "| smoke | compile | 4 | e2e+compile |" in md and "sum of hybrid steps" in md
    check = json.loads((out / "2_step_cost.json").read_text())["plan_check"]      # incubate plan's estimate
    assert [r["job"] for r in check["rows"]] == ["hybrid 1", "e2e"] and check["device"] == "cpu"
    assert all(0.9 <= r["estimate_over_measured"] <= 1.1 for r in check["rows"]) and "### plan estimate vs" in md

    acc = json.loads((out / "3_accuracy.json").read_text())
    assert not acc["errors"] and acc["running"] is None and acc["run"]["rc"] == 0
    points = {(r["family"], r["method"], r["budget"], r["variant"] if r["method"] == "ours" else "")
              for r in acc["rows"]}
    assert points == {("vit", "e2e", "1", ""), ("vit", "e2e", "2", ""), ("vit", "meta", "2", ""),
                      ("vit", "ours", "1/1+1", "metainit-ftlr3e-4"), ("vit", "ours", "1/1+1", "paper"),
                      ("vit", "ours", "1/1+1", "stack-ftlr3e-4"), ("causal_lm", "ours", "0.002/A", "meta"),
                      ("causal_lm", "grow", "0.002/A", ""), ("causal_lm", "e2e", "0.002", ""),
                      ("causal_lm", "meta", "0.002", "")}
    assert [r["method"] for r in acc["rows"] if r["family"] == "causal_lm"] == ["ours", "grow", "e2e", "meta"]
    assert all(0 <= r["top1"] <= 100 and r["flops"] > 0 for r in acc["rows"] if r["family"] == "vit")
    assert all(0 < r["bpb"] < 8 and r["flops"] > 0 and r["evals"] for r in acc["rows"] if r["family"] == "causal_lm")
    unregistered = {e.family for e in gpu_accuracy.PART3 if e.family not in FAMILIES}
    assert {s["family"] for s in acc["skipped"] if "not registered" in s["why"]} == unregistered
    md = (out / "3_accuracy.md").read_text()
    assert md.count("| vit |") == 6 and md.count("| causal_lm |") == 4
    assert all(f"Skipped {f}: family" in md for f in unregistered)


def test_every_gpu_test_lives_where_part_1_collects():
    marks = re.compile(r"^(pytestmark = .*|\s*@)pytest\.mark\.gpu\b", re.M)
    marked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
              if marks.search(p.read_text(encoding="utf-8"))}
    assert marked and all(m.startswith(gpu_run.GPU_TESTS + "/") for m in marked), marked


def test_plan_runs_the_cheapest_whole_comparison_first():
    entry = next(e for e in gpu_accuracy.PART3 if e.family == "vit")
    order = [(m, b, v) for m, _, _, b, _, v in gpu_accuracy.plan(entry)]
    level0 = [("e2e", 10, "paper"), ("meta", 40, "paper"), ("ours", (40, 2, 2), "metainit-ftlr3e-4"),
              ("ours", (40, 2, 2), "paper"), ("ours", (40, 2, 2), "stack-ftlr3e-4")]
    assert order[:5] == level0 and order[5:7] == [("e2e", 20, "paper"), ("meta", 80, "paper")]
    assert gpu_accuracy.variant_sets("stack-ftlr3e-4") == ["incubate.module_init=stack", "finetune.lr=3e-4"]
    assert [p[2] for p in order[7:10]] == [v for _, _, v in level0[2:]] and order[10:] == [
        ("e2e", 40, "paper"), ("meta", 160, "paper")]
    # equal FLOPs: the meta model alone at 80 epochs costs what E2E does at 10 (depth 32, K = 4)
    assert gpu_accuracy.block_passes("meta", 80, 32, 4, False) == gpu_accuracy.block_passes("e2e", 10, 32, 4, False)
    ours = gpu_accuracy.block_passes("ours", (40, 2, 2), 32, 4, False)
    assert ours == 3 * 4 * 40 + 2 * (4 * 24 + 18) + 2 * 96
    assert gpu_accuracy.block_passes("ours", (40, 2, 2), 32, 4, True) == ours - 3 * 4 * 40
    # unmeasured methods are priced at 1.5x the slowest measured pass; nothing measured: unpriced
    assert gpu_accuracy.pass_seconds({}, "meta") == 0
    assert gpu_accuracy.pass_seconds({"e2e": 2.0, "ours": 1.0}, "meta") == 3.0
    assert gpu_accuracy.pass_seconds({"e2e": 2.0, "meta": 4.0}, "meta") == 4.0


def test_a_failed_part_writes_its_error_and_the_next_parts_run(tmp_path, monkeypatch):
    limits = {}

    def broken(args, out, work, limit):
        raise RuntimeError("simulated failure")

    def step_cost(args, out, work, deadline, env):
        limits["step_cost"] = deadline - time.time()
        return {"status": "ok", "note": ""}

    def accuracy(args, out, work, limit):
        limits["accuracy"] = limit
        return {"status": "ok", "note": ""}
    monkeypatch.setattr(gpu_run, "part_tests", broken)
    monkeypatch.setattr(gpu_run, "part_step_cost", step_cost)
    monkeypatch.setattr(gpu_run, "part_accuracy", accuracy)
    monkeypatch.setattr(gpu_run, "machine", lambda smoke: {
        "python": "3", "packages": {}, "missing": ["x (y)"], "smoke": smoke, "cpu_count": 2, "time": "now",
        "cuda": True, "gpu": "G", "gpu_memory_gib": 1, "capability": "9.0", "cuda_version": "13", "nvidia_smi": "-"})
    rc = gpu_run.main([str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--limit", "500"])
    assert rc == 1
    run = json.loads((tmp_path / "out/run.json").read_text())
    assert [p["status"] for p in run["parts"]] == ["failed", "ok", "ok"]
    assert "simulated failure" in json.loads((tmp_path / "out/1_tests.json").read_text())["error"]
    assert "FAILED" in (tmp_path / "out/1_tests.md").read_text() and "Missing: x (y)" in (tmp_path / "out/run.md").read_text()
    # part 2 gets its cap; what it leaves unused goes to part 3 (all that is left, less the reserve)
    assert gpu_run.CAPS["step_cost"] - 5 < limits["step_cost"] <= gpu_run.CAPS["step_cost"]
    assert 500 - gpu_run.RESERVE_S - 10 < limits["accuracy"] <= 500 - gpu_run.RESERVE_S


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_run_refuses_without_cuda(tmp_path):
    rc = gpu_run.main([str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    run = json.loads((tmp_path / "out/run.json").read_text())
    assert rc == 2 and run["parts"][0]["status"] == "not run" and "--smoke" in run["parts"][0]["note"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.json", "run.md"]


def test_the_lm_study_runs_ours_and_growth_first_and_prices_points_by_tflops(tmp_path, monkeypatch):
    ran = []

    def fake_point(root, study, method, depth, fraction, budget, seed, args, variant):
        time.sleep(0.3)
        ran.append((method, budget, variant))
        return {"method": method, "budget": gpu_accuracy.studies.budget_label(method, budget), "variant": variant,
                "bpb": 2.0, "flops": 1, "seconds": 0.3}
    monkeypatch.setattr(gpu_accuracy.acc, "train_point", fake_point)
    monkeypatch.setattr(gpu_accuracy.studies, "ensure_data", lambda **kw: None)
    lm = next(e for e in gpu_accuracy.PART3 if e.family == "causal_lm")
    assert gpu_accuracy.PART3[0] is lm       # where depth pays: the first entry of part 3
    assert [(p[0], p[3], p[5]) for p in gpu_accuracy.plan(lm)] == [
        ("ours", (10000, "A"), "meta"), ("grow", (10000, "A"), "paper"), ("e2e", 10000, "paper"),
        ("meta", 10000, "paper")]
    report = {"rows": [], "skipped": [], "errors": [], "running": None, "extra_sets": []}
    gpu_accuracy.run_entry(lm, tmp_path, time.time() + 0.95, report, lambda r: None)
    # ours ran unpriced (10000 TFLOPs in 0.3 s); growth, 10000 more (its meta model not on disk) priced
    # at 1.5x that rate, 0.45 s, fits in the 0.65 s left; then 0.35 s is left for 0.45 s each
    assert ran == [("ours", (10000, "A"), "meta"), ("grow", (10000, "A"), "paper")]
    assert [s["point"] for s in report["skipped"]] == ["e2e 10000", "meta 10000"]
    md = gpu_accuracy.markdown(dict(report, command="c", mode="full", time="t"))
    assert "| causal_lm | ours | meta | 10000/A | (TFLOPs) | 2.0000 bits/byte |" in md


def test_points_that_do_not_fit_in_the_time_left_are_skipped(tmp_path, monkeypatch):
    ran = []

    def fake_point(root, study, method, depth, fraction, budget, seed, args, variant):
        time.sleep(0.4)
        ran.append((method, budget, variant))
        return {"method": method, "budget": str(budget), "variant": variant, "top1": 50.0, "flops": 1,
                "seconds": 0.4}
    monkeypatch.setattr(gpu_accuracy.acc, "train_point", fake_point)
    monkeypatch.setattr(gpu_accuracy.studies, "ensure_data", lambda path: None)
    report = {"rows": [], "skipped": [], "errors": [], "running": None, "extra_sets": []}
    saved = []
    vit = next(e for e in gpu_accuracy.PART3 if e.family == "vit")
    gpu_accuracy.run_entry(vit, tmp_path, time.time() + 0.6, report, saved.append)
    # the first point runs unpriced; priced by it, none of the others fits in the 0.2 s left
    assert ran == [("e2e", 10, "paper")] and report["running"] is None and saved
    assert len(report["skipped"]) == len(gpu_accuracy.plan(vit)) - 1
    assert all("needs ~" in s["why"] for s in report["skipped"])
    md = gpu_accuracy.markdown(dict(report, command="c", mode="full", time="t"))
    assert "| vit | e2e | - | 10 | 10.0 | 50.00 |" in md and "Skipped vit meta 40: needs ~" in md


def test_the_machine_part_reads_versions_without_importing(monkeypatch):
    monkeypatch.setattr(gpu_run, "PACKAGES", [("no_such_module", "no-such-dist", None, "nothing"),
                                              ("no_such_module", "torch", None, "a renamed module"),
                                              ("json", "torch", "99.0", "the future")])
    monkeypatch.setattr(gpu_run.importlib, "import_module", None)      # nothing is imported to read a version
    env = gpu_run.machine(smoke=True)
    assert env["missing"] == ["no-such-dist (nothing): not installed",
                              "torch (a renamed module): installed, but there is no module no_such_module to import",
                              f"torch >= 99.0 (found {env['packages']['torch']}; needed by the future)"]
