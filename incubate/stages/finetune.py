"""Stage 4: fine-tune the assembled target model end to end."""
from __future__ import annotations

from ..recipe.schema import Recipe
from ..modular import load_strict
from ..store.rundir import StageDir
from ..stage_registry import ASSEMBLED, FINETUNE
from .train import train_stage


def _assembled(ctx, stage: StageDir) -> str:
    return StageDir(ctx.run, ASSEMBLED).require_finished()["meta_fingerprint"]


def _from_assembled(ctx, model) -> None:
    assembled = StageDir(ctx.run, ASSEMBLED)
    load_strict(model, assembled.load(), assembled.weights, "the recipe's target model")


def main(recipe: Recipe, out) -> dict:
    return train_stage(recipe, out, FINETUNE, check=_assembled, start=_from_assembled)
