"""Datasets and loaders.

In-memory data (digits, IDX, CIFAR) is decoded once into one normalised tensor and served by a
batched loader (random shift and flip done a batch at a time), so small datasets never wait on
Python workers. Image folders, and in-memory data with RandAugment/random erasing, go through timm's
per-image transforms and a DataLoader. Every order and augmentation draw is a function of
(seed, epoch, rank), so a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from .datasets import Split, class_balanced_subset, read_cifar, read_digits, read_idx, read_imagefolder
from ..errors import UserError
from .order import Reader, epoch_order
from .records import RECORD_SOURCES
from .spec import ImageSpec


@dataclass
class DataBundle:
    """An image data set's splits, what it is (`spec`: channels, size, classes) and its normalisation."""
    train: Split
    test: Split
    spec: ImageSpec
    mean: tuple
    std: tuple
    source: str

    def describe(self, augment) -> dict:
        """How test images reach the model (what a manifest records, and an export's pretrained_cfg
        says): image files through timm's eval transform as data.augment sets it, in-memory data
        resized bilinearly."""
        from_files, size = self.train.images is None, self.spec.size
        return {"input_size": [self.spec.channels, size, size], "mean": list(self.mean), "std": list(self.std),
                "interpolation": augment.interpolation if from_files else "bilinear",
                "crop_pct": eval_crop_pct(augment, size) if from_files else 1.0}


def modality(cfg) -> str:
    """What data.source holds, known before it is read: "text" (text:, jsonl:, parquet:, hf_disk:) or
    "image"; the spec of the bundle load_data gives (incubate/data/spec.py) says the same."""
    kind = cfg.source.partition(":")[0]
    return "text" if kind == "text" or kind in RECORD_SOURCES else "image"


def load_data(cfg, run=None, train_tokenizer: bool = True):
    """Read the recipe's data source; in-memory images are resized to `data.img_size` and normalised.
    `text:PATH` (and the records of `jsonl:PATH`, `parquet:PATH`, `hf_disk:PATH`) gives a
    text.TextBundle (token windows for a language model); with data.tokenizer: bpe its
    tokenizer is RUN/tokenizer.json (`run`), trained there first if missing and `train_tokenizer`."""
    kind, _, arg = cfg.source.partition(":")
    if modality(cfg) == "text":
        from .text import load_text
        return load_text(cfg, arg, run, train_tokenizer)
    readers = {"digits": lambda: read_digits(), "idx": lambda: read_idx(Path(arg)),
               "imagefolder": lambda: read_imagefolder(Path(arg)), "cifar10": lambda: read_cifar(Path(arg), "cifar10"),
               "cifar100": lambda: read_cifar(Path(arg), "cifar100")}
    if kind not in readers:
        raise UserError(f"unknown data.source '{cfg.source}'; use digits, idx:PATH, imagefolder:PATH, "
                        f"cifar10:PATH, cifar100:PATH, or for text text:PATH, jsonl:PATH, parquet:PATH, hf_disk:PATH")
    if kind == "digits" and arg:
        raise UserError(f"data.source '{cfg.source}': digits is the built-in data set and takes no path; "
                        f"use digits, or idx:PATH / imagefolder:PATH for files")
    if kind != "digits":
        if not arg:
            raise UserError(f"data.source '{cfg.source}' needs a path, e.g. {kind}:/data/{kind}")
        if not Path(arg).exists():
            raise UserError(f"data path {arg} (from data.source '{cfg.source}') does not exist")
    train, test, names = readers[kind]()
    train = class_balanced_subset(train, cfg.train_fraction, cfg.subset_seed)
    if train.images is None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        return DataBundle(train, test, ImageSpec(3, cfg.img_size, tuple(names)), IMAGENET_DEFAULT_MEAN,
                          IMAGENET_DEFAULT_STD, cfg.source)
    x = train.images.float() / 255.0
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return DataBundle(train, test, ImageSpec(train.images.shape[1], cfg.img_size, tuple(names)), mean, std, cfg.source)


# ---------------------------------------------------------------- loaders

