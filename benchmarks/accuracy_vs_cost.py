"""Accuracy versus training cost, ours against E2E, on Fashion-MNIST (the paper's Figure 4 shape).

Studies (each point a run directory under --root; finished runs are reused, so it can be run in
parts and rerun after a kill):
  budget  one deep target; E2E at several epoch budgets; the meta model alone at several budgets;
          ours at several M/m+n schedules (meta epochs / module epochs + fine-tune epochs) with each
          meta model trained once a seed and counted in full in every point that uses it
  depth   same width, several depths, ours vs E2E at matched schedules
  data    several class-balanced fractions of the training set
  regime  the over-parameterised regime: a DeiT-Tiny-width ViT (embed 192) of depth 12 and 24 on
          10% and 25% of the data; regime_reg the same with the paper's DeiT regularisation
  lm      a 16-layer Llama-architecture language model (K=4) on the reStructuredText sources of the
          Python tutorial (Debian's python3.11-doc, pinned), in validation bits per byte
          (recipes/lm_python_tutorial.yaml); inits as variants, e.g. --variant stack
          --set incubate.module_init=stack
  lm_tokens  language-model pre-training in tokens, read about once, as the growth literature
          measures it: E2E, the meta model alone, ours (meta, stack, random module init) and G_stack
          growth at budgets in TFLOPs (benchmarks/token_study.py; recipes/lm_tokens.yaml)
  resnet  the CIFAR-style ResNet-56 of He et al. (recipes/fashion_mnist_resnet.yaml, K=3): E2E and
          the meta model alone at several budgets, ours with the paper's random module init, and
          ours with meta init as the variant `--study resnet --methods ours --variant metainit
          --set incubate.module_init=meta`
  map_<regime>_d<depth>  the map of which method pays where (issue 34): regimes small, mid, rich,
          depths 16 and 64; the meta model alone, and E2E, growth (variants lr...) and ours with meta
          init (its fine-tune: variants ft...) each at several learning rates; in map_rich_d16, ours and growth also from a meta model not
          annealed (variant flatmeta). --collect writes the map into docs/results.md and its table into
          README.md (between its markers), by benchmarks/map_report.py
Cost is counted two ways: process seconds summed over every job, and FLOPs (FlopCounterMode on one
step of each stage times the steps taken). Accuracy is top-1 on the full 10k test set.

  python -m benchmarks.accuracy_vs_cost --study all
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from benchmarks import token_study as tok
from benchmarks import map_report
from benchmarks.studies import (ROOT, STUDIES, base_dir, budget_label, ensure_data, make_recipe, point_stages,
                                meta_variant, points, result_row, tok_run_dir, tok_variants)
from incubate.errors import UserError
from incubate.store.rundir import StageDir
from incubate.stages import assemble, e2e, finetune, grow, incubate, meta


def run_e2e(root: Path, study, depth, fraction, epochs, seed, extra, variant) -> dict:
    run = base_dir(root, study, depth, fraction, seed) / f"e2e_{epochs}"
    recipe = make_recipe(depth, fraction, seed, [f"e2e.epochs={epochs}"] + extra, study)
    e2e.main(recipe, run)
    return result_row(study, depth, fraction, "e2e", f"{epochs}", seed, run, [StageDir(run, "e2e")], "paper")


def run_meta(root: Path, study, depth, fraction, epochs, seed, extra, variant) -> dict:
    run = base_dir(root, study, depth, fraction, seed) / f"meta_{epochs}"
    meta.main(make_recipe(depth, fraction, seed, [f"meta.epochs={epochs}"] + extra, study), run)
    return result_row(study, depth, fraction, "meta", f"{epochs}", seed, run, [StageDir(run, "meta")], "paper")


def run_ours(root: Path, study, depth, fraction, schedule, seed, extra, variant) -> dict:
    meta_epochs, m, n = schedule
    base = base_dir(root, study, depth, fraction, seed)
    recipe = make_recipe(depth, fraction, seed, [f"meta.epochs={meta_epochs}", f"incubate.epochs={m}",
                                                 f"finetune.epochs={n}"] + extra, study)
    meta_run = base / f"meta_{meta_epochs}"
    meta.main(recipe, meta_run)                     # trained once a seed, shared by every schedule
    run = base / ("" if variant == "paper" else variant) / f"ours_{meta_epochs}_{m}+{n}"
    if not (run / "meta").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(meta_run / "meta", run / "meta")
    k = len(recipe.model.division)
    for i in range(k):
        incubate.main(recipe, run, i)
    assemble.main(recipe, run)
    finetune.main(recipe, run)
    return result_row(study, depth, fraction, "ours", budget_label("ours", schedule), seed, run, point_stages(run, "ours", k),
                variant)


def run_tok(method: str, root: Path, study, depth, fraction, budget, seed, extra, variant) -> dict:
    """One point of the token study: its run directory, each stage's tokens from the point's TFLOPs."""
    common = tok.sets(root) + STUDIES[study].get("sets", []) + list(extra)    # the study's corpus wins
    key = tuple(common)
    make = lambda more: make_recipe(depth, fraction, seed, common + more, study)
    run = tok_run_dir(root, study, method, budget, seed, variant)
    if method in ("e2e", "meta"):
        more = fair_sets(study, method, variant, tok.budget_sets(key, method, budget, None))
        {"e2e": e2e, "meta": meta}[method].main(make(more), run)
        return result_row(study, depth, fraction, method, budget_label(method, budget), seed, run, point_stages(run, method), variant)
    total, split = budget
    meta_tf = tok.meta_budget(method, total, split)
    base, meta_sets = meta_variant(study, variant)
    meta_run = tok_run_dir(root, study, "meta", meta_tf, seed, base)
    meta.main(make(tok.budget_sets(key, "meta", meta_tf, None) + meta_sets), meta_run)     # once a seed and budget, shared
    if not (run / "meta").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(meta_run / "meta", run / "meta")
    inits = STUDIES[study]["inits"]
    init = variant if variant in inits else next(iter(inits))      # another meta model or lr: the first init
    recipe = make(tok.budget_sets(key, "meta", meta_tf, None) + meta_sets
                  + fair_sets(study, method, variant, tok.budget_sets(key, method, total, split))
                  + ([f"incubate.module_init={init}"] if method == "ours" else []))
    if method == "grow":
        grow.main(recipe, run)
    else:
        if variant in STUDIES[study].get("ours_variants", {}):     # only the fine-tune differs from the recipe's point
            reuse_modules(tok_run_dir(root, study, "ours", budget, seed, init), run, len(recipe.model.division))
        for i in range(len(recipe.model.division)):
            incubate.main(recipe, run, i)
        assemble.main(recipe, run)
        finetune.main(recipe, run)
    return result_row(study, depth, fraction, method, budget_label(method, budget), seed, run, point_stages(run, method), variant)


def reuse_modules(source: Path, run: Path, k: int) -> None:
    """A point of ours whose fine-tune alone differs starts from the finished modules and assembly of
    the recipe's point (the same meta model, seed and module budget), copied; each still counts in full."""
    stages = point_stages(source, "ours", k)[1:-1]
    if not all(sd.finished() for sd in stages):
        return
    for sd in stages:
        if not (run / sd.path.relative_to(source)).exists():
            shutil.copytree(sd.path, run / sd.path.relative_to(source))


