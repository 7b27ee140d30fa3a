"""benchmarks/gpu_run.sh's driver: what the CPU cannot measure, on one lent GPU, in at most 9 minutes.

Parts, in this order (each one's files are written as soon as it ends, so a run cut short still
returns the first parts; a part that fails writes its error and the next part runs):
  0 the machine: versions found and what is missing, the GPU        -> run.json, run.md (rewritten after every part)
  1 the CUDA tests (`pytest -m gpu`, tests/gpu/)                     -> 1_tests.json, 1_tests.md
  2 step cost, bf16: DeiT-T width depth 32 at 32 px and ViT-B/16 at 224 px, eager then compiled
    (benchmarks/step_cost.py; each run under its own time limit), and first the agreement's cost on
    a step (step_cost.py --agreement: one process, so its host sync alone) and `incubate plan`'s
    memory estimate against max_memory_allocated for one hybrid and one E2E step of a 1.1B-parameter
    Llama (benchmarks/plan_check.py)                                    -> 2_step_cost.json, 2_step_cost.md
  3 accuracy vs cost at full Fashion-MNIST scale, every family with
    an entry in benchmarks/gpu_accuracy.py, sized to the time left   -> 3_accuracy.json, 3_accuracy.md
Every part's time is its cap or what is left, whichever is less; what a part leaves goes to the next.
--smoke runs the same parts on the CPU at tiny sizes (docs/performance.md gives its time).

  bash benchmarks/gpu_run.sh OUTDIR            # on the GPU machine (docs/performance.md: what to carry)
  bash benchmarks/gpu_run.sh --smoke OUTDIR    # anywhere; tests/integration/test_gpu_run_smoke.py runs it
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LIMIT_S = 540                    # 9 minutes for everything
# part 3 takes the rest, less RESERVE_S (part 2's 90 s for the plan check came from it)
CAPS = {"tests": 110, "step_cost": 310}
RESERVE_S = 10                   # for writing the last files
FILES = ["run.json", "run.md", "1_tests.json", "1_tests.md", "2_step_cost.json", "2_step_cost.md",
         "3_accuracy.json", "3_accuracy.md"]
# (import name, distribution, minimum version or None, what needs it)
PACKAGES = [("torch", "torch", "2.4", "everything"), ("timm", "timm", "1.0", "every model"),
            ("safetensors", "safetensors", None, "checkpoints"), ("yaml", "pyyaml", None, "recipes"),
            ("numpy", "numpy", None, "data"), ("sklearn", "scikit-learn", None, "the digits data"),
            ("PIL", "pillow", None, "image data"), ("matplotlib", "matplotlib", None, "report.png"),
            ("tqdm", "tqdm", None, "progress bars"), ("pytest", "pytest", None, "part 1"),
            ("tensorboard", "tensorboard", None, "train.tensorboard, on by default"),
            ("transformers", "transformers", None, "optional: the causal-LM family"),
            ("tokenizers", "tokenizers", None, "optional: the causal-LM family")]
# (preset, batch on a >= 100 GiB GPU, mode); mode compile also re-times eager E2E/meta/hybrids to pair with
STEP_RUNS = [("deit_t32", 1024, "eager"), ("vit_b16", 256, "eager"), ("vit_b16", 256, "compile"),
             ("deit_t32", 1024, "compile")]
SMOKE_STEP_RUNS = [("smoke", 4, "eager"), ("smoke", 4, "compile")]
AGREEMENT_S = 60                 # of part 2, for step_cost.py --agreement
PLAN_CHECK_S = 90                # of part 2, for benchmarks/plan_check.py
AGREEMENT = ["--ranks", 1, "--device", "cuda", "--width", 192, "--depth", 12, "--img", 32, "--batch", 64,
             "--rounds", 6]
SMOKE_AGREEMENT = ["--ranks", 1, "--device", "cpu", "--width", 32, "--depth", 1, "--batch", 32, "--rounds", 2]
# the smoke run compiles one network (a CPU takes seconds a compilation): the compile path of step_cost.py
# is the same for every job; tests/gpu compiles a hybrid
SMOKE_COMPILED = "e2e"
GPU_TESTS = "tests/gpu"          # every test marked gpu lives here: collecting all of tests/ costs half a minute


def _version_tuple(v: str) -> tuple:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in v.split("+")[0].split(".")[:2])


def machine(smoke: bool) -> dict:
    """Versions installed, what is missing (said plainly), and the GPU. Versions are read from the
    installed distributions, not by importing them (6 s of a 9-minute run); a part that imports a
    broken one fails with that error in its own file."""
    found, missing = {}, []
    for module, dist, minimum, need in PACKAGES:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{dist} ({need}): not installed")
            continue
        found[dist] = version
        if importlib.util.find_spec(module) is None:
            missing.append(f"{dist} ({need}): installed, but there is no module {module} to import")
        elif minimum and _version_tuple(version) < _version_tuple(minimum):
            missing.append(f"{dist} >= {minimum} (found {version}; needed by {need})")
    env = {"python": platform.python_version(), "packages": found, "missing": missing, "smoke": smoke,
           "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import torch
        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                       capability=f"{props.major}.{props.minor}", cuda_version=torch.version.cuda,
                       bf16=torch.cuda.is_bf16_supported())
    except Exception as e:
        env["cuda"] = False
        env["cuda_error"] = f"{type(e).__name__}: {e}"
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = "not available"
    return env


def run_logged(cmd: list, timeout: float, env: dict | None = None) -> dict:
    """Run a part's command in its own process group, echo its output, keep the tail; kill it at timeout."""
    t0 = time.time()
    print(f"\n$ {' '.join(map(str, cmd))}   (limit {timeout:.0f}s)", flush=True)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, **(env or {})), start_new_session=True)
    tail: collections.deque = collections.deque(maxlen=60)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(5)
    return {"command": " ".join(map(str, cmd)), "rc": rc, "timed_out": timed_out,
            "seconds": round(time.time() - t0, 1), "tail": "".join(tail)[-4000:]}


