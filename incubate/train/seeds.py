"""Every stage's seed, as an offset from the recipe's `seed`: the data order and augmentation draws
of a stage (and of each incubation module) come from its own stream.

Models are built (initialised) from the recipe's seed itself whatever the stage, so module i starts
from the same target weights E2E starts from. The offsets below seed `fit`:

    meta        0
    e2e         0        the baseline reads the meta model's data order
    module i    1 + i    (1 for every module with train.shared_data_order, the official code's)
    finetune   -1        modules take every offset >= 1 for some division length
    grow       1000
    assemble   draws nothing (it only evaluates, in order)
"""
from __future__ import annotations

from ..stage_registry import E2E, FINETUNE, GROW, INCUBATE, META

OFFSETS = {META: 0, E2E: 0, FINETUNE: -1, GROW: 1000}
FIRST_MODULE = 1


def stage_seed(seed: int, stage: str, module: int | None = None, shared_data_order: bool = False) -> int:
    """The seed `fit` trains stage `stage` (module `module` of the incubate stage) with."""
    if stage == INCUBATE:
        return seed + FIRST_MODULE + (0 if shared_data_order else module)
    return seed + OFFSETS[stage]
