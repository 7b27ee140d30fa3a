"""The baseline: the same target model trained end to end on the same data."""
from __future__ import annotations

from ..config import Recipe
from ..engine import fit
from .common import StageDir, begin, finish, prepare, trainable_params


def main(recipe: Recipe, out) -> dict:
    ctx = prepare(recipe, out)
    stage = StageDir(ctx.run, "e2e")
    manifest = ctx.base_manifest(stage)
    if not begin(ctx, stage, manifest):
        return stage.manifest()
    cfg = recipe.stage("e2e")
    model = ctx.build(drop_path=cfg.drop_path)
    result = fit(model, model, cfg, ctx.bundle, recipe.data, ctx.dist, recipe.seed, stage.path, label="e2e",
                 task=ctx.task)
    manifest.update(result, trainable_params=trainable_params(model), world_size=ctx.dist.world)
    return finish(ctx, stage, model.state_dict(), manifest)
