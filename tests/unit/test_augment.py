"""Repeated augmentation (DeiT's RASampler) on both data paths, and the per-image path's transform keys."""
from collections import Counter
from pathlib import Path

import pytest
import torch

from incubate.recipe.schema import DataCfg, load_recipe
from incubate.data.loaders import Loader, Reader, epoch_order, load_data
from incubate.errors import UserError

from ..conftest import make_image_folder

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _orders(n, world, batch, repeats, seed=0, epoch=0):
    return [epoch_order(n, epoch, Reader(batch, True, seed, r, world), repeats).tolist() for r in range(world)]


@pytest.mark.parametrize("n, world, batch", [(48, 3, 4), (50, 2, 4), (40, 1, 8)])
def test_repeated_aug_counts_copies_on_different_ranks_and_epoch_length(n, world, batch):
    plain, rep = _orders(n, world, batch, 1), _orders(n, world, batch, 3)
    usable = (n // (batch * world)) * batch * world
    # the epoch keeps the length it has without repeats (DeiT: the dataset's length), on every rank
    assert [len(o) for o in rep] == [len(o) for o in plain] == [usable // world] * world
    # dealt back in order, the ranks' lists are the permutation with each index 3 times in a row, cut
    merged = [rep[p % world][p // world] for p in range(usable)]
    perm = epoch_order(n, 0, Reader(n, True, 0, 0, 1)).tolist()          # the same seeded permutation, whole
    assert merged == [i for i in perm for _ in range(3)][:usable]
    counts = Counter(merged)
    assert sorted(counts.values())[1:] == [3] * (len(counts) - 1)   # only the one cut at the end has fewer
    assert len(counts) == -(-usable // 3)                           # about n / 3 distinct images an epoch
    # the copies of one image go to min(3, world) different ranks
    for i, c in counts.items():
        if c == 3:
            assert len({r for r in range(world) if i in rep[r]}) == min(3, world)


def test_repeated_aug_reshuffles_every_epoch_and_replays_for_the_same_seed_and_epoch():
    a0, a1 = _orders(96, 2, 8, 3, epoch=0), _orders(96, 2, 8, 3, epoch=1)
    assert a0 != a1 and all(x != y for x, y in zip(a0, a1))       # every rank gets a new order
    assert _orders(96, 2, 8, 3, epoch=1) == a1                      # a resumed run replays it
    assert _orders(96, 2, 8, 3, seed=1, epoch=1) != a1
    # over the epochs every image comes round (each epoch sees about a third of them)
    seen = {i for e in range(10) for o in _orders(96, 2, 8, 3, epoch=e) for i in o}
    assert len(seen) > 0.9 * 96


def test_repeated_aug_off_is_the_order_runs_had_before():
    g = torch.Generator().manual_seed(5 * 100_003 + 2)
    perm = torch.randperm(100, generator=g)
    for rank in range(2):
        assert torch.equal(epoch_order(100, 2, Reader(8, True, 5, rank, 2)), perm[:96][rank::2])


def _digits(**aug):
    cfg = DataCfg(source="digits", img_size=8, train_fraction=0.2, repeated_aug=3)
    for k, v in aug.items():
        setattr(cfg.augment, k, v)
    return cfg, load_data(cfg)


def test_repeated_aug_in_the_batched_loader_gives_each_copy_its_own_augmentation():
    cfg, bundle = _digits(shift=2, hflip=True)
    loader = Loader(bundle, bundle.train, cfg, Reader(12, True, 0, 0, 1, "cpu"))
    assert not loader.per_image and len(loader) == len(bundle.train) // 12
    torch.manual_seed(0)
    x, y = next(iter(loader.epoch(0)))
    idx = epoch_order(len(bundle.train), 0, Reader(12, True, 0, 0, 1), 3)[:12]
    assert torch.equal(y, bundle.train.labels[idx]) and idx[0] == idx[1] == idx[2]
    assert not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))   # three draws, not one image thrice


def test_repeated_aug_in_the_per_image_loader_replays_and_draws_per_copy():
    cfg, bundle = _digits(auto_augment="rand-m9-mstd0.5")          # forces the per-image DataLoader
    loader = Loader(bundle, bundle.train, cfg, Reader(12, True, 0, 0, 1, "cpu"))
    assert loader.per_image
    sampler = loader.dataloader().sampler
    sampler.set_epoch(1)
    items = list(sampler)
    assert [i for i, _ in items] == epoch_order(len(bundle.train), 1, Reader(12, True, 0, 0, 1), 3).tolist()
    assert items[0][0] == items[1][0] == items[2][0] and len({s for _, s in items[:3]}) == 3
    sampler.set_epoch(2)
    assert [i for i, _ in sampler] != [i for i, _ in items]
    fresh = Loader(bundle, bundle.train, cfg, Reader(12, True, 0, 0, 1, "cpu"))   # a resumed run asks for epoch 1 only
    xa, ya = next(iter(loader.epoch(1)))
    xb, yb = next(iter(fresh.epoch(1)))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_paper_imagenet_recipes_use_repeated_aug_3():
    for name in ("base", "large", "huge"):
        assert load_recipe(RECIPES / f"imagenet_vit_{name}.yaml").data.repeated_aug == 3


def _folder_transforms(tmp_path, **aug):
    root = make_image_folder(tmp_path / "data")
    cfg = DataCfg(source=f"imagefolder:{root}", img_size=8)
    for k, v in aug.items():
        setattr(cfg.augment, k, v)
    bundle = load_data(cfg)
    train = Loader(bundle, bundle.train, cfg, Reader(2, True, 0, 0, 1, "cpu")).dataset.transform
    test = Loader(bundle, bundle.test, cfg, Reader(2, False, 0, 0, 1, "cpu")).dataset.transform
    return train.transforms, test.transforms, bundle.describe(cfg.augment)


def _one(transforms, name):
    found = [t for t in transforms if type(t).__name__ == name]
    return found[0] if found else None


def test_default_image_folder_transform_is_unchanged(tmp_path):
    train, test, pre = _folder_transforms(tmp_path)
    jitter = _one(train, "ColorJitter")
    assert jitter is not None and jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.6, 1.4)
    assert _one(train, "RandomHorizontalFlip") is None                 # hflip stays off unless asked
    assert _one(train, "RandomResizedCropAndInterpolation").interpolation.value == "bicubic"
    resize = _one(test, "Resize")
    assert resize.size == 8 and resize.interpolation.value == "bicubic"   # crop_pct 1.0 up to 64 px
    assert (pre["interpolation"], pre["crop_pct"]) == ("bicubic", 1.0)     # what manifests and exports say


def test_augment_keys_reach_timms_transform(tmp_path):
    train, test, pre = _folder_transforms(tmp_path, color_jitter=0.2, hflip=True, interpolation="bilinear",
                                     re_prob=0.5, re_mode="const", re_count=2, crop_pct=0.5)
    assert _one(train, "ColorJitter").brightness == pytest.approx((0.8, 1.2))
    assert _one(train, "RandomHorizontalFlip").p == 0.5
    assert _one(train, "RandomResizedCropAndInterpolation").interpolation.value == "bilinear"
    erasing = _one(train, "RandomErasing")
    assert erasing.mode == "const" and erasing.max_count == 2 and erasing.probability == 0.5
    resize = _one(test, "Resize")
    assert resize.size == 16 and resize.interpolation.value == "bilinear"   # 8 px / crop_pct 0.5
    assert (pre["interpolation"], pre["crop_pct"]) == ("bilinear", 0.5)    # an export's pretrained_cfg
    off, _, _ = _folder_transforms(tmp_path / "b", color_jitter=0.0)
    assert _one(off, "ColorJitter") is None


def test_randaugment_recipes_keep_timms_no_jitter(tmp_path):
    train, _, _ = _folder_transforms(tmp_path, auto_augment="rand-m9-mstd0.5-inc1")
    assert _one(train, "ColorJitter") is None and _one(train, "RandAugment") is not None


@pytest.mark.parametrize("sets, match", [
    (["data.repeated_aug=0"], r"data.repeated_aug must be >= 1"),
    (["data.augment.color_jitter=-0.1"], r"color_jitter must be >= 0"),
    (["data.augment.color_jitter=0.4", "data.augment.auto_augment=rand-m9-mstd0.5"],
     r"timm leaves ColorJitter out when auto_augment is set"),
    (["data.augment.interpolation=lanczos"], r"interpolation must be bicubic, bilinear or nearest"),
    (["data.augment.re_mode=zero"], r"re_mode must be pixel, rand or const"),
    (["data.augment.re_count=0"], r"re_count must be >= 1"),
    (["data.augment.crop_pct=1.5"], r"crop_pct must be in \(0, 1\]"),
])
def test_bad_augment_values_are_one_clear_error(tiny_recipe, sets, match):
    with pytest.raises(UserError, match=match):
        load_recipe(tiny_recipe, sets)
