"""Reruns one rank-fault test many times beside CPU-hogging processes and counts how it ends.

A teardown race (a rank dying of SIGABRT after the ranks agreed to stop) shows only now and then,
and more often on a loaded machine: `--load N` starts N busy loops beside the test for the whole
loop, so the two ranks are descheduled at awkward moments.

    python -m benchmarks.rank_fault_loop --runs 20 --load 2
    python -m benchmarks.rank_fault_loop --runs 5 --test test_ranks_leave_the_process_group_when_the_command_ends
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = "tests/integration/test_rank_faults.py"
DEFAULT_TEST = "test_one_rank_unreadable_image_stops_every_rank"


def start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def verdict(rc: int, output: str) -> str:
    """How one pytest run ended, in one word: a SIGABRT is told apart from any other failure."""
    if rc == 0:
        return "pass"
    if "terminate called" in output:      # libstdc++'s last words before abort()
        return "sigabrt"
    return "other-failure"


def run_once(test: str) -> tuple[str, float, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{TEST_FILE}::{test}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    return verdict(done.returncode, output), time.time() - start, output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--load", type=int, default=2, help="busy loops running beside the test")
    ap.add_argument("--test", default=DEFAULT_TEST, help=f"a test of {TEST_FILE}")
    ap.add_argument("--show", action="store_true", help="print the output of every failed run")
    args = ap.parse_args(argv)
    # a background job ignores SIGINT: SIGTERM too must reach the finally that stops the busy loops
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    load = start_load(args.load)
    counts = Counter()
    try:
        for i in range(args.runs):
            word, seconds, output = run_once(args.test)
            counts[word] += 1
            print(f"run {i + 1}/{args.runs}: {word} ({seconds:.0f}s)", flush=True)
            if word != "pass" and args.show:
                print(output[-4000:], flush=True)
    finally:
        stop_load(load)
    print(f"{args.test}, {args.runs} runs beside {args.load} busy loops: {counts['pass']} passed, "
          f"{counts['sigabrt']} SIGABRT, {counts['other-failure']} other failures")
    return 0 if counts["pass"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
