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
Cost is counted two ways: process seconds summed over every job, and FLOPs (FlopCounterMode on one
step of each stage times the steps taken). Accuracy is top-1 on the full 10k test set.

  python benchmarks/accuracy_vs_cost.py --study all
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incubate.config import load_recipe  # noqa: E402
from incubate.errors import UserError  # noqa: E402
from incubate.stages import assemble, e2e, finetune, grow, incubate, meta  # noqa: E402
from incubate.stages.common import StageDir  # noqa: E402
from benchmarks import token_study as tok  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
DATA = ROOT / "data" / "fashion-mnist"      # a git-ignored copy that travels to a GPU machine (make gpu-data)
RECIPE = ROOT / "recipes" / "fashion_mnist.yaml"
# The LM study's corpus: text nobody here wrote, from a Debian package pinned by version.
PYDOC = Path("/usr/share/doc/python3.11/html/_sources/tutorial")
PYDOC_PACKAGE = "python3.11-doc=3.11.2-6+deb12u8"
RESNET_RECIPE = ROOT / "recipes" / "fashion_mnist_resnet.yaml"

# Every study, as (study, depth, fraction, method, budget) points. Budgets: E2E epochs; meta-model
# epochs for the meta model alone (the K-block shallow baseline); or (meta epochs, module epochs,
# fine-tune epochs) for ours. A study may change the recipe for every method (`sets`); its run
# directories then carry a `prefix`, so that they never mix with another study's.
WIDE = ["model.kwargs.embed_dim=192", "model.kwargs.num_heads=3"]     # DeiT-Tiny width
# The paper's DeiT regularisation (RandAugment, mixup 0.8, cutmix 1.0, random erasing 0.25,
# drop-path), with a gentler crop than ImageNet's 0.08 for 28 px images.
DEIT = ["data.augment.auto_augment=rand-m9-mstd0.5-inc1", "data.augment.re_prob=0.25", "data.augment.hflip=true",
        "data.augment.crop_scale=[0.25,1.0]", "train.mixup=0.8", "train.cutmix=1.0", "train.drop_path=0.1"]
