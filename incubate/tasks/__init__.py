"""Tasks: what a batch is, the loss, the metrics, the headline metric and what the report plots.

The one training loop (engine.fit, engine.evaluate) calls a task; it never knows which one it
serves. The task is implied by the model family (each adapter names its `task`): a ViT classifies
images (`classification`), a `causal_lm` model predicts the next token (`causal_lm`). A recipe
therefore never names a task, and a family cannot be paired with another task's data.
"""
from __future__ import annotations

from ..errors import UserError
from ..families import adapter_task, task_name
from .causal_lm import CausalLMTask
from .classification import ClassificationTask

TASKS = {"classification": ClassificationTask(), "causal_lm": CausalLMTask()}


def get_task(name: str):
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task '{name}'; valid: {', '.join(TASKS)}") from None


HOLDS = {"image": "holds images", "text": "is text"}     # what a data source of each modality is, in a refusal


def check_modality(task, modality: str, family: str, source: str) -> None:
    """The one check that the data is what the family's task reads: the task's declared modality
    against the data source's (data.loaders.modality, what its bundle's spec will say), made before
    the data is read, so that nothing is written for a refused pair."""
    if modality != task.modality:
        raise UserError(f"model.family '{family}' {task.summary} but data.source '{source}' "
                        f"{HOLDS[modality]}; {task.use}")


def modality_of(family: str) -> str:
    """The data the family called `family` reads ("image" or "text"): its task's, its adapter not imported."""
    return get_task(task_name(family)).modality


def task_of(family) -> object:
    """The task a model family trains for (ViT: classification)."""
    return get_task(adapter_task(family))
