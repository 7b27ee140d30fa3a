"""The baseline: the same target model trained end to end on the same data."""
from __future__ import annotations

from ..recipe.schema import Recipe
from ..stage_registry import E2E
from .train import train_stage


def main(recipe: Recipe, out) -> dict:
    return train_stage(recipe, out, E2E)
