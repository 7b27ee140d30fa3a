"""safe_read: YAML with limits (a "billion laughs" and deep nesting refused at once), text checked as
UTF-8, JSON of the expected type; every failure one line naming the file and what to do."""
from __future__ import annotations

import os
import stat
import time

import pytest
import torch

from incubate.store.checkpoint import save_weights
from incubate.recipe.schema import load_recipe
from incubate.errors import UserError
from incubate.store.safe_read import MAX_DEPTH, read_json, read_json_lines
from tests.conftest import in_process, one_error_line


def billion_laughs() -> str:
    text, prev = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n', "a"
    for name in "bcdefghi":
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text


@pytest.mark.parametrize("text, match", [
    (billion_laughs(), r"expands to more than 100,000 values"),
    ("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", r"nests deeper than 64 levels"),
    ("", r"is empty \(no keys\)"),
    ("# only a comment\n", r"is empty \(no keys\)"),
    ("- 1\n- 2\n", r"must hold a mapping of keys, got a list"),
])
def test_recipes_that_are_no_recipe_are_refused_in_one_line_at_once(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    t0 = time.process_time()
    with pytest.raises(UserError, match=match):
        load_recipe(path)
    assert time.process_time() - t0 < 2     # the bomb is refused before it is expanded
    proc = in_process("meta", "--recipe", path, "--out", tmp_path / "run")
    assert proc.returncode == 2 and str(path) in one_error_line(proc.stderr)
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_recipe(path)


@pytest.mark.parametrize("data, match", [
    (b"", "is not valid JSON"), (b'{"a": ', "is not valid JSON"), (b"\xff\xfe\x00", "is not UTF-8 text"),
    (b"null", "holds null, not a mapping"), (b"[1]", "holds a list, not a mapping"),
    (b"[" * 100000, "nests too deeply"),
])
def test_read_json_turns_damage_into_one_line_with_the_fix(tmp_path, data, match):
    path = tmp_path / "manifest.json"
    path.write_bytes(data)
    with pytest.raises(UserError, match=match) as e:
        read_json(path, dict, "manifest", "delete that stage folder")
    assert str(path) in str(e.value) and str(e.value).endswith("delete that stage folder")


def test_json_lines_keep_the_readable_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 1}\nnull\n[2]\n\xff\xfe\n{"epoch": 2, "x"')
    assert read_json_lines(path) == [{"epoch": 1}]
    assert read_json_lines(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_weights_files_get_the_mode_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_weights({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~umask
