"""Stage 1: train the shallow meta model end to end."""
from __future__ import annotations

from ..recipe.schema import Recipe
from ..stage_registry import META
from .train import train_stage


def main(recipe: Recipe, out) -> dict:
    return train_stage(recipe, out, META, meta=True)
