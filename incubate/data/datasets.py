"""Readers of the data sources: each returns (train Split, test Split, class names).

digits (embedded), IDX files, CIFAR python folders (a restricted unpickler: numpy arrays only) and
ImageNet-layout image folders; plus the class-balanced subset of a split.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

@dataclass
class Split:
    images: torch.Tensor | None     # in memory: uint8 N x C x H x W
    labels: torch.Tensor
    files: list | None = None       # image folders: paths

    def __len__(self):
        return len(self.labels)


DIGITS_SPLIT = Path(__file__).with_name("digits_split.npy")    # the train indices, then the test ones
DIGITS_TEST = 450                                              # test_size=0.25 of 1,797, rounded up


def _digits_csv() -> Path | None:
    """scikit-learn's digits.csv.gz, found without importing scikit-learn (3 s a process)."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits (values 0-16) and their labels, as sklearn.datasets.load_digits gives them."""
    path = _digits_csv()
    if path is None:        # another layout of scikit-learn: its own loader
        from sklearn.datasets import load_digits
        d = load_digits()
        return d.images, d.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def read_digits():
    """scikit-learn's digits, split 3:1 by class as train_test_split(stratify, random_state=0) splits
    them (that split, stored: the same images on every scikit-learn version)."""
    images, target = _load_digits()
    images = (images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]
    order = np.load(DIGITS_SPLIT)
    train, test = order[:-DIGITS_TEST], order[-DIGITS_TEST:]
    return Split(torch.from_numpy(images[train]), torch.from_numpy(target[train]).long()), \
        Split(torch.from_numpy(images[test]), torch.from_numpy(target[test]).long()), [str(n) for n in range(10)]


def _read_idx_file(path: Path) -> np.ndarray:
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


def read_idx(root: Path):
    def find(stem):
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
        raise UserError(f"IDX data folder {root} has no {stem}[.gz]; it needs train-images-idx3-ubyte, "
                        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte")
    splits = []
    for prefix in ("train", "t10k"):
        x = _read_idx_file(find(f"{prefix}-images-idx3-ubyte"))
        y = _read_idx_file(find(f"{prefix}-labels-idx1-ubyte"))
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


def read_cifar(root: Path, kind: str):
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


def read_imagefolder(root: Path):
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
