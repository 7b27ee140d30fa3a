"""Stage 3: stitch the K incubated modules into the target model and evaluate it."""
from __future__ import annotations

import time

from ..store.checkpoint import load_weights
from ..recipe.schema import Recipe
from ..data.loaders import make_loader
from ..data.order import Reader
from ..train.engine import evaluate
from ..errors import UserError
from ..api import assemble, divide
from ..store.rundir import StageDir, meta_fingerprint
from ..stage_registry import ASSEMBLED, INCUBATE
from .common import begin, finish, prepare


def gather_modules(ctx) -> tuple[list[dict], str]:
    """Every module's weights, refusing missing, foreign or stale ones with the file's name."""
    recipe, run = ctx.recipe, ctx.run
    fingerprint = meta_fingerprint(run)
    spec, division = ctx.model_spec(), recipe.model.division
    parts = []
    for i in range(len(division)):
        sd = StageDir(run, INCUBATE, i)
        m = sd.manifest()
        if not (m and m.get("finished")):
            raise UserError(f"module {i} is missing or unfinished ({sd.manifest_path}); {sd.hint}")
        if m.get("model") != spec or m.get("division") != division:
            raise UserError(f"{sd.manifest_path} was incubated for another recipe or division "
                            f"({m.get('model', {}).get('name')}, division {m.get('division')}); "
                            f"rerun that module with this recipe")
        if m.get("meta_fingerprint") != fingerprint:
            raise UserError(f"{sd.manifest_path} was incubated against another meta model (fingerprint "
                            f"{str(m.get('meta_fingerprint'))[:12]}, run has {fingerprint[:12]}); rerun that module")
        parts.append(load_weights(sd.weights, m.get("sha256")))
    return parts, fingerprint


def main(recipe: Recipe, out) -> dict:
    ctx = prepare(recipe, out)
    stage = StageDir(ctx.run, ASSEMBLED)
    if stage.finished():
        return begin(ctx, stage, {}) or stage.manifest()
    parts, fingerprint = gather_modules(ctx)
    manifest = ctx.base_manifest(stage)
    manifest["meta_fingerprint"] = fingerprint
    begin(ctx, stage, manifest)
    t0 = time.perf_counter()
    model = assemble(divide(ctx.build(), recipe.model.division, recipe.model.family), parts)
    model.to(ctx.dist.device)
    loader = make_loader(ctx.bundle, ctx.bundle.test, recipe.data, Reader(
        recipe.data.eval_batch_size, False, recipe.seed, ctx.dist.rank, ctx.dist.world, ctx.dist.device))
    metrics = evaluate(model, loader, ctx.dist, task=ctx.task)
    if ctx.dist.main:
        print(f"[{stage.label}] {ctx.task.text(metrics)} before fine-tuning", flush=True)
    seconds = time.perf_counter() - t0
    manifest.update(metrics=ctx.task.final(metrics), epochs=0, seconds=seconds,
                    process_seconds=seconds * ctx.dist.world, flops=0, steps=0, trainable_params=0,
                    world_size=ctx.dist.world)
    return finish(ctx, stage, model.state_dict(), manifest)
