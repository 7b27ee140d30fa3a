"""The LM-in-tokens study of benchmarks/accuracy_vs_cost.py (`--study lm_tokens`): one pass over
real prose, every method's budget in FLOPs, every stage's budget in tokens (train.tokens), curves
from evaluations during training (train.eval_every) on one fixed held-out slice.

Methods, each with a total budget T (TFLOPs) and, where a meta model comes first, a split:
  e2e    the 16-layer target end to end, T
  meta   the 4-layer meta model alone, T (also the meta model of every method below)
  ours   meta model (share m of T), K modules (share i, split evenly), fine-tune (the rest);
         module init meta, stack or random (the variant)
  grow   G_stack: meta model (share m), then the grown target end to end (the rest)
A stage's tokens are its share of T divided by its FLOPs a token, measured with FlopCounterMode on
the stage's own network (hybrid i for module i) before anything trains. Every method that uses a
meta model of a given budget copies the one meta run of that budget and seed.
"""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from incubate.store.rundir import StageDir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lm_tokens.yaml"
CORPUS = ROOT / "data" / "lm_corpus"        # git-ignored; travels to a GPU machine (compressed, ~12 MB)
# Debian bookworm's packages, pinned; when a security update drops a pinned version from the archive,
# pin the one `apt-cache policy PACKAGE` offers and rerun every point (the corpus, so the data, changes).
PACKAGES = {"python3.11-doc": "3.11.2-6+deb12u8", "linux-doc-6.1": "6.1.176-1"}
SOURCES = {"python": (Path("/usr/share/doc/python3.11/html/_sources"), "*.rst.txt"),
           "linux": (Path("/usr/share/doc/linux-doc-6.1/Documentation"), "*.rst.gz")}
# (meta share, modules' share); fine-tune the rest. C puts ours' first deep model (the assembly) at half
# the budget, A at three quarters: how early ours can reach E2E's final is bounded by that.
SPLITS = {"A": (0.5, 0.25), "B": (0.25, 0.25), "C": (0.4, 0.1)}
GROW_SPLITS = {"A": 0.5, "B": 0.25}                 # meta share; growth the rest
INITS = ("meta", "stack", "random")


