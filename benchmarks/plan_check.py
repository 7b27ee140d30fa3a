"""`incubate plan`'s memory estimate against a real step on the device: one hybrid step and one E2E step
of a ~1.1B-parameter Llama-shaped model (TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4 key-value
heads, MLP 5632, vocabulary 32000; K = 4) in bf16 autocast with fused AdamW, batch 4 x 2048 tokens.
Measured: torch.cuda.max_memory_allocated over the steady step (the optimizer state made by a first step
on zero gradients, as the estimate's traced step starts); estimated: the plan's DDP peak at one device.
--smoke: a tiny model of the same shape family on the CPU, measured with torch's MemTracker on real
tensors (a CPU has no allocator statistics).

  python -m benchmarks.plan_check --out OUT          # writes OUT.json (benchmarks/gpu_run.py, part 2)
  python -m benchmarks.plan_check --out OUT --smoke
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FULL = ["model.kwargs={hidden_size: 2048, num_attention_heads: 32, num_key_value_heads: 4, intermediate_size: 5632}",
        "model.division=[6,5,5,6]", "data.vocab_size=32000", "data.context=2048", "train.batch_size=4"]
SMOKE = ["model.kwargs={hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 176}",
         "model.division=[2,2,2,2]", "data.vocab_size=512", "data.context=64", "train.batch_size=2"]
COMMON = ["model.family=causal_lm", "model.name=llama", "data.source=text:/nonexistent", "data.tokenizer=bpe",
          "train.amp=bf16", "train.fused=true", "train.label_smoothing=0.0"]
JOBS = (("hybrid 1", "incubate", 1), ("e2e", "e2e", 0))


def measure(make, data, loss_fn, shape, device) -> dict:
    """One steady step of make(None) on `device`: its peak bytes and the seconds it took."""
    import torch

    from incubate.plan import memory
    torch.manual_seed(0)
    with torch.device(device):
        net, trained, _ = make(None)
    optimizer = memory._make_optimizer(trained, shape)
    memory._init_optimizer_state(trained, optimizer)
    x, y = (t.to(device) for t in data())
    t0 = time.time()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory._micro_steps(net, loss_fn, x, y, shape)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        tracker, _ = memory._tracker(net, trained, optimizer, (x, y), 0)
        with tracker:
            memory._micro_steps(net, loss_fn, x, y, shape)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak, how = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"], "MemTracker, real tensors"
    seconds = time.time() - t0
    del net, trained, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"measured_bytes": peak, "measured_by": how, "step_s": round(seconds, 2)}


def run(smoke: bool) -> dict:
    from incubate.plan import memory, jobs as plan_jobs
    from incubate.recipe.schema import load_recipe
    sets = COMMON + (SMOKE if smoke else FULL)
    s = plan_jobs.Setting.of(load_recipe(None, sets), None, None)
    uniform, device, rows = plan_jobs._uniform(s), "cpu" if smoke else "cuda", []
    for name, stage, index in JOBS:
        cfg = s.recipe.stage(stage)
        make, depth = plan_jobs._maker(s, stage, index, cfg.drop_path, uniform)
        data, loss, shape = plan_jobs._data(s, cfg.batch_size), plan_jobs._loss(s, cfg), plan_jobs._shape(cfg)
        t0 = time.time()
        estimate, scaled = memory.scaled_trace(lambda d: memory.trace_step(lambda: make(d), data, loss, shape), depth)
        row = {"job": name, "params": estimate.params, "trained": estimate.trained, "estimate_bytes": estimate.peak,
               "estimate_parts": estimate.parts, "scaled": scaled, "estimate_s": round(time.time() - t0, 1)}
        row.update(measure(make, data, loss, shape, device))
        row["estimate_over_measured"] = round(row["estimate_bytes"] / row["measured_bytes"], 4)
        rows.append(row)
    return {"sets": sets, "device": device, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Plan estimate vs a real step on {result['device']} (benchmarks/plan_check.py; bf16 autocast, fused "
             f"AdamW): `{' '.join(result['sets'])}`", "",
             "| job | params | trained | estimate GiB | measured GiB | estimate / measured | measured by |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['job']} | {r['params'] / 1e6:.1f}M | {r['trained'] / 1e6:.1f}M | "
                     f"{r['estimate_bytes'] / 2 ** 30:.3f} | {r['measured_bytes'] / 2 ** 30:.3f} | "
                     f"{r['estimate_over_measured']:.3f} | {r['measured_by']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="writes OUT.json")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    args = ap.parse_args(argv)
    result = run(args.smoke)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
