"""Text for causal language models: `data.source: text:PATH` (a UTF-8 file or a folder of them).

Tokens are bytes (vocabulary 256: nothing to download or train). The held-out split never
overlaps the training text: a folder holds out whole files (a seeded choice, `data.subset_seed`,
until `data.val_fraction` of the bytes is held out); a single file holds out its last
`data.val_fraction` of bytes. Each split is cut into windows of `data.context` + 1 tokens that
follow each other with a stride of `data.context`, so every token after the first is predicted
exactly once in an epoch. A batch is (inputs, targets): the window without its last token and the
window without its first. TextLoader keeps data.Loader's contract (len, epoch(e), take_skipped)
and its orders: a function of (seed, epoch, rank), so a resumed run replays the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

BYTE_VOCAB = 256


@dataclass
class TextSplit:
    """One split's tokens, read as windows of `context` + 1 tokens with stride `context`."""
    tokens: torch.Tensor            # 1-D int64
    context: int

    def __len__(self) -> int:
        return max((len(self.tokens) - 1) // self.context, 0)

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        starts = idx.long() * self.context
        return self.tokens[starts[:, None] + torch.arange(self.context + 1)[None]]


@dataclass
class TextBundle:
    train: TextSplit
    test: TextSplit
    vocab_size: int
    context: int
    source: str
    tokenizer: str = "byte"
    train_files: list = field(default_factory=list)
    test_files: list = field(default_factory=list)

    # What the family adapters read from a bundle (data.DataBundle's names): the vocabulary is the
    # number of classes a position predicts, the context the size of an input.
    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def img_size(self) -> int:
        return self.context

    in_chans = 1
    class_names: tuple = ()

    @property
    def test_bytes(self) -> int:
        """UTF-8 bytes of the held-out text whose tokens are predicted (bits per byte divide by it)."""
        return len(self.test) * self.context     # byte tokens: one byte a token

    def describe(self) -> dict:
        """What a manifest records of the data (in place of an image pipeline)."""
        return {"tokenizer": self.tokenizer, "vocab_size": self.vocab_size, "context": self.context,
                "train_tokens": len(self.train.tokens), "test_tokens": len(self.test.tokens),
                "test_files": [str(f) for f in self.test_files]}


def _read_utf8(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read text file {path}: {e.strerror}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text file {path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        f"convert it to UTF-8 or remove it from the corpus") from None
    return raw


def _files(root: Path) -> list[Path]:
    """The corpus's files, sorted; hidden ones skipped, and a file reached twice (a symbolic link,
    e.g. GPL -> GPL-3 in /usr/share/common-licenses) read once, so no text is in both splits."""
    if root.is_file():
        return [root]
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            if p.resolve() not in found or found[p.resolve()].is_symlink():   # name the real file
                found[p.resolve()] = p
    return sorted(found.values())


def split_corpus(root: Path, val_fraction: float, seed: int) -> tuple[bytes, bytes, list, list]:
    """(training bytes, held-out bytes, training files, held-out files)."""
    files = _files(root)
    texts = {f: _read_utf8(f) for f in files}
    total = sum(len(t) for t in texts.values())
    if total == 0:
        raise UserError(f"text corpus {root} is empty ({len(files)} files, 0 bytes); point data.source "
                        f"text:PATH at a UTF-8 file or a folder of them")
    nonempty = [f for f in files if texts[f]]
    if len(nonempty) == 1:      # one file: a fixed tail is held out
        raw = texts[nonempty[0]]
        cut = len(raw) - max(1, int(round(val_fraction * len(raw))))
        return raw[:cut], raw[cut:], nonempty, nonempty
    g = torch.Generator().manual_seed(seed)
    order = [nonempty[i] for i in torch.randperm(len(nonempty), generator=g).tolist()]
    held, held_bytes = [], 0
    while order[len(held):-1] and (not held or held_bytes < val_fraction * total):
        held.append(order[len(held)])
        held_bytes += len(texts[held[-1]])
    train = sorted(set(nonempty) - set(held))
    held = sorted(held)
    return b"".join(texts[f] for f in train), b"".join(texts[f] for f in held), train, held


def load_text(cfg, path: str) -> TextBundle:
    root = Path(path)
    if not path:
        raise UserError(f"data.source '{cfg.source}' needs a path, e.g. text:/usr/share/common-licenses")
    if not root.exists():
        raise UserError(f"data path {path} (from data.source '{cfg.source}') does not exist")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if getattr(cfg, "train_fraction", 1.0) < 1.0:
        raise UserError(f"data.train_fraction {cfg.train_fraction} takes a class-balanced subset of images; "
                        f"text has no classes: remove it (or give fewer files in text:PATH)")
    if cfg.context < 1:
        raise UserError(f"data.context must be >= 1 token, got {cfg.context}")
    train, test, train_files, test_files = split_corpus(root, cfg.val_fraction, cfg.subset_seed)
    bundle = TextBundle(TextSplit(torch.frombuffer(bytearray(train), dtype=torch.uint8).long(), cfg.context),
                        TextSplit(torch.frombuffer(bytearray(test), dtype=torch.uint8).long(), cfg.context),
                        BYTE_VOCAB, cfg.context, cfg.source, "byte", train_files, test_files)
    for name, split in (("training", bundle.train), ("held-out", bundle.test)):
        if len(split) == 0:
            raise UserError(f"the {name} text of {root} has {len(split.tokens)} tokens, fewer than one window of "
                            f"data.context + 1 = {cfg.context + 1}; use a smaller data.context or more text")
    return bundle


class TextLoader:
    """Batches of one split's windows for one rank: `epoch(e)` yields (inputs, targets) on `device`."""

    def __init__(self, bundle: TextBundle, split: TextSplit, cfg, batch: int, train: bool, seed: int,
                 rank: int, world: int, device):
        self.bundle, self.split, self.batch, self.train = bundle, split, batch, train
        self.seed, self.rank, self.world, self.device = seed, rank, world, device

    def __len__(self):
        n = len(self.split)
        if self.train:
            return n // (self.batch * self.world)
        return -(-len(range(self.rank, n, self.world)) // self.batch)

    def epoch(self, epoch: int, start: int = 0):
        """Batches of `epoch` from batch `start` on (a mid-epoch resume): the same batches an
        uninterrupted epoch yields from there (the order is the only randomness)."""
        from .data import epoch_order
        order = epoch_order(len(self.split), self.seed, epoch, self.rank, self.world, self.batch, self.train)
        for start in range(start * self.batch, len(order), self.batch):
            w = self.split.windows(order[start:start + self.batch])
            yield w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def take_skipped(self) -> list[str]:
        return []
