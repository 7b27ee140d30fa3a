"""Bad input: one line, a non-zero exit, no traceback, no good checkpoint lost (docs/errors.md)."""
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from incubate.store import checkpoint
from incubate.store.checkpoint import load_training_state
from incubate.store.lock import read_holder
from ..conftest import PROCESS_TIMEOUT_S, ROOT, default_signals, make_image_folder, one_error_line, run_main, write_recipe


def _meta(capsys, recipe, run, *sets):
    return run_main(capsys, "meta", "--recipe", recipe, "--out", run, *sum((["--set", s] for s in sets), []))


# ---------------------------------------------------------------- recipe

@pytest.mark.parametrize("sets, expected", [
    (["model.division=[2,1]"], "model.division [2, 1] sums to 3 blocks but model.kwargs.depth is 4; make them agree"),
    (["model.division=[1,1,1,1,1]"], "model.division has 5 modules but the target has only 4 blocks "
                                     "(model.kwargs.depth); K can be at most the depth: use fewer modules"),
    (["train.epochs=ten"], "recipe key 'train.epochs' must be of type int, got 'ten'; fix the recipe or the --set value"),
    (["data.on_bad_image=ignore"], "data.on_bad_image must be stop or skip, got 'ignore'"),
], ids=["division_not_depth", "k_larger_than_depth", "wrong_type", "bad_on_bad_image"])
def test_recipe_values_refused(tmp_path, capsys, sets, expected):
    recipe = write_recipe(tmp_path / "r.yaml")
    rc, _, err = _meta(capsys, recipe, tmp_path / "run", *sets)
    assert rc == 2 and one_error_line(err) == f"incubate: error: {expected}"
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    (tmp_path / "file").write_text("a file, not a folder")
    rc, _, err = _meta(capsys, recipe, tmp_path / "file/run")
    assert rc == 2 and one_error_line(err) == (f"incubate: error: cannot write the run directory {tmp_path}/file/run: "
                                               f"Not a directory; choose a writable --out")


# ---------------------------------------------------------------- image folders

def _folder_recipe(tmp_path, data, **changes):
    return write_recipe(tmp_path / "r.yaml", data__source=f"imagefolder:{data}", data__train_fraction=1.0,
                        data__augment={}, train__batch_size=4, meta__epochs=1, **changes)


