"""What every stage shares: the run directory, the models a recipe names, manifests, summary."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..checkpoint import (load_weights, previous_checkpoint, read_json, save_weights, uninterrupted,
                          write_json_atomic, write_text_atomic)
from ..config import Recipe, dump_recipe
from ..data import DataBundle, eval_crop_pct, load_data
from ..engine import Dist, barrier, seed_all, setup_dist
from ..errors import UserError
from ..families import get_family
from ..lock import hold, release
from ..tasks import task_of
from ..text_data import RESTORE, TOKENIZER_FILE

STAGE_DIRS = {"meta": "meta", "assembled": "assembled", "finetune": "finetune", "e2e": "e2e", "grow": "grow"}
# Parts of the recipe that must not change inside one run directory: what the weights and the
# dataset are. Training settings, loader settings and augmentation may change between stages.
FIXED_KEYS = ("model.family", "model.name", "model.kwargs", "model.division", "model.meta_division",
              "data.source", "data.img_size", "data.train_fraction", "data.subset_seed", "data.context",
              "data.val_fraction", "data.tokenizer", "data.vocab_size", "data.eval_tokens")


class StageDir:
    def __init__(self, run: Path, stage: str, module: int | None = None):
        self.run, self.stage, self.module = Path(run), stage, module
        self.path = self.run / "modules" / str(module) if stage == "incubate" else self.run / STAGE_DIRS[stage]
        self.weights = self.path / "model.safetensors"
        self.manifest_path = self.path / "manifest.json"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.safetensors"

    @property
    def label(self) -> str:
        return f"module {self.module}" if self.stage == "incubate" else self.stage

    def manifest(self) -> dict | None:
        return read_json(self.manifest_path) if self.manifest_path.exists() else None

    def finished(self) -> bool:
        m = self.manifest()
        return bool(m and m.get("finished") and self.weights.exists())

    def require_finished(self, hint: str) -> dict:
        m = self.manifest()
        if not (m and m.get("finished")):
            raise UserError(f"{self.label} has not finished: {self.manifest_path} is missing or unfinished; {hint}")
        return m

    def load(self) -> dict:
        m = self.require_finished("run that stage first")
        return load_weights(self.weights, m.get("sha256"))


@dataclass
class Context:
    recipe: Recipe
    run: Path
    dist: Dist
    bundle: DataBundle
    family: object

    @property
    def task(self):
        """What a batch is, the loss and the metrics: implied by the family (incubate/tasks)."""
        return task_of(self.family)

    def model_spec(self, meta: bool = False) -> dict:
        div = self.recipe.meta_division if meta else self.recipe.model.division
        kwargs = self.family.model_kwargs(self.recipe.model, self.bundle.num_classes, self.bundle.in_chans,
                                          self.bundle.img_size, div, meta=meta)
        return {"name": self.recipe.model.name, "kwargs": kwargs}

    def build(self, meta: bool = False, drop_path: float = 0.0, seed_offset: int = 0):
        """Build (and initialise, from the recipe's seed) the target or the meta model."""
        spec = self.model_spec(meta)
        seed_all(self.recipe.seed + seed_offset)
        return self.family.build(spec["name"], spec["kwargs"], drop_path=drop_path)

    def base_manifest(self, stage: StageDir, meta: bool = False) -> dict:
        r = self.recipe
        return {"stage": stage.stage, "module": stage.module, "family": r.model.family,
                "model": self.model_spec(meta), "division": r.meta_division if meta else r.model.division,
                "target_division": r.model.division, "meta_division": r.meta_division,
                "meta_fingerprint": None, "recipe": r.name, "classes": self.bundle.class_names,
                "num_classes": self.bundle.num_classes, "data": r.data.source,
                "preprocess": preprocess(self.bundle, r.data.augment), "finished": False}


def preprocess(bundle: DataBundle, augment) -> dict:
    """How test images reach the model (what an export's pretrained_cfg must say): image files
    through timm's eval transform as data.augment sets it, in-memory data resized bilinearly."""
    if hasattr(bundle, "describe"):    # text: the tokenizer and the split
        return bundle.describe()
    from_files = bundle.train.images is None
    return {"input_size": [bundle.in_chans, bundle.img_size, bundle.img_size], "mean": list(bundle.mean),
            "std": list(bundle.std), "interpolation": augment.interpolation if from_files else "bilinear",
            "crop_pct": eval_crop_pct(augment, bundle.img_size) if from_files else 1.0}


def _check_run_recipe(run: Path, recipe: Recipe) -> None:
    saved = run / "recipe.yaml"
    if not saved.exists():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = recipe.to_dict()
    defaults = Recipe().to_dict()      # a key an older version did not write has its default

    def get(d, dotted):
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    for key in FIXED_KEYS:
        if key == "data.vocab_size" and get(new, "data.tokenizer") == "byte":
            continue        # byte tokens: the vocabulary is 256 whatever data.vocab_size says
        before = get(old, key) if get(old, key) is not None else get(defaults, key)
        if before != get(new, key):
            raise UserError(f"run directory {run} was made with {key}={before!r} (its recipe.yaml), not "
                            f"{get(new, key)!r}; use a new --out, or the same recipe")


def write_run_recipe(run: Path, recipe: Recipe) -> None:
    """RUN/recipe.yaml, refusing a run directory made with another model or data."""
    _check_run_recipe(run, recipe)
    try:
        run.mkdir(parents=True, exist_ok=True)
        text, path = dump_recipe(recipe), run / "recipe.yaml"
        if not (path.exists() and path.read_text() == text):
            write_text_atomic(path, text)
    except OSError as e:
        raise UserError(f"cannot write the run directory {run}: {e.strerror}; choose a writable --out") from None


def _check_tokenizer_of_stages(run: Path, recipe: Recipe, bundle) -> None:
    """A BPE run's stages all read one tokenizer: refuse a RUN/tokenizer.json that is not the one
    its stages so far were trained with (replaced, or trained again by another tokenizers version)."""
    have = getattr(bundle, "tokenizer_sha256", "")
    if not have:
        return
    for sd in stage_dirs(run, len(recipe.model.division)):
        m = sd.manifest() if sd.manifest_path.exists() else None
        want = ((m or {}).get("preprocess") or {}).get("tokenizer_sha256")
        if want and want != have:
            raise UserError(f"{run / TOKENIZER_FILE} (SHA-256 {have[:12]}) is not the tokenizer {sd.path} was "
                            f"trained with ({want[:12]}, its manifest); {RESTORE}")


def prepare(recipe: Recipe, out: str | Path) -> Context:
    run = Path(out)
    _check_run_recipe(run, recipe)
    dist = setup_dist(recipe.device)
    if recipe.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    family = get_family(recipe.model.family)
    # Bad data is refused before anything is written; a BPE tokenizer is trained and saved in the run
    # directory only once the corpus passed every check (config.validate keeps it to LM families).
    bundle = load_data(recipe.data, run)
    task_of(family).check_data(bundle, recipe.model.family)
    _check_tokenizer_of_stages(run, recipe, bundle)
    if dist.main:
        write_run_recipe(run, recipe)
    barrier(dist)
    return Context(recipe, run, dist, bundle, family)


def trainable_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def finish(ctx: Context, stage: StageDir, state: dict, manifest: dict) -> dict:
    """Write the stage's weights, then its finished manifest, then the run summary (rank 0)."""
    if ctx.dist.main:
        with uninterrupted():     # Ctrl-C waits until weights, manifest and summary agree
            manifest = dict(manifest, sha256=save_weights(state, stage.weights), finished=True,
                            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            write_json_atomic(stage.manifest_path, manifest)
            stage.checkpoint.unlink(missing_ok=True)
            previous_checkpoint(stage.checkpoint).unlink(missing_ok=True)
            write_summary(ctx.run)
        release(stage.path)
    barrier(ctx.dist)
    return manifest


def begin(ctx: Context, stage: StageDir, manifest: dict) -> bool:
    """Returns False when the stage already finished (then it is skipped).

    A finished stage is skipped without its lock; otherwise rank 0 locks the stage folder, so a
    second process writing the same stage is refused (the lock is dropped when the stage finishes).
    """
    if ctx.dist.main and not stage.finished():
        claim(stage)
    if stage.finished():
        if ctx.dist.main:
            print(f"[{stage.label}] already finished in {stage.path}; skipping", flush=True)
        return False
    if ctx.dist.main:
        for stale in stage.path.glob("*.tmp"):     # left by a write that was killed (the folder is locked)
            stale.unlink(missing_ok=True)
        write_json_atomic(stage.manifest_path, manifest)
    barrier(ctx.dist)
    return True


def claim(stage: StageDir) -> None:
    """Create the stage folder and hold its lock until the stage finishes (or the process ends)."""
    try:
        stage.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {stage.path}: {e.strerror}; choose a writable --out") from None
    hold(stage.path, f"{stage.label} of run directory {stage.run}")


def stage_dirs(run: Path, k: int) -> list[StageDir]:
    return ([StageDir(run, "meta")] + [StageDir(run, "incubate", i) for i in range(k)]
            + [StageDir(run, s) for s in ("assembled", "finetune", "e2e", "grow")])


def write_summary(run: Path) -> dict:
    """RUN/summary.json: one entry a finished stage (the task's metrics, e.g. top1 and loss, or bpb,
    loss and acc; seconds, FLOPs, trainable params)."""
    k = len(yaml.safe_load((run / "recipe.yaml").read_text())["model"]["division"])
    summary = {}
    for sd in stage_dirs(run, k):
        m = sd.manifest() if sd.manifest_path.exists() else None
        if not m or not m.get("finished"):
            continue
        key = f"module_{sd.module}" if sd.stage == "incubate" else sd.stage
        summary[key] = {"stage": sd.stage, "module": sd.module, **m["metrics"],
                        "seconds": m.get("process_seconds", m.get("seconds", 0.0)),
                        "flops": m.get("flops", 0), "trainable_params": m.get("trainable_params", 0),
                        "epochs": m.get("epochs", 0)}
    write_json_atomic(run / "summary.json", summary)
    return summary
