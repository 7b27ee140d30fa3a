"""incubate plan's estimates against reality on tiny models: model state exact, the traced peak
within 10% of one real CPU step's (torch's MemTracker on real tensors: every storage alive, counted
by its real size, no process RSS), depth scaling and FSDP's world-size rescaling exact, FLOPs equal
to the stages' own count; and the command's output and its refusals."""
import gc
import json
import subprocess
import sys

import pytest
import torch

from incubate.plan import memory, jobs as plan_jobs
from incubate.recipe.schema import load_recipe
from incubate.plan.estimate import Options, parse_memory, placement

from ..conftest import ROOT

LM = ["model.division=[1,3,1,1]", "train.batch_size=4", "data.context=32", "train.fused=true"]
# activations outweigh the model state, as at scale (else the peak moves between moments of the step)
SMALL = ["model.division=[1,1,1,1]", "train.batch_size=8", "data.context=64"]
VIT = ["train.batch_size=8", "train.amp=bf16"]


def setting(recipe: str, sets: list, classes=None):
    r = load_recipe(ROOT / "recipes" / recipe, sets)
    return plan_jobs.Setting.of(r, classes, None)


def parts(s, stage: str, index: int = 0):
    cfg = s.recipe.stage(stage)
    make, depth = plan_jobs._maker(s, stage, index, cfg.drop_path, plan_jobs._uniform(s))
    return make, depth, plan_jobs._data(s, cfg.batch_size), plan_jobs._loss(s, cfg), plan_jobs._shape(cfg)


def real_step(make, data, loss_fn, shape) -> dict:
    """One steady step on real tensors, measured as the estimate is traced, and the state it holds."""
    torch.manual_seed(0)
    net, trained, _ = make(None)
    optimizer = memory._make_optimizer(trained, shape)
    memory._init_optimizer_state(trained, optimizer)
    x, y = data()
    tracker, _ = memory._tracker(net, trained, optimizer, (x, y), 0)
    with tracker:
        memory._micro_steps(net, loss_fn, x, y, shape)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in trained.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    opt = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
              if torch.is_tensor(v))
    return {"peak": peak, "params": sum(p.numel() * p.element_size() for p in net.parameters()), "grads": grads,
            "opt": opt}


@pytest.mark.parametrize("recipe, sets, stage, index", [
    ("quickstart_lm.yaml", LM, "e2e", 0), ("quickstart_lm.yaml", LM, "incubate", 1),
    ("quickstart.yaml", VIT, "e2e", 0), ("quickstart.yaml", VIT, "incubate", 0)])
def test_model_state_is_exact_and_the_peak_within_10_percent_of_a_real_step(recipe, sets, stage, index):
    s = setting(recipe, sets)
    make, depth, data, loss, shape = parts(s, stage, index)
    estimate, scaled = memory.scaled_trace(lambda d: memory.trace_step(lambda: make(d), data, loss, shape), depth)
    real = real_step(make, data, loss, shape)
    state = (estimate.param_bytes, estimate.grad_bytes, estimate.opt_bytes)
    assert state == (real["params"], real["grads"], real["opt"])
    assert abs(estimate.peak - real["peak"]) <= 0.10 * real["peak"], (estimate.peak, real["peak"], scaled)


@pytest.mark.parametrize("world", [0, 2])
def test_depth_scaling_is_exact(world):
    s = setting("quickstart_lm.yaml", SMALL)
    make, depth, data, loss, shape = parts(s, "e2e")
    assert depth == 4

    def trace_at(d):
        return memory.trace_step(lambda: make(d), data, loss, shape, s.family, world)
    scaled, was_scaled = memory.scaled_trace(trace_at, depth)
    whole = trace_at(depth)
    assert was_scaled and scaled.parts == whole.parts
    assert (scaled.peak, scaled.flops, scaled.params, scaled.param_bytes) == \
        (whole.peak, whole.flops, whole.params, whole.param_bytes)


def test_fsdp_at_two_ranks_holds_half_the_model_state_and_rescaling_from_eight_is_exact():
    s = setting("quickstart_lm.yaml", SMALL + ["train.amp=bf16"])
    make, _, data, loss, shape = parts(s, "e2e")
    one, two, eight = (memory.trace_step(lambda: make(None), data, loss, shape, s.family, w) for w in (1, 2, 8))
    state = lambda t: t.parts["SHARDED_PARAM"] + t.parts["OPT"]
    assert 0.49 < state(two) / state(one) < 0.52
    assert abs(memory.rescale(eight, 8, 2).peak - two.peak) <= 0.01 * two.peak
    assert memory.rescale(eight, 8, 8).peak == eight.peak