def ensure_corpus(out: Path = CORPUS) -> Path:
    """data/lm_corpus: the Python 3.11 docs' reStructuredText sources (gzipped here) and the
    kernel's documentation (.rst.gz as Debian ships it), installed first when missing."""
    if (out / "VERSIONS").exists():
        return out
    missing = [f"{p}={v}" for p, v in PACKAGES.items() if not SOURCES["python" if "python" in p else "linux"][0].exists()]
    if missing:
        print(f"installing Debian's {' '.join(missing)} ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (src, pattern) in SOURCES.items():
        for f in sorted(src.rglob(pattern)):
            dest = tmp / name / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".gz":
                shutil.copyfile(f, dest)
            else:     # mtime 0: the same bytes (so the same token-cache key) on every machine
                dest.with_name(dest.name + ".gz").write_bytes(gzip.compress(f.read_bytes(), 9, mtime=0))
    versions = subprocess.run(["dpkg-query", "-W", *PACKAGES], capture_output=True, text=True).stdout
    (tmp / "VERSIONS").write_text(versions)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# The map's middle regime (issue 34): the Python docs' guides, the tutorial's own kind of prose and a
# superset of it (tutorial, language reference, HOWTOs: 1.38 MB), read about 4 times by the 16-layer
# target at the map's largest budget.
MID_CORPUS = ROOT / "data" / "lm_mid"
MID_PARTS = ("tutorial", "reference", "howto")


def ensure_mid_corpus(out: Path = MID_CORPUS) -> Path:
    """data/lm_mid: MID_PARTS of python3.11-doc's sources (installed first when missing), as they
    ship; .VERSIONS is hidden, so not read as text."""
    if (out / ".VERSIONS").exists():
        return out
    src = SOURCES["python"][0]
    if not src.exists():
        ensure_corpus()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in MID_PARTS:
        shutil.copytree(src / part, tmp / part)
    versions = subprocess.run(["dpkg-query", "-W", "python3.11-doc"], capture_output=True, text=True).stdout
    (tmp / ".VERSIONS").write_text(versions)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def sets(root: Path) -> list[str]:
    """What every point of the study adds to the recipe: the corpus and one token cache for all
    (a study's own sets, after these, may name another corpus)."""
    return [f"data.source=text:{CORPUS}", f"data.cache_dir={root / 'token_cache'}"]


@lru_cache(maxsize=None)
def flops_per_token(recipe_key: tuple, stage: str, module: int = -1) -> float:
    """Training FLOPs a token of one stage's network (forward and backward), measured."""
    import torch

    from incubate.recipe.schema import load_recipe
    from incubate.train.step import count_step_flops
    from incubate.families import get_family
    from incubate.data.spec import TextSpec
    from incubate.modular import Hybrid
    from incubate.tasks.causal_lm import _NextTokenLoss
    # the lr schedule changes no FLOPs, and a stage's warm-up alone is refused before its tokens are set
    recipe = load_recipe(RECIPE, [s for s in recipe_key if ".warmup_tokens=" not in s])
    family, m, context = get_family(recipe.model.family), recipe.model, recipe.data.context
    vocab = 256 if recipe.data.tokenizer == "byte" else recipe.data.vocab_size

    def build(meta: bool):
        div = recipe.meta_division if meta else m.division
        return family.build(m.name, family.model_kwargs(m, TextSpec(context, vocab), div, meta=meta))
    if stage == "incubate":
        target = family.keep_only(build(False), m.division, module)
        net = Hybrid(family, build(True), recipe.meta_division, target, m.division, module)
        trained = net.runner
    else:
        net = trained = build(stage == "meta")
    x = torch.randint(0, vocab, (2, context))
    return count_step_flops(net, trained, _NextTokenLoss(0.0), x, x) / (2 * context)


def stage_tokens(recipe_key: tuple, stage: str, tflops: float, module: int = -1) -> int:
    return int(tflops * 1e12 / flops_per_token(recipe_key, stage, module))


def budget_sets(recipe_key: tuple, method: str, total: float, split: str | None, k: int = 4) -> list[str]:
    """The --set lines that give each stage of a point its tokens."""
    if method in ("e2e", "meta"):
        return [f"{method}.tokens={stage_tokens(recipe_key, method, total)}"]
    if method == "grow":
        return [f"grow.tokens={stage_tokens(recipe_key, 'e2e', total * (1 - GROW_SPLITS[split]))}"]
    meta_share, module_share = SPLITS[split]
    # incubate.tokens is one budget for every module job: the modules' share over their mean FLOPs a token
    per_module = total * module_share / k
    mean_fpt = sum(flops_per_token(recipe_key, "incubate", i) for i in range(k)) / k
    return [f"incubate.tokens={int(per_module * 1e12 / mean_fpt)}",
            f"finetune.tokens={stage_tokens(recipe_key, 'e2e', total * (1 - meta_share - module_share))}"]


def meta_budget(method: str, total: float, split: str | None) -> float:
    """TFLOPs of the meta model a point starts from."""
    if method == "ours":
        return total * SPLITS[split][0]
    return total * GROW_SPLITS[split]


def fmt(t: float) -> str:
    return f"{t:g}"


def evals(stage, base_flops: float, metric: str) -> list:
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
    row["evals"] = evals(last, before, metric)
    row["tokens"] = sum(m.get("tokens", 0) for m in ms)
    row["corpus_tokens"] = (ms[-1].get("preprocess") or {}).get("train_tokens")     # passes = tokens / this
    row["trained_params"] = ms[-1].get("trainable_params")      # the deep model's, in its last stage
    if ("meta", None) in by and len(stages) > 1:
        row["meta_tflops"] = round(by[("meta", None)]["flops"] / 1e12, 3)
        row[f"meta_{metric}"] = by[("meta", None)]["metrics"][metric]
        row["meta_evals"] = evals(stages[0], 0, metric)
    if ("assembled", None) in by:       # the deep model's first point: assembled, before fine-tuning
        row[f"assembled_{metric}"] = by[("assembled", None)]["metrics"][metric]
        row["evals"] = [[round(before / 1e12, 4), round(row[f"assembled_{metric}"], 6), None]] + row["evals"]
        row[f"hybrid_{metric}"] = [by[("incubate", i)]["metrics"][metric] for i in range(len(stages) - 3)]
    return row


if __name__ == "__main__":      # `python -m benchmarks.token_study`: gather data/lm_corpus (make gpu-data does)
    print(ensure_corpus())
