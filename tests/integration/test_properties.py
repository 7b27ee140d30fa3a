"""Property tests of the mechanisms behind docs/errors.md, not more rows: (1) for every key of the
recipe's schema, values of the wrong kind and out of range, generated from the schema itself, are
refused in one line and touch nothing; (2) damaged copies of every file a finished run holds give
`status`, `report`, `export` and a rerun one line at most (or a row naming the file), and leave the
rest of the run as it was. Everything runs in this process against one tiny finished run."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import typing
from pathlib import Path

import pytest

from incubate.recipe.schema import Recipe
from incubate.recipe.typed import Choices, Items, Overrides, Plain, Range, Sections, Text, field_types
from tests.conftest import in_process, write_recipe

# ----------------------------------------------------------------- values generated from the schema


def _unwrap(tp):
    """(base type, its rules, optional) of a declared type."""
    optional, rules = False, []
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Union:
            optional, tp = True, next(a for a in typing.get_args(tp) if a is not type(None))
        elif origin is typing.Annotated:
            tp, *more = typing.get_args(tp)
            rules += more
        else:
            return tp, rules, optional


def leaves(cls, prefix: str = "", turn: list | None = None):
    """(dotted key, declared type) of every key of the schema, sections and their keys alike. The
    sections of overrides (meta, incubate, ...: one mechanism, Overrides) and of stage shapes take
    their keys in turn: each key once under one of them, every section some keys."""
    turn = [0] if turn is None else turn
    for name, tp in field_types(cls).items():
        path = f"{prefix}{name}"
        yield path, tp
        base, rules, _ = _unwrap(tp)
        if dataclasses.is_dataclass(base):
            yield from leaves(base, path + ".", turn)
        for rule in rules:
            sections = rule.names if isinstance(rule, Sections) else [name] if isinstance(rule, Overrides) else []
            if isinstance(rule, Overrides) and rule in turn[1:]:
                continue        # the overrides of train keys: expanded once, over every stage section
            turn.append(rule)
            for key, sub in field_types(rule.cls).items() if sections else ():
                turn[0] += 1
                yield from _one(f"{path}.{sections[turn[0] % len(sections)]}." if isinstance(rule, Sections)
                                else f"{path}.", key, sub, turn, isinstance(rule, Overrides))


def _one(prefix: str, key: str, tp, turn: list, rotate: bool):
    """The key under the section whose turn it is (overrides: meta, incubate, finetune, e2e, grow)."""
    if rotate:
        stages = [n for n, t in field_types(Recipe).items() if any(isinstance(r, Overrides) for r in _unwrap(t)[1])]
        prefix = f"{stages[turn[0] % len(stages)]}."
    yield f"{prefix}{key}", tp


def _outside(r: Range, integer: bool) -> list:
    step = 1 if integer else 0.5
    out = [r.ge - step if r.ge is not None else None, r.gt if r.gt is not None else None,
           r.le + step if r.le is not None else None, r.lt if r.lt is not None else None]
    return [v for v in out if v is not None]


WRONG_KIND = {bool: ["2", "maybe", "[true]", "{a: 1}"],
              int: ["ten", "1.5", "true", "[1]", "{a: 1}", str(2 ** 63), str(-2 ** 63 - 1), "1e999"],
              float: ["fast", "true", "[1.0]", "{a: 1}", ".nan", ".inf", "-.inf", "1e999"],
              str: ["3", "true", "[a]", "{a: 1}"], list: ['"x"', "3", "{a: 1}"], dict: ['"x"', "3", "[1]"]}


def bad_values(tp) -> list[str]:
    """YAML texts (as `--set key=TEXT` takes them) that key type `tp` must refuse."""
    base, rules, _ = _unwrap(tp)
    if typing.get_origin(base) is typing.Literal:
        return ["not_a_choice", "3", "[x]"]
    if dataclasses.is_dataclass(base):
        return ["3", "[1]", "{no_such_key: 1}"]
    out = list(WRONG_KIND[base])
    for rule in rules:
        if isinstance(rule, Range):
            out += [str(v) for v in _outside(rule, base is int)]
        elif isinstance(rule, Choices):
            out.append("no_such_name")
        elif isinstance(rule, Text):
            out.append("''")
        elif isinstance(rule, Items):
            out += [f"[{v}]" for v in bad_values(rule.item)[:3]]
            good = "0.5" if _unwrap(rule.item)[0] is float else "2"
            if rule.length:
                out.append("[" + ", ".join([good] * (rule.length + 1)) + "]")
            if rule.min_len:
                out.append("[]")
            if rule.ordered:
                out.append("[1, 0.5]" if _unwrap(rule.item)[0] is float else "[3, 2]")
        elif isinstance(rule, Plain):
            out += ["{a: .nan}", "{a: [.inf]}", "{1: 2}"]
        elif isinstance(rule, (Sections, Overrides)):
            out += ["{no_such_key: {}}"]
    return out


def schema_cases() -> list[tuple[str, str]]:
    return [(key, text) for key, tp in leaves(Recipe) for text in bad_values(tp)]


def test_every_number_of_the_schema_has_a_range():
    """By construction: a key added without bounds (fsdp's, anyone's) fails here, not in a user's run."""
    unbounded = [key for key, tp in leaves(Recipe) if _unwrap(tp)[0] in (int, float)
                 and not any(isinstance(r, Range) for r in _unwrap(tp)[1])]
    assert unbounded == []


