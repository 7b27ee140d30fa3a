"""Every stage in one table: its name (in the run directory, manifests, summary.json, status), its
`incubate` subcommand, its folder, what it needs and produces, and the module whose `main` runs it.
The pipeline, the CLI, the run directory, the recipe, report, status, interop and the LM tools read
it; no other module spells a stage's name. It imports nothing of the package (every layer reads it).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

META, INCUBATE, ASSEMBLED, FINETUNE, E2E, GROW, EVALUATE = (
    "meta", "incubate", "assembled", "finetune", "e2e", "grow", "evaluate")


@dataclass(frozen=True)
class Stage:
    name: str                   # in the run directory, manifests, summary.json and `incubate status`
    command: str                # its `incubate` subcommand (and its key under launch.stages)
    folder: str | None          # under the run directory ({module}: the module's index); None: writes none
    needs: tuple                # stages that must have finished first (INCUBATE: all K modules)
    produces: str
    help: str                   # the subcommand's help line
    args: tuple = ("out",)      # what its main takes after the recipe, each a CLI option
    trains: bool = True         # trains weights: the recipe has a section of its own train values
    weights: str | None = "target"   # what its weights are: a meta, target or module model (None: none)
    in_run: str = "always"      # `incubate run`: always | default (off with --no-<name>) | opt-in | never

    @property
    def entry(self) -> str:
        """The module whose main(recipe, *args) runs the stage."""
        return f"incubate.stages.{self.command}"

    def main(self):
        return importlib.import_module(self.entry).main

    @property
    def per_module(self) -> bool:
        return self.folder is not None and "{module}" in self.folder

    def hint(self, module: int | None = None) -> str:
        """How a person makes this stage: the command that finishes it."""
        extra = f" --module {module if module is not None else 'N'}" if self.per_module else ""
        return f"run `incubate {self.command}{extra}` first"


ALL = (
    Stage(META, "meta", "meta", (), "the meta model (one block a module), trained end to end",
          "train the meta model end to end", weights="meta"),
    Stage(INCUBATE, "incubate", "modules/{module}", (META,), "target module I, trained inside the frozen meta model",
          "train target module I inside the frozen meta model", args=("out", "module"), weights="module"),
    Stage(ASSEMBLED, "assemble", "assembled", (INCUBATE,), "the target model stitched from every module, evaluated",
          "stitch modules 0..K-1 into the target and evaluate it", trains=False),
    Stage(FINETUNE, "finetune", "finetune", (ASSEMBLED,), "the assembled model fine-tuned end to end: ours",
          "fine-tune the assembled model end to end"),
    Stage(E2E, "e2e", "e2e", (), "the E2E baseline: the target trained end to end, same data and recipe",
          "the E2E baseline: same target, data and recipe", in_run="default"),
    Stage(GROW, "grow", "grow", (META,), "the growth baseline: the meta model's blocks repeated in order, then E2E",
          "the growth baseline (G_stack): the target from the meta model's layers repeated in order, then end to "
          "end", in_run="opt-in"),
    Stage(EVALUATE, "evaluate", None, (), "the task's metrics of any finished stage's weights, printed",
          "accuracy and loss of any stage's weights", args=("checkpoint",), trains=False, weights=None,
          in_run="never"),
)
_BY_NAME = {s.name: s for s in ALL}
_BY_COMMAND = {s.command: s for s in ALL}


def stage(name: str) -> Stage:
    """The stage named `name` (KeyError for none)."""
    return _BY_NAME[name]


def by_command(command: str) -> Stage | None:
    return _BY_COMMAND.get(command)


def names(**where) -> tuple:
    """The names of the stages whose fields equal `where`'s values, in the order they run."""
    return tuple(s.name for s in ALL if all(getattr(s, k) == v for k, v in where.items()))


def lineage(name: str) -> tuple:
    """The stages `name` builds on (its needs, theirs, ...) and `name`, in the order they run: what a
    method's whole cost adds up (FINETUNE: meta, incubate, assembled, finetune; GROW: meta, grow)."""
    needed = _needed(name)
    return tuple(s.name for s in ALL if s.name in needed)


def _needed(name: str) -> set:
    return {name}.union(*(_needed(n) for n in stage(name).needs))


def in_folders() -> tuple:
    """The stages that write a folder of the run directory, in order."""
    return tuple(s.name for s in ALL if s.folder is not None)


def whole_models() -> tuple:
    """The stages whose weights are one whole model (meta or target): what sample reads."""
    return tuple(s.name for s in ALL if s.weights in ("meta", "target"))


def launched() -> tuple:
    """The subcommands `incubate run --launcher` starts as jobs (keys of launch.stages)."""
    return tuple(s.command for s in ALL if s.in_run != "never")
