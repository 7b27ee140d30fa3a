"""benchmarks/step_cost.py's output: the result as JSON and as the markdown tables of docs/performance.md."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mib(b) -> str:
    return f"{b / 2 ** 20:.1f}" if b is not None else "-"


def markdown(res: dict) -> str:
    m = res["machine"]
    peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in m["matmul_peak_flops_per_s"].items())
    out = [f"`{res['command']}`", "",
           f"{res['time']}; {m['device']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), torch "
           f"{m['torch']}; load average {m['load_avg_before'][0]:.2f} before, {m['load_after'][0]:.2f} after the "
           f"timed rounds; matmul peak measured in the same rounds: {peaks}. Median of {res['steps']} "
           f"interleaved steps after {res['warmup']} warm-up; ratios are medians of per-round ratios "
           f"(q25-q75 in brackets).", "",
           ]
    if res["rows"]:
        out += ["| job | step s (q25-q75) | time / E2E | FLOPs / E2E | GFLOP/step | GFLOP/s | of peak | "
                "model state MiB | saved act. MiB | memory MiB | speedup vs base | compile s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        s, mem = r["step_s"], r["memory"]
        tv = r.get("time_vs_e2e")
        sp = r.get("speedup_vs_base")
        out.append(
            f"| {r['job']} | {s['median']:.3f} ({s['q25']:.3f}-{s['q75']:.3f}) | "
            + (f"{tv['median']:.3f} ({tv['q25']:.2f}-{tv['q75']:.2f})" if tv else "-") + " | "
            + (f"{r['flops_vs_e2e']:.3f}" if "flops_vs_e2e" in r else "-")
            + f" | {r['flops'] / 1e9:.2f} | {r['flops_per_s'] / 1e9:.1f} | {100 * r['peak_fraction']:.0f}% | "
            + f"{mib(mem.get('model_state', (mem.get('params', 0) + mem.get('grads_at_rest', 0) + mem.get('optimizer', 0)) if mem else None))} | "
            + f"{mib(mem.get('saved_activations')) if mem else '-'} | {mib(mem.get('total')) if mem else '-'} | "
            + (f"{sp['median']:.2f}x ({sp['q25']:.2f}-{sp['q75']:.2f})" if sp else "-") + " | "
            + (f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-") + " |")
    for sk in res.get("skipped", []):
        out.append(f"\nSkipped {sk['job']} ({sk['why']}).")
    out += ["", "| bar | value | pass |", "|---|---|---|"]
    for name, b in res["bars"].items():
        extra = ""
        if "flop_ratio" in b:
            extra = f" (FLOP ratio {b['flop_ratio']:.3f}" + (f", time ratio {b['time_ratio']:.3f}" if "time_ratio" in b else "") + ")"
        out.append(f"| {name} | {b['value']:.3f}{extra} | {'yes' if b['pass'] else 'NO'} |")
    prof = [(r["job"], r["memory"]["profile"]) for r in res["rows"] if r["memory"].get("profile")]
    if prof:
        out += ["", "torch.profiler, mean of 3 steps a job after the timed rounds (profiling inflates times):", "",
                "| job | forward+backward s | matmul-type ops s | other ops s | bookkeeping s | optimizer s |",
                "|---|---|---|---|---|---|"]
        for name, pr in prof:
            out.append(f"| {name} | {pr['forward_backward_s']:.3f} | {pr['matmul_s']:.3f} | {pr['other_ops_s']:.3f} | "
                       f"{pr['bookkeeping_s']:.3f} | {pr['optimizer_s']:.3f} |")
    if "data_wait" in res:
        out += ["", "| loader (E2E steps, in-memory images) | wait share | median wait ms | max wait ms | step s |",
                "|---|---|---|---|---|"]
        for r in res["data_wait"]:
            out.append(f"| {r['loader']} | {100 * r['wait_share']:.2f}% | {r['median_wait_ms']:.1f} | "
                       f"{r['max_wait_ms']:.1f} | {r['median_step_s']:.3f} |")
    return "\n".join(out) + "\n"


def save(res: dict, args) -> str:
    tag = "_".join(filter(None, [args.preset, args.amp if args.amp != "none" else "", args.variants.replace(",", "-"),
                                 "profile" if args.profile else "", "data" if args.data_only else ""]))
    base = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"step_cost_{tag}"
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    base.with_suffix(".md").write_text(md)
    return md


def summary(runs: list) -> str:
    """One line a job of several runs (benchmarks/gpu_run.sh): step time, MFU against the matmul peak
    measured in the same rounds, peak memory, compile time and speed-up; then each run's sum of hybrid
    steps against the official semantics."""
    out = ["| model | run | batch | job | step ms | TFLOP/s | MFU (of measured matmul peak) | peak memory GiB | "
           "compile s | compile speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for res in runs:
        for r in res["rows"]:
            mem, sp = r["memory"].get("total"), r.get("speedup_vs_base")
            out.append(f"| {res['preset']} | {res.get('mode', '')} | {res['config']['batch']} | {r['job']} | {1e3 * r['step_s']['median']:.1f} | "
                       f"{r['flops_per_s'] / 1e12:.2f} | {100 * r['peak_fraction']:.1f}% | "
                       + (f"{mem / 2 ** 30:.2f}" if mem else "-") + " | "
                       + (f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-") + " | "
                       + (f"{sp['median']:.2f}x" if sp else "-") + " |")
        peaks = ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in res["machine"]["matmul_peak_flops_per_s"].items())
        bar = res["bars"].get("sum hybrid / sum official")
        notes.append(f"- {res['preset']} ({res.get('mode', '')}): matmul peak {peaks}"
                     + (f"; sum of hybrid steps / sum with official semantics {bar['value']:.3f} "
                        f"(FLOP ratio {bar['flop_ratio']:.3f})" if bar else "")
                     + "".join(f"; skipped {s['job']} ({s['why']})" for s in res.get("skipped", [])))
    return "\n".join(out + [""] + notes) + "\n"