# ----------------------------------------------------------------- one tiny finished run

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    recipe = write_recipe(root / "tiny.yaml", meta__epochs=1, model__division=[2, 2])     # K=2: fewer files, same kinds
    in_process("run", "--recipe", recipe, "--out", root / "run", check=True)
    return recipe, root / "run"


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def one_line(proc) -> bool:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return "Traceback" not in proc.stderr + proc.stdout and len(lines) == 1 and lines[0].startswith("incubate: error: ")


def test_every_key_refuses_values_of_the_wrong_kind_and_out_of_range(finished, tmp_path):
    recipe, run = finished
    before = snapshot(run)
    cases = schema_cases()
    found = []
    for i, (key, text) in enumerate(cases):
        for out in ((run, tmp_path / "new")[i % 2],):      # the finished run, or a new folder, in turn
            proc = in_process("meta", "--recipe", recipe, "--out", out, "--set", f"{key}={text}")
            line = proc.stderr.strip()
            named = key.split(".")[-1] in line
            if proc.returncode != 2 or not one_line(proc) or not named or (tmp_path / "new").exists():
                found.append((key, text, str(out), proc.returncode, line[-300:]))
    print(f"schema property: {len(cases)} generated values over {len({k for k, _ in cases})} keys; "
          f"{len(found)} not refused in one line naming the key")
    assert not found, "\n".join(map(str, found[:40]))
    assert snapshot(run) == before


# ----------------------------------------------------------------- damaged copies of a finished run's files

