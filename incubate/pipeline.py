"""`incubate run`: the stage graph in order, skipping stages already finished.

Without a launcher every stage runs in this process (which may itself be one rank of torchrun).
With one (`local`, `ray`, `slurm`), every stage is a job of its own, in its own shape
(`launch.stages`), and the K module jobs run at the same time: they need only the meta model's
weights, handed over through the run directory.
"""
from __future__ import annotations

from pathlib import Path

from .config import Recipe
from .dist import setup_dist
from .stages import assemble, e2e, finetune, grow, incubate, meta


def phases(recipe: Recipe, out, with_e2e: bool = True, with_grow: bool = False) -> list[list]:
    """The stage graph: each phase needs every job of the phases before it; jobs of one phase are independent."""
    from .launchers import Job
    run = Path(out).resolve()
    graph = [[Job("meta", run)], [Job("incubate", run, i) for i in range(len(recipe.model.division))],
             [Job("assemble", run)], [Job("finetune", run)]]
    return graph + ([[Job("e2e", run)]] if with_e2e else []) + ([[Job("grow", run)]] if with_grow else [])


def run(recipe: Recipe, out, with_e2e: bool = True, launcher: str | None = None, jobs: int = 1,
        retries: int | None = None, address: str | None = None, with_grow: bool = False) -> dict:
    if launcher is None:
        meta.main(recipe, out)
        for i in range(len(recipe.model.division)):
            incubate.main(recipe, out, i)
        assemble.main(recipe, out)
        finetune.main(recipe, out)
        if with_e2e:
            e2e.main(recipe, out)
        if with_grow:
            grow.main(recipe, out)
    else:
        from .launchers import make_launcher, run_jobs
        from .rundir import write_run_recipe
        engine = make_launcher(launcher, recipe, Path(out), address)   # refuses a shape it cannot run first
        write_run_recipe(Path(out), recipe)      # the jobs read the run's recipe.yaml, nothing else
        for phase in phases(recipe, out, with_e2e, with_grow):
            run_jobs(engine, phase, jobs, recipe.launch.retries if retries is None else retries)
    if setup_dist(recipe.device).main:
        from .report import report
        return report(Path(out))
    return {}
