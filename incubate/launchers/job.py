"""A job: one stage command against a run directory, and the resources it gets."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..store.rundir import StageDir
from ..stage_registry import by_command


@dataclass
class Job:
    """One stage command against a run directory. `stage` is the CLI's name (meta, incubate, ...)."""
    stage: str
    run: Path
    module: int | None = None

    @property
    def dir(self) -> StageDir:
        return StageDir(self.run, by_command(self.stage).name, self.module)

    @property
    def label(self) -> str:
        return self.dir.label

    @property
    def log(self) -> Path:
        return self.dir.path / "log.txt"

    @property
    def console(self) -> Path:
        """What the job says to the person at `incubate run` (incubate/console.py), beside its log."""
        return self.dir.path / "console.txt"

    def main(self, recipe, out) -> dict:
        """Run the job in this process (`incubate run` without a launcher), against run directory `out`."""
        return by_command(self.stage).main()(recipe, out, *([self.module] if self.module is not None else []))

    def args(self) -> list[str]:
        extra = ["--module", str(self.module)] if self.module is not None else []
        return [self.stage, "--recipe", str(self.run / "recipe.yaml"), "--out", str(self.run), *extra]


@dataclass
class Resources:
    procs: int = 1                       # processes of the job a node (torchrun when > 1, SLURM: tasks)
    threads: int = 1                     # CPU threads a process
    gpus: int = 0                        # GPUs a node the job asks its engine for (ray, slurm)
    gpu_ids: list = field(default_factory=list)   # GPUs of this machine it gets (local)
    nodes: int = 1                       # nodes of the job (slurm)

    def describe(self, launcher: str) -> str:
        nodes = f"{self.nodes} node(s) x " if self.nodes > 1 else ""
        return f"({launcher}, {nodes}{self.procs} process(es), {self.threads} thread(s) each)"
