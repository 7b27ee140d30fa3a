"""`incubate run`: the stage graph in order, skipping stages already finished.

Without a launcher every stage runs in this process (which may itself be one rank of torchrun).
With one (`local`, `ray`, `slurm`), every stage is a job of its own, in its own shape
(`launch.stages`), and the K module jobs run at the same time: they need only the meta model's
weights, handed over through the run directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .recipe.schema import Recipe
from .train.dist import setup_dist
from .stage_registry import ALL, E2E, GROW


def phases(recipe: Recipe, out, with_e2e: bool = True, with_grow: bool = False) -> list[list]:
    """The stage graph in the registry's order: each phase needs every job of the phases before it;
    jobs of one phase (the K module jobs) are independent."""
    from .launchers import Job
    run, k = Path(out).resolve(), len(recipe.model.division)
    on = {E2E: with_e2e, GROW: with_grow}      # the run's switches of its optional stages
    picked = [s for s in ALL if s.in_run == "always" or (s.in_run != "never" and on.get(s.name, s.in_run == "default"))]
    return [[Job(s.command, run, i) for i in (range(k) if s.per_module else [None])] for s in picked]


@dataclass(frozen=True)
class Launch:
    """`incubate run --launcher NAME --jobs N --retries R --address A`: every stage a job of `launcher`,
    `jobs` at once, each retried `retries` times (None: the recipe's launch.retries)."""
    launcher: str
    jobs: int = 1
    retries: int | None = None
    address: str | None = None


def run(recipe: Recipe, out, with_e2e: bool = True, launch: Launch | None = None, with_grow: bool = False) -> dict:
    """Every stage of the run in order; in this process, or as jobs of `launch.launcher`."""
    if launch is None:
        for phase in phases(recipe, out, with_e2e, with_grow):
            for job in phase:
                job.main(recipe, out)
    else:
        from .launchers import make_launcher, run_jobs
        from .store.rundir import check_run_recipe, write_run_recipe
        check_run_recipe(Path(out), recipe)
        engine = make_launcher(launch.launcher, recipe, Path(out), launch.address)   # refuses a bad shape first
        if not all(job.dir.finished() for phase in phases(recipe, out, with_e2e, with_grow) for job in phase):
            write_run_recipe(Path(out), recipe)      # the jobs read the run's recipe.yaml, nothing else
        for phase in phases(recipe, out, with_e2e, with_grow):
            run_jobs(engine, phase, launch.jobs, recipe.launch.retries if launch.retries is None else launch.retries)
    if setup_dist(recipe.device).main:
        from .report import report
        return report(Path(out))
    return {}
