"""The token cache: a corpus tokenized once into memory-mapped token files, shared by every stage,
module job and rank of a run (or of every run that names the same `data.cache_dir`).

One entry a (corpus, split, tokenizer): `<cache>/<key>/` holds `train.bin` and `test.bin` (the
splits' token ids, uint8 / uint16 / uint32 by vocabulary size) and `meta.json` (their SHA-256
digests, lengths and the split's file lists). The key is a digest of every corpus file's path
and content, of the split settings and of the tokenizer file, so any change makes a new entry.
A stage after the first reads only the corpus files' bytes (for the key) and maps the token
files: nothing of the corpus stays in Python strings. An entry is written under a lock to a
temporary folder and renamed whole; a damaged one (digests that no longer match) is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import UserError
from ..store.safe_read import read_json

CACHE_DIR = "token_cache"       # in the run directory, unless data.cache_dir names another folder
FORMAT = 1                      # bumped when the layout of an entry changes


def dtype_for(vocab_size: int):
    """The smallest unsigned type that holds every token id."""
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32


def cache_root(cfg, run) -> Path | None:
    """Where the entries live: data.cache_dir, else RUN/token_cache; None without either (in memory)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(run) / CACHE_DIR if run is not None else None


def corpus_key(root: Path, files: list[Path], settings: dict) -> str:
    """A digest of every file's path (relative to the corpus) and bytes, and of `settings`."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    base = root if root.is_dir() else root.parent
    for f in files:
        h.update(str(f.relative_to(base)).encode() + b"\0")
        try:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        except OSError as e:
            raise UserError(f"cannot read text file {f}: {e.strerror}") from None
    return h.hexdigest()[:24]


@dataclass
class Tokens:
    """One entry's splits: read-only memory maps (or arrays, without a cache) and file lists."""
    train: np.ndarray
    test: np.ndarray
    train_files: list
    test_files: list


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _damaged(folder: Path, why: str) -> UserError:
    return UserError(f"the token cache {folder} is damaged ({why}); delete that folder and rerun: the corpus is "
                     f"tokenized again")


def load(folder: Path) -> Tokens | None:
    """The entry in `folder`, its files checked against their digests; None when there is none."""
    meta_path = folder / "meta.json"
    if not folder.is_dir():
        return None
    try:
        meta = read_json(meta_path, dict, "token cache metadata", "")
        sizes = {split: (int(meta[split]["bytes"]), int(meta[split]["tokens"]), str(meta[split]["sha256"]))
                 for split in ("train", "test")}
        files = [[Path(p) for p in meta[f"{split}_files"]] for split in ("train", "test")]
        dtype = np.dtype(meta["dtype"])
    except UserError as e:
        raise _damaged(folder, f"meta.json unreadable: {str(e).split(';')[0]}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise _damaged(folder, f"meta.json lacks {e}") from None
    maps = {}
    for split in ("train", "test"):
        size, n, sha = sizes[split]
        path = folder / f"{split}.bin"
        if not path.exists() or path.stat().st_size != size or n * dtype.itemsize != size:
            raise _damaged(folder, f"{path.name} is missing or of another size than meta.json says")
        if _digest(path) != sha:
            raise _damaged(folder, f"{path.name} does not match its SHA-256 in meta.json")
        maps[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
    return Tokens(maps["train"], maps["test"], *files)


def _write_split(path: Path, parts: Iterable[np.ndarray], dtype) -> dict:
    """Stream token arrays into one file; its length and SHA-256."""
    h, n = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for part in parts:
            data = np.ascontiguousarray(part, dtype=dtype).tobytes()
            f.write(data)
            h.update(data)
            n += len(part)
        f.flush()
        os.fsync(f.fileno())
    return {"tokens": n, "bytes": n * np.dtype(dtype).itemsize, "sha256": h.hexdigest()}


def write(folder: Path, vocab_size: int, made: tuple, describe: dict) -> Tokens:
    """Write the entry (`made`: train parts, test parts, train files, test files) to a temporary
    folder beside `folder`, then rename it into place; return it mapped."""
    dtype = dtype_for(vocab_size)
    train_parts, test_parts, train_files, test_files = made
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size, **describe,
                "train": _write_split(tmp / "train.bin", train_parts, dtype),
                "test": _write_split(tmp / "test.bin", test_parts, dtype),
                "train_files": [str(f) for f in train_files], "test_files": [str(f) for f in test_files]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the token cache {folder}: {e.strerror}; free space or choose a writable "
                        f"data.cache_dir, then rerun") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load(folder)


def load_or_build(root: Path | None, key: str, vocab_size: int, tokenize: Callable[[], tuple],
                  describe: dict) -> Tokens:
    """The cached entry `key` under `root`, made by tokenize() when missing. Tokenizing comes
    before anything is written, so a corpus it refuses leaves no folder behind. Without a root
    (no run directory, no data.cache_dir) the tokens stay in memory."""
    if root is not None and (found := load(root / key)) is not None:
        return found
    made = tokenize()
    if root is None:
        dtype = dtype_for(vocab_size)
        join = lambda parts: np.concatenate([np.asarray(p, dtype=dtype) for p in parts] or [np.zeros(0, dtype)])
        return Tokens(join(made[0]), join(made[1]), list(made[2]), list(made[3]))
    from ..store.lock import waiting
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the token cache {root}: {e.strerror}; choose a writable data.cache_dir") from None
    with waiting(root / f".{key}.lock"):       # one process writes; one that tokenized beside it maps that entry
        return load(root / key) or write(root / key, vocab_size, made, describe)