STUDIES = {
    "budget": {"depth": 32, "fraction": 0.1, "e2e": [10, 20, 40, 80], "meta": [40, 80, 160, 240],
               "ours": [(40, 2, 2), (40, 4, 4), (40, 8, 8), (80, 2, 2), (80, 4, 4), (160, 2, 2), (160, 4, 4),
                        (240, 2, 2)],
               "seeds": [0, 1]},
    "depth": {"depths": [8, 16, 32, 64], "fraction": 0.1, "e2e": [20], "meta": [40], "ours": [(40, 4, 4)],
              "seeds": [0]},
    "data": {"depth": 32, "fractions": [1.0, 0.25, 0.1], "e2e": [20], "meta": [40], "ours": [(40, 4, 4)],
             "seeds": [0]},
    # The over-parameterised regime (issue 10): millions of parameters on thousands of images.
    "regime": {"depths": [12, 24], "fractions": [0.1, 0.25], "prefix": "w192_", "sets": WIDE,
               "e2e": [10, 30], "meta": [30, 90], "ours": [(30, 2, 2)], "seeds": [0, 1]},
    "regime_reg": {"depths": [12, 24], "fractions": [0.1, 0.25], "prefix": "w192reg_", "sets": WIDE + DEIT,
                   "e2e": [10, 30], "meta": [30, 90], "ours": [(30, 2, 2)], "seeds": [0, 1]},
    # Language models (issue 12): a study with its own recipe and metric (bits per byte, lower is
    # better); the fraction is always all of the text.
    "lm": {"recipe": ROOT / "recipes" / "lm_python_tutorial.yaml", "metric": "bpb", "prefix": "lm_",
           "depth": 16, "fraction": 1.0, "e2e": [4, 8, 16, 32], "meta": [8, 16, 32],
           "ours": [(16, 2, 2), (16, 4, 4), (32, 4, 4)], "seeds": [0, 1]},
    # The paper's CNN row (issue 11): a CIFAR-style ResNet (depth 6n+2), one stage a module. One E2E
    # epoch of ResNet-56 on 10% of the data is 46 steps, 3.39 TFLOPs (`incubate e2e --recipe
    # recipes/fashion_mnist_resnet.yaml --set e2e.epochs=1`; docs/resnet.md); its ResNet-8 meta model's ~0.33.
    "resnet": {"family": "resnet", "k": 3, "depth": 56, "fraction": 0.1, "prefix": "resnet_",
               "e2e": [5, 10, 20, 40], "meta": [20, 40, 80], "ours": [(40, 2, 2), (40, 4, 4), (80, 2, 2), (80, 4, 4)],
               "seeds": [0, 1]},
    # Pre-training in tokens (issue 20): budgets in TFLOPs; ours and growth as (total, split) with the
    # splits of token_study.py; every init of ours a variant (random at one budget: the paper's, known to
    # break at this size).
    "lm_tokens": {"recipe": tok.RECIPE, "metric": "bpb", "prefix": "lmtok_", "depth": 16, "fraction": 1.0,
                  "budget": "flops", "e2e": [30, 60], "meta": [30, 60],
                  "ours": [(30, "A"), (60, "A"), (30, "B"), (60, "B")], "grow": [(30, "A"), (60, "A"), (30, "B"), (60, "B")],
                  "inits": {"meta": None, "stack": None, "random": [(30, "A")]},
                  "seeds": [0, 1]},
    # benchmarks/gpu_run.sh part 3 (issue 20): where depth should pay, on one H200: width 256, 16 layers
    # (13.6M parameters) against its 4-layer meta model, 1e16 FLOPs a method, bf16; budgets in TFLOPs.
    # The cheapest complete comparison comes first (benchmarks/gpu_accuracy.py runs the points in order).
    "gpu_lm": {"recipe": tok.RECIPE, "metric": "bpb", "prefix": "gpu_lm_", "depth": 16, "fraction": 1.0,
               "budget": "flops", "e2e": [10000], "meta": [10000], "ours": [(10000, "A")], "grow": [(10000, "A")],
               "inits": {"meta": None}, "seeds": [0],
               "sets": ["model.kwargs.hidden_size=256", "model.kwargs.intermediate_size=688", "data.context=256",
                        "data.eval_tokens=131072", "train.batch_size=64", "train.lr_base_batch=64", "train.amp=bf16",
                        "train.fused=true", "train.checkpoint_minutes=0", "data.eval_batch_size=128"]},
    # benchmarks/gpu_run.sh on one GPU: all 60,000 images, the paper's DeiT-T-32 shape (patch 4: 49
    # tokens), bf16, batch 1024 (lr x2 through lr_base_batch 512); benchmarks/gpu_accuracy.py sizes it.
    # Ours at 40/2+2 and 80/4+4 costs about E2E at 10 and 20 epochs, and so does the meta model at 80, 160.
    "gpu": {"depth": 32, "fraction": 1.0, "prefix": "gpu_", "e2e": [10, 20, 40], "meta": [40, 80, 160],
            "ours": [(40, 2, 2), (80, 4, 4)], "seeds": [0],
            "sets": WIDE + [f"data.source=idx:{DATA}", "model.kwargs.patch_size=4", "train.amp=bf16",
                            "train.batch_size=1024", "train.lr_base_batch=512", "data.eval_batch_size=1000"]},
}


