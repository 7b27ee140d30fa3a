"""Stage 1: train the shallow meta model end to end."""
from __future__ import annotations

from ..config import Recipe
from ..engine import fit
from .common import StageDir, begin, finish, prepare, trainable_params


def main(recipe: Recipe, out) -> dict:
    ctx = prepare(recipe, out)
    stage = StageDir(ctx.run, "meta")
    manifest = ctx.base_manifest(stage, meta=True)
    if not begin(ctx, stage, manifest):
        return stage.manifest()
    cfg = recipe.stage("meta")
    model = ctx.build(meta=True, drop_path=cfg.drop_path)
    result = fit(model, model, cfg, ctx.bundle, recipe.data, ctx.dist, recipe.seed, stage.path, label="meta",
                 task=ctx.task)
    manifest.update(result, trainable_params=trainable_params(model), world_size=ctx.dist.world)
    return finish(ctx, stage, model.state_dict(), manifest)
