"""What a launcher is: the four calls the scheduler makes of every back-end."""
from __future__ import annotations

from typing import Any, Protocol

from .job import Job, Resources


class Launcher(Protocol):
    name: str       # local, ray or slurm: shown in each try's line of the job's log

    def plan(self, stage: str, n_jobs: int, parallel: int) -> tuple[int, Resources]:
        """How many jobs of `stage` may run at once, and what each gets."""

    def submit(self, job: Job, res: Resources) -> Any:
        """Start `job` (or queue it); returns a handle for poll and stop."""

    def poll(self, handle) -> tuple[int | None, str]:
        """(None, "") while the job runs; else its exit code and, when the engine knows, why it failed."""

    def stop(self, handle) -> None:
        """End a job that still runs (the scheduler is stopping)."""


def gpus_a_node(recipe, devices: int) -> int:
    """GPUs a node of a job asks its engine for: its devices unless the recipe runs on CPU."""
    return devices if recipe.device != "cpu" else 0