def write(out: Path, name: str, data) -> None:
    (out / name).write_text(data if isinstance(data, str) else json.dumps(data, indent=1, default=str))


# ---------------------------------------------------------------- part 1

def junit_rows(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:300]
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                     "seconds": float(case.get("time") or 0), "message": message})
    return rows


def part_tests(args, out: Path, work: Path, limit: float) -> dict:
    junit = work / "junit.xml"
    junit.unlink(missing_ok=True)
    # a test module that fails to import (another family's package missing there) must not stop the rest
    res = run_logged([args.python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", GPU_TESTS,
                      "--continue-on-collection-errors", f"--junitxml={junit}"], limit, {"INCUBATE_GPU_TESTS_ON": "cpu"} if args.smoke else None)
    res["tests"] = junit_rows(junit)
    res["device"] = "cpu (INCUBATE_GPU_TESTS_ON=cpu)" if args.smoke else "cuda"
    write(out, "1_tests.json", res)
    md = [f"Part 1, CUDA tests on {res['device']}: `{res['command']}`; exit {res['rc']}"
          + (" (killed at its time limit)" if res["timed_out"] else "") + f", {res['seconds']:.0f}s.", "",
          "| test | outcome | seconds | message |", "|---|---|---|---|"]
    md += [f"| {r['test']} | {r['outcome']} | {r['seconds']:.1f} | "
           f"{(r['message'].splitlines() or [''])[0].replace('|', '/')} |" for r in res["tests"]]
    if res["rc"] != 0:
        md += ["", "```", res["tail"], "```"]
    write(out, "1_tests.md", "\n".join(md) + "\n")
    ok = res["rc"] == 0 and res["tests"] and all(r["outcome"] == "passed" for r in res["tests"])
    return {"status": "ok" if ok else "failed", "note": ", ".join(
        f"{sum(r['outcome'] == o for r in res['tests'])} {o}" for o in ("passed", "failed", "error", "skipped"))}


# ---------------------------------------------------------------- part 2

def agreement_run(args, work: Path, limit: float) -> dict:
    """step_cost.py --agreement: a step with the ranks' agreement against with it a no-op."""
    base = work / "agreement"
    cmd = [args.python, "benchmarks/step_cost.py", "--agreement", "--threads", 1, "--out", base]
    return json_result(cmd + (SMOKE_AGREEMENT if args.smoke else AGREEMENT), base, limit)


def json_result(cmd: list, base: Path, limit: float) -> dict:
    """Run a benchmark that writes BASE.json: its figures with the run's record, or why there are none."""
    base.with_suffix(".json").unlink(missing_ok=True)
    res = run_logged(cmd, limit, None)
    if base.with_suffix(".json").exists():
        return dict(json.loads(base.with_suffix(".json").read_text()), run=res)
    return {"run": res, "error": "killed at its time limit" if res["timed_out"] else f"exit {res['rc']}"}


def agreement_md(agreement: dict) -> list:
    from benchmarks.agreement_cost import markdown
    return result_md("agreement cost", agreement, markdown)


def result_md(title: str, result: dict, markdown) -> list:
    if "error" in result:
        return [f"### {title}: FAILED ({result['error']})", "", "```", result["run"].get("tail", ""), "```", ""]
    return [f"### {title}", "", markdown(result)]


def plan_check_run(args, work: Path, limit: float) -> dict:
    """benchmarks/plan_check.py: the plan's peak-memory estimate against a real hybrid and E2E step."""
    base = work / "plan_check"
    cmd = [args.python, "-m", "benchmarks.plan_check", "--out", base] + (["--smoke"] if args.smoke else [])
    return json_result(cmd, base, limit)


