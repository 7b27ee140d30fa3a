"""The sequence of every stage that trains one whole model (meta, fine-tune, E2E, grow): prepare,
begin, build, start from what the stage needs, fit, finish."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..recipe.schema import Recipe
from ..train.engine import fit
from ..train.parallel import Trainee, full_state
from ..store.rundir import StageDir
from ..train.seeds import stage_seed
from ..train.step import StageRun
from .common import Context, begin, finish, prepare, trainable_params

# Refuses what the stage cannot start from and returns the meta fingerprint its manifest records.
Check = Callable[[Context, StageDir], Optional[str]]
# Sets the freshly built model's starting weights (e.g. from the assembled model).
Start = Callable[[Context, torch.nn.Module], None]


def train_stage(recipe: Recipe, out, name: str, meta: bool = False, check: Check | None = None,
                start: Start | None = None) -> dict:
    """Train stage `name` (the meta model when `meta`, else the target) and return its manifest;
    a finished stage is skipped."""
    ctx = prepare(recipe, out)
    stage = StageDir(ctx.run, name)
    fingerprint = check(ctx, stage) if check else None
    manifest = ctx.base_manifest(stage, meta=meta)
    if fingerprint is not None:
        manifest["meta_fingerprint"] = fingerprint
    if not begin(ctx, stage, manifest):
        return stage.manifest()
    cfg = recipe.stage(name)
    model = ctx.build(meta=meta, drop_path=cfg.drop_path)
    if start:
        start(ctx, model)
    run = StageRun(ctx.dist, stage_seed(recipe.seed, name), stage.path, label=name, task=ctx.task)
    result = fit(Trainee.whole(model, ctx.family), cfg, ctx.bundle, recipe.data, run)
    manifest.update(result, trainable_params=trainable_params(model), world_size=ctx.dist.world)
    return finish(ctx, stage, full_state(model), manifest)