def test_empty_class_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    (data / "train/c").mkdir()
    rc, _, err = _meta(capsys, _folder_recipe(tmp_path, data), tmp_path / "run")
    assert rc == 2 and f"class folder {data}/train/c holds no images (" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_train_and_val_classes_differ(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", val=("a", "z"))
    rc, _, err = _meta(capsys, _folder_recipe(tmp_path, data), tmp_path / "run")
    assert rc == 2 and one_error_line(err) == (f"incubate: error: {data}/train and {data}/val have different classes "
                                               f"(e.g. ['b', 'z']); both need the same class folders")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_stops_and_names_the_file(tmp_path, capsys, workers):
    data = make_image_folder(tmp_path / "data")
    (data / "train/b/1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rc, _, err = _meta(capsys, _folder_recipe(tmp_path, data, data__num_workers=workers), tmp_path / "run")
    line = one_error_line(err)
    assert rc == 2 and f"image {data}/train/b/1.png is unreadable (cannot identify image file)" in line
    assert line.endswith("remove or replace it, or set data.on_bad_image: skip")


def test_corrupt_image_skipped_and_counted(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    (data / "train/b/1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    recipe = _folder_recipe(tmp_path, data, data__on_bad_image="skip")
    rc, out, err = _meta(capsys, recipe, tmp_path / "run")
    assert rc == 0, err
    assert f"[meta] epoch 1: skipped 1 unreadable images (data.on_bad_image: skip), e.g. {data}/train/b/1.png" in out
    row = json.loads((tmp_path / "run/meta/metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped_images"] == 1


# ---------------------------------------------------------------- checkpoints

def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    ckpt = run / "meta/checkpoint.safetensors"
    real, state = checkpoint.save_file, {}

    def full_disk(tensors, filename, metadata=None):
        if ckpt.exists():     # the second epoch's checkpoint: half written, then the disk is full
            state["before"] = ckpt.read_bytes()
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    rc, _, err = _meta(capsys, recipe, run)
    assert rc == 2 and one_error_line(err) == (
        f"incubate: error: cannot write {ckpt}: No space left on device; the previous checkpoint.safetensors "
        f"(if any) is kept intact; free disk space or fix permissions, then rerun the same command")
    assert ckpt.read_bytes() == state["before"] and load_training_state(ckpt)[2]["epoch"] == 0
    assert not list(ckpt.parent.glob("*.tmp"))
    monkeypatch.undo()
    rc, out, err = _meta(capsys, recipe, run)
    assert rc == 0 and "resuming after epoch 1/2" in out


def test_disk_full_while_appending_metrics(tmp_path, capsys, monkeypatch):
    import builtins
    recipe = write_recipe(tmp_path / "r.yaml")
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    rc, _, err = _meta(capsys, recipe, tmp_path / "run")
    monkeypatch.undo()
    assert rc == 2 and one_error_line(err) == (
        f"incubate: error: {tmp_path}/run/meta/metrics.jsonl: No space left on device; checkpoints already on "
        f"disk are intact: fix this, then rerun the same command (--debug shows where)")


def test_unreadable_training_checkpoint_restarts_the_stage_and_is_kept(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    ckpt = tmp_path / "run/meta/checkpoint.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"garbage")
    rc, out, err = _meta(capsys, recipe, tmp_path / "run")
    warnings = [l for l in out.splitlines() if "warning" in l]
    assert rc == 0 and err == "" and len(warnings) == 1, out + err
    assert warnings[0].startswith(f"[meta] warning: training checkpoint {ckpt} is unreadable (SafetensorError: ")
    assert warnings[0].endswith("no earlier checkpoint is readable: this stage restarts from scratch")
    assert [p.read_bytes() for p in ckpt.parent.glob("checkpoint.safetensors.damaged-*")] == [b"garbage"]
    assert json.loads((tmp_path / "run/meta/manifest.json").read_text())["finished"] is True


def test_read_only_file_system_while_saving(tmp_path, capsys, monkeypatch):
    def read_only(tensors, filename, metadata=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))     # remounted read-only after a storage error

    monkeypatch.setattr(checkpoint, "save_file", read_only)
    rc, _, err = _meta(capsys, write_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    ckpt = tmp_path / "run/meta/checkpoint.safetensors"
    assert rc == 2 and one_error_line(err) == (
        f"incubate: error: cannot write {ckpt}: the file system holding it is read-only (mounted read-only, or "
        f"remounted read-only after a storage error); files already there are intact: remount it read-write or "
        f"copy the run directory to writable storage and pass that as --out, then rerun the same command")


def _can_mount():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces (unshare -m) to mount a read-only tmpfs")
def test_resume_on_a_read_only_file_system(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", meta__epochs=3)
    src = tmp_path / "src"
    _poison(monkeypatch, lambda: (src / "meta/checkpoint.safetensors").exists())
    assert _meta(capsys, recipe, src)[0] == 2      # stopped in epoch 2: a checkpoint to resume from
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in (src / "meta").iterdir()}
    ro = tmp_path / "ro"
    ro.mkdir()
    # a private mount namespace: the read-only tmpfs exists for this one command only
    script = (f"mount -t tmpfs -o size=32m tmpfs {ro} && cp -a {src}/. {ro}/ && mount -o remount,ro {ro} && "
              f"{sys.executable} -m incubate.cli meta --recipe {recipe} --out {ro}; rc=$?; "
              f"cmp -s {ro}/meta/checkpoint.safetensors {src}/meta/checkpoint.safetensors || exit 99; exit $rc")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 2 and one_error_line(proc.stderr) == (
        f"incubate: error: cannot write {ro}/meta/.lock: the file system holding it is read-only (mounted "
        f"read-only, or remounted read-only after a storage error); files already there are intact: remount it "
        f"read-write or copy the run directory to writable storage and pass that as --out, then rerun the same "
        f"command")
    assert {p.name: p.read_bytes() for p in (src / "meta").iterdir()} == before


def _fill_a_tmpfs_then_rerun(tmp_path, size: str, filler: str, args: str, after_fill="", after_rerun="") -> dict:
    """In a private mount namespace (the tmpfs exists for this one script only, so what the test needs of it
    is copied or listed out by `after_fill` / `after_rerun`): a tmpfs of `size` at tmp_path/mnt, and
    tests/integration/disk_filler.py (mode `filler`) running `incubate ARGS` until the disk is full, then again
    with the space back, in one process. Returns tmp_path/out's files: 1.rc, 1.err, 2.rc, 2.out, 2.err and any other."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 98; exec {sys.executable} -m "
              f"tests.integration.disk_filler {filler} {mnt}/filler {out} {shlex.quote(after_fill or ':')} "
              f"{shlex.quote(after_rerun or ':')} {args}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_text() for p in out.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces (unshare -m) to mount a small tmpfs")
def test_real_disk_full_while_saving_keeps_the_previous_checkpoint_and_resumes(tmp_path):
    """A tmpfs of a few MB, filled up while epoch 2's checkpoint is being written: the kernel's own ENOSPC."""
    recipe = write_recipe(tmp_path / "r.yaml")
    mnt, full = tmp_path / "mnt", tmp_path / "when_full"
    read = _fill_a_tmpfs_then_rerun(tmp_path, "4m", "checkpoint", f"meta --recipe {recipe} --out {mnt}/run",
                                    after_fill=f"cp -a {mnt}/run {full}")
    ckpt = mnt / "run/meta/checkpoint.safetensors"
    assert read["1.rc"].strip() == "2" and one_error_line(read["1.err"]) == (
        f"incubate: error: cannot write {ckpt}: No space left on device; the previous checkpoint.safetensors "
        f"(if any) is kept intact; free disk space or fix permissions, then rerun the same command")
    assert load_training_state(full / "meta/checkpoint.safetensors")[2]["epoch"] == 0     # epoch 1's, readable
    assert not list((full / "meta").glob("*.tmp"))
    assert read["2.rc"].strip() == "0" and "resuming after epoch 1/2" in read["2.out"], read


@pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces (unshare -m) to mount a small tmpfs")
def test_real_disk_full_while_writing_the_token_cache_leaves_no_entry_and_a_rerun_builds_it(tmp_path, capsys):
    """data.cache_dir on a 1 MB tmpfs, filled up while a module stage writes the cache's train.bin."""
    from .test_lm_tokens import token_recipe
    recipe = token_recipe(tmp_path, updates={"meta": 4, "incubate": 2, "finetune": 2})
    run, mnt, out = tmp_path / "run", tmp_path / "mnt", tmp_path / "out"
    assert run_main(capsys, "meta", "--recipe", recipe, "--out", run)[0] == 0     # with its own RUN/token_cache
    before = {p.name: p.read_bytes() for p in (run / "meta").iterdir() if p.name != ".lock"}
    args = f"incubate --recipe {recipe} --out {run} --module 0 --set data.cache_dir={mnt}/cache"
    read = _fill_a_tmpfs_then_rerun(tmp_path, "1m", "token_cache", args, after_fill=f"ls -A {mnt}/cache >{out}/1.ls",
                                    after_rerun=f"ls -A {mnt}/cache >{out}/2.ls")
    entries = read["2.ls"].split()
    assert read["2.rc"].strip() == "0" and len([e for e in entries if not e.startswith(".")]) == 1, read
    entry = mnt / "cache" / next(e for e in entries if not e.startswith("."))
    assert read["1.rc"].strip() == "2" and one_error_line(read["1.err"]) == (
        f"incubate: error: cannot write the token cache {entry}: No space left on device; free space or choose a "
        f"writable data.cache_dir, then rerun")
    assert all(e.startswith(".") for e in read["1.ls"].split()), read["1.ls"]    # no entry, no partial folder
    assert {p.name: p.read_bytes() for p in (run / "meta").iterdir() if p.name != ".lock"} == before
    assert json.loads((run / "modules/0/manifest.json").read_text())["finished"] is True


def test_evaluate_checkpoint_of_another_architecture(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    assert _meta(capsys, recipe, run, "meta.epochs=0")[0] == 0
    path = run / "meta/manifest.json"
    m = json.loads(path.read_text())
    m["model"]["kwargs"]["embed_dim"] = 32
    m["model"]["kwargs"]["num_heads"] = 4
    path.write_text(json.dumps(m))
    rc, _, err = run_main(capsys, "evaluate", "--recipe", recipe, "--checkpoint", run / "meta")
    line = one_error_line(err)
    assert rc == 2 and line == (
        f"incubate: error: {run}/meta/model.safetensors holds weights of another architecture than its manifest's "
        f"model (vit_tiny_patch16_224): 55 of another shape (e.g. cls_token (1, 1, 16) vs (1, 1, 32)); "
        f"check model.name, model.kwargs and the division")


# ---------------------------------------------------------------- non-finite loss

def _poison(monkeypatch, when):
    """Make the training loss NaN whenever when() is true (the loss class fit() asks timm for)."""
    import timm.loss

    class Poisoned(timm.loss.LabelSmoothingCrossEntropy):
        def forward(self, x, target):
            loss = super().forward(x, target)
            return loss * float("nan") if when() else loss

    monkeypatch.setattr(timm.loss, "LabelSmoothingCrossEntropy", Poisoned)


def test_nan_loss_stops_names_the_step_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", meta__epochs=3)
    ckpt = tmp_path / "run/meta/checkpoint.safetensors"
    _poison(monkeypatch, lambda: ckpt.exists())
    rc, _, err = _meta(capsys, recipe, tmp_path / "run")
    assert rc == 2 and one_error_line(err) == (
        f"incubate: error: meta: loss became nan at epoch 2 step 1; stopped, the last good checkpoint {ckpt} is "
        f"kept (rerun resumes from it); lower the lr, set clip_grad (e.g. --set train.clip_grad=1.0), use bf16 "
        f"instead of fp16, or allow a few bad steps with --set train.max_nonfinite_skips=N")
    assert load_training_state(ckpt)[2]["epoch"] == 0
    assert json.loads((tmp_path / "run/meta/manifest.json").read_text())["finished"] is False


def test_nan_loss_skipped_within_max_nonfinite_skips(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml")
    seen = []
    _poison(monkeypatch, lambda: seen.append(1) or len(seen) == 5)
    rc, out, err = _meta(capsys, recipe, tmp_path / "run", "train.max_nonfinite_skips=1")
    assert rc == 0, err
    assert "[meta] warning: loss is nan at epoch 1 step 4; skipping this update (1/1 allowed" in out
    assert json.loads((tmp_path / "run/meta/manifest.json").read_text())["finished"] is True


# ---------------------------------------------------------------- processes

@pytest.mark.slow
def test_second_writer_refused_then_ctrl_c_exits_cleanly(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", meta__epochs=500)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "incubate.cli", "meta", "--recipe", str(recipe), "--out", str(run)],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        metrics = run / "meta/metrics.jsonl"
        deadline = time.time() + 300      # a loaded machine: the start alone can take a minute
        while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        # two processes writing the same stage: the second is refused, naming the first
        rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", run)
        holder = read_holder(run / "meta/.lock")
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
        assert rc == 2 and one_error_line(err) == (
            f"incubate: error: meta of run directory {run} is being written by process {proc.pid} on "
            f"{holder['host']} (since {holder['started']}) (lock {run}/meta/.lock); wait for it to finish, "
            f"or stop it, or use another --out")
        # Ctrl-C, three times quickly: exit 130 with one line (no KeyboardInterrupt traceback from the
        # presses that land in the clean-up); the checkpoint on disk is complete
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.02)
        assert proc.wait(timeout=180) == 130
        assert proc.stderr.read().strip() == ("incubate: interrupted; the last complete checkpoint is kept, "
                                              "rerun the same command to resume")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert load_training_state(run / "meta/checkpoint.safetensors")[2]["epoch"] >= 0
    assert not list((run / "meta").glob("*.tmp"))


def test_ctrl_c_during_a_write_finishes_it_first(tmp_path, monkeypatch):
    real = checkpoint.save_file

    def interrupted(tensors, filename, metadata=None):
        os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C arrives in the middle of the write
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    # Ctrl-C as in a foreground shell, however pytest was started (a background job ignores it, and
    # incubate then keeps ignoring it: K test_an_ignored_ctrl_c_stays_ignored_during_a_write)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_weights({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_file(tmp_path / "w.safetensors")["w"].tolist() == [1.0, 1.0, 1.0]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_finished_stage_is_released_so_another_process_can_skip_it(tmp_path, capsys):
    from ..conftest import cli
    recipe = write_recipe(tmp_path / "r.yaml", meta__epochs=1)
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run")
    assert rc == 0, err
    # this (test) process is still alive: the finished stage must not stay locked by it
    proc = cli("meta", "--recipe", recipe, "--out", tmp_path / "run")
    assert proc.returncode == 0 and "[meta] already finished" in proc.stdout, proc.stderr


def test_every_training_image_unreadable_with_skip_is_one_line(tmp_path, capsys):
    """data.on_bad_image: skip with nothing left to read: the first batch, read to count a step's
    FLOPs, finds none; one line instead of a StopIteration's traceback, and nothing written."""
    data = make_image_folder(tmp_path / "data")
    for f in (data / "train").rglob("*.png"):
        f.write_bytes(b"not an image")
    recipe = _folder_recipe(tmp_path, data, data__on_bad_image="skip")
    rc, out, err = _meta(capsys, recipe, tmp_path / "run")
    assert rc == 2 and one_error_line(err).startswith(
        "incubate: error: meta: no batch of the training data is readable (data.on_bad_image: skip left none)"), err
    assert not (tmp_path / "run/meta/checkpoint.safetensors").exists()
