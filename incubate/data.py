"""Datasets and loaders.

In-memory data (digits, IDX, CIFAR) is decoded once into one normalised tensor and served by a
batched loader (random shift and flip done a batch at a time), so small datasets never wait on
Python workers. Image folders, and in-memory data with RandAugment/random erasing, go through timm's
per-image transforms and a DataLoader. Every order and augmentation draw is a function of
(seed, epoch, rank), so a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import gzip
import pickle
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from .errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    images: torch.Tensor | None     # in memory: uint8 N x C x H x W
    labels: torch.Tensor
    files: list | None = None       # image folders: paths

    def __len__(self):
        return len(self.labels)


@dataclass
class DataBundle:
    train: Split
    test: Split
    class_names: list
    in_chans: int
    img_size: int
    mean: tuple
    std: tuple
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------- readers

def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
    xtr, xte, ytr, yte = train_test_split(images, d.target, test_size=0.25, stratify=d.target,
                                          random_state=0)
    names = [str(n) for n in d.target_names]
    return Split(torch.from_numpy(xtr), torch.from_numpy(ytr).long()), \
        Split(torch.from_numpy(xte), torch.from_numpy(yte).long()), names


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        _, dtype, ndim = struct.unpack(">HBB", raw[:4])
        shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        if dtype != 0x08:
            raise ValueError(f"element type 0x{dtype:02x}, expected unsigned bytes (0x08)")
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise UserError(f"IDX file {path} is unreadable ({e}); check the download") from None


def _idx(root: Path):
    def find(stem):
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
        raise UserError(f"IDX data folder {root} has no {stem}[.gz]; it needs train-images-idx3-ubyte, "
                        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte")
    splits = []
    for prefix in ("train", "t10k"):
        x = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise UserError(f"IDX data in {root}: {len(x)} {prefix} images but {len(y)} labels")
        splits.append(Split(torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64))))
    classes_file = root / "classes.txt"
    n = int(max(splits[0].labels.max(), splits[1].labels.max())) + 1
    names = classes_file.read_text().split("\n")[:n] if classes_file.is_file() else [str(i) for i in range(n)]
    return splits[0], splits[1], names


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow numpy arrays and builtins, nothing callable else."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar(root: Path, kind: str):
    def load(name):
        path = root / name
        if not path.is_file():
            raise UserError(f"CIFAR folder {root} has no file '{name}'; point {kind}:PATH at the "
                            f"extracted cifar-*-python folder")
        try:
            with open(path, "rb") as f:
                return _ArraysOnly(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise UserError(f"CIFAR file {path} is unreadable: {e}") from None
    if kind == "cifar10":
        batches = [load(f"data_batch_{i}") for i in range(1, 6)]
        test, meta, key, names_key = load("test_batch"), load("batches.meta"), "labels", "label_names"
    else:
        batches = [load("train")]
        test, meta, key, names_key = load("test"), load("meta"), "fine_labels", "fine_label_names"
    def split(parts):
        x = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[key]) for p in parts])
        return Split(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    return split(batches), split([test]), list(meta[names_key])


def _imagefolder(root: Path):
    def scan(split):
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"image folder {folder} does not exist; imagefolder:PATH needs PATH/train/CLASS/* "
                            f"and PATH/val/CLASS/*")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"image folder {folder} has no class folders")
        files, labels = [], []
        for i, c in enumerate(classes):
            found = sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise UserError(f"class folder {folder / c} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
            files += found
            labels += [i] * len(found)
        return classes, Split(None, torch.tensor(labels), files)
    classes, train = scan("train")
    val_classes, test = scan("val")
    if classes != val_classes:
        diff = sorted(set(classes) ^ set(val_classes))
        raise UserError(f"{root}/train and {root}/val have different classes (e.g. {diff[:3]}); "
                        f"both need the same class folders")
    return train, test, classes


def class_balanced_subset(split: Split, fraction: float, seed: int) -> Split:
    if fraction >= 1.0:
        return split
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(split.labels):
        idx = torch.nonzero(split.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        keep.append(idx[:max(1, round(fraction * len(idx)))])
    keep = torch.sort(torch.cat(keep)).values
    files = [split.files[i] for i in keep.tolist()] if split.files is not None else None
    return Split(split.images[keep] if split.images is not None else None, split.labels[keep], files)


def load_data(cfg) -> DataBundle:
    """Read the recipe's data source; in-memory images are resized to `img_size` and normalised."""
    kind, _, arg = cfg.source.partition(":")
    readers = {"digits": lambda: _digits(), "idx": lambda: _idx(Path(arg)),
               "imagefolder": lambda: _imagefolder(Path(arg)),
               "cifar10": lambda: _cifar(Path(arg), "cifar10"), "cifar100": lambda: _cifar(Path(arg), "cifar100")}
    if kind not in readers:
        raise UserError(f"unknown data.source '{cfg.source}'; use digits, idx:PATH, imagefolder:PATH, "
                        f"cifar10:PATH or cifar100:PATH")
    if kind != "digits":
        if not arg:
            raise UserError(f"data.source '{cfg.source}' needs a path, e.g. {kind}:/data/{kind}")
        if not Path(arg).exists():
            raise UserError(f"data path {arg} (from data.source '{cfg.source}') does not exist")
    train, test, names = readers[kind]()
    train = class_balanced_subset(train, cfg.train_fraction, cfg.subset_seed)
    if train.images is None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        return DataBundle(train, test, names, 3, cfg.img_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, cfg.source)
    x = train.images.float() / 255.0
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return DataBundle(train, test, names, train.images.shape[1], cfg.img_size, mean, std, cfg.source)


