"""Depthwise growth, the baseline of the model-growth literature (G_stack, Du et al. 2024): the
target starts as the trained meta model's blocks repeated in order (with its stem and head), then
trains end to end. It needs only the meta model: no modules, no assembly."""
from __future__ import annotations

from ..recipe.schema import Recipe
from ..errors import UserError
from ..store.rundir import StageDir, meta_fingerprint
from ..stage_registry import GROW
from .incubate import load_meta
from .train import train_stage


def _growable(ctx, stage: StageDir) -> str:
    if not hasattr(ctx.family, "grow_from_meta"):
        raise UserError(f"model.family {ctx.recipe.model.family} cannot be grown depthwise (its blocks are not one "
                        f"stack of equal shapes); use incubate run without --grow")
    fingerprint = meta_fingerprint(ctx.run)
    if stage.finished() and stage.manifest().get("meta_fingerprint") != fingerprint:
        raise UserError(f"{stage.path} was grown from another meta model; delete that folder to redo it")
    return fingerprint


def _from_meta(ctx, model) -> None:
    meta, _ = load_meta(ctx)
    ctx.family.grow_from_meta(model, meta)


def main(recipe: Recipe, out) -> dict:
    return train_stage(recipe, out, GROW, check=_growable, start=_from_meta)
