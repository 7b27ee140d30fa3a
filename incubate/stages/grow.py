"""Depthwise growth, the baseline of the model-growth literature (G_stack, Du et al. 2024): the
target starts as the trained meta model's blocks repeated in order (with its stem and head), then
trains end to end. It needs only the meta model: no modules, no assembly."""
from __future__ import annotations

from ..config import Recipe
from ..engine import fit
from ..errors import UserError
from .common import StageDir, begin, finish, prepare, trainable_params
from .incubate import load_meta

SEED_OFFSET = 1000      # its own data order, apart from the meta model's (seed) and the modules' (seed + 1 + i)


def main(recipe: Recipe, out) -> dict:
    ctx = prepare(recipe, out)
    if not hasattr(ctx.family, "grow_from_meta"):
        raise UserError(f"model.family {recipe.model.family} cannot be grown depthwise (its blocks are not one stack "
                        f"of equal shapes); use incubate run without --grow")
    stage = StageDir(ctx.run, "grow")
    fingerprint = StageDir(ctx.run, "meta").require_finished("run `incubate meta` first")["sha256"]
    manifest = ctx.base_manifest(stage)
    manifest["meta_fingerprint"] = fingerprint
    if stage.finished() and stage.manifest().get("meta_fingerprint") != fingerprint:
        raise UserError(f"{stage.path} was grown from another meta model; delete that folder to redo it")
    if not begin(ctx, stage, manifest):
        return stage.manifest()
    cfg = recipe.stage("grow")
    model = ctx.build(drop_path=cfg.drop_path)
    meta, _ = load_meta(ctx)
    ctx.family.grow_from_meta(model, meta)
    result = fit(model, model, cfg, ctx.bundle, recipe.data, ctx.dist, recipe.seed + SEED_OFFSET, stage.path,
                 label="grow", task=ctx.task)
    manifest.update(result, trainable_params=trainable_params(model), world_size=ctx.dist.world)
    return finish(ctx, stage, model.state_dict(), manifest)