def fair_sets(study, method: str, variant: str, budget: list[str]) -> list[str]:
    """A point's budget lines, plus what a study gives each method to be fair: E2E, growth and ours'
    fine-tune their variant's lr, and a warm-up of the study's share of their tokens (growth re-warms,
    as G_stack; ours' fine-tune only in its swept variants, the recipe's point has none)."""
    s = STUDIES[study]
    out = list(budget) + s.get(f"{method}_variants", {}).get(variant, [])
    swept_ours = method == "ours" and variant in s.get("ours_variants", {})
    warmed = method if method in ("e2e", "grow") else "finetune" if swept_ours else None
    for line in budget if s.get("warmup") and warmed else []:
        key, tokens = line.split("=")
        if key == f"{warmed}.tokens":
            out.append(f"{warmed}.warmup_tokens={int(s['warmup'] * int(tokens))}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=list(STUDIES) + ["all"], default="all",
                    help="all: budget, depth and data (the regime studies are run by name)")
    ap.add_argument("--root", default=str(ROOT / "benchmarks" / "runs" / "accuracy_vs_cost"))
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides for every run")
    ap.add_argument("--variant", default=None, help="name of a variant of ours made by --set (E2E is shared), "
                    "or one of a study's named variants (e.g. an E2E learning rate, lr0.0005; paper: growth at the "
                    "recipe's lr) to train only that one; default: every variant")
    ap.add_argument("--methods", default="meta,ours,e2e,grow", help="which methods to run (meta: the meta model alone; grow: G_stack)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's)")
    ap.add_argument("--depths", default=None, help="comma-separated depths to train (default: the study's)")
    ap.add_argument("--fractions", default=None, help="comma-separated data fractions to train (default: the study's)")
    ap.add_argument("--budgets", default=None,
                    help="comma-separated budgets to train, as the tables name them (e.g. 40,160/4+4; default: all)")
    ap.add_argument("--missing", action="store_true",
                    help="train only the points that --results has no row of (how a new machine resumes a study)")
    ap.add_argument("--shard", default=None, help="K/N: train every N-th of the points from the K-th (0-based), "
                    "so that N processes share a study (a meta run two of them need is trained by one, awaited by the other)")
    ap.add_argument("--plan", action="store_true", help="print the points that would train, and train nothing")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results.json"))
    ap.add_argument("--collect", action="store_true", help="train nothing: gather finished runs into the results")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.root)
    if not args.collect:
        todo = planned(args)
        if args.missing:
            have = {row_key(r) for r in json.loads(Path(args.results).read_text())} if Path(args.results).exists() else set()
            todo = [p for p in todo if point_key(*p) not in have]
        if args.shard:
            k, n = (int(x) for x in args.shard.split("/"))
            todo = todo[k::n]
        if args.plan:
            for study, method, depth, fraction, budget, seed, variant in todo:
                print(f"{study} {method} {budget_label(method, budget)} seed {seed}"
                      + (f" ({variant})" if method == "ours" or variant != "paper" else ""))
            return
        for study in dict.fromkeys(p[0] for p in todo):
            ensure_data(study=study)
        for study, method, depth, fraction, budget, seed, variant in todo:
            train_point(root, study, method, depth, fraction, budget, seed, args, variant)
    rows = publish(Path(args.results), root)
    print(f"{len(rows)} rows in {args.results}; tables in docs/results.md")


