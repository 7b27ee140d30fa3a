"""`incubate status RUN`: read-only, from another process while stages are being written."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from incubate.errors import UserError
from incubate.recipe.schema import load_recipe
from incubate.store.lock import read_holder
from incubate.store.rundir import write_run_recipe
from incubate.status import status
from ..conftest import ROOT, one_error_line, run_main, write_recipe

HOLD = """
import sys, time
from pathlib import Path
from incubate.store.lock import hold
hold(Path(sys.argv[1]), "meta")
print("held", flush=True)
time.sleep(120)
"""


def _new_run(tmp_path):
    run = tmp_path / "run"
    write_run_recipe(run, load_recipe(write_recipe(tmp_path / "r.yaml", meta__epochs=3)))
    return run


def _snapshot(run):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


def test_status_of_a_run_with_nothing_done(tmp_path, capsys):
    run = _new_run(tmp_path)
    rc, out, err = run_main(capsys, "status", run)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"run {run} (recipe tiny, K=4), as of ")
    assert [line.split()[-2:] for line in lines[1:]] == [["not", "started"]] * 8
    assert lines[2] == "  module 0   not started"


def test_status_of_a_stage_being_written_by_another_process(tmp_path, capsys):
    run = _new_run(tmp_path)
    (run / "meta").mkdir()
    writer = subprocess.Popen([sys.executable, "-c", HOLD, str(run / "meta")], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert writer.stdout.readline().strip() == "held"
        # what the writer's fit loop appends after an epoch
        (run / "meta/metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": 42.5, "seconds": 1.0}) + "\n")
        written = (run / "meta/metrics.jsonl").stat().st_mtime
        before = _snapshot(run)
        rows = status(run)
        out = capsys.readouterr().out
        assert _snapshot(run) == before                      # read-only: nothing written, nothing locked
        meta = rows[0]
        assert meta["state"] == "running" and meta["pid"] == writer.pid and meta["host"] == socket.gethostname()
        assert meta["started"] == read_holder(run / "meta/.lock")["started"]
        assert meta["epoch"] == 1 and meta["epochs"] == 3 and meta["written"] == written
        line = next(line for line in out.splitlines() if line.startswith("  meta "))
        assert "running" in line and "epoch 1/3 test top-1 42.50%, written " in line
        assert f"pid {writer.pid} on {socket.gethostname()}, started {meta['started']}" in line
        assert all(r["state"] == "not started" for r in rows[1:])
    finally:
        writer.kill()
        writer.wait()
    # the writer died: its stage is stopped, not running (the lock file still names it)
    meta = status(run)[0]
    assert meta["state"] == "stopped" and meta["epoch"] == 1
    assert "no process holds it: rerun to resume" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "checkpoint.prev.safetensors", "checkpoint.dcp",
                                  "checkpoint.prev.dcp"])
def test_a_stage_stopped_before_its_first_epoch_end_is_stopped_in_either_checkpoint_format(tmp_path, capsys, name):
    """Only a mid-epoch checkpoint on disk (a sharded folder under fsdp; the previous one alone after a
    kill between a save's renames): the stage is stopped, not "not started"; import-official refuses it."""
    from incubate.interop import _refuse_to_overwrite
    from incubate.store.rundir import StageDir
    run = _new_run(tmp_path)
    (run / "meta").mkdir()
    if name.endswith(".dcp"):
        (run / "meta" / name).mkdir()
        (run / "meta" / name / "state.json").write_text("{}")
    else:
        (run / "meta" / name).write_bytes(b"")
    meta = status(run)[0]
    assert meta["state"] == "stopped" and meta["epoch"] == 0
    assert "no epoch finished yet; no process holds it: rerun to resume" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"holds a meta model in training \\({name}\\); use a new --out"):
        _refuse_to_overwrite(StageDir(run, "meta"))


def test_status_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    rc, out, err = run_main(capsys, "status", tmp_path)
    assert rc == 2 and one_error_line(err) == (
        f"incubate: error: {tmp_path} is not a run directory (no recipe.yaml); pass the --out of a run")


def test_status_of_a_stage_held_on_another_node(tmp_path, capsys):
    run = _new_run(tmp_path)
    (run / "modules/2").mkdir(parents=True)
    (run / "modules/2/.lock").write_text("4242\nnode7\n2026-11-28T20:00:00\n")
    row = status(run)[3]
    assert row["stage"] == "module 2" and row["state"] == "running" and row["host"] == "node7"
    assert "pid 4242 on node7, started 2026-11-28T20:00:00 (another host: not checked from here" in \
        capsys.readouterr().out


@pytest.mark.parametrize("command", ["status", "report"])
def test_output_into_a_closed_pipe_stops_quietly(tmp_path, command):
    """`incubate status RUN | true`: the reader is gone before the first line; no error line, no traceback."""
    run = _new_run(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "incubate.cli", command, str(run)], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    finally:
        os.close(write_end)
    assert proc.returncode in (0, 141) and proc.stderr == "", (proc.returncode, proc.stderr)

