"""benchmarks/step_cost.py runs end to end on CPU and its FLOP and memory accounting holds together."""
import json

import torch

from benchmarks import step_cost


def test_step_cost_smoke_flops_and_memory(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = step_cost.main(["--batch", "2", "--steps", "2", "--warmup", "1", "--jobs", "e2e,meta,hybrid,official",
                              "--no-data", "--threads", "1", "--out", str(tmp_path / "sc")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "sc.json").read_text())["bars"].keys() == res["bars"].keys()
    assert (tmp_path / "sc.md").read_text().count("| hybrid") >= 4
    rows = {r["job"]: r for r in res["rows"]}
    e2e = rows["e2e"]["flops"]
    # FLOP floor in block passes (E2E = 36): ours 15, 14, 13, 12; official 18, 16, 14, 12 (+ stem/head)
    for i, (ours, official) in enumerate([(15, 18), (14, 16), (13, 14), (12, 12)]):
        assert abs(rows[f"hybrid{i}"]["flops"] / e2e - ours / 36) < 0.02
        assert abs(rows[f"official{i}"]["flops"] / e2e - official / 36) < 0.02
        mem, off = rows[f"hybrid{i}"]["memory"], rows[f"official{i}"]["memory"]
        assert mem["grads"] == 4 * mem["trainable_params"] and mem["optimizer"] == 2 * mem["grads"]
        assert (off["grads"] > mem["grads"]) == (i < 3)      # official: wasted suffix gradients
        assert res["bars"][f"hybrid{i} model state / (E2E/K + meta params)"]["pass"]
    assert abs(res["bars"]["sum hybrid / sum official"]["flop_ratio"] - 54 / 60) < 0.01
    assert rows["e2e"]["memory"]["saved_activations"] > rows["hybrid0"]["memory"]["saved_activations"] > 0


def test_time_limit_skips_the_compilations_that_do_not_fit(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = step_cost.main(["--preset", "smoke", "--steps", "5", "--warmup", "1", "--jobs", "e2e,hybrid",
                              "--variants", "compile", "--variant-jobs", "e2e,hybrid0", "--compile-backend",
                              "aot_eager", "--no-data", "--threads", "1", "--time-limit", "0.001",
                              "--out", str(tmp_path / "sc")])
    finally:
        torch.set_num_threads(threads)
    assert [s["job"] for s in res["skipped"]] == ["e2e+compile", "hybrid0+compile"]
    assert all(not r["job"].endswith("+compile") for r in res["rows"]) and res["steps"] == 2   # the floor
    assert "Skipped e2e+compile (time:" in (tmp_path / "sc.md").read_text()


def test_cuda_memory_accounting_feeds_the_bars_and_tables():
    """The CUDA branch of the memory accounting, run on CPU tensors: its model_state is the one the
    CPU measures, and report() and the tables take its dicts."""
    from types import SimpleNamespace

    from benchmarks.step_cost_report import markdown, summary
    cpu = torch.device("cpu")
    p = step_cost.PRESETS["smoke"]
    names = ["e2e", "meta"] + [f"hybrid{i}" for i in range(4)]
    jobs = [step_cost.make_job(n, "base", p, "none", cpu) for n in names]
    x, y = torch.randn(p["batch"], 3, p["img"], p["img"]), torch.randint(0, p["classes"], (p["batch"],))
    for job in jobs:
        measured = step_cost.measure_memory(job, x, y, cpu)["model_state"]
        job.flops, job.times, job.cuda_growth = 10, [0.1, 0.2], 1000
        job.memory = step_cost.cuda_memory(job)
        assert job.memory["model_state"] == measured and job.memory["step_peak_growth"] == 1000
    peak = step_cost.matmul_job(cpu, torch.float32, 8)
    peak.times = [0.01, 0.01]
    args = SimpleNamespace(preset="smoke", amp="none", steps=2, warmup=1, matmul_n=8)
    res = step_cost.report(args, p, cpu, jobs, [peak], (0, 0, 0), (0, 0, 0), x, y)
    assert all(f"hybrid{i} model state / (E2E/K + meta params)" in res["bars"] for i in range(4))
    res["mode"] = "eager"
    assert "| hybrid3 |" in markdown(res) and "| smoke | eager | 4 | hybrid3 |" in summary([res])


def test_data_wait_measures_every_loader_setting(tmp_path):
    """benchmarks/data_wait.py (the data-wait part) runs from step_cost's --data-only on the real Loader."""
    res = step_cost.main(["--preset", "smoke", "--data-only", "--data-steps", "2", "--warmup", "1", "--threads", "1",
                          "--out", str(tmp_path / "dw")])
    loaders = [r["loader"] for r in res["data_wait"]]
    assert loaders[0].startswith("batched") and any(lo.startswith("per-image") for lo in loaders)
    assert all(r["steps"] == 2 and 0 <= r["wait_share"] <= 1 for r in res["data_wait"])
    assert "data-wait share (in-memory, batched)" in res["bars"]


def test_agreement_cost_times_steps_with_and_without_the_agreement(tmp_path, monkeypatch):
    """--agreement: fits alternately with the step guard and with it patched to a no-op; one rank runs in
    this very process, and leaves neither its step hook nor the patch behind."""
    from torch.optim import optimizer
    from incubate.train import faults
    from benchmarks import agreement_cost
    hooks, guard = dict(optimizer._global_optimizer_pre_hooks), dict(vars(faults.StepGuard))
    monkeypatch.setattr(agreement_cost.subprocess, "Popen", None)      # no second process
    res = step_cost.main(["--agreement", "--ranks", "1", "--rounds", "2", "--width", "32", "--depth", "1",
                          "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "ag")])
    assert dict(optimizer._global_optimizer_pre_hooks) == hooks and dict(vars(faults.StepGuard)) == guard
    assert [r["agreement"] for r in res["rounds"]] == [True, False] and res["agreement_kind"].startswith("StepGuard")
    assert all(r["steps"] > 5 and r["median_s"] > 0 for r in res["rounds"])
    assert res["ratio_with_over_without"] > 0
    assert "| with the agreement |" in (tmp_path / "ag.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ag.json", "ag.md"]       # rank 0's dump is not left beside them
