"""Stage 2: train target module I inside the frozen meta model (one independent job a module)."""
from __future__ import annotations

from .. import api
from ..recipe.schema import Recipe
from ..train.engine import fit
from ..errors import UserError
from ..modular import Hybrid
from ..train.parallel import full_state
from ..store.rundir import StageDir, meta_fingerprint
from ..runs import load_into
from ..train.seeds import stage_seed
from ..stage_registry import INCUBATE, META
from ..train.step import StageRun
from .common import Context, begin, finish, prepare, trainable_params


def load_meta(ctx: Context):
    """The finished meta model of the run (the recipe's, loaded strictly), and its fingerprint."""
    meta_fingerprint(ctx.run)       # a missing meta model: one line that says how to make it
    meta = load_into(ctx.build(meta=True), StageDir(ctx.run, META), "the recipe's meta model")
    return meta, api.record(meta).fingerprint


def build_hybrid(ctx: Context, index: int, drop_path: float = 0.0, module_init: str = "random",
                 frozen_suffix_grads: bool = True) -> Hybrid:
    """incubate.hybrid of the run's meta model and the recipe's target. The whole target is built from
    the recipe's seed, so module I starts from the same weights E2E starts from."""
    meta, _ = load_meta(ctx)
    target = api.divide(ctx.build(drop_path=drop_path), ctx.recipe.model.division, ctx.recipe.model.family)
    return api.hybrid(meta, target, index, module_init=module_init, frozen_suffix_grads=frozen_suffix_grads)


def main(recipe: Recipe, out, module: int) -> dict:
    k = len(recipe.model.division)
    if not 0 <= module < k:       # before prepare: a refused command reads no data and writes nothing
        raise UserError(f"--module {module} is out of range: the recipe divides the target into {k} modules "
                        f"(0..{k - 1})")
    ctx = prepare(recipe, out)
    stage = StageDir(ctx.run, INCUBATE, module)
    cfg = recipe.stage(INCUBATE)
    fingerprint = meta_fingerprint(ctx.run)
    manifest = ctx.base_manifest(stage)
    manifest["meta_fingerprint"] = fingerprint
    if stage.finished() and stage.manifest().get("meta_fingerprint") != fingerprint:
        raise UserError(f"{stage.path} was incubated against another meta model; delete that folder to redo it")
    if not begin(ctx, stage, manifest):     # finished: skipped without building any model
        return stage.manifest()
    hybrid = build_hybrid(ctx, module, cfg.drop_path, cfg.module_init, cfg.frozen_suffix_grads)
    target = hybrid.runner.model
    seed = stage_seed(recipe.seed, INCUBATE, module, cfg.shared_data_order)
    run = StageRun(ctx.dist, seed, stage.path, label=f"module {module}", task=ctx.task)
    result = fit(hybrid.trainee(), cfg, ctx.bundle, recipe.data, run)
    manifest.update(result, trainable_params=trainable_params(target), world_size=ctx.dist.world)
    return finish(ctx, stage, full_state(target), manifest)
