"""Fault-tolerance harness: SIGKILL `incubate run` (or one of its jobs) at random moments, go on, check.

Each kill targets a stage (meta, a module, fine-tune, in turn) and lands, in turn, while a weights
or checkpoint file is being written (the harness watches for the temporary file and kills at
once), during training steps (a random delay after a checkpoint changed), or inside an epoch (at
most 30 ms after a mid-epoch checkpoint, train.checkpoint_every, appeared). After each kill:

- every checkpoint and weights file on disk must load (weights against their manifest's SHA-256);
- every stage that had finished must be untouched (model.safetensors mtime, size and SHA-256);

then the run is started again (a killed `run`) or its launcher retries the job (a killed job),
which resumes from the last checkpoint. When a run completes, every weights file must equal the
uninterrupted reference run's (made in the harness's own process), tensor for tensor (CPU,
deterministic: true, one thread a job), and a fresh round starts until --kills kills were made.

    python -m benchmarks.kill_harness --kills 20 --launcher local          # full form
    python -m benchmarks.kill_harness --kills 5 --launcher inline          # the CI form (tests/)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from incubate.store.checkpoint import load_training_state, load_weights, sha256_file

ROOT = Path(__file__).resolve().parents[1]

MODES = ("write", "step", "mid")

RECIPE = {
    "name": "kill-harness", "seed": 0, "device": "cpu", "deterministic": True,
    "model": {"name": "vit_tiny_patch16_224",
              "kwargs": {"patch_size": 4, "embed_dim": 16, "depth": 4, "num_heads": 2}, "division": [2, 2]},
    "data": {"source": "digits", "img_size": 8, "train_fraction": 0.7, "augment": {"shift": 1}},
    "train": {"batch_size": 32, "lr": 2e-3, "lr_base_batch": 32, "epochs": 3, "warmup_epochs": 0,
              "checkpoint_every": 5},     # mid-epoch checkpoints: kills inside an epoch resume there
    "launch": {"cpus_per_job": 1},
    "meta": {"epochs": 3}, "incubate": {"epochs": 2}, "finetune": {"epochs": 2},
}
STAGES = ("meta", "modules/0", "modules/1", "assembled", "finetune")
TARGETS = ("meta", "modules", "finetune")


def run_command(recipe: Path, run: Path, launcher: str) -> list[str]:
    cmd = [sys.executable, "-m", "incubate.cli", "run", "--recipe", str(recipe), "--out", str(run), "--no-e2e"]
    return cmd + (["--launcher", launcher, "--jobs", "2", "--retries", "1000"] if launcher != "inline" else [])


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log, "ab") as f:      # its own process group: killing it kills every job it started
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, IndexError, ValueError):
            continue
    return out


def stage_of(path: Path, run: Path) -> str:
    rel = path.relative_to(run).parts
    return "/".join(rel[:2]) if rel[0] == "modules" else rel[0]


def snapshot(run: Path) -> dict:
    """{file: mtime_ns} of every checkpoint and weights file, finished or being written."""
    out = {}
    for p in run.rglob("*.safetensors*"):
        try:
            out[p] = p.stat().st_mtime_ns
        except FileNotFoundError:
            pass
    return out


def _done(run: Path, stage: str) -> bool:
    try:
        return bool(json.loads((run / stage / "manifest.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def finished(run: Path) -> dict:
    """{stage: (mtime_ns, size, sha256)} of every finished stage's weights."""
    out = {}
    for s in STAGES:
        m, w = run / s / "manifest.json", run / s / "model.safetensors"
        if m.exists() and w.exists() and json.loads(m.read_text()).get("finished"):
            st = w.stat()
            out[s] = (st.st_mtime_ns, st.st_size, sha256_file(w))
    return out


def verify(run: Path, done_before: dict, counts: dict) -> dict:
    """Every file on disk loads; no finished stage changed. Returns the stages finished now."""
    for p in [*run.rglob("checkpoint.safetensors"), *run.rglob("checkpoint.prev.safetensors")]:
        load_training_state(p)
        counts["checkpoints_verified"] += 1
    for p in run.rglob("model.safetensors"):
        m = json.loads((p.parent / "manifest.json").read_text())
        load_weights(p, m.get("sha256") if m.get("finished") else None)
        counts["weights_verified"] += 1
    now = finished(run)
    for stage, sig in done_before.items():
        if now.get(stage) != sig:
            counts["finished_stages_redone"] += 1
            print(f"  !! {stage} changed after it had finished: {sig} -> {now.get(stage)}", flush=True)
    return now


