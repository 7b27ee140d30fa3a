"""Step cost of every stage against E2E: time, FLOPs, FLOP/s, share of matmul peak, memory.

Every job (E2E, the meta model, each hybrid(i), each hybrid(i) with the official semantics, and the
same jobs under the throughput options asked for) lives in this one process; after warm-up they are
stepped round-robin, one step each a round (the start rotates), so a load change on the machine
hits them alike. Times are medians over --steps rounds; ratios are medians of per-round ratios.
A large matmul is timed in the same rounds as this machine's peak. FLOPs come from
FlopCounterMode on one step. Memory: on CUDA the job's resident tensors plus the step's peak
growth (max_memory_allocated); on CPU parameters + gradients + optimizer state + the tensors
autograd saves for backward (saved_tensors_hooks, unique storages, parameters excluded), measured.
The data-wait part runs E2E steps on the real incubate.data.loaders.Loader over in-memory images.

  python -m benchmarks.step_cost --threads 1                         # CPU: DeiT-Tiny width, 32 px
  python -m benchmarks.step_cost --threads 1 --variants compile --jobs e2e,hybrid --no-data
  python -m benchmarks.step_cost --preset vit_b16 --amp bf16         # GPU
  python -m benchmarks.step_cost --preset deit_t32 --amp bf16 --variants compile --time-limit 60   # GPU
  python -m benchmarks.step_cost --agreement --ranks 2 --threads 1   # the ranks' agreement's cost (agreement_cost.py)

--time-limit S keeps a run inside S seconds (benchmarks/gpu_run.sh): compile variants are compiled
one after another while the longest compilation so far still fits in 70% of S (the others are
listed as skipped), and the timed rounds are as many as fit in what is left (at least 2).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import agreement_cost
from benchmarks.data_wait import data_wait
from benchmarks.step_cost_report import save
from benchmarks.step_jobs import CRITERION, PRESETS, Job, make_job, step, sync
from incubate.train.step import autocast, count_step_flops

COMPILE_SHARE = 0.7      # of --time-limit, for compiling; the rest for the timed rounds
VARIANTS = ("base", "compile", "bf16", "ckpt", "fused")


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def model_state(job: Job) -> dict:
    """Bytes of parameters, gradients still held, and optimizer state, from the tensors themselves."""
    params = list(job.net.parameters())
    opt_state = [t for s in job.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"params": storage_bytes(params),
            "grads_at_rest": storage_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer": storage_bytes(opt_state),
            "trainable_params": sum(p.numel() for p in job.trained.parameters())}


def cuda_memory(job: Job) -> dict:
    """On CUDA: the job's resident tensors plus the step's peak growth (max_memory_allocated), and
    model_state as on the CPU (parameters + the gradients of the trained ones + optimizer state),
    the gradients counted from their parameters since none is held between steps."""
    state = model_state(job)
    grads = sum(p.numel() * p.element_size() for p in job.trained.parameters() if p.requires_grad)
    return dict(job.memory, **state, grads=grads, step_peak_growth=job.cuda_growth,
                model_state=state["params"] + grads + state["optimizer"],
                total=state["params"] + state["grads_at_rest"] + state["optimizer"] + job.cuda_growth)


def measure_memory(job: Job, x, y, device) -> dict:
    """One eager forward/backward, no update: saved activations and gradients measured."""
    params = list(job.net.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(job.amp, device):
            loss = CRITERION(job.net(x), y)
    loss.backward()
    grads = storage_bytes([p.grad for p in params if p.grad is not None])
    job.opt.zero_grad(set_to_none=True)
    state = model_state(job)
    mem = dict(state, grads=grads, saved_activations=sum(saved.values()))
    mem["model_state"] = mem["params"] + mem["grads"] + mem["optimizer"]
    mem["total"] = mem["model_state"] + mem["saved_activations"]
    return mem


def matmul_job(device, dtype, n: int) -> Job:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    job = Job("matmul", str(dtype).replace("torch.", ""))
    job.run = lambda: a @ b
    job.flops = 2 * n ** 3
    return job


def timed(job: Job, x, y, device) -> float:
    if device.type == "cuda":
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    if job.name == "matmul":
        job.run()
    else:
        step(job, x, y, device)
    sync(device)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        job.cuda_growth = max(job.cuda_growth, torch.cuda.max_memory_allocated() - start)
    return dt


MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "scaled_dot_product", "flash_attention", "convolution", "linear")


def profile_job(job: Job, x, y, device, steps: int = 3) -> dict:
    """Where one step's time goes, from torch.profiler (forward+backward) and a timer (optimizer):
    matmul-type kernels (GEMMs, attention, conv: the work FlopCounterMode counts), every other op
    (norms, activations, softmax, adds, reductions: 0 FLOPs), Python/autograd bookkeeping (the
    rest of forward+backward), and the optimizer."""
    from torch.profiler import ProfilerActivity, profile
    sums = {"matmul_s": 0.0, "other_ops_s": 0.0, "forward_backward_s": 0.0, "optimizer_s": 0.0}
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            with autocast(job.amp, device):
                loss = CRITERION(job.run(x), y)
            loss.backward()
            sync(device)
            sums["forward_backward_s"] += time.perf_counter() - t0
        for ev in prof.key_averages():
            if ev.key.startswith("aten::"):
                kind = "matmul_s" if any(m in ev.key[6:] for m in MATMUL_OPS) else "other_ops_s"
                sums[kind] += ev.self_cpu_time_total / 1e6
        t0 = time.perf_counter()
        job.opt.step()
        job.opt.zero_grad(set_to_none=True)
        sync(device)
        sums["optimizer_s"] += time.perf_counter() - t0
    out = {k: v / steps for k, v in sums.items()}
    out["bookkeeping_s"] = out["forward_backward_s"] - out["matmul_s"] - out["other_ops_s"]
    return out


def quantiles(xs: list) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q25": q[0], "q75": q[2], "min": min(xs), "max": max(xs)}


def paired(a: Job, b: Job) -> dict:
    return quantiles([x / y for x, y in zip(a.times, b.times)])


# ---------------------------------------------------------------- main

def _setup(args) -> tuple:
    """The device, thread count and preset (with --batch) that every measurement shares."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dict(PRESETS[args.preset], **({"batch": args.batch} if args.batch else {}))