def _prepare(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = images.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def batch_augment(x: torch.Tensor, shift: int, hflip: bool) -> torch.Tensor:
    """Random translation by up to `shift` pixels (zero fill) and horizontal flip, per sample."""
    b, c, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (b,))
        dx = torch.randint(0, 2 * shift + 1, (b,))
        rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, c, h, w + 2 * shift)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, c, h, w)
        x = x.gather(3, cols)
    if hflip:
        flip = torch.rand(b) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    return x


def eval_crop_pct(aug, size: int) -> float:
    """Image files at eval: resized to size / crop_pct, then center-cropped (unset: whole image up to
    64 px, where a crop would cut the object, else ImageNet's 0.875)."""
    return aug.crop_pct if aug.crop_pct is not None else (1.0 if size <= 64 else 0.875)


class BadImage(NamedTuple):
    """An image file that could not be decoded: returned in place of a sample, dealt with in the
    main process (so DataLoader workers never raise through their own traceback wrapper)."""
    path: str
    reason: str


def _collate(items):
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [it for it in items if isinstance(it, BadImage)]
    return (default_collate(good) if good else None), bad


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, where 0 bits kept gives a black image (as in TF): timm asks for 0 bits at
    PosterizeIncreasing's top magnitude, which Pillow >= 10 refuses."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    from timm.data.auto_augment import posterize
    return posterize(img, bits_to_keep, **kwargs)


def _posterize_zero_bits(transform):
    """Point the Posterize ops of timm's (Rand/Auto/AugMix) augmentation at `_posterize`."""
    def ops(node):
        if isinstance(node, (list, tuple)):
            for item in node:
                yield from ops(item)
        elif hasattr(node, "aug_fn") and hasattr(node, "name"):
            yield node
        else:
            for attr in ("transforms", "ops", "policy"):
                if hasattr(node, attr):
                    yield from ops(getattr(node, attr))
    for op in ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


class _EpochSampler(Sampler):
    """One rank's order for the epoch set by `set_epoch`, as (index, augmentation seed) pairs.

    The DataLoader is built once (so persistent workers survive epochs); the order and every
    sample's augmentation seed stay functions of (seed, epoch, rank, position), whatever the number
    of workers and whatever epochs ran before in this process (a resumed run replays them).
    """

    def __init__(self, n: int, reader: Reader, repeats: int = 1):
        self.n, self.reader, self.seed, self.rank = n, reader, reader.seed, reader.rank
        self.repeats = repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start      # start: samples to leave out (a mid-epoch resume)

    def _order(self):
        return epoch_order(self.n, self.epoch, self.reader, self.repeats)

    def __iter__(self):
        base = (self.seed * 7919 + self.epoch * 131 + self.rank) * 1_000_003
        for pos, i in enumerate(self._order().tolist()):
            if pos >= self.start:
                yield i, (base + pos) % (2 ** 63)

    def __len__(self):
        return max(len(self._order()) - self.start, 0)


