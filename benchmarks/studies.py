"""The studies of benchmarks/accuracy_vs_cost.py: each one's points, recipes and run-directory
names, and the result row read back from a finished run directory."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks import token_study as tok
from incubate.recipe.schema import load_recipe
from incubate.errors import UserError
from incubate.store.rundir import StageDir

ROOT = Path(__file__).resolve().parents[1]
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
    # splits of token_study.py; every init of ours a variant (stack at splits A and B, random at one
    # budget: the paper's, known to break at this size; split C, for how early ours reaches E2E, meta only).
    "lm_tokens": {"recipe": tok.RECIPE, "metric": "bpb", "prefix": "lmtok_", "depth": 16, "fraction": 1.0,
                  "budget": "flops", "e2e": [30, 60], "meta": [30, 60],
                  "ours": [(30, "A"), (60, "A"), (30, "B"), (60, "B"), (60, "C")],
                  "grow": [(30, "A"), (60, "A"), (30, "B"), (60, "B")],
                  "inits": {"meta": None, "stack": [(30, "A"), (60, "A"), (30, "B"), (60, "B")], "random": [(30, "A")]},
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

# The map of which method pays where (issue 34): three data regimes x two depths of width-64 Llama
# targets (K = 4, one 4-layer meta model a regime and seed), budgets in TFLOPs. Fair baselines: E2E
# with a warm-up of 5% of its tokens, growth re-warming its learning rate the same way, and ours' fine-tune,
# each at several learning rates (variants; the one with the lower final on seed 0 is reported); ours and
# growth share split B's meta models. A sweep runs at 15 TFLOPs, seed 0; the larger budget and seed 1
# train the chosen rate only.
MAP_REGIMES = {
    "small": [f"data.source=text:{PYDOC}", "data.val_fraction=0.1", "data.eval_tokens=0"],   # 221 kB
    "mid": [f"data.source=text:{tok.MID_CORPUS}", "data.val_fraction=0.05"],                   # 1.38 MB
    "rich": [],                                     # lm_tokens' 36 MB and its held-out slice
}
# 64 layers: 1e-3 and 5e-4 both stay near the unigram plateau at 15 TFLOPs (4.81, 4.97 bits per byte
# on 221 kB; lower is worse), so the sweep goes up too: the plateau, not divergence, is what stops it;
# 4e-3 edged 2e-3 on 221 kB (4.793 against 4.800), then 8e-3 edged 4e-3 (4.764) and
# 1.6e-2 edged 8e-3 (4.709), then 3.2e-2 left the plateau sooner (4.452) and 6.4e-2 lost to it (4.539);
# on 1.38 MB 3.2e-2 (4.285) beat 1e-3 (4.745) and both its neighbours (1.6e-2 4.817, 6.4e-2 4.820).
# 16 layers: 2e-3 beat 1e-3 on both corpora (2.19 against 2.42, 2.25 against 2.44), then 4e-3 beat 2e-3
# (2.174, 2.241), so the sweep goes on up to 8e-3; on 36 MB 2e-3 won (2.683 against 2.946 at 1e-3, 2.927
# at 4e-3, 3.045 at 8e-3). The 36 MB/64-layer cell runs E2E at 3.2e-2 only, where both other 64-layer sweeps settled.
MAP_E2E_LRS = {16: (8e-3, 4e-3, 2e-3, 1e-3), 64: (6.4e-2, 3.2e-2, 1.6e-2, 8e-3, 4e-3, 2e-3, 1e-3, 5e-4)}
MAP_WARMUP = 0.05
# Growth's sweep: the recipe's lr (2e-3, variant "paper") and these.
# At 64 layers 2e-3 beat 1e-3 and 4e-3 in both cells (221 kB: 2.324 against 2.337 and 2.507); at 16 layers
# 4e-3 beat 2e-3 and 8e-3 on 221 kB (1.988 against 2.027, 2.000), but on 1.38 MB 8e-3 beat 4e-3 (1.947
# against 1.974), so the sweep goes on to 1.6e-2 there; on 36 MB 8e-3 won too (2.351 against 2.362 at 4e-3,
# 2.399 at 1.6e-2). The 36 MB/64-layer cell runs growth at the recipe's 2e-3 only, as both other 64-layer sweeps chose.
MAP_GROW_LRS = {16: (1e-3, 4e-3, 8e-3, 1.6e-2), 64: (1e-3, 4e-3)}
# Ours gets the sweep growth gets where it could move too: its fine-tune (which trains the whole deep
# model, as growth does) at the recipe's 1e-3 with no warm-up (variant "meta"), and at these with the
# same 5% warm-up; the modules and the assembly are the recipe point's (the fine-tune alone differs).
# 16 layers: 4e-3 beat 2e-3 and 1e-3 on 221 kB (2.028, 2.060, 2.097), so on to 8e-3; 64 layers: 5e-4 beat
# the recipe's 1e-3 on both corpora (2.223 against 2.243, 2.327 against 2.341), so down to 2.5e-4.
# 36 MB: 4e-3 beat 8e-3 and 1e-3 at 16 layers (2.456, 2.491, 2.498); 5e-4 beat 1e-3 at 64 (2.703, 2.721).
MAP_OURS_FT_LRS = {16: (2e-3, 4e-3, 8e-3), 64: (2.5e-4, 5e-4, 2e-3, 4e-3)}
# The check of G_stack's base (one budget, the data-rich 16-layer cell): ours and growth from a meta
# model trained at a constant lr (multistep that never steps), i.e. taken before a WSD schedule's decay.
MAP_FLAT_META = {"flatmeta": (["meta.sched=multistep", "meta.decay_milestones=[1000000000]"], [(15, "B")])}
for _regime, _sets in MAP_REGIMES.items():
    for _depth in (16, 64):
        _small = _regime == "rich" and _depth == 64       # the most costly cell: one budget
        STUDIES[f"map_{_regime}_d{_depth}"] = {
            "recipe": tok.RECIPE, "metric": "bpb", "prefix": f"map_{_regime}_", "depth": _depth, "fraction": 1.0,
            "budget": "flops", "e2e": [15] if _small else [15, 30], "meta": [15, 30] if _depth == 16 else [],
            "ours": [(15, "B")] if _small else [(15, "B"), (30, "B")],
            "grow": [(15, "B")] if _small else [(15, "B"), (30, "B")],
            "inits": {"meta": None}, "seeds": [0, 1], "warmup": MAP_WARMUP, "corpus": _regime,
            "e2e_variants": {f"lr{lr:g}": [f"e2e.lr={lr}"] for lr in MAP_E2E_LRS[_depth]},
            "grow_variants": {f"lr{lr:g}": [f"grow.lr={lr}"] for lr in MAP_GROW_LRS[_depth]},
            "ours_variants": {f"ft{lr:g}": [f"finetune.lr={lr}"] for lr in MAP_OURS_FT_LRS[_depth]},
            "meta_variants": MAP_FLAT_META if (_regime, _depth) == ("rich", 16) else {},
            "sets": _sets + [f"model.division={[_depth // 4] * 4}", f"train.eval_every={50 if _depth == 16 else 25}"]}


def ensure_data(path: Path = FMNIST, study: str = "budget") -> None:
    s = STUDIES.get(study, {})
    corpus = s.get("corpus")
    if corpus in ("mid", "rich"):       # a map regime with a corpus of its own
        (tok.ensure_mid_corpus if corpus == "mid" else tok.ensure_corpus)()
        return
    if s.get("budget") == "flops" and corpus is None:
        if not any(x.startswith("data.source=") for x in s.get("sets", [])):
            tok.ensure_corpus()     # the study's own corpus, unless its sets name another (a smoke run)
        return
    if "recipe" in s:      # a study with its own corpus (the LM, the map's small regime)
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


def epoch_curve(stage: StageDir, metric: str = "top1") -> list:
    """[epoch, train loss, test top-1 (or the study's metric)] after every epoch of a stage (its metrics.jsonl)."""
    if not stage.metrics.exists():
        return []
    rows = [json.loads(line) for line in stage.metrics.read_text().splitlines() if line.strip()]
    return [[r["epoch"], round(r["train_loss"], 4), round(r[f"test_{metric}"], 4 if metric == "bpb" else 2)]
            for r in rows if r.get("kind") != "eval"]


def result_row(study, depth, fraction, method, budget, seed, run: Path, stages: list[StageDir], variant: str) -> dict:
    ms = [s.manifest() for s in stages]
    final = ms[-1]
    metric = STUDIES[study].get("metric", "top1")
    row = {"study": study, "variant": variant, "depth": depth, "fraction": fraction, "method": method, "budget": budget,
           "seed": seed, metric: final["metrics"][metric],
           "seconds": sum(m.get("process_seconds", 0.0) for m in ms),
           "flops": sum(m.get("flops", 0) for m in ms), "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run)}
    curve = epoch_curve(stages[-1], metric)
    if curve:      # the paper's table puts the training loss beside the accuracy: so do we
        row["train_loss"] = curve[-1][1]
        row["curve"] = curve
    if STUDIES[study].get("budget") == "flops":
        return tok.tok_row(row, stages, ms, metric)
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


def budget_label(method: str, budget) -> str:
    """How tables and --budgets name a budget: E2E/meta epochs ("40"), ours as "M/m+n"; in TFLOPs
    studies the total ("30"), or total and split for ours and growth ("30/A")."""
    if isinstance(budget, tuple) and isinstance(budget[1], str):
        return f"{tok.fmt(budget[0])}/{budget[1]}"
    return f"{budget[0]}/{budget[1]}+{budget[2]}" if method == "ours" else f"{budget}"


def tok_run_dir(root: Path, study, method: str, budget, seed: int, variant: str) -> Path:
    base = base_dir(root, study, STUDIES[study]["depth"], 1.0, seed)
    if method in ("e2e", "meta"):
        tag = method if variant in ("paper", None) else f"{method}-{variant}"
        return base / f"{tag}_{tok.fmt(budget)}"
    name = f"{tok.fmt(budget[0])}{budget[1]}"
    if method == "grow":
        return base / (f"grow_{name}" if variant in ("paper", None) else f"grow-{variant}_{name}")
    return base / f"ours-{variant}_{name}"


def tok_variants(study: str, method: str, budget) -> list[str]:
    """The variants a point of a TFLOPs study is trained in: ours in each module init that covers
    its budget, E2E, growth and ours' fine-tune at each of their learning rates, ours and growth also
    from each of the study's other meta models; others once."""
    s = STUDIES[study]
    if method == "e2e" and "e2e_variants" in s:
        return list(s["e2e_variants"])
    metas = [name for name, (_, only) in s.get("meta_variants", {}).items() if budget in only]
    if method == "grow":
        return ["paper"] + list(s.get("grow_variants", {})) + metas
    if method != "ours":
        return ["paper"]
    inits = [init for init, only in s["inits"].items() if only is None or budget in only]
    return inits + list(s.get("ours_variants", {})) + metas


def meta_variant(study: str, variant: str) -> tuple[str, list[str]]:
    """The meta model a point of ours or growth starts from: the study's variant of that name (its
    --set lines), or the study's own ("paper", no lines)."""
    sets, _ = STUDIES[study].get("meta_variants", {}).get(variant, (None, None))
    return (variant, sets) if sets is not None else ("paper", [])


def points(study: str, seeds=None, budgets=None, depths=None, fractions=None):
    """The study's (method, depth, fraction, budget, seed) points; budgets (labels), depths and
    fractions, where given, keep only those."""
    for p in all_points(study, seeds):
        if ((budgets is None or budget_label(p[0], p[3]) in budgets) and (depths is None or p[1] in depths)
                and (fractions is None or p[2] in fractions)):
            yield p


def all_points(study: str, seeds=None):
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


def point_stages(run: Path, method: str, k: int = 4) -> list[StageDir]:
    if method in ("e2e", "meta"):
        return [StageDir(run, method)]
    if method == "grow":
        return [StageDir(run, "meta"), StageDir(run, "grow")]
    return ([StageDir(run, "meta")] + [StageDir(run, "incubate", i) for i in range(k)]
            + [StageDir(run, "assembled"), StageDir(run, "finetune")])
