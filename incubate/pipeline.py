"""`incubate run`: the stage graph in order, skipping stages already finished."""
from __future__ import annotations

from pathlib import Path

from .config import Recipe
from .engine import setup_dist
from .stages import assemble, e2e, finetune, incubate, meta


def run(recipe: Recipe, out, with_e2e: bool = True) -> dict:
    meta.main(recipe, out)
    for i in range(len(recipe.model.division)):   # one after another for now
        incubate.main(recipe, out, i)
    assemble.main(recipe, out)
    finetune.main(recipe, out)
    if with_e2e:
        e2e.main(recipe, out)
    if setup_dist(recipe.device).main:
        from .report import report
        return report(Path(out))
    return {}
