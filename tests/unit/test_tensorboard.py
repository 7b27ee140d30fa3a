"""TensorBoard event files, read back with TensorBoard's own reader, agree with metrics.jsonl, also
after a resume that replays steps the killed attempt had already logged."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from incubate.recipe.schema import DataCfg, TrainCfg
from incubate.data.loaders import load_data
from incubate.train.dist import Dist
from incubate.train.engine import fit
from incubate.families import get_family
from incubate.train.parallel import Trainee
from incubate.train.step import StageRun
from incubate.train.tblog import TAGS, Events, tensorboard_dir

DATA = DataCfg(source="digits", img_size=8, train_fraction=0.2)


def _fit(stage_dir: Path, epochs: int, **train):
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1,
                            num_heads=2, in_chans=1, num_classes=10)
    cfg = TrainCfg(epochs=epochs, batch_size=32, lr=2e-3, lr_base_batch=32, **train)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return fit(Trainee.whole(net, get_family("vit")), cfg, load_data(DATA), DATA, StageRun(Dist(), 0, stage_dir, "tb"))


def _scalars(folder: Path) -> dict:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(stage_dir: Path) -> list:
    return [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _check_against_metrics(events: dict, rows: list, result: dict, updates: int):
    assert set(TAGS) <= set(events)
    steps = [s for s, _ in events["train/loss"]]
    assert steps == list(range(1, updates * len(rows) + 1))          # every update once, in order
    for tag in TAGS:
        assert len({s for s, _ in events[tag]}) == len(events[tag]), tag   # no step twice
    for e, row in enumerate(rows):
        end = updates * (e + 1)
        assert events["eval/top1"][e] == (end, pytest.approx(row["test_top1"], rel=1e-6))
        assert events["eval/loss"][e] == (end, pytest.approx(row["test_loss"], rel=1e-6))
        assert events["train/epoch_loss"][e] == (end, pytest.approx(row["train_loss"], rel=1e-6))
        # the per-update losses of an epoch average to its train_loss (equal batches, no accumulation)
        losses = [v for s, v in events["train/loss"] if end - updates < s <= end]
        assert sum(losses) / len(losses) == pytest.approx(row["train_loss"], rel=1e-5)
        assert dict(events["train/lr"])[end] == pytest.approx(row["lr"], rel=1e-6)
    assert events["train/flops"][-1][1] == pytest.approx(result["flops"], rel=1e-6)
    assert all(v > 0 for _, v in events["train/samples_per_s"])
    assert all(0 < v < float("inf") for _, v in events["train/grad_norm"])


def test_events_match_metrics_jsonl(tmp_path):
    stage = tmp_path / "run" / "meta"
    result = _fit(stage, epochs=2)
    updates = len(load_data(DATA).train) // 32
    folder = tmp_path / "run" / "tensorboard" / "meta"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    _check_against_metrics(_scalars(folder), _rows(stage), result, updates)


def test_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    stage = tmp_path / "run" / "modules" / "1"
    _fit(stage, epochs=1, clip_grad=0.5)
    epoch1 = tmp_path / "checkpoint_after_epoch_1"
    shutil.copy(stage / "checkpoint.safetensors", epoch1)
    _fit(stage, epochs=2, clip_grad=0.5)              # resumes; logs the steps of epoch 2
    # killed after epoch 2 had logged its steps but before its checkpoint: back to epoch 1's
    shutil.copy(epoch1, stage / "checkpoint.safetensors")
    result = _fit(stage, epochs=2, clip_grad=0.5)     # replays epoch 2
    folder = tensorboard_dir(stage)
    assert folder == tmp_path / "run" / "tensorboard" / "module_1"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 3
    events = _scalars(folder)
    _check_against_metrics(events, _rows(stage), result, len(load_data(DATA).train) // 32)
    # with clipping on, the logged norm is clip_grad_norm_'s (before clipping: it may exceed 0.5)
    assert max(v for _, v in events["train/grad_norm"]) > 0.5


def test_tensorboard_false_writes_nothing(tmp_path):
    _fit(tmp_path / "run" / "e2e", epochs=1, tensorboard=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert len(_rows(tmp_path / "run" / "e2e")) == 1


def test_a_resumed_writer_in_the_same_second_sorts_after_the_stale_file(tmp_path):
    stage = tmp_path / "run" / "meta"
    folder = tensorboard_dir(stage)
    stale = Events(stage, True, 0, 1, 10)
    for step in range(1, 6):
        stale.writer.add_scalar("train/lr", 1.0, step)
    stale.close()
    # as if another process (a larger pid) had written it: its name sorts after ours in that second
    old = next(folder.glob("events.out.tfevents.*"))
    parts = old.name.split(".")
    old.rename(folder / ".".join(parts[:4] + [socket.gethostname(), "99999999", "0"]))
    resumed = Events(stage, True, 2, 1, 10)           # the checkpoint covers updates 1-2
    for step in (3, 4):
        resumed.writer.add_scalar("train/lr", 2.0, step)
    resumed.close()
    assert _scalars(folder)["train/lr"] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]


def test_a_stage_stopped_by_an_error_keeps_its_last_steps(tmp_path):
    # as when fit raises (a NaN loss): the process exits without closing the writer
    stage = tmp_path / "run" / "meta"
    code = ("import sys, time; from incubate.train.tblog import Events\n"
            f"ev = Events({str(stage)!r}, True, 0, 1, 10)\n"
            "for step in (1, 2, 3): ev.update(step, float(step), 32 * step, 0.0, None, 0.1)\n"
            "raise SystemExit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert [s for s, _ in _scalars(tensorboard_dir(stage))["train/lr"]] == [1, 2, 3]