def run(args) -> dict:
    device, p = _setup(args)
    k = p["k"]
    names = []
    for group in args.jobs.split(","):
        names += {"e2e": ["e2e"], "meta": ["meta"], "hybrid": [f"hybrid{i}" for i in range(k)],
                  "official": [f"official{i}" for i in range(k)]}[group]
    variant_names = [n for n in names if n.startswith(("e2e", "hybrid"))]
    if args.variant_jobs:
        variant_names = [n for n in args.variant_jobs.split(",") if n in names]
    jobs = [make_job(n, "base", p, args.amp, device) for n in names]
    for v in [v for v in args.variants.split(",") if v]:
        if v == "fused" and device.type == "cpu":
            print("  note: fused AdamW on CPU (torch >= 2.4; the engine's train.fused allows it)", flush=True)
        jobs += [make_job(n, v, p, args.amp, device, args.compile_backend) for n in variant_names]
    dtypes = {torch.float32} | {{"bf16": torch.bfloat16, "fp16": torch.float16}[j.amp] for j in jobs if j.amp != "none"}
    args.matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    peaks = [matmul_job(device, dt, args.matmul_n) for dt in sorted(dtypes, key=str)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(p["batch"], 3, p["img"], p["img"], generator=g).to(device)
    y = torch.randint(0, p["classes"], (p["batch"],), generator=g).to(device)

    jobs, skipped = prepare_jobs(jobs, x, y, device, args)
    round_s = 0.0
    for r in range(args.warmup):
        t0 = time.perf_counter()
        for job in jobs + peaks:
            timed(job, x, y, device)
        round_s = time.perf_counter() - t0
    if args.time_limit:       # as many timed rounds as fit in what is left, at least 2
        left = args.time_limit - (time.perf_counter() - args.started)
        args.steps = max(2, min(args.steps, int(0.8 * left / max(round_s, 1e-6))))
    for job in jobs:
        if device.type == "cpu" and job.variant != "compile":
            job.memory = measure_memory(job, x, y, device)
    everyone = jobs + peaks
    load_before = os.getloadavg()
    for r in range(args.steps):
        shift = r % len(everyone)
        for job in everyone[shift:] + everyone[:shift]:
            job.times.append(timed(job, x, y, device))
        print(f"  round {r + 1}/{args.steps}", end="\r", flush=True)
    load_after = os.getloadavg()
    if args.profile:
        for job in jobs:
            if job.variant == "base":
                job.memory["profile"] = profile_job(job, x, y, device)
    for job in jobs:
        if device.type == "cuda":
            job.memory = cuda_memory(job)
    result = report(args, p, device, jobs, peaks, load_before, load_after, x, y)
    result["skipped"] = skipped
    del jobs, everyone
    if not args.no_data:
        save(result, args)            # the timings are kept even if the data part fails
        add_data_wait(result, p, args, device)
    return result


def prepare_jobs(jobs: list, x, y, device, args) -> tuple[list, list]:
    """FLOPs of every job; each compile variant compiled (timed apart from its steps) while the
    longest compilation so far still fits in COMPILE_SHARE of --time-limit."""
    kept, skipped, longest = [], [], 0.0
    for job in jobs:
        spent = time.perf_counter() - args.started
        if job.variant == "compile" and args.time_limit and spent + longest > COMPILE_SHARE * args.time_limit:
            skipped.append({"job": job.key, "why": f"time: {spent:.0f}s spent, the longest compilation took "
                                                   f"{longest:.0f}s, limit {args.time_limit:.0f}s"})
            print(f"  skipped {job.key}: {skipped[-1]['why']}", flush=True)
            continue
        job.flops = count_step_flops(job.net, job.trained, CRITERION, x, y)
        if job.variant == "compile":
            t0 = time.perf_counter()
            timed(job, x, y, device)
            job.compile_s = time.perf_counter() - t0
            longest = max(longest, job.compile_s)
            print(f"  compiled {job.key} in {job.compile_s:.1f}s", flush=True)
            if args.out:      # kept if the run is killed before its result
                Path(f"{args.out}.compiled.json").write_text(json.dumps(
                    {j.key: j.compile_s for j in kept + [job] if j.compile_s is not None}))
        kept.append(job)
    return kept, skipped


def report(args, p, device, jobs, peaks, load_before, load_after, x, y) -> dict:
    peak = {pk.variant: pk.flops / statistics.median(pk.times) for pk in peaks}
    by = {j.key: j for j in jobs}
    rows = []
    for j in jobs:
        t = quantiles(j.times)
        flops_s = j.flops / t["median"]
        ref = peak[{"bf16": "bfloat16", "fp16": "float16"}.get(j.amp, "float32")]
        row = {"job": j.key, "step_s": t, "flops": j.flops, "flops_per_s": flops_s, "peak_fraction": flops_s / ref,
               "memory": j.memory, "compile_s": j.compile_s}
        if "e2e" in by and j.variant == "base":
            row["time_vs_e2e"] = paired(j, by["e2e"])
            row["flops_vs_e2e"] = j.flops / by["e2e"].flops
        base = by.get(j.name)
        if j.variant != "base" and base is not None:
            row["speedup_vs_base"] = paired(base, j)
        rows.append(row)
    k = p["k"]
    bars = {}
    if "e2e" in by:
        e2e = by["e2e"]
        for i in range(k):
            h = by.get(f"hybrid{i}")
            if h:
                ratio = paired(h, e2e)["median"]
                predicted = h.flops / e2e.flops
                bars[f"hybrid{i} time / (FLOP share x E2E time)"] = {
                    "value": ratio / predicted, "time_ratio": ratio, "flop_ratio": predicted,
                    "pass": ratio / predicted <= 1.10, "within_10pct_both_ways": abs(ratio / predicted - 1) <= 0.10}
        if "meta" in by:
            v = paired(by["meta"], e2e)["median"]
            bars["meta / E2E step"] = {"value": v, "pass": v <= 0.36}
        if e2e.memory and all(f"hybrid{i}" in by for i in range(k)) and "meta" in by:
            limit = e2e.memory["model_state"] / k + by["meta"].memory["params"]
            for i in range(k):
                v = by[f"hybrid{i}"].memory["model_state"]
                bars[f"hybrid{i} model state / (E2E/K + meta params)"] = {"value": v / limit, "bytes": v,
                                                                        "limit_bytes": limit, "pass": v <= limit}
    if all(f"hybrid{i}" in by and f"official{i}" in by for i in range(k)):
        per_round = [sum(by[f"hybrid{i}"].times[r] for i in range(k)) / sum(by[f"official{i}"].times[r] for i in range(k))
                     for r in range(len(jobs[0].times))]
        v = statistics.median(per_round)
        bars["sum hybrid / sum official"] = {"value": v, "spread": quantiles(per_round), "pass": v <= 0.9,
                                             "flop_ratio": sum(by[f"hybrid{i}"].flops for i in range(k))
                                             / sum(by[f"official{i}"].flops for i in range(k))}
    for j in jobs:
        if j.variant == "compile" and j.name in by:
            v = paired(by[j.name], j)["median"]
            bars[f"compile speedup {j.name}"] = {"value": v, "pass": v >= 1.2, "compile_s": j.compile_s}
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_avg_before": load_before, "load_after": load_after,
               "matmul_peak_flops_per_s": peak, "matmul_n": args.matmul_n}
    result = {"command": "python -m benchmarks.step_cost " + " ".join(sys.argv[1:]), "preset": args.preset,
              "config": p, "amp": args.amp, "steps": args.steps, "warmup": args.warmup, "machine": machine,
              "rows": rows, "bars": bars,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return result


def add_data_wait(result: dict, p: dict, args, device) -> dict:
    result["data_wait"] = data_wait(p, args, device, args.amp)
    batched = [r for r in result["data_wait"] if r["loader"].startswith("batched")][0]
    result["bars"]["data-wait share (in-memory, batched)"] = {"value": batched["wait_share"],
                                                              "pass": batched["wait_share"] < 0.05}
    return result


def run_data_only(args) -> dict:
    device, p = _setup(args)
    load_before = os.getloadavg()
    return add_data_wait({"command": "python -m benchmarks.step_cost " + " ".join(sys.argv[1:]), "preset": args.preset,
            "config": p, "amp": args.amp, "steps": args.data_steps, "warmup": args.warmup,
            "machine": {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "load_avg_before": load_before, "load_after": os.getloadavg(),
                        "matmul_peak_flops_per_s": {}},
            "rows": [], "bars": {}, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, p, args, device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=0, help="override the preset's batch")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="for every job")
    ap.add_argument("--jobs", default="e2e,meta,hybrid,official", help="groups: e2e, meta, hybrid, official")
    ap.add_argument("--variants", default="", help=f"extra variants of the E2E and hybrid jobs: {', '.join(VARIANTS[1:])}")
    ap.add_argument("--variant-jobs", default="", help="jobs the variants apply to, e.g. e2e,hybrid1 "
                    "(default: E2E and every hybrid)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data-steps", type=int, default=20)
    ap.add_argument("--no-data", action="store_true", help="skip the data-wait measurement")
    ap.add_argument("--data-only", action="store_true", help="only the data-wait measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--matmul-n", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also break each job's step down by op kind")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile variant "
                    "(aot_eager: tracing without code generation, for quick CPU checks)")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds: skip compilations and shorten the "
                    "timed rounds to fit (0: no limit)")
    ap.add_argument("--out", default="", help="basename for .json and .md (default benchmarks/results/...)")
    ap.add_argument("--agreement", action="store_true", help="instead: the ranks' agreement's cost on a step "
                    "(benchmarks/agreement_cost.py), with it against with it patched to a no-op")
    agreement_cost.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.agreement:
        return run_agreement(args)
    args.started = time.perf_counter()
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS[1:]]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS[1:])}")
    if args.amp == "fp16" and not torch.cuda.is_available():
        ap.error("--amp fp16 needs CUDA; use bf16 on CPU")
    res = run_data_only(args) if args.data_only else run(args)
    print("\n" + save(res, args))
    return res


def run_agreement(args) -> dict:
    args.batch = args.batch or 32
    args.out = args.out or "benchmarks/results/agreement"
    res = agreement_cost.run(args)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1))
    text = agreement_cost.markdown(res)
    Path(f"{args.out}.md").write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
