"""Stage 4: fine-tune the assembled target model end to end."""
from __future__ import annotations

from ..config import Recipe
from ..engine import fit
from ..modular import load_strict
from .common import StageDir, begin, finish, prepare, trainable_params


def main(recipe: Recipe, out) -> dict:
    ctx = prepare(recipe, out)
    stage = StageDir(ctx.run, "finetune")
    assembled = StageDir(ctx.run, "assembled")
    assembled.require_finished("run `incubate assemble` first")
    manifest = ctx.base_manifest(stage)
    manifest["meta_fingerprint"] = assembled.manifest()["meta_fingerprint"]
    if not begin(ctx, stage, manifest):
        return stage.manifest()
    cfg = recipe.stage("finetune")
    model = ctx.build(drop_path=cfg.drop_path)
    load_strict(model, assembled.load(), assembled.weights, "the recipe's target model")
    result = fit(model, model, cfg, ctx.bundle, recipe.data, ctx.dist, recipe.seed + 3, stage.path, label="finetune",
                 task=ctx.task)
    manifest.update(result, trainable_params=trainable_params(model), world_size=ctx.dist.world)
    return finish(ctx, stage, model.state_dict(), manifest)
