"""Mid-epoch checkpoints (train.checkpoint_every): stopped after one, resumed, bitwise the uninterrupted run."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from incubate.store import resume
from incubate.store.checkpoint import load_training_state, previous_checkpoint
from incubate.recipe.schema import AugmentCfg, DataCfg, TrainCfg
from incubate.data.loaders import load_data
from incubate.train.dist import Dist
from incubate.train.engine import fit
from incubate.families import get_family
from incubate.train.parallel import Trainee
from incubate.train.step import StageRun


class Stop(Exception):
    """Stands for a kill right after a checkpoint reached the disk."""


def _model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                             in_chans=1, num_classes=10, drop_path_rate=0.2)


def _fit(stage_dir, per_image):
    aug = AugmentCfg(shift=1, hflip=True, re_prob=0.5 if per_image else 0.0)
    data = DataCfg(source="digits", img_size=8, train_fraction=0.1, augment=aug)
    # drop-path (torch RNG), mixup (numpy RNG), shift/flip or random erasing (per batch or per image),
    # accumulation: everything the rest of an epoch draws from an RNG or carries from step to step
    cfg = TrainCfg(epochs=2, batch_size=16, accum_steps=2, lr=2e-3, lr_base_batch=32, mixup=0.2,
                   checkpoint_every=2, warmup_epochs=0)
    net = _model()
    stage_dir.mkdir(exist_ok=True)
    fit(Trainee.whole(net, get_family("vit")), cfg, load_data(data), data, StageRun(Dist(), 3, stage_dir, "t"))
    return net


@pytest.mark.parametrize("per_image", [False, True], ids=["batched", "per_image"])
def test_mid_epoch_checkpoint_resumes_bitwise(tmp_path, monkeypatch, capsys, per_image):
    reference = _fit(tmp_path / "a", per_image).state_dict()

    real, saves = resume.save_training_state, []

    def stop_after_second_mid_epoch_save(path, *args):
        real(path, *args)
        if args[-1].get("step") is not None:
            saves.append(args[-1]["step"])
            if len(saves) == 2:     # 8 micro-steps, 4 updates an epoch: one mid-epoch save each
                raise Stop

    monkeypatch.setattr(resume, "save_training_state", stop_after_second_mid_epoch_save)
    with pytest.raises(Stop):
        _fit(tmp_path / "b", per_image)
    monkeypatch.undo()
    ckpt = tmp_path / "b/checkpoint.safetensors"
    meta = load_training_state(ckpt)[2]
    assert (meta["epoch"], meta["step"]) == (1, 4) and saves == [4, 4]
    assert load_training_state(previous_checkpoint(ckpt))[2].get("step") is None     # epoch 1's end, kept as fallback
    capsys.readouterr()
    resumed = _fit(tmp_path / "b", per_image).state_dict()
    assert f"[t] resuming in epoch 2/2 after step 4/8 from {ckpt}" in capsys.readouterr().out
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    rows = [[json.loads(l)["train_loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == 2      # the running loss of epoch 2 carried over exactly


def test_checkpoint_minutes_saves_inside_the_epoch(tmp_path, monkeypatch):
    data = DataCfg(source="digits", img_size=8, train_fraction=0.1)
    cfg = TrainCfg(epochs=1, batch_size=16, lr=2e-3, lr_base_batch=32, checkpoint_minutes=1e-9, warmup_epochs=0)
    real, steps = resume.save_training_state, []

    def record(path, *args):
        steps.append(args[-1].get("step"))
        real(path, *args)

    monkeypatch.setattr(resume, "save_training_state", record)
    net = _model()
    fit(Trainee.whole(net, get_family("vit")), cfg, load_data(data), data, StageRun(Dist(), 0, tmp_path, "t"))
    assert steps == list(range(1, 8)) + [None]     # after every update but the epoch's last, then the epoch's end
    assert load_file(tmp_path / "checkpoint.safetensors").keys()
