"""What a large text corpus costs a stage's start: the token cache's first build (tokenizing) against
every later stage (which maps the token files), in wall time and peak memory, at about 100 MB of text.

The corpus is the token study's prose (data/lm_corpus, 36 MB of text) copied `--copies` times under
other folder names; every point is one `incubate meta` process of a single update on the token
study's recipe, its wall time and peak private and file-backed memory against the same process on a
small corpus (100 of its files). Cold: the cache entry is built (and deleted before each cold run); warm: it exists.

  python -m benchmarks.token_cache_cost          # writes benchmarks/results/token_cache_100mb.{json,md}
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import token_study as tok

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_corpus(out: Path, copies: int) -> tuple[Path, Path, int]:
    """The study's corpus `copies` times over, and a small corpus (100 of its files); the first's bytes of text."""
    src = tok.ensure_corpus()
    big, small = out / "corpus", out / "small"
    if not big.exists():
        for i in range(copies):
            shutil.copytree(src / "python", big / f"copy{i}" / "python")
            shutil.copytree(src / "linux", big / f"copy{i}" / "linux")
    small.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted((src / "python").rglob("*.gz"))[:100]):      # enough for a held-out window
        shutil.copyfile(f, small / f"{i:03d}_{f.name}")
    text_bytes = sum(len(gzip.decompress(f.read_bytes())) for f in big.rglob("*.gz"))
    return big, small, text_bytes


def one_stage(corpus: Path, cache: Path, run: Path) -> dict:
    """One `incubate meta` process of a single update: its wall seconds and the peaks of its private
    (anonymous) and file-backed resident memory, sampled every 10 ms from /proc: a copy of the corpus
    would be private memory, a mapped token file is file-backed."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "incubate.cli", "meta", "--recipe", str(tok.RECIPE), "--out", str(run),
           "--set", f"data.source=text:{corpus}", "--set", f"data.cache_dir={cache}",
           "--set", "meta.tokens=4096", "--set", "data.eval_tokens=4096"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    peaks = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        peaks = {k: max(v, resident_kib(proc.pid, k)) for k, v in peaks.items()}
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the stage failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": round(wall, 2), "anon_mib": round(peaks["RssAnon"] / 1024, 1),
            "file_mib": round(peaks["RssFile"] / 1024, 1)}


def resident_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(work: Path, copies: int, repeats: int) -> dict:
    big, small, text_bytes = make_corpus(work, copies)
    points = {"small corpus": [], "cold": [], "warm": []}
    for _ in range(repeats):        # interleaved, so that a change of load hits every kind alike
        points["small corpus"].append(one_stage(small, work / "cache_small", work / "run"))
        shutil.rmtree(work / "cache", ignore_errors=True)
        points["cold"].append(one_stage(big, work / "cache", work / "run"))
        points["warm"].append(one_stage(big, work / "cache", work / "run"))
    entry = next(p for p in (work / "cache").iterdir() if p.is_dir())
    token_bytes = sum(f.stat().st_size for f in entry.glob("*.bin"))
    median = {k: {m: statistics.median(p[m] for p in v) for m in v[0]} for k, v in points.items()}
    return {"copies": copies, "text_bytes": text_bytes, "token_file_bytes": token_bytes, "repeats": repeats,
            "points": points, "median": median}


def markdown(r: dict) -> str:
    base = r["median"]["small corpus"]
    out = [f"Token cache at {r['text_bytes'] / 1e6:.1f} MB of text ({r['copies']} copies of data/lm_corpus; token "
           f"files {r['token_file_bytes'] / 2**20:.1f} MiB); medians of {r['repeats']} interleaved runs of one "
           f"`incubate meta` process of a single update (`python -m benchmarks.token_cache_cost`). Peak private "
           f"(anonymous) and file-backed resident memory, sampled every 10 ms from /proc/PID/status.", "",
           "| stage start | wall s | over the small corpus | peak private MiB | over it | peak file-backed MiB | over it |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, m in r["median"].items():
        out.append(f"| {kind} | {m['wall_s']:.2f} | {m['wall_s'] - base['wall_s']:+.2f} s | {m['anon_mib']:.1f} | "
                   f"{m['anon_mib'] - base['anon_mib']:+.1f} | {m['file_mib']:.1f} | {m['file_mib'] - base['file_mib']:+.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/incubate_token_cache_cost", help="corpus, cache and runs (kept)")
    ap.add_argument("--copies", type=int, default=3, help="copies of the 36 MB corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "token_cache_100mb"), help="PATH.json and PATH.md")
    args = ap.parse_args(argv)
    r = measure(Path(args.work), args.copies, args.repeats)
    Path(args.out + ".json").write_text(json.dumps(r, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