def plan_check_md(check: dict) -> list:
    from benchmarks.plan_check import markdown
    return result_md("plan estimate vs measured", check, markdown)


def part_step_cost(args, out: Path, work: Path, deadline: float, env: dict) -> dict:
    from benchmarks.step_cost_report import markdown, summary
    big = args.smoke or env.get("gpu_memory_gib", 0) >= 100
    plan = SMOKE_STEP_RUNS if args.smoke else STEP_RUNS
    runs = []
    agreement = agreement_run(args, work, min(AGREEMENT_S, deadline - time.time()))
    check = plan_check_run(args, work, min(PLAN_CHECK_S, deadline - time.time()))
    for i, (preset, batch, mode) in enumerate(plan):
        left = deadline - time.time()
        # an eager run needs little on a GPU; the compiled runs share what is left (the smoke run: every run
        # does, as a loaded CPU can take longer than 45 s for one)
        limit = (min(45.0, left) if mode == "eager" and not args.smoke else
                 left / sum(1 for p in plan[i:] if args.smoke or p[2] == "compile"))
        base = work / f"step_cost_{preset}_{mode}"
        for old in (base.with_suffix(".json"), Path(f"{base}.compiled.json")):
            old.unlink(missing_ok=True)
        # the run's own clock starts after its imports: 12 s of margin for them before the hard limit
        cmd = [args.python, "-m", "benchmarks.step_cost", "--preset", preset, "--amp", "bf16", "--no-data",
               "--batch", batch if big else batch // 2, "--time-limit", f"{max(limit - 12, 5):.0f}", "--out", base,
               "--steps", 2 if args.smoke else 20, "--warmup", 1 if args.smoke else 3]
        if mode == "eager":
            cmd += ["--jobs", "e2e,meta,hybrid,official"]
        else:
            cmd += ["--jobs", "e2e,meta,hybrid", "--variants", "compile", "--variant-jobs",
                    SMOKE_COMPILED if args.smoke else "e2e,meta,hybrid0,hybrid1,hybrid2,hybrid3"]
        if args.smoke:       # seconds on a CPU: tracing without code generation
            # a 256-wide peak matmul: a CPU without bf16 units takes a minute for the 2048-wide one in bf16
            cmd += ["--device", "cpu", "--threads", "1", "--compile-backend", "aot_eager", "--matmul-n", 256]
        if limit < 10:
            runs.append({"preset": preset, "mode": mode, "error": f"skipped: {left:.0f}s left"})
        else:
            res = run_logged(cmd, limit, None)
            result = json.loads(base.with_suffix(".json").read_text()) if base.with_suffix(".json").exists() else None
            compiled = Path(f"{base}.compiled.json")
            runs.append(dict(result, preset=preset, mode=mode, run=res) if result else
                        {"preset": preset, "mode": mode, "run": res,
                         "compiled_s": json.loads(compiled.read_text()) if compiled.exists() else {},
                         "error": "killed at its time limit" if res["timed_out"] else f"exit {res['rc']}"})
        write(out, "2_step_cost.json", {"runs": runs, "agreement": agreement, "plan_check": check})
        md = ["Part 2, step cost (bf16): " + ", ".join(f"{r['preset']} {r['mode']}" for r in runs) + ".", "",
              summary([r for r in runs if "rows" in r]), ""]
        for r in runs:
            if "rows" in r:
                md += [f"### {r['preset']} {r['mode']}", "", markdown(r)]
            else:
                done = ", ".join(f"{k} {v:.0f}s" for k, v in r.get("compiled_s", {}).items())
                md += [f"### {r['preset']} {r['mode']}: FAILED ({r['error']})", "",
                       f"Compiled before it ended: {done}." if done else "", "```",
                       r.get("run", {}).get("tail", ""), "```", ""]
        write(out, "2_step_cost.md", "\n".join(md + agreement_md(agreement) + plan_check_md(check)))
    failed = [f"{r['preset']} {r['mode']}" for r in runs if "rows" not in r]
    note = f"failed: {', '.join(failed)}" if failed else ""
    for what, extra in (("agreement cost", agreement), ("plan check", check)):
        if "error" in extra:      # an extra measurement: noted, the step cost runs decide the part
            note = ", ".join(n for n in (note, f"{what}: {extra['error']}") if n)
    return {"status": "failed" if failed else "ok", "note": note}


# ---------------------------------------------------------------- part 3

