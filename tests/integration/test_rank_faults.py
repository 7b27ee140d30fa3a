"""One rank fails, every rank stops: 2 gloo processes, only rank 1 meets the fault.

The two processes are started directly (the environment torchrun would give them), without
torchrun's agent, which would otherwise kill the survivor itself: this checks that the ranks stop
on their own, within seconds, with one line on rank 0 and nothing on rank 1.
"""
import json
import os
import subprocess
import sys
import time

from pathlib import Path

import pytest

from incubate.launchers import free_port
from ..conftest import ROOT, make_image_folder, write_recipe

STOP_SECONDS = 60       # every rank gone this soon after the fault; without the agreement: the 30-minute gloo timeout


def _start(tmp_path, recipe, fault):
    port, stamp = free_port(), tmp_path / "fault_time"
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.integration.rank_fault", fault, str(stamp), "meta",
                                       "--recipe", str(recipe), "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs, stamp


def _wait(procs, timeout=240):
    ended, deadline = {}, time.time() + timeout
    try:
        while len(ended) < len(procs) and time.time() < deadline:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [p.communicate() for p in procs]
    assert len(ended) == len(procs), f"a rank was still running after {timeout}s: {outs}"
    return ended, outs


def gloo_gone(stamp):
    """No rank still runs gloo's threads when the CLI returns: a failing rank's traceback holds its
    DDP model (and so the group) in a reference cycle, and gloo's threads then die in interpreter
    finalization, where they aborted rank 1 now and then ("terminate called without an active exception")."""
    assert [Path(f"{stamp}.threads.{r}").read_text() for r in (0, 1)] == ["", ""]


