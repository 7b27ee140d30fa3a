"""Training checkpoints: a damaged one is detected, the previous one is kept and used, Ctrl-C rules."""
import errno
import os
import signal
from pathlib import Path

import pytest
import torch

from incubate.store import checkpoint, resume
from incubate.store.checkpoint import (load_training_state, previous_checkpoint, save_training_state, uninterrupted)
from incubate.train.dist import Dist
from incubate.errors import UserError


def _save(path, epoch, value):
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(value)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    save_training_state(path, model.state_dict(), opt, None, None, epoch,
                        {"seconds": 1.0, "num_updates": epoch + 1, "flops_per_step": 10})


def test_cut_short_or_changed_bytes_are_unreadable(tmp_path):
    ckpt = tmp_path / "checkpoint.safetensors"
    _save(ckpt, 0, 1.0)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-7])                       # cut short by a storage crash
    with pytest.raises(UserError, match="is unreadable"):
        load_training_state(ckpt)
    flipped = bytearray(data)
    flipped[-3] ^= 0x40                                # one bit of a tensor changed: the header still parses
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="do not match the digest"):
        load_training_state(ckpt)


def test_each_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint.safetensors"
    _save(ckpt, 0, 1.0)
    _save(ckpt, 1, 2.0)
    assert load_training_state(ckpt)[2]["epoch"] == 1
    assert load_training_state(previous_checkpoint(ckpt))[2]["epoch"] == 0


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.safetensors"
    _save(ckpt, 0, 1.0)
    _save(ckpt, 1, 2.0)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    model_state, _, meta = resume.load(ckpt, "meta", Dist())
    assert meta["epoch"] == 0 and torch.all(model_state["weight"] != 2.0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[meta] warning: training checkpoint {ckpt} is unreadable (")
    assert lines[0].endswith(f"and this stage resumes from the previous checkpoint {previous_checkpoint(ckpt)}")
    aside = list(tmp_path.glob("checkpoint.safetensors.damaged-*"))
    assert len(aside) == 1 and len(aside[0].read_bytes()) == 100          # kept for a look, not deleted
    assert load_training_state(ckpt)[2]["epoch"] == 0 and not previous_checkpoint(ckpt).exists()


def test_a_kill_between_the_two_renames_resumes_from_the_previous_one(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.safetensors"
    _save(ckpt, 0, 1.0)
    os.replace(ckpt, previous_checkpoint(ckpt))      # the new file never got its name
    assert resume.load(ckpt, "meta", Dist())[2]["epoch"] == 0
    assert capsys.readouterr().out == "" and ckpt.exists()


def test_no_readable_checkpoint_restarts_the_stage(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(b"garbage")
    assert resume.load(ckpt, "meta", Dist()) is None
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[meta] warning: training checkpoint {ckpt} is unreadable (")
    assert line.endswith("and no earlier checkpoint is readable: this stage restarts from scratch")
    assert not ckpt.exists() and len(list(tmp_path.glob("checkpoint.safetensors.damaged-*"))) == 1


def test_an_ignored_ctrl_c_stays_ignored_during_a_write():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)     # as in a background job of a script
    try:
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
        # no KeyboardInterrupt after the block: the process was told to ignore Ctrl-C
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_mid_epoch_position_goes_on_in_the_same_order_at_another_number_of_processes(tmp_path):
    from incubate.train.budget import Budget
    ranks = [{"loss_sum": 3.0, "seen": 6, "torch": "..."}, {"loss_sum": 5.0, "seen": 6, "torch": "..."}]
    meta = {"epoch": 1, "step": 4, "ranks": ranks, "seconds": 1.0, "num_updates": 6, "flops_per_step": 1}
    at_2, at_1 = Budget(3, 6, 6, 9), Budget(3, 12, 12, 18)      # micro-steps an epoch at 2 processes, at 1
    same = resume.position(meta, 2, at_2, 1)
    assert (same.step, same.num_updates, same.ranks, same.rescaled) == (4, 6, ranks, None)
    one = resume.position(meta, 1, at_1, 1)     # 2 ranks' 4 batches each: the permutation's first 8
    assert (one.step, one.num_updates, one.ranks, one.rescaled) == (8, 20, [{"loss_sum": 8.0, "seen": 12}], (2, 0))
    four = resume.position(dict(meta, step=3), 4, Budget(3, 2, 2, 6), 1)    # 6 batches: 1 update of 4, 2 read again
    assert (four.step, four.num_updates, four.rescaled) == (1, 3, (2, 2))
    assert four.ranks == [{"loss_sum": 3.0, "seen": 6}, {"loss_sum": 5.0, "seen": 6}] + [{"loss_sum": 0, "seen": 0}] * 2
    ended = resume.position({"epoch": 0, "seconds": 1.0, "num_updates": 6, "flops_per_step": 1, "world": 2}, 1,
                            at_1, 2)       # an epoch's end: the next epoch at 1 process's count of updates
    assert (ended.epoch, ended.step, ended.num_updates, ended.rescaled) == (1, 0, 6, (2, 0))


FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
from incubate.store import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # so the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoint._save_file({"a": torch.zeros(1 << 16)}, sys.argv[1])     # 256 KiB: past the limit
except OSError as e:
    print(e.errno, e.filename)
"""


def test_safetensors_write_failure_is_the_oserror_it_is(tmp_path):
    """safetensors reports a failed write as SafetensorError('... (os error 27)'): unless it is turned
    back into an OSError, a full disk prints a traceback instead of its one line. A file-size limit
    makes the kernel refuse the write (EFBIG) as a full disk would (ENOSPC), without root."""
    import subprocess
    import sys
    target = tmp_path / "w.safetensors"
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(target)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.stdout.split() == [str(errno.EFBIG), str(target)], proc.stderr