def ensure_data(path: Path = FMNIST, study: str = "budget") -> None:
    if STUDIES.get(study, {}).get("budget") == "flops":
        if not any(x.startswith("data.source=") for x in STUDIES[study].get("sets", [])):
            tok.ensure_corpus()     # the study's own corpus, unless its sets name another (a smoke run)
        return
    if "recipe" in STUDIES.get(study, {}):      # a study with its own corpus (the LM)
        path, package = PYDOC, PYDOC_PACKAGE
        if path.exists():
            return
    else:
        if (path / "train-images-idx3-ubyte.gz").exists():
            return
        if path != FMNIST:
            raise UserError(f"no Fashion-MNIST in {path}; fill it with `make gpu-data`")
        package = "dataset-fashion-mnist"
    print(f"installing Debian's {package} ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True)


# The "paper" variant: the recipe with the paper's choices (random module init, fine-tune at the
# training lr); variants (--variant, --set) change them on top.
PAPER = ["incubate.module_init=random", "finetune.lr=0.001"]


def make_recipe(depth: int, fraction: float, seed: int, sets: list[str], study: str = "budget"):
    if STUDIES[study].get("family") == "resnet":   # one stage a module; the paper fine-tunes at the training lr
        n = (depth - 2) // 6
        return load_recipe(RESNET_RECIPE, ["incubate.module_init=random", "incubate.lr=0.1", "finetune.lr=0.1"]
                           + STUDIES[study].get("sets", []) + [
            f"model.name=cifar_resnet{depth}", f"model.division={[n] * 3}", f"data.train_fraction={fraction}",
            f"seed={seed}"] + sets)
    k = 4
    if "recipe" in STUDIES[study]:      # a study with its own recipe (the LM): the depth is the division's
        return load_recipe(STUDIES[study]["recipe"], PAPER + STUDIES[study].get("sets", []) + [
            f"model.division={[depth // k] * k}", f"seed={seed}"] + sets)
    return load_recipe(RECIPE, PAPER + STUDIES[study].get("sets", []) + [
        f"model.kwargs.depth={depth}", f"model.division={[depth // k] * k}", f"data.train_fraction={fraction}",
        f"seed={seed}"] + sets)


def base_dir(root: Path, study: str, depth: int, fraction: float, seed: int) -> Path:
    """A (depth, data, seed) cell's folder: E2E, the meta model alone and every ours of the cell."""
    return root / f"{STUDIES[study].get('prefix', '')}d{depth}_f{fraction}_s{seed}"


def _curve(stage: StageDir, metric: str = "top1") -> list:
    """[epoch, train loss, test top-1 (or the study's metric)] after every epoch of a stage (its metrics.jsonl)."""
    if not stage.metrics.exists():
        return []
    rows = [json.loads(line) for line in stage.metrics.read_text().splitlines() if line.strip()]
    return [[r["epoch"], round(r["train_loss"], 4), round(r[f"test_{metric}"], 4 if metric == "bpb" else 2)]
            for r in rows if r.get("kind") != "eval"]


def _row(study, depth, fraction, method, budget, seed, run: Path, stages: list[StageDir], variant: str) -> dict:
    ms = [s.manifest() for s in stages]
    final = ms[-1]
    metric = STUDIES[study].get("metric", "top1")
    row = {"study": study, "variant": variant, "depth": depth, "fraction": fraction, "method": method, "budget": budget,
           "seed": seed, metric: final["metrics"][metric],
           "seconds": sum(m.get("process_seconds", 0.0) for m in ms),
           "flops": sum(m.get("flops", 0) for m in ms), "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run)}
    curve = _curve(stages[-1], metric)
    if curve:      # the paper's table puts the training loss beside the accuracy: so do we
        row["train_loss"] = curve[-1][1]
        row["curve"] = curve
    if STUDIES[study].get("budget") == "flops":
        return tok_row(row, stages, ms, metric)
    if method == "ours":
        row["meta_epochs"] = int(run.name.split("_")[1])
        by = {(s.stage, s.module): m for s, m in zip(stages, ms)}
        row[f"assembled_{metric}"] = by[("assembled", None)]["metrics"][metric]
        row[f"meta_{metric}"] = by[("meta", None)]["metrics"][metric]
        row[f"hybrid_{metric}"] = [by[("incubate", i)]["metrics"][metric] for i in range(len(stages) - 3)]
        row["finetune_flops"] = by[("finetune", None)]["flops"]
        row["finetune_seconds"] = by[("finetune", None)]["process_seconds"]
        row["meta_flops"] = by[("meta", None)]["flops"]
        row["meta_seconds"] = by[("meta", None)]["process_seconds"]
    return row


def run_e2e(root: Path, study, depth, fraction, epochs, seed, extra, variant) -> dict:
    run = base_dir(root, study, depth, fraction, seed) / f"e2e_{epochs}"
    recipe = make_recipe(depth, fraction, seed, [f"e2e.epochs={epochs}"] + extra, study)
    e2e.main(recipe, run)
    return _row(study, depth, fraction, "e2e", f"{epochs}", seed, run, [StageDir(run, "e2e")], "paper")


def run_meta(root: Path, study, depth, fraction, epochs, seed, extra, variant) -> dict:
    run = base_dir(root, study, depth, fraction, seed) / f"meta_{epochs}"
    meta.main(make_recipe(depth, fraction, seed, [f"meta.epochs={epochs}"] + extra, study), run)
    return _row(study, depth, fraction, "meta", f"{epochs}", seed, run, [StageDir(run, "meta")], "paper")


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
    return _row(study, depth, fraction, "ours", budget_label("ours", schedule), seed, run, _stages(run, "ours", k),
                variant)


def budget_label(method: str, budget) -> str:
    """How tables and --budgets name a budget: E2E/meta epochs ("40"), ours as "M/m+n"; in TFLOPs
    studies the total ("30"), or total and split for ours and growth ("30/A")."""
    if isinstance(budget, tuple) and isinstance(budget[1], str):
        return f"{tok.fmt(budget[0])}/{budget[1]}"
    return f"{budget[0]}/{budget[1]}+{budget[2]}" if method == "ours" else f"{budget}"


# ---------------------------------------------------------------- the study in tokens (lm_tokens)

def tok_run_dir(root: Path, study, method: str, budget, seed: int, variant: str) -> Path:
    base = base_dir(root, study, STUDIES[study]["depth"], 1.0, seed)
    if method in ("e2e", "meta"):
        return base / f"{method}_{tok.fmt(budget)}"
    name = f"{tok.fmt(budget[0])}{budget[1]}"
    return base / (f"grow_{name}" if method == "grow" else f"ours-{variant}_{name}")


def run_tok(method: str, root: Path, study, depth, fraction, budget, seed, extra, variant) -> dict:
    """One point of the token study: its run directory, each stage's tokens from the point's TFLOPs."""
    common = tok.sets(root) + STUDIES[study].get("sets", []) + list(extra)    # the study's corpus wins
    key = tuple(common)
    make = lambda more: make_recipe(depth, fraction, seed, common + more, study)
    run = tok_run_dir(root, study, method, budget, seed, variant)
    if method in ("e2e", "meta"):
        {"e2e": e2e, "meta": meta}[method].main(make(tok.budget_sets(key, method, budget, None)), run)
        return _row(study, depth, fraction, method, budget_label(method, budget), seed, run, _stages(run, method), variant)
    total, split = budget
    meta_tf = tok.meta_budget(method, total, split)
    meta_run = tok_run_dir(root, study, "meta", meta_tf, seed, variant)
    meta.main(make(tok.budget_sets(key, "meta", meta_tf, None)), meta_run)     # once a seed and budget, shared
    if not (run / "meta").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(meta_run / "meta", run / "meta")
    recipe = make(tok.budget_sets(key, "meta", meta_tf, None) + tok.budget_sets(key, method, total, split)
                  + ([f"incubate.module_init={variant}"] if method == "ours" else []))
    if method == "grow":
        grow.main(recipe, run)
    else:
        for i in range(len(recipe.model.division)):
            incubate.main(recipe, run, i)
        assemble.main(recipe, run)
        finetune.main(recipe, run)
    return _row(study, depth, fraction, method, budget_label(method, budget), seed, run, _stages(run, method), variant)


def tok_variants(study: str, method: str, budget) -> list[str]:
    """The variants a point of a TFLOPs study is trained in: ours in each module init that covers
    its budget; every other method once."""
    if method != "ours":
        return ["paper"]
    return [init for init, only in STUDIES[study]["inits"].items() if only is None or budget in only]


def _evals(stage: StageDir, base_flops: float, metric: str) -> list:
    """[cumulative TFLOPs, metric, tokens] of every evaluation during a stage's training."""
    if not stage.metrics.exists():
        return []
    rows = [json.loads(line) for line in stage.metrics.read_text().splitlines() if line.strip()]
    return [[round((base_flops + r["flops"]) / 1e12, 4), round(r[f"test_{metric}"], 6), r.get("tokens")]
            for r in rows if r.get("kind") == "eval"]


def tok_row(row: dict, stages: list, ms: list, metric: str) -> dict:
    """A token-study row: the final stage's eval curve at cumulative FLOPs, the meta model's curve,
    and, for ours, the hybrids' and the assembly's scores."""
    by = {(s.stage, s.module): m for s, m in zip(stages, ms)}
    last = stages[-1]
    before = sum(m.get("flops", 0) for s, m in zip(stages, ms) if s is not last)
    row["evals"] = _evals(last, before, metric)
    row["tokens"] = sum(m.get("tokens", 0) for m in ms)
    if ("meta", None) in by and len(stages) > 1:
        row["meta_tflops"] = round(by[("meta", None)]["flops"] / 1e12, 3)
        row[f"meta_{metric}"] = by[("meta", None)]["metrics"][metric]
        row["meta_evals"] = _evals(stages[0], 0, metric)
    if ("assembled", None) in by:       # the deep model's first point: assembled, before fine-tuning
        row[f"assembled_{metric}"] = by[("assembled", None)]["metrics"][metric]
        row["evals"] = [[round(before / 1e12, 4), round(row[f"assembled_{metric}"], 6), None]] + row["evals"]
        row[f"hybrid_{metric}"] = [by[("incubate", i)]["metrics"][metric] for i in range(len(stages) - 3)]
    return row


def points(study: str, seeds=None, budgets=None, depths=None, fractions=None):
    """The study's (method, depth, fraction, budget, seed) points; budgets (labels), depths and
    fractions, where given, keep only those."""
    for p in _points(study, seeds):
        if ((budgets is None or budget_label(p[0], p[3]) in budgets) and (depths is None or p[1] in depths)
                and (fractions is None or p[2] in fractions)):
            yield p


def _points(study: str, seeds=None):
    s = STUDIES[study]
    depths = s.get("depths", [s.get("depth")])
    fractions = s.get("fractions", [s.get("fraction")])
    for seed in (seeds if seeds is not None else s["seeds"]):
        for depth in depths:
            for fraction in fractions:
                for ep in s["meta"]:
                    yield ("meta", depth, fraction, ep, seed)
                for sched in s["ours"]:
                    yield ("ours", depth, fraction, sched, seed)
                for ep in s["e2e"]:
                    yield ("e2e", depth, fraction, ep, seed)
                for sched in s.get("grow", []):
                    yield ("grow", depth, fraction, sched, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=list(STUDIES) + ["all"], default="all",
                    help="all: budget, depth and data (the regime studies are run by name)")
    ap.add_argument("--root", default=str(ROOT / "benchmarks" / "runs" / "accuracy_vs_cost"))
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides for every run")
    ap.add_argument("--variant", default="paper", help="name of a variant of ours made by --set (E2E is shared)")
    ap.add_argument("--methods", default="meta,ours,e2e,grow", help="which methods to run (meta: the meta model alone; grow: G_stack)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's)")
    ap.add_argument("--depths", default=None, help="comma-separated depths to train (default: the study's)")
    ap.add_argument("--fractions", default=None, help="comma-separated data fractions to train (default: the study's)")
    ap.add_argument("--budgets", default=None,
                    help="comma-separated budgets to train, as the tables name them (e.g. 40,160/4+4; default: all)")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results.json"))
    ap.add_argument("--collect", action="store_true", help="train nothing: gather finished runs into the results")
    args = ap.parse_args()
    root = Path(args.root)
    if not args.collect:
        studies = ["budget", "depth", "data"] if args.study == "all" else [args.study]
        for study in studies:
            ensure_data(study=study)
            seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
            budgets = args.budgets.split(",") if args.budgets else None
            depths = [int(x) for x in args.depths.split(",")] if args.depths else None
            fractions = [float(x) for x in args.fractions.split(",")] if args.fractions else None
            for method, depth, fraction, budget, seed in points(study, seeds, budgets, depths, fractions):
                if method not in args.methods.split(","):
                    continue
                if STUDIES[study].get("budget") != "flops":
                    train_point(root, study, method, depth, fraction, budget, seed, args)
                    continue
                for variant in tok_variants(study, method, budget):
                    if args.variant in ("paper", variant) or method != "ours":
                        train_point(root, study, method, depth, fraction, budget, seed, args, variant)
    rows = publish(Path(args.results), root)
    print(f"{len(rows)} rows in {args.results}; tables in docs/results.md")


def publish(results: Path, root: Path, docs: Path = ROOT / "docs") -> list[dict]:
    """The rows found under `root` merged into `results` (JSON), and docs/results.md's tables and
    figures rebuilt from them: every study, the LM's in bits per byte."""
    from benchmarks.results_report import write_report
    old = json.loads(results.read_text()) if results.exists() else []
    rows = merge(old, collect(root))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=1) + "\n")
    write_report(rows, docs)
    return rows


def train_point(root, study, method, depth, fraction, budget, seed, args, variant=None) -> None:
    t0 = time.time()
    fn = {"ours": run_ours, "e2e": run_e2e, "meta": run_meta}.get(method)
    if STUDIES[study].get("budget") == "flops":
        fn = lambda *a: run_tok(method, *a)
    while True:     # a point another process is training: wait for it, then reuse it
        try:
            row = fn(root, study, depth, fraction, budget, seed, args.set,
                     variant or (args.variant if method == "ours" else "paper"))
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


def _stages(run: Path, method: str, k: int = 4) -> list[StageDir]:
    if method in ("e2e", "meta"):
        return [StageDir(run, method)]
    if method == "grow":
        return [StageDir(run, "meta"), StageDir(run, "grow")]
    return ([StageDir(run, "meta")] + [StageDir(run, "incubate", i) for i in range(k)]
            + [StageDir(run, "assembled"), StageDir(run, "finetune")])


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
                stages = _stages(run, method, STUDIES[study].get("k", 4))
                if all(sd.finished() for sd in stages):
                    rows.append(_row(study, depth, fraction, method, label, seed, run, stages, variant))
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
