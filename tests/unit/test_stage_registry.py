"""One registry of stages (incubate/stage_registry.py): every face reads it, and no other module of
incubate/ spells a stage's name."""
import importlib
import re
from pathlib import Path

import pytest

from incubate import cli, stage_registry
from incubate.recipe import schema as config
from incubate.store.checkpoint import write_json_atomic
from incubate.recipe.schema import Recipe
from incubate.errors import UserError
from incubate.pipeline import phases
from incubate.store.rundir import StageDir, stage_dirs
from incubate.stage_registry import ALL, by_command, names

ROOT = Path(__file__).resolve().parents[2]


def test_a_methods_stages_are_read_from_the_registry_and_report_adds_up_their_cost():
    """report's ours and growth are the stages fine-tune and grow build on (stage_registry.lineage)."""
    from incubate.report import grow_total, ours_parts, ours_total, table
    from incubate.tasks import get_task
    assert stage_registry.lineage("finetune") == ("meta", "incubate", "assembled", "finetune")
    assert stage_registry.lineage("grow") == ("meta", "grow") and stage_registry.lineage("e2e") == ("e2e",)
    cost = lambda f, s: {"top1": 50.0, "loss": 1.0, "flops": f, "seconds": s, "trainable_params": 1}
    summary = {"meta": cost(10, 1.0), "module_1": cost(20, 2.0), "module_0": cost(30, 3.0), "assembled": cost(0, 0.5),
               "finetune": cost(40, 4.0), "grow": cost(70, 7.0), "e2e": cost(90, 9.0)}
    assert ours_parts(summary) == ["meta", "module_0", "module_1", "finetune"]
    assert ours_total(summary, "top1") == {"top1": 50.0, "seconds": 10.0, "flops": 100}
    assert grow_total(summary, "top1") == {"top1": 50.0, "seconds": 8.0, "flops": 80}
    assert grow_total({k: v for k, v in summary.items() if k != "meta"}, "top1") is None
    rows = [r.split(" | ")[0] for r in table(summary, get_task("classification")).splitlines()[2:]]
    assert rows == ["| meta", "| module 0", "| module 1", "| assembled", "| finetune",
                    "| **ours (meta+modules+finetune)**", "| **e2e**", "| **grow (G_stack)** (meta + grow)"]


def test_every_stage_has_its_command_its_entry_and_needs_only_stages_before_it():
    subcommands = cli.parser()._subparsers._group_actions[0].choices
    seen = set()
    for stage in ALL:
        assert stage.command in subcommands and by_command(stage.command) is stage
        assert callable(importlib.import_module(stage.entry).main)
        assert set(stage.needs) <= seen, f"{stage.name} needs a stage that runs after it"
        seen.add(stage.name)
    folders = [s.folder for s in ALL if s.folder is not None]
    assert len(set(folders)) == len(folders)


def test_the_recipe_and_the_launcher_take_their_stage_keys_from_the_registry():
    own_sections = {f for f in Recipe.__dataclass_fields__ if Recipe.__dataclass_fields__[f].type == "StageOverrides"}
    assert set(config.STAGES) == own_sections == set(names(trains=True))
    assert config.LAUNCH_STAGES == tuple(s.command for s in ALL if s.in_run != "never")


def test_the_pipeline_runs_the_registry_in_order_with_its_optional_stages(tmp_path):
    recipe = Recipe()
    recipe.model.division = [1, 1, 1]
    plan = [[(j.stage, j.module) for j in phase] for phase in phases(recipe, tmp_path)]
    assert plan == [[("meta", None)], [("incubate", 0), ("incubate", 1), ("incubate", 2)], [("assemble", None)],
                    [("finetune", None)], [("e2e", None)]]
    assert [p[0].stage for p in phases(recipe, tmp_path, with_e2e=False, with_grow=True)][-2:] == ["finetune", "grow"]
    assert phases(recipe, tmp_path)[2][0].dir.path == tmp_path.resolve() / "assembled"


def test_a_stage_folder_names_its_stage_and_run(tmp_path):
    run = tmp_path / "run"
    for sd in stage_dirs(run, 2):
        sd.path.mkdir(parents=True)
        write_json_atomic(sd.manifest_path, {"stage": sd.stage, "module": sd.module})
        found = StageDir.at(sd.path)
        assert (found.run, found.stage, found.module, found.path) == (run, sd.stage, sd.module, sd.path)
    write_json_atomic(run / "meta/manifest.json", {"stage": "meta_model"})
    with pytest.raises(UserError, match="names no stage of a run directory \\('meta_model'\\)"):
        StageDir.at(run / "meta")
    assert [sd.label for sd in stage_dirs(run, 2)][:3] == ["meta", "module 0", "module 1"]
    with pytest.raises(UserError, match="module 1 has not finished.*incubate incubate --module 1"):
        StageDir(run, "incubate", 1).require_finished()
    with pytest.raises(UserError, match="assembled has not finished.*run `incubate assemble` first"):
        StageDir(run, "assembled").require_finished()


def test_no_module_but_the_registry_spells_a_stage_name():
    """A stage's name as a quoted literal stands in at most 3 files of incubate/ ("meta" also names
    torch's meta device and module_init's mode: not counted)."""
    stages = {s.name for s in ALL} | {s.command for s in ALL}
    for name in sorted(stages - {"meta"}):
        files = [p for p in sorted((ROOT / "incubate").rglob("*.py"))
                 if re.search(rf"[\"']{name}[\"']", p.read_text())]
        allowed = {"stage_registry.py", "cli.py", "__init__.py"}       # prog="incubate"; the API's assemble()
        assert len(files) <= 3 and {p.name for p in files} <= allowed, (name, files)
    assert stage_registry.stage("assembled").command == "assemble"