def test_flops_a_token_are_the_stages_own_count():
    from incubate.tasks.causal_lm import _NextTokenLoss
    from incubate.train.step import count_step_flops
    s = setting("quickstart_lm.yaml", LM)
    make, depth, data, loss, shape = parts(s, "incubate", 2)
    estimate, _ = memory.scaled_trace(lambda d: memory.trace_step(lambda: make(d), data, loss, shape), depth)
    net, trained, _ = make(None)
    x, _ = data()
    assert estimate.flops == count_step_flops(net, trained, _NextTokenLoss(0.0), x, x)


def test_placement_takes_ddp_where_a_device_holds_the_step_else_the_fewest_fsdp_ranks():
    worlds = plan_jobs.WORLDS
    job = plan_jobs.Job("e2e", "e2e", 1, 1, 0, "token", 6.0, 10 ** 12, {}, {w: 50 for w in worlds},
                        {w: 400 // w for w in worlds}, False)
    o = Options(device_memory=60, devices_per_node=8, device_tflops=1.0, mfu=0.5)
    assert placement(job, o)["mode"] == "ddp" and placement(job, o)["gpu_hours"] == 6e12 / 0.5e12 / 3600
    run = placement(job, Options(device_memory=40, devices_per_node=8, device_tflops=1.0, mfu=0.5))
    assert (run["mode"], run["fewest"], run["devices"]) == ("fsdp", 16, 16)
    assert placement(job, Options(device_memory=1))["mode"] == "none"


def test_memory_sizes_parse_and_unknown_units_are_refused():
    assert parse_memory("80GiB") == 80 * 2 ** 30 and parse_memory("80 GB") == 80 * 10 ** 9
    from incubate.errors import UserError
    for bad in ("80XB", "lots", "0GiB"):
        with pytest.raises(UserError):
            parse_memory(bad)


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "incubate.cli", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args, says", [
    (["--recipe", "recipes/llama3_8b.yaml", "--device-memory", "80XB"], "--device-memory '80XB' is not a size"),
    (["--recipe", "recipes/llama3_8b.yaml", "--mfu", "1.5"], "--mfu 1.5 must lie in (0, 1]"),
    (["--recipe", "recipes/llama3_8b.yaml", "--set", "model.division=[8,8]"], "meta")])
def test_bad_input_is_one_line(args, says):
    proc = plan_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("incubate: error:") and says in lines[0], proc.stderr


def test_an_image_recipe_of_unknown_classes_asks_for_them():
    from incubate.errors import UserError
    with pytest.raises(UserError, match="pass --classes N"):
        setting("imagenet_vit_huge.yaml", [])
    assert setting("imagenet_vit_huge.yaml", [], classes=1000).spec.classes == 1000


@pytest.mark.slow
def test_the_command_prints_every_job_and_its_json():
    budgets = ["meta.tokens=1000000", "incubate.tokens=500000", "finetune.tokens=500000", "e2e.tokens=3000000",
               "grow.tokens=2000000"]
    proc = plan_cli("--recipe", "recipes/quickstart_lm.yaml", *(f"--set={s}" for s in SMALL + budgets), "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    assert [j["job"] for j in p["jobs"]] == ["meta"] + [f"hybrid {i}" for i in range(4)] + ["finetune", "e2e", "grow"]
    assert all(j["run"]["mode"] == "ddp" and j["flops"] > 0 for j in p["jobs"])
    hybrid = p["jobs"][1]
    assert hybrid["frozen"] > 0 and hybrid["params"] == hybrid["trained"] + hybrid["frozen"]
    assert set(p["methods"]) == {"ours", "e2e", "growth"} and p["methods"]["e2e"]["gpu_hours"] > 0
    from incubate.plan.table import table
    text = table(p)
    assert "hybrid 3" in text and "fsdp x64" in text and "ours" in text


def test_grad_checkpointing_of_a_language_model_lowers_its_planned_activations():
    """The plan traces the step as the loop runs it: the causal_lm family's recomputed layers keep fewer activations."""
    traces = []
    for on in ("false", "true"):
        s = setting("quickstart_lm.yaml", SMALL + [f"train.grad_checkpointing={on}"])
        make, _, data, loss, shape = parts(s, "e2e")
        traces.append(memory.trace_step(lambda: make(None), data, loss, shape, s.family))
    assert traces[1].parts["ACT"] < 0.8 * traces[0].parts["ACT"] and traces[1].peak < traces[0].peak


def test_the_planned_peak_does_not_depend_on_when_python_collects_its_cycles():
    """Recomputed layers leave tensors that only the cycle collector frees; a collection in the middle
    of the traced step (its allocations or another test's left-overs can start one) lowered the peak."""
    s = setting("quickstart_lm.yaml", SMALL + ["train.grad_checkpointing=true"])
    make, _, data, loss, shape = parts(s, "e2e")
    peaks = set()
    for threshold in (1, 700):
        old = gc.get_threshold()
        gc.set_threshold(threshold)
        try:
            peaks.add(memory.trace_step(lambda: make(None), data, loss, shape, s.family).peak)
        finally:
            gc.set_threshold(*old)
    assert len(peaks) == 1, peaks