def part_accuracy(args, out: Path, work: Path, limit: float) -> dict:
    base = out / "3_accuracy"
    for old in (base.with_suffix(".json"), base.with_suffix(".md")):     # an earlier run's, in the same OUTDIR
        old.unlink(missing_ok=True)
    cmd = [args.python, "-m", "benchmarks.gpu_accuracy", "--out", base, "--root", work / "accuracy",
           "--time-limit", f"{max(limit - 15, 1):.0f}"] + (["--data", args.data] if args.data else []) \
        + (["--smoke"] if args.smoke else [])
    res = run_logged(cmd, limit, None)
    if not base.with_suffix(".json").exists():
        write(out, "3_accuracy.json", {"run": res, "error": "no result written"})
        write(out, "3_accuracy.md", f"Part 3 FAILED before its first result: `{res['command']}`\n\n```\n"
                                    f"{res['tail']}\n```\n")
        return {"status": "failed", "note": f"exit {res['rc']}"}
    report = json.loads(base.with_suffix(".json").read_text())
    report["run"] = res
    write(out, "3_accuracy.json", report)
    bad = res["rc"] != 0 or report["errors"] or report.get("running")
    return {"status": "failed" if bad else "ok",
            "note": f"{len(report['rows'])} points, {len(report['skipped'])} skipped, {len(report['errors'])} "
                    f"failed" + (", killed at its time limit" if res["timed_out"] else "")}


# ---------------------------------------------------------------- main

def summary_md(env: dict, parts: list, total: float) -> str:
    pk = env["packages"]
    gpu = (f"{env['gpu']} ({env['gpu_memory_gib']} GiB, compute {env['capability']}, CUDA {env['cuda_version']})"
           if env.get("cuda") else "no CUDA device")
    out = [f"# GPU run ({'smoke, CPU' if env['smoke'] else 'full'}), {env['time']}", "",
           f"{gpu}; nvidia-smi: {env['nvidia_smi']}; Python {env['python']}, "
           + ", ".join(f"{k} {v}" for k, v in pk.items()) + f"; {env['cpu_count']} CPUs.", "",
           "Missing: " + ("; ".join(env["missing"]) if env["missing"] else "nothing"), "",
           "| part | status | seconds | limit s | files | note |", "|---|---|---|---|---|---|"]
    for p in parts:
        out.append(f"| {p['part']} | {p['status']} | {p.get('seconds', 0):.0f} | {p.get('limit', 0):.0f} | "
                   f"{', '.join(p.get('files', []))} | {p.get('note', '')} |")
    out += ["", f"Total {total:.0f}s."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for the (at most 8) result files")
    ap.add_argument("--smoke", action="store_true", help="the same parts on the CPU at tiny sizes")
    ap.add_argument("--limit", type=float, default=LIMIT_S, help="seconds for everything")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "incubate_gpu_run"),
                    help="run directories and logs (not OUTDIR: it must hold only the result files)")
    ap.add_argument("--data", default="", help="Fashion-MNIST IDX folder for part 3 (default: data/fashion-mnist)")
    ap.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    started = time.time()
    deadline = started + args.limit
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = machine(args.smoke)
    parts: list = []

    def record():
        write(out, "run.json", {"env": env, "parts": parts, "seconds": time.time() - started, "limit": args.limit})
        write(out, "run.md", summary_md(env, parts, time.time() - started))
    record()
    print(summary_md(env, parts, 0), flush=True)
    if not args.smoke and not env.get("cuda"):
        parts.append({"part": "all", "status": "not run", "note": "torch sees no CUDA device: run this on the "
                      "GPU machine, or --smoke on a CPU"})
        record()
        print("gpu_run: torch sees no CUDA device; run it on the GPU machine, or with --smoke", file=sys.stderr)
        return 2
    steps = [("1 CUDA tests", ["1_tests.json", "1_tests.md"], CAPS["tests"],
              lambda lim: part_tests(args, out, work, lim)),
             ("2 step cost", ["2_step_cost.json", "2_step_cost.md"], CAPS["step_cost"],
              lambda lim: part_step_cost(args, out, work, time.time() + lim, env)),
             ("3 accuracy vs cost", ["3_accuracy.json", "3_accuracy.md"], None,
              lambda lim: part_accuracy(args, out, work, lim))]
    for name, files, cap, fn in steps:
        left = deadline - time.time() - RESERVE_S
        limit = min(cap, left) if cap and not args.smoke else left
        t0 = time.time()
        try:
            res = fn(limit) if limit > 5 else {"status": "skipped", "note": f"{left:.0f}s left"}
        except Exception as e:      # the part's own error; the next part still runs
            import traceback
            res = {"status": "failed", "note": f"{type(e).__name__}: {e}"}
            write(out, files[0], {"error": res["note"], "traceback": traceback.format_exc()})
            write(out, files[1], f"Part {name} FAILED: {res['note']}\n\n```\n{traceback.format_exc()}\n```\n")
        parts.append(dict(res, part=name, files=files, seconds=time.time() - t0, limit=limit))
        record()
    print(summary_md(env, parts, time.time() - started), flush=True)
    return 0 if all(p["status"] == "ok" for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