DAMAGE = {"empty": lambda b: b"", "truncated": lambda b: b[: len(b) // 2],
          "binary": lambda b: bytes(range(256)) * 4, "null": lambda b: b"null", "a list": lambda b: b"[]",
          "a string": lambda b: b'"text"', "a number": lambda b: b"3"}
# the JSON (and YAML) files get every kind; the others (weights, locks, event files, the figure) the first
# three: a short JSON value is just another few bytes of garbage to them
TEXT_FILES = (".json", ".jsonl", ".yaml")
REWRITTEN = {"summary.json", "report.png"}     # what `report` (and a rerun, which ends with it) makes anew
READ_BY_BOTH = ("recipe.yaml", "manifest.json")  # status and report name these when they do not read


def commands(recipe: Path, run: Path, tmp: Path) -> dict:
    return {"status": ["status", run], "report": ["report", run],
            "export": ["export", run, "--stage", "finetune", "--to", tmp / "export"],
            "rerun": ["run", "--recipe", recipe, "--out", run]}


def _judge(name: str, proc, changed: set, damaged: str, kind: str) -> str | None:
    """What is wrong with a command's answer to a damaged file (None: nothing)."""
    text = proc.stdout + proc.stderr
    if "Traceback" in text or proc.returncode not in (0, 2):
        return f"exit {proc.returncode}: {text[-300:]}"
    if proc.returncode == 2 and not one_line(proc):
        return f"not one line: {proc.stderr[-300:]}"
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 0 and any(not line.startswith("incubate: warning: ") for line in warnings):
        return f"stray output on stderr: {proc.stderr[-300:]}"
    named = damaged in text or kind == "truncated"      # half a YAML or JSON file may still read
    if name in ("status", "report") and damaged.endswith(READ_BY_BOTH) and not named:
        return "the damaged file is not named"
    allowed = REWRITTEN if name in ("report", "rerun") else set()
    if changed - allowed - ({damaged} if damaged in allowed else set()):
        return f"changed {sorted(changed)}"
    return None


def test_damaged_files_of_a_finished_run_give_one_line_and_leave_the_rest(finished, tmp_path, monkeypatch):
    recipe, run = finished
    # the figure's drawing reads nothing from the run (curves() does): 0.2 s a call saved
    monkeypatch.setattr("incubate.report._draw", lambda *a: None)
    in_process("report", run, check=True)
    pristine = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    before = snapshot(run)
    cases, found, named = 0, [], 0
    for path, original in pristine.items():
        rel = str(path.relative_to(run))
        for kind, damage in list(DAMAGE.items())[: 7 if path.name.endswith(TEXT_FILES) else 3]:
            for name, argv in commands(recipe, run, tmp_path).items():
                path.write_bytes(damage(original))
                damaged = snapshot(run)
                cases += 1
                proc = in_process(*argv)
                now = snapshot(run)
                if (why := _judge(name, proc, {k for k in damaged if now.get(k) != damaged[k]}, rel, kind)) is not None:
                    found.append((rel, kind, name, why))
                named += rel in proc.stdout + proc.stderr
                for p, data in pristine.items():        # the run as it was, for the next case
                    if now.get(str(p.relative_to(run))) != before[str(p.relative_to(run))]:
                        p.write_bytes(data)
    print(f"damage property: {len(pristine)} files, {cases // 4} damaged copies x 4 commands = {cases} commands; "
          f"{named} answers named the damaged file; {len(found)} wrong")
    assert not found, "\n".join(map(str, found[:40]))
    assert snapshot(run) == before


# ----------------------------------------------------------------- validate, then write; file modes

def test_a_refused_command_or_one_that_changes_nothing_leaves_the_finished_run_as_it_was(finished, tmp_path):
    recipe, run = finished
    before, stamp = snapshot(run), (run / "recipe.yaml").stat().st_mtime_ns
    refused = [("incubate", "--recipe", recipe, "--out", run, "--module", "-1", "--set", "train.lr=0.5"),
               ("export", run, "--stage", "finetune", "--to", run),
               ("export", run, "--stage", "finetune", "--to", run / "meta" / "x"),
               ("export", run, "--stage", "finetune", "--to", ""),
               ("meta", "--recipe", recipe, "--out", run / "meta"),
               ("meta", "--recipe", recipe, "--out", ""),
               ("meta", "--recipe", recipe, "--out", run, "--set", "train.lr=.nan"),
               ("meta", "--recipe", recipe, "--out", run, "--set", "train.opt=adamww")]
    for argv in refused:
        proc = in_process(*argv)
        assert proc.returncode == 2 and one_line(proc), (argv, proc.stderr)
    # every stage finished: a rerun with other training settings trains nothing, so rewrites nothing
    in_process("run", "--recipe", recipe, "--out", run, "--set", "train.lr=0.5", check=True)
    assert snapshot(run) == dict(before, **{k: snapshot(run)[k] for k in REWRITTEN})
    assert (run / "recipe.yaml").stat().st_mtime_ns == stamp


def test_weights_and_exports_get_the_umask_mode(finished, tmp_path):
    recipe, run = finished
    old = os.umask(0o022)
    try:
        in_process("export", run, "--stage", "finetune", "--to", tmp_path / "shared", check=True)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "shared").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in run.rglob("model.safetensors")} == {0o666 & ~old}