def planned(args) -> list[tuple]:
    """(study, method, depth, fraction, budget, seed, variant) of every point the arguments select, in
    the order they train; variant: the one its row will carry (outside the TFLOPs studies, ours'
    --variant; E2E and the meta model are shared, "paper")."""
    out = []
    for study in ["budget", "depth", "data"] if args.study == "all" else [args.study]:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
        budgets = args.budgets.split(",") if args.budgets else None
        depths = [int(x) for x in args.depths.split(",")] if args.depths else None
        fractions = [float(x) for x in args.fractions.split(",")] if args.fractions else None
        for method, depth, fraction, budget, seed in points(study, seeds, budgets, depths, fractions):
            if method not in args.methods.split(","):
                continue
            if STUDIES[study].get("budget") != "flops":
                out.append((study, method, depth, fraction, budget, seed,
                            (args.variant or "paper") if method == "ours" else "paper"))
                continue
            names = tok_variants(study, method, budget)
            out += [(study, method, depth, fraction, budget, seed, variant) for variant in names
                    if args.variant in (None, variant) or (method != "ours" and args.variant not in names)]
    return out


def point_key(study, method, depth, fraction, budget, seed, variant) -> tuple:
    """The row_key that a planned point's row will have."""
    return row_key({"study": study, "variant": variant,
                    "depth": depth, "fraction": fraction, "method": method, "budget": budget_label(method, budget),
                    "seed": seed})