def _check(procs, ended, outs, expected_in_line):
    (out0, err0), (out1, err1) = outs
    assert procs[0].returncode == 2 and procs[1].returncode == 2, outs
    lines = [l for l in err0.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("incubate: error: rank 1 of 2 failed at epoch 1 step "), err0
    assert expected_in_line in lines[0] and "every rank stopped" in lines[0], lines[0]
    assert "Traceback" not in err0 and err1.strip() == "", err1
    return lines[0]


@pytest.mark.parametrize("fault, expected", [
    ("nan", "loss became nan at epoch 1 step 2 on rank 1 of 2"),
    ("raise", "RuntimeError: injected fault on rank 1"),
])
def test_one_rank_nan_or_exception_stops_every_rank(tmp_path, fault, expected):
    recipe = write_recipe(tmp_path / "r.yaml", train__batch_size=16, meta__epochs=1)
    procs, stamp = _start(tmp_path, recipe, fault)
    ended, outs = _wait(procs)
    if fault == "nan":      # the NaN is agreed on by every rank: rank 0 names it as its own error line
        err0 = outs[0][1]
        assert procs[0].returncode == 2 and procs[1].returncode == 2, outs
        lines = [l for l in err0.splitlines() if l.strip()]
        assert len(lines) == 1 and f"incubate: error: meta: {expected}" in lines[0], err0
        assert outs[1][1].strip() == "", outs[1][1]
    else:
        _check(procs, ended, outs, expected)
    assert [Path(f"{stamp}.group.{r}").read_text() for r in (0, 1)] == ["left", "left"]   # a gloo group: left
    gloo_gone(stamp)
    seconds = max(ended.values()) - float(stamp.read_text())
    print(f"{fault}: every rank stopped {seconds:.2f}s after rank 1 met the fault")
    assert seconds < STOP_SECONDS


@pytest.mark.parametrize("fault, expected", [
    ("backward", "rank 1 of 2 failed at epoch 1 step 2, in backward: RuntimeError: injected fault in backward "
                 "on rank 1"),
    ("step", "rank 1 of 2 failed at epoch 1 step 2, in the optimizer step: RuntimeError: injected fault in "
             "optimizer.step on rank 1"),
    ("nangrad", "meta: the gradient norm became nan at epoch 1 step 2; stopped"),
])
def test_a_fault_in_backward_or_the_optimizer_step_stops_every_rank_and_keeps_the_checkpoint(tmp_path, fault,
                                                                                              expected):
    """Where DDP's collectives run (backward's all-reduce) and after it (the optimizer step): every
    rank still stops with one line, and the checkpoint saved after update 1 is the one left."""
    from incubate.store.checkpoint import load_training_state
    recipe = write_recipe(tmp_path / "r.yaml", train__batch_size=16, train__checkpoint_every=1, meta__epochs=1)
    procs, stamp = _start(tmp_path, recipe, fault)
    ended, outs = _wait(procs)
    (_, err0), (_, err1) = outs
    assert [p.returncode for p in procs] == [2, 2], outs
    lines = [l for l in err0.splitlines() if l.strip()]
    ckpt = tmp_path / "run/meta/checkpoint.safetensors"
    assert len(lines) == 1 and lines[0].startswith(f"incubate: error: {expected}"), err0
    assert f"the last good checkpoint {ckpt} is kept" in lines[0] and err1.strip() == "", outs
    assert load_training_state(ckpt)[2]["step"] == 1      # saved after update 1; nothing written after the fault
    assert [Path(f"{stamp}.group.{r}").read_text() for r in (0, 1)] == ["left", "left"]
    gloo_gone(stamp)
    seconds = max(ended.values()) - float(stamp.read_text())
    print(f"{fault}: every rank stopped {seconds:.2f}s after rank 1 met the fault")
    assert seconds < STOP_SECONDS


def test_one_rank_unreadable_image_stops_every_rank(tmp_path):
    from incubate.recipe.schema import load_recipe
    from incubate.data.loaders import Reader, epoch_order, load_data
    data = make_image_folder(tmp_path / "data", per_class=8)
    recipe = write_recipe(tmp_path / "r.yaml", data__source=f"imagefolder:{data}", data__train_fraction=1.0,
                          data__augment={}, train__batch_size=2, meta__epochs=1)
    split = load_data(load_recipe(recipe).data).train
    rank1 = epoch_order(len(split), 0, Reader(2, True, 0, 1, 2)).tolist()
    bad = split.files[rank1[2]]     # rank 1's second batch (its first is read to count FLOPs)
    bad.write_bytes(b"not an image")
    procs, stamp = _start(tmp_path, recipe, "none")
    ended, outs = _wait(procs)
    line = _check(procs, ended, outs, f"image {bad} is unreadable")
    gloo_gone(stamp)
    spread = abs(ended[0] - ended[1])
    print(f"image: {line}; the ranks exited {spread:.2f}s apart")
    assert spread < STOP_SECONDS


# the same on success, every rank leaving the group itself: test_killed_ranks.py (its torchrun reference)


def test_a_rank_whose_shard_lost_a_whole_batch_ends_the_epoch_with_the_others(tmp_path):
    """data.on_bad_image: skip drops rank 1's last batch (both its images unreadable), so rank 1 has
    one batch fewer than rank 0: it steps on a stand-in while rank 0 trains its last batch (DDP's
    all-reduce still meets), the ranks agree that one ran out, and both end the epoch there without
    that window's update, as one process drops a partial window. Without it rank 1 leaves the epoch
    while rank 0 waits in backward's all-reduce."""
    from incubate.recipe.schema import load_recipe
    from incubate.data.loaders import Reader, epoch_order, load_data
    data = make_image_folder(tmp_path / "data", per_class=8)
    recipe = write_recipe(tmp_path / "r.yaml", data__source=f"imagefolder:{data}", data__train_fraction=1.0,
                          data__augment={}, data__on_bad_image="skip", train__batch_size=2,
                          train__eval_every=10_000, meta__epochs=1)
    split = load_data(load_recipe(recipe).data).train
    rank1 = epoch_order(len(split), 0, Reader(2, True, 0, 1, 2)).tolist()
    bad = [split.files[i] for i in rank1[-2:]]      # rank 1's last batch, both its images
    for f in bad:
        f.write_bytes(b"not an image")
    procs, stamp = _start(tmp_path, recipe, "none")
    ended, outs = _wait(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = [json.loads(line) for line in (tmp_path / "run/meta/metrics.jsonl").read_text().splitlines()]
    epoch_rows, eval_rows = [r for r in rows if "kind" not in r], [r for r in rows if r.get("kind") == "eval"]
    assert [r["epoch"] for r in epoch_rows] == [1] and epoch_rows[0]["skipped_images"] == 2, rows   # rank 1's, counted
    assert [r["update"] for r in eval_rows] == [len(rank1) // 2 - 1], rows     # the lost batch's window not applied
    assert "epoch 1: skipped 2 unreadable images" in outs[0][0] and outs[1][0] == "", outs
    gloo_gone(stamp)