def mid_epoch(path: Path) -> bool:
    """Whether the checkpoint at `path` was saved inside an epoch (resuming continues there)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"]).get("step") is not None
    except Exception:      # noqa: BLE001 -- being replaced, or gone: not a mid-epoch one now
        return False


def wait_and_kill(proc, run: Path, target: str, mode: str, launcher: str, rng: random.Random) -> dict | None:
    """Wait for a checkpoint event in a `target` stage, then SIGKILL the run or that stage's job."""
    before = snapshot(run)
    delay = {"step": rng.uniform(0.0, 0.25), "mid": rng.uniform(0.0, 0.03)}.get(mode, 0.0)
    polls = 0
    while proc.poll() is None:
        polls += 1
        if polls % 50 == 0 and all(_done(run, s) for s in STAGES if s.startswith(target)):
            return None     # the target finished before a kill could land

        now = snapshot(run)
        hits = [p for p, t in now.items() if stage_of(p, run).startswith(target) and before.get(p) != t
                and {"write": p.name.endswith(".tmp"), "step": True,
                     "mid": p.name == "checkpoint.safetensors" and mid_epoch(p)}[mode]]
        before = now
        if hits:
            time.sleep(delay)
            stage = stage_of(hits[0], run)
            what = "run"
            if launcher != "inline" and rng.random() < 0.5:   # kill only the job that trains this stage
                word = {"meta": " meta ", "finetune": " finetune "}.get(stage, f"--module {stage[-1]} ")
                pids = [pid for pid, cmd in children(proc.pid) if word in cmd + " "]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    what = "job"
                    time.sleep(0.05)
            if what == "run":
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # A temporary file still there after the kill is a write the kill interrupted.
            writing = [str(p.relative_to(run)) for p in (run / stage).glob("*.safetensors*.tmp")]
            inside = mid_epoch(run / stage / "checkpoint.safetensors")
            return {"stage": stage, "mode": mode, "what": what, "writing": writing, "mid_epoch": inside}
        time.sleep(0.001)
    return None


def weights(run: Path) -> dict:
    return {s: load_file(run / s / "model.safetensors") for s in STAGES}


def equal(a: dict, b: dict) -> bool:
    import torch
    return all(a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s]) for s in STAGES)


def reference_run(recipe: Path, run: Path, log: Path) -> int:
    """The uninterrupted run, in this process (a process of its own would only import again), on one
    thread as every job: the weights each round must end at, whatever launcher the rounds use."""
    import contextlib

    from incubate.cli import as_in_a_cli_process, main
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), as_in_a_cli_process():
        return main(["run", "--recipe", str(recipe), "--out", str(run), "--no-e2e"])


def harness(kills: int, launcher: str, work: Path, seed: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    rng = random.Random(seed)
    t0 = time.perf_counter()
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    if reference_run(recipe, ref, work / "reference.log") != 0:
        raise SystemExit(f"the reference run failed; see {work / 'reference.log'}")
    reference = weights(ref)
    counts = {"kills": 0, "kills_whole_run": 0, "kills_one_job": 0, "kills_while_writing": 0, "kills_mid_epoch": 0,
              "resumes": 0, "resumes_mid_epoch": 0,
              "skips_of_finished_stages": 0, "checkpoints_verified": 0, "weights_verified": 0,
              "finished_stages_redone": 0, "rounds": 0, "rounds_equal": 0,
              "kills_by_stage": {}, "reference_seconds": round(time.perf_counter() - t0, 1)}
    log_kills = []
    while counts["kills"] < kills:
        counts["rounds"] += 1
        run, log = work / f"round{counts['rounds']}", work / f"round{counts['rounds']}.log"
        shutil.rmtree(run, ignore_errors=True)
        log.unlink(missing_ok=True)
        done, plan = {}, [t for t in TARGETS for _ in range(2)]
        proc = start(run_command(recipe, run, launcher), log)
        while True:
            target = plan.pop(0) if plan and counts["kills"] < kills else None
            mode = MODES[counts["kills"] % len(MODES)]
            event = wait_and_kill(proc, run, target, mode, launcher, rng) if target else None
            if event is None and target is not None and proc.poll() is None:
                continue        # the target stage finished before a kill: aim at the next one
            if event is None:
                proc.wait()
                break
            counts["kills"] += 1
            counts["kills_whole_run" if event["what"] == "run" else "kills_one_job"] += 1
            counts["kills_while_writing"] += bool(event["writing"])
            counts["kills_mid_epoch"] += event["mid_epoch"]     # the next start resumes inside an epoch
            counts["kills_by_stage"][event["stage"]] = counts["kills_by_stage"].get(event["stage"], 0) + 1
            log_kills.append(event)
            print(f"kill {counts['kills']}: {event['what']} in {event['stage']} ({event['mode']}"
                  f"{', writing ' + ', '.join(event['writing']) if event['writing'] else ''}"
                  f"{', inside an epoch' if event['mid_epoch'] else ''})", flush=True)
            done = verify(run, done, counts)
            if event["what"] == "run":
                proc = start(run_command(recipe, run, launcher), log)
        if proc.returncode != 0:
            raise SystemExit(f"round {counts['rounds']} ended with exit {proc.returncode}; see {log}")
        verify(run, done, counts)
        text = log.read_text()
        counts["resumes"] += text.count("] resuming ")
        counts["resumes_mid_epoch"] += text.count("] resuming in epoch")
        counts["skips_of_finished_stages"] += text.count("already finished")
        same = equal(weights(run), reference)
        counts["rounds_equal"] += same
        print(f"round {counts['rounds']}: final weights {'EQUAL to' if same else 'DIFFER from'} the "
              f"uninterrupted run's", flush=True)
    counts["final_weights_equal"] = counts["rounds_equal"] == counts["rounds"]
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    counts["events"] = log_kills
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--launcher", choices=("inline", "local"), default="local")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the counts here")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill-harness-"))
    counts = harness(args.kills, args.launcher, work, args.seed)
    summary = {k: v for k, v in counts.items() if k != "events"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(counts, indent=2) + "\n")
    ok = counts["final_weights_equal"] and counts["finished_stages_redone"] == 0 and counts["kills"] >= args.kills
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