def publish(results: Path, root: Path, docs: Path = ROOT / "docs") -> list[dict]:
    """The rows found under `root` merged into `results` (JSON), and docs/results.md's tables and
    figures rebuilt from them: every study, the LM's in bits per byte."""
    from benchmarks.results_report import write_report
    old = json.loads(results.read_text()) if results.exists() else []
    rows = merge(old, collect(root))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=1) + "\n")
    write_report(rows, docs)
    map_report.write_readme(rows, docs.parent / "README.md")
    return rows


def train_point(root, study, method, depth, fraction, budget, seed, args, variant) -> None:
    t0 = time.time()
    fn = {"ours": run_ours, "e2e": run_e2e, "meta": run_meta}.get(method)
    if STUDIES[study].get("budget") == "flops":
        fn = lambda *a: run_tok(method, *a)
    while True:     # a point another process is training: wait for it, then reuse it
        try:
            row = fn(root, study, depth, fraction, budget, seed, args.set, variant)
            break
        except UserError as e:
            if "is being written by" not in str(e):
                raise
            print(f"waiting: {e}", flush=True)
            time.sleep(30)
    score = f"top-1 {row['top1']:.2f}%" if "top1" in row else f"bits/byte {row['bpb']:.4f}"
    print(f"== {study} d{depth} f{fraction} {method} {row['budget']} seed {seed}: {score} "
          f"({row['seconds']:.0f}s, {row['flops'] / 1e12:.2f} TFLOPs; {time.time() - t0:.0f}s now)", flush=True)
    return row


def collect(root: Path) -> list[dict]:
    """Every finished point of every study, read from its run directory (the only state)."""
    rows = []
    for study in STUDIES:
        pattern = f"{STUDIES[study].get('prefix', '')}d*_f*_s*"
        seeds = sorted({int(p.name.rsplit("_s", 1)[1]) for p in root.glob(pattern)}) if root.is_dir() else []
        for method, depth, fraction, budget, seed in points(study, seeds):
            base = base_dir(root, study, depth, fraction, seed)
            if STUDIES[study].get("budget") == "flops":
                runs = [(v, tok_run_dir(root, study, method, budget, seed, v), budget_label(method, budget))
                        for v in tok_variants(study, method, budget)]
            elif method in ("e2e", "meta"):
                runs = [("paper", base / f"{method}_{budget}", f"{budget}")]
            else:
                name = f"ours_{budget[0]}_{budget[1]}+{budget[2]}"
                extra = sorted(v.name for v in base.iterdir() if v.is_dir() and (v / name).is_dir()) if base.is_dir() else []
                label = budget_label(method, budget)
                runs = [("paper", base / name, label)] + [(v, base / v / name, label) for v in extra]
            for variant, run, label in runs:
                stages = point_stages(run, method, STUDIES[study].get("k", 4))
                if all(sd.finished() for sd in stages):
                    rows.append(result_row(study, depth, fraction, method, label, seed, run, stages, variant))
    return rows


def row_key(r: dict) -> tuple:
    return (r["study"], r.get("variant", "paper"), r["depth"], r["fraction"], r["method"], r["budget"], r["seed"])


def merge(old: list[dict], found: list[dict]) -> list[dict]:
    """The rows found on disk, plus earlier rows (docs/results.json) whose run directories are not
    on this machine: a run directory is the only state, but one session's machine does not hold
    every earlier session's runs."""
    keys = {row_key(r) for r in found}
    return [r for r in old if row_key(r) not in keys] + found


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
