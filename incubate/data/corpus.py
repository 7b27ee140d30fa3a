"""A corpus and its two splits: the documents of `data.source: text:PATH` (a UTF-8 file or a folder
of them; files ending in .gz are read decompressed) or of the records of `jsonl:PATH`,
`parquet:PATH` and `hf_disk:PATH` (records.py, each record a document as each file is), read and
split into training and held-out documents once (`Corpus`), and encoded once for the tokenizer.

The held-out split never overlaps the training text: a folder holds out whole files (a seeded
choice, `data.subset_seed`, until `data.val_fraction` of the bytes is held out); a single file holds
out its last `data.val_fraction` of bytes (with BPE the cut moves back to the start of a character).
Records follow the same rule, a record for a file, unless the source holds out a split itself (a
DatasetDict's test split). A split's documents are joined with nothing between them.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from . import records
from .bpe import encode, pieces
from ..errors import UserError
from .records import Documents


def _read_utf8(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except OSError as e:
        raise UserError(f"cannot read text file {path}: {e.strerror or e}") from None
    except EOFError:
        raise UserError(f"text file {path} is a cut-short gzip file; replace it or remove it from the corpus") from None
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


def split_corpus(root: Path, val_fraction: float, seed: int, kind: str = "text",
                 column: str = "text") -> tuple[bytes, bytes, list, list]:
    """(training bytes, held-out bytes, training documents, held-out documents)."""
    train, test, train_files, test_files = _split(root, val_fraction, seed, kind=kind, column=column)
    return b"".join(train), b"".join(test), train_files, test_files


def _documents(root: Path, kind: str, column: str) -> Documents:
    if kind == "text":
        files = _files(root)
        return Documents(files, [_read_utf8(f) for f in files])
    return records.read(kind, root, records.corpus_files(kind, root, _files(root)), column)


def _split(root: Path, val_fraction: float, seed: int, char_boundary: bool = False, kind: str = "text",
           column: str = "text"):
    """(training texts, held-out texts, training documents, held-out documents): a text a document
    (a file, or a record), or the two parts of a single one, whose cut moves back to the start of a
    UTF-8 character when `char_boundary` (BPE reads characters; bytes keep their cut)."""
    docs = _documents(root, kind, column)
    named = (lambda names: names) if kind == "text" else records.listed
    if docs.held is not None:       # the source's own held-out split
        train, held = ([i for i, t in enumerate(d.texts) if t] for d in (docs, docs.held))
        if not train:
            raise _empty(root, kind, column, len(docs.texts))
        return ([docs.texts[i] for i in train], [docs.held.texts[i] for i in held],
                named([docs.names[i] for i in train]), named([docs.held.names[i] for i in held]))
    if sum(len(t) for t in docs.texts) == 0:
        raise _empty(root, kind, column, len(docs.texts))
    nonempty = [i for i, t in enumerate(docs.texts) if t]
    if len(nonempty) == 1:      # one document: a fixed tail is held out
        raw, names = docs.texts[nonempty[0]], named([docs.names[nonempty[0]]])
        cut = len(raw) - max(1, int(round(val_fraction * len(raw))))
        while char_boundary and 0 < cut and raw[cut] & 0xC0 == 0x80:     # a continuation byte
            cut -= 1
        return [raw[:cut]], [raw[cut:]], names, names
    train, held = _hold_out(docs.texts, nonempty, val_fraction, seed)
    return ([docs.texts[i] for i in train], [docs.texts[i] for i in held],
            named([docs.names[i] for i in train]), named([docs.names[i] for i in held]))


def _hold_out(texts: list[bytes], nonempty: list[int], val_fraction: float, seed: int):
    """(training, held-out) indices of whole documents: a seeded order, held out from its start
    until `val_fraction` of the bytes is, leaving at least one document to train on."""
    total = sum(len(texts[i]) for i in nonempty)
    g = torch.Generator().manual_seed(seed)
    order = [nonempty[i] for i in torch.randperm(len(nonempty), generator=g).tolist()]
    held, held_bytes = [], 0
    while order[len(held):-1] and (not held or held_bytes < val_fraction * total):
        held.append(order[len(held)])
        held_bytes += len(texts[held[-1]])
    return sorted(set(nonempty) - set(held)), sorted(held)


def _empty(root: Path, kind: str, column: str, n: int) -> UserError:
    if kind == "text":
        return UserError(f"text corpus {root} is empty ({n} files, 0 bytes); point data.source "
                         f"text:PATH at a UTF-8 file or a folder of them")
    return UserError(f"{kind} corpus {root} is empty ({n} records, no text in their column '{column}'); "
                     f"point data.source {kind}:PATH at records that hold text")


def source_kind(cfg) -> str:
    """text, or the record source (records.RECORD_SOURCES) that data.source names."""
    kind = cfg.source.partition(":")[0]
    return kind if kind in records.RECORD_SOURCES else "text"


class Corpus:
    """The corpus at `root`, read and split once, when first asked: the BPE trainer and the
    tokenizer share that one split, and a stage that finds its token cache never reads it."""

    def __init__(self, cfg, root: Path):
        self.cfg, self.root, self.kind = cfg, root, source_kind(cfg)
        self._parts = self._encoded = None

    def files(self) -> list[Path]:
        """The corpus's files (what the token cache's key digests), read no further."""
        files = _files(self.root)
        return files if self.kind == "text" else records.corpus_files(self.kind, self.root, files)

    def split(self) -> tuple:
        """(training texts, held-out texts, training documents, held-out documents); with BPE the
        cut of a single document moves back to the start of a character (BPE reads characters)."""
        if self._parts is None:
            cfg = self.cfg
            self._parts = _split(self.root, cfg.val_fraction, cfg.subset_seed, char_boundary=cfg.tokenizer == "bpe",
                                 kind=self.kind, column=cfg.text_column)
        return self._parts

    def tokens(self, tok) -> tuple:
        """(training token parts, held-out token parts): the split's bytes, or its ids under BPE
        tokenizer `tok`, encoded once (the trainer's window check and the token cache share them)."""
        train, test = self.split()[:2]
        if tok is None:
            return [np.frombuffer(t, dtype=np.uint8) for t in train], [np.frombuffer(t, dtype=np.uint8) for t in test]
        if self._encoded is None or self._encoded[0] is not tok:
            self._encoded = (tok, encode(tok, pieces(train)), encode(tok, pieces(test)))
        return [self._encoded[1]], [self._encoded[2]]

    def documents(self) -> str:
        return f"{len(self.split()[0])} {'files' if self.kind == 'text' else 'records'}"
