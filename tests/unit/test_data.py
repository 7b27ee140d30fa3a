"""Loaders: persistent workers survive epochs; order and augmentation stay (seed, epoch, rank)-determined."""
import pytest
import torch

from incubate.recipe.schema import DataCfg
from incubate.data.loaders import Loader, Reader, load_data


def _cfg(**kw):
    cfg = DataCfg(source="digits", img_size=8, train_fraction=0.1, **kw)
    cfg.augment.auto_augment = "rand-m9-mstd0.5"     # forces the per-image DataLoader path
    return cfg


def _batches(loader, epoch):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]


def test_persistent_workers_outlive_epochs_and_replay_like_a_fresh_loader():
    cfg = _cfg(num_workers=2, persistent_workers=True)
    bundle = load_data(cfg)
    persistent = Loader(bundle, bundle.train, cfg, Reader(16, True, 3, 0, 1, "cpu"))
    assert persistent.per_image
    epoch0 = _batches(persistent, 0)
    dl = persistent.dataloader()
    workers = dl._iterator._workers if dl._iterator is not None else None
    epoch1 = _batches(persistent, 1)
    assert persistent.dataloader() is dl and dl._iterator._workers == workers   # same worker processes
    assert all(w.is_alive() for w in workers)
    # a fresh single-process loader asked only for epoch 1 (a resumed run) sees the same batches
    fresh_cfg = _cfg(num_workers=0)
    fresh = Loader(bundle, bundle.train, fresh_cfg, Reader(16, True, 3, 0, 1, "cpu"))
    before = torch.get_rng_state()
    replay = _batches(fresh, 1)
    assert torch.equal(before, torch.get_rng_state())     # loading left training's RNG alone
    assert len(replay) == len(epoch1) == len(bundle.train) // 16
    for (xa, ya), (xb, yb) in zip(epoch1, replay):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # and epochs differ from each other (new order, new augmentation draws)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))


def test_pin_memory_only_applies_on_cuda():
    cfg = DataCfg(source="digits", img_size=8, train_fraction=0.1, pin_memory=True)
    bundle = load_data(cfg)
    loader = Loader(bundle, bundle.train, cfg, Reader(16, True, 0, 0, 1, torch.device("cpu")))
    assert not loader.pin            # pinning needs CUDA; on CPU it is skipped instead of failing
    x, y = next(iter(loader.epoch(0)))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)


def test_an_image_bundle_declares_its_channels_size_and_classes_and_describes_its_preprocessing():
    from incubate.data.loaders import modality
    from incubate.data.spec import ImageSpec
    cfg = DataCfg(source="digits", img_size=8, train_fraction=0.1)
    bundle = load_data(cfg)
    assert bundle.spec == ImageSpec(1, 8, tuple(str(i) for i in range(10))) and bundle.spec.classes == 10
    assert bundle.spec.modality == modality(cfg) == "image"
    assert bundle.spec.manifest_fields() == {"classes": [str(i) for i in range(10)], "num_classes": 10}
    d = bundle.describe(cfg.augment)
    assert d["input_size"] == [1, 8, 8] and d["interpolation"] == "bilinear" and d["crop_pct"] == 1.0


def test_paper_randaugment_at_top_magnitude_posterizes_instead_of_crashing():
    from PIL import Image
    cfg = DataCfg(source="digits", img_size=8, train_fraction=0.1)
    cfg.augment.auto_augment = "rand-m9-mstd0.5-inc1"     # every paper recipe's string
    bundle = load_data(cfg)
    transform = Loader(bundle, bundle.train, cfg, Reader(16, True, 0, 0, 1, "cpu")).dataset.transform
    rand = [t for t in transform.transforms if hasattr(t, "ops")][0]
    op = [o for o in rand.ops if o.name == "PosterizeIncreasing"][0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0      # timm asks for 0 bits here
    img = Image.fromarray((torch.arange(64, dtype=torch.uint8).view(8, 8) * 4).numpy())
    out = op(img)
    assert out.size == img.size and out.getextrema() == (0, 0)


@pytest.mark.parametrize("from_csv", [True, False])
def test_digits_are_scikit_learns_stratified_split_without_importing_it(monkeypatch, from_csv):
    """read_digits reads the CSV and a stored split: the images train_test_split(stratify, random_state=0)
    gives, and scikit-learn (3 s a process) is imported only when its CSV is not where it should be."""
    import builtins
    import numpy as np
    from incubate.data import datasets
    if not from_csv:
        monkeypatch.setattr(datasets, "_digits_csv", lambda: None)
    imported, real_import = [], builtins.__import__

    def recording_import(name, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", recording_import)
    train, test, names = datasets.read_digits()
    monkeypatch.undo()
    assert any(n.startswith("sklearn") for n in imported) is not from_csv
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
    xtr, xte, ytr, yte = train_test_split(images, d.target, test_size=0.25, stratify=d.target, random_state=0)
    assert torch.equal(train.images, torch.from_numpy(xtr)) and torch.equal(test.images, torch.from_numpy(xte))
    assert torch.equal(train.labels, torch.from_numpy(ytr)) and torch.equal(test.labels, torch.from_numpy(yte))
    assert names == [str(n) for n in d.target_names]
