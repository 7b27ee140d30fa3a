"""What every stage shares: preparing it (recipe check, data, process group), the models a recipe
names, its base manifest, begin and finish across ranks. The run directory itself is incubate/store/rundir.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..recipe.schema import Recipe
from ..data.loaders import DataBundle, load_data, modality
from ..train.dist import Dist, barrier, setup_dist
from ..train.engine import seed_all
from ..families import get_family
from ..store.rundir import (StageDir, begin_stage, check_run_recipe, check_tokenizer, finish_stage,
                            stage_dirs, write_run_recipe)
from ..tasks import check_modality, task_of
from ..data.text import TOKENIZER_FILE


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
        kwargs = self.family.model_kwargs(self.recipe.model, self.bundle.spec, div, meta=meta)
        return {"name": self.recipe.model.name, "kwargs": kwargs}

    def build(self, meta: bool = False, drop_path: float = 0.0):
        """Build (and initialise, from the recipe's seed: incubate/train/seeds.py) the target or the meta model."""
        spec = self.model_spec(meta)
        seed_all(self.recipe.seed)
        return self.family.build(spec["name"], spec["kwargs"], drop_path=drop_path)

    def base_manifest(self, stage: StageDir, meta: bool = False) -> dict:
        r = self.recipe
        return {"stage": stage.stage, "module": stage.module, "family": r.model.family,
                "model": self.model_spec(meta), "division": r.meta_division if meta else r.model.division,
                "target_model": self.model_spec(),     # what incubate.target_model(run) builds
                "target_division": r.model.division, "meta_division": r.meta_division,
                "meta_fingerprint": None, "recipe": r.name, **self.bundle.spec.manifest_fields(),
                "data": r.data.source, "preprocess": self.bundle.describe(r.data.augment), "finished": False}


def _check_tokenizer_of_stages(run: Path, recipe: Recipe, bundle) -> None:
    """A BPE run's stages all read one tokenizer: refuse a RUN/tokenizer.json that is not the one
    its stages so far were trained with (replaced, or trained again by another tokenizers version)."""
    if bundle.spec.modality != "text" or not bundle.spec.tokenizer_sha256:     # no tokenizer file: bytes, images
        return
    have = bundle.spec.tokenizer_sha256
    for sd in stage_dirs(run, len(recipe.model.division)):
        check_tokenizer(sd.manifest() or {}, have, run / TOKENIZER_FILE, sd.path)


def prepare(recipe: Recipe, out: str | Path) -> Context:
    run = Path(out)
    check_run_recipe(run, recipe)
    dist = setup_dist(recipe.device)
    if recipe.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    family = get_family(recipe.model.family)
    # Bad data is refused before anything is written; a BPE tokenizer is trained and saved in the run
    # directory only once the corpus passed every check (recipe_checks.validate keeps it to LM families).
    check_modality(task_of(family), modality(recipe.data), recipe.model.family, recipe.data.source)
    bundle = load_data(recipe.data, run)
    _check_tokenizer_of_stages(run, recipe, bundle)
    return Context(recipe, run, dist, bundle, family)


def trainable_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def finish(ctx: Context, stage: StageDir, state: dict, manifest: dict) -> dict:
    """Write the stage's weights, then its finished manifest, then the run summary (rank 0)."""
    if ctx.dist.main:
        manifest = finish_stage(stage, state, manifest)
    barrier(ctx.dist)
    return manifest


def begin(ctx: Context, stage: StageDir, manifest: dict) -> bool:
    """Returns False when the stage already finished (then it is skipped); rank 0 locks the stage folder.
    The run's recipe.yaml is written here, once the stage is to run: a command refused before, or one
    that finds every stage finished, leaves it as it is."""
    if ctx.dist.main and not stage.finished():
        write_run_recipe(ctx.run, ctx.recipe)
    if not begin_stage(stage, manifest, ctx.dist.main):
        return False
    barrier(ctx.dist)
    return True