class _ImageDataset(Dataset):
    """Items are (index, seed): the seed fixes every random draw of that sample's transform."""

    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, item):
        i, seed = item
        if get_worker_info() is not None:       # a worker's RNGs serve only its transforms
            return self._load(i, seed)
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:                                    # in the main process: leave training's RNGs alone
            return self._load(i, seed)
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])

    def _load(self, i, seed):
        from PIL import Image
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        if self.split.images is not None:
            arr = self.split.images[i].numpy()
            img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        else:
            path = self.split.files[i]
            try:
                img = Image.open(path).convert("RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                return BadImage(str(path), str(e).replace(f" '{path}'", "") or type(e).__name__)
        return self.transform(img), int(self.split.labels[i])


def make_loader(bundle, split, cfg, reader: Reader):
    """The loader of a bundle's split for `reader`: images (Loader) or text windows (text.TextLoader)."""
    if bundle.spec.modality == "text":
        from .text import TextLoader
        return TextLoader(bundle, split, cfg, reader)
    return Loader(bundle, split, cfg, reader)


def image_transform(bundle, aug, train: bool):
    """timm's transform of one image file as the stages apply it: for training with data.augment's
    augmentation, else the eval transform (incubate.run_data hands it to a script too)."""
    from timm.data import create_transform
    size = bundle.spec.size
    if train:
        # color_jitter None: timm's own choice (ColorJitter(0.4) unless auto_augment is set); 0: no op.
        jitter = 0.4 if aug.color_jitter is None else (aug.color_jitter or None)
        return _posterize_zero_bits(
            create_transform(size, is_training=True, auto_augment=aug.auto_augment, color_jitter=jitter,
                             re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count,
                             scale=tuple(aug.crop_scale), hflip=0.5 if aug.hflip else 0.0,
                             mean=bundle.mean, std=bundle.std, interpolation=aug.interpolation))
    return create_transform(size, is_training=False, mean=bundle.mean, std=bundle.std,
                            crop_pct=eval_crop_pct(aug, size), interpolation=aug.interpolation)


class Loader:
    """Batches of one split for one rank; `epoch(e)` yields (images, labels) on `device`."""

    def __init__(self, bundle: DataBundle, split: Split, cfg, reader: Reader):
        self.bundle, self.split, self.cfg, self.reader = bundle, split, cfg, reader
        self.batch, self.train, self.seed = reader.batch, reader.train, reader.seed
        self.rank, self.world, self.device = reader.rank, reader.world, reader.device
        self.skipped: list[str] = []     # unreadable files skipped since the last take_skipped()
        self.repeats = cfg.repeated_aug if self.train else 1
        aug = cfg.augment
        self.per_image = split.images is None or (self.train and (aug.auto_augment or aug.re_prob > 0))
        if self.per_image:
            self._dataloader = None
            self.dataset = _ImageDataset(split, self._transform())
        else:
            self.tensor = _prepare(split.images, bundle.spec.size, bundle.mean, bundle.std)

    def _transform(self):
        return image_transform(self.bundle, self.cfg.augment, self.train)

    def __len__(self):
        n = len(self.split)
        if self.train:
            return n // (self.batch * self.world)
        return -(-len(range(self.rank, n, self.world)) // self.batch)

    @property
    def pin(self) -> bool:
        """Pinned host memory only helps (and only works) when batches go to a CUDA device."""
        return bool(self.cfg.pin_memory) and torch.device(self.device).type == "cuda"

    def epoch(self, epoch: int, start: int = 0):
        """Batches of `epoch` from batch `start` on (a mid-epoch resume): the same batches, with the
        same augmentation, that an uninterrupted epoch yields from there."""
        if self.per_image:
            yield from self._per_image(epoch, start)
            return
        order = epoch_order(len(self.split), epoch, self.reader, self.repeats)
        aug = self.cfg.augment
        for start in range(start * self.batch, len(order), self.batch):
            idx = order[start:start + self.batch]
            x, y = self.tensor[idx], self.split.labels[idx]
            if self.train:
                x = batch_augment(x, aug.shift, aug.hflip)
            if self.pin:        # so that non_blocking copies really overlap with compute
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def dataloader(self) -> DataLoader:
        """The per-image DataLoader, built once so that persistent workers outlive an epoch."""
        if self._dataloader is None:
            workers = self.cfg.num_workers
            sampler = _EpochSampler(len(self.split), self.reader, self.repeats)
            self._dataloader = DataLoader(self.dataset, batch_size=self.batch, sampler=sampler,
                                          num_workers=workers, pin_memory=self.pin, drop_last=self.train,
                                          persistent_workers=bool(self.cfg.persistent_workers) and workers > 0,
                                          generator=torch.Generator(),   # its seed draw is unused: spare the global RNG
                                          collate_fn=_collate)
        return self._dataloader

    def _per_image(self, epoch, start=0):
        loader = self.dataloader()
        loader.sampler.set_epoch(epoch, start * self.batch)
        for batch, bad in loader:
            if bad and self.cfg.on_bad_image != "skip":
                raise UserError(f"image {bad[0].path} is unreadable ({bad[0].reason}); remove or replace it, "
                                f"or set data.on_bad_image: skip")
            self.skipped += [b.path for b in bad]
            if batch is None:
                continue
            x, y = batch
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def take_skipped(self) -> list[str]:
        """Distinct files skipped since the last call (a batch may be drawn twice, e.g. to count FLOPs)."""
        out, self.skipped = sorted(set(self.skipped)), []
        return out
