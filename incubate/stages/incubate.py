"""Stage 2: train target module I inside the frozen meta model (one independent job a module)."""
from __future__ import annotations

from ..config import Recipe
from ..engine import fit
from ..errors import UserError
from ..modular import Hybrid, load_strict
from ..rundir import StageDir
from ..seeds import stage_seed
from .common import Context, begin, finish, prepare, trainable_params


def load_meta(ctx: Context):
    """The finished meta model of the run, and its fingerprint (SHA-256 of its weights file)."""
    stage = StageDir(ctx.run, "meta")
    manifest = stage.require_finished("run `incubate meta` first, or `incubate import-official CKPT --as meta`")
    meta = ctx.build(meta=True)
    load_strict(meta, stage.load(), stage.weights, "the recipe's meta model")
    return meta, manifest["sha256"]


def build_hybrid(ctx: Context, index: int, drop_path: float = 0.0, module_init: str = "random",
                 frozen_suffix_grads: bool = True) -> Hybrid:
    k = len(ctx.recipe.model.division)
    if not 0 <= index < k:
        raise UserError(f"--module {index} is out of range: the recipe divides the target into {k} modules "
                        f"(0..{k - 1})")
    meta, fingerprint = load_meta(ctx)
    # The whole target is built from the recipe's seed, so module I starts from the same weights
    # E2E starts from; everything module I does not own is dropped before training.
    target = ctx.build(drop_path=drop_path)
    if module_init != "random":
        ctx.family.init_from_meta(target, meta, ctx.recipe.model.division, ctx.recipe.meta_division, index,
                                  mode=module_init)
    ctx.family.keep_only(target, ctx.recipe.model.division, index)
    hybrid = Hybrid(ctx.family, meta, ctx.recipe.meta_division, target, ctx.recipe.model.division, index,
                    frozen_suffix_grads=frozen_suffix_grads)
    hybrid.fingerprint = fingerprint
    return hybrid


def main(recipe: Recipe, out, module: int) -> dict:
    ctx = prepare(recipe, out)
    k = len(recipe.model.division)
    if not 0 <= module < k:
        raise UserError(f"--module {module} is out of range: the recipe divides the target into {k} modules "
                        f"(0..{k - 1})")
    stage = StageDir(ctx.run, "incubate", module)
    cfg = recipe.stage("incubate")
    fingerprint = StageDir(ctx.run, "meta").require_finished("run `incubate meta` first (or import a meta model)")["sha256"]
    manifest = ctx.base_manifest(stage)
    manifest["meta_fingerprint"] = fingerprint
    if stage.finished() and stage.manifest().get("meta_fingerprint") != fingerprint:
        raise UserError(f"{stage.path} was incubated against another meta model; delete that folder to redo it")
    if not begin(ctx, stage, manifest):     # finished: skipped without building any model
        return stage.manifest()
    hybrid = build_hybrid(ctx, module, cfg.drop_path, cfg.module_init, cfg.frozen_suffix_grads)
    target = hybrid.runner.model
    seed = stage_seed(recipe.seed, "incubate", module, cfg.shared_data_order)
    result = fit(hybrid, target, cfg, ctx.bundle, recipe.data, ctx.dist, seed, stage.path,
                 ddp_attr="runner", label=f"module {module}", task=ctx.task)
    manifest.update(result, trainable_params=trainable_params(target), world_size=ctx.dist.world)
    return finish(ctx, stage, target.state_dict(), manifest)