# ---------------------------------------------------------------- loaders

def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, batch: int, train: bool):
    """Indices this rank sees in this epoch: a seeded permutation (train) or a strided shard (eval)."""
    if not train:
        return torch.arange(rank, n, world)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    usable = (n // (batch * world)) * batch * world
    return perm[:usable][rank::world]


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
    """timm's posterize, where 0 bits kept gives a black image as in TF and older Pillow.

    timm asks for 0 bits at the top magnitude of PosterizeIncreasing (rand-...-inc1 with mstd
    reaches it on ~2% of its draws) and Pillow >= 10 refuses 0, which crashed a DataLoader within
    the first epoch of every paper recipe."""
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

    def __init__(self, n: int, seed: int, rank: int, world: int, batch: int, train: bool):
        self.n, self.seed, self.rank, self.world, self.batch, self.train = n, seed, rank, world, batch, train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self):
        return epoch_order(self.n, self.seed, self.epoch, self.rank, self.world, self.batch, self.train)

    def __iter__(self):
        base = (self.seed * 7919 + self.epoch * 131 + self.rank) * 1_000_003
        for pos, i in enumerate(self._order().tolist()):
            yield i, (base + pos) % (2 ** 63)

    def __len__(self):
        return len(self._order())


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


class Loader:
    """Batches of one split for one rank; `epoch(e)` yields (images, labels) on `device`."""

    def __init__(self, bundle: DataBundle, split: Split, cfg, batch: int, train: bool, seed: int,
                 rank: int, world: int, device):
        self.bundle, self.split, self.cfg, self.batch, self.train = bundle, split, cfg, batch, train
        self.seed, self.rank, self.world, self.device = seed, rank, world, device
        self.skipped: list[str] = []     # unreadable files skipped since the last take_skipped()
        aug = cfg.augment
        self.per_image = split.images is None or (train and (aug.auto_augment or aug.re_prob > 0))
        if self.per_image:
            self._dataloader = None
            self.dataset = _ImageDataset(split, self._transform())
        else:
            self.tensor = _prepare(split.images, bundle.img_size, bundle.mean, bundle.std)

    def _transform(self):
        from timm.data import create_transform
        aug = self.cfg.augment
        size = self.bundle.img_size
        if self.train:
            return _posterize_zero_bits(
                create_transform(size, is_training=True, auto_augment=aug.auto_augment,
                                 re_prob=aug.re_prob, re_mode="pixel", scale=tuple(aug.crop_scale),
                                 hflip=0.5 if aug.hflip else 0.0, mean=self.bundle.mean,
                                 std=self.bundle.std, interpolation="bicubic"))
        return create_transform(size, is_training=False, mean=self.bundle.mean, std=self.bundle.std,
                                crop_pct=1.0 if size <= 64 else 0.875, interpolation="bicubic")

    def __len__(self):
        n = len(self.split)
        if self.train:
            return n // (self.batch * self.world)
        return -(-len(range(self.rank, n, self.world)) // self.batch)

    @property
    def pin(self) -> bool:
        """Pinned host memory only helps (and only works) when batches go to a CUDA device."""
        return bool(self.cfg.pin_memory) and torch.device(self.device).type == "cuda"

    def epoch(self, epoch: int):
        if self.per_image:
            yield from self._per_image(epoch)
            return
        order = epoch_order(len(self.split), self.seed, epoch, self.rank, self.world, self.batch, self.train)
        aug = self.cfg.augment
        for start in range(0, len(order), self.batch):
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
            sampler = _EpochSampler(len(self.split), self.seed, self.rank, self.world, self.batch, self.train)
            self._dataloader = DataLoader(self.dataset, batch_size=self.batch, sampler=sampler,
                                          num_workers=workers, pin_memory=self.pin, drop_last=self.train,
                                          persistent_workers=bool(self.cfg.persistent_workers) and workers > 0,
                                          generator=torch.Generator(),   # its seed draw is unused: spare the global RNG
                                          collate_fn=_collate)
        return self._dataloader

    def _per_image(self, epoch):
        loader = self.dataloader()
        loader.sampler.set_epoch(epoch)
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
