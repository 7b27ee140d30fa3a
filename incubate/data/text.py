"""Text for causal language models: a corpus (corpus.py: its documents, read and split into training
and held-out text once) as token windows, from its tokenizer and the token cache, and the loader of
those windows. `load_text` goes down the floors in order: the recipe's data settings checked, the
corpus, its tokenizer, its token cache, the windows, the bundle.

Tokens are bytes by default (`data.tokenizer: byte`, vocabulary 256: nothing to download or train),
or byte-level BPE (`data.tokenizer: bpe`, bpe.py), trained on the training split only (never the
held-out text) and saved once as RUN/tokenizer.json. Any UTF-8 text encodes (every byte is a token),
so there is no unknown token. (RESTORE, TOKENIZER_FILE and read_tokenizer are imported from here too.)

Each split is cut into windows of `data.context` + 1 tokens that follow each other with a stride of
`data.context`, so every token after the first is predicted exactly once in an epoch. A batch is
(inputs, targets): the window without its last token and the window without its first. TextLoader
keeps data.Loader's contract (len, epoch(e), take_skipped) and its orders: a function of (seed,
epoch, rank), so a resumed run replays the same batches.

Bits per byte divide by the UTF-8 bytes of the held-out text that the predicted tokens stand for
(`TextBundle.test_bytes`): the held-out text less its first token (nothing comes before it to
predict it from) and less the tail after the last whole window (shorter than one window, never
predicted). With bytes that is len(windows) * context; with BPE the byte lengths of those tokens.

The token ids live in the token cache (token_cache.py): memory-mapped files made once per corpus,
split and tokenizer. `data.eval_tokens` picks a fixed slice of the held-out windows (evenly spaced
over it): every evaluation of the run reads that slice, during training (train.eval_every) and at
epoch ends, so that it costs little and every stage and method is scored on the same text.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import token_cache
from .bpe import RESTORE, TOKENIZER_FILE, pieces, read_tokenizer, run_tokenizer, train_checked  # noqa: F401
from .corpus import Corpus, source_kind
from ..errors import UserError
from .order import Reader, epoch_order
from .spec import TextSpec

BYTE_VOCAB = 256


@dataclass
class TextSplit:
    """One split's tokens, read as windows of `context` + 1 tokens, one every `stride` tokens
    (0: every `context`, so that windows follow each other and each token is predicted once)."""
    tokens: np.ndarray              # 1-D token ids (a read-only memory map of the token cache)
    context: int
    stride: int = 0

    def __post_init__(self):
        if isinstance(self.tokens, torch.Tensor):
            self.tokens = self.tokens.numpy()
        self.stride = self.stride or self.context

    def __len__(self) -> int:
        return max((len(self.tokens) - self.context - 1) // self.stride + 1, 0)

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        starts = np.asarray(idx, dtype=np.int64) * self.stride
        return torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.context + 1)[None]].astype(np.int64))

    def targets(self) -> np.ndarray:
        """Every token a window predicts (all but each window's first), in window order."""
        if self.stride == self.context:
            return self.tokens[1:1 + len(self) * self.context]
        return self.windows(torch.arange(len(self)))[:, 1:].numpy().reshape(-1)

    def spaced(self, n: int) -> "TextSplit":
        """`n` of the windows, evenly spaced over the split, as a split of their own."""
        picked = torch.from_numpy(np.linspace(0, len(self) - 1, n).round().astype(np.int64))
        return TextSplit(self.windows(picked).numpy().reshape(-1), self.context, self.context + 1)


@dataclass
class TextBundle:
    """A corpus's two splits as token windows and what it is (`spec`: context, vocabulary, tokenizer)."""
    train: TextSplit
    test: TextSplit
    spec: TextSpec
    source: str
    train_files: list = field(default_factory=list)
    test_files: list = field(default_factory=list)
    token_bytes: Optional[torch.Tensor] = None      # bpe: UTF-8 bytes each token id stands for

    @property
    def test_bytes(self) -> int:
        """UTF-8 bytes of the held-out text whose tokens are predicted (bits per byte divide by it):
        the targets of every window of the held-out split."""
        if self.token_bytes is None:
            return len(self.test) * self.spec.context     # byte tokens: one byte a token
        return int(self.token_bytes[torch.from_numpy(self.test.targets().astype(np.int64))].sum())

    def eval_slice(self, eval_tokens: int) -> "TextBundle":
        """This bundle with its held-out split cut to `eval_tokens` predicted tokens (0: all of it),
        in whole windows evenly spaced over it: the same slice for every stage and method."""
        if not eval_tokens:
            return self
        check_eval_tokens(eval_tokens, len(self.test), self.spec.context)
        return replace(self, test=self.test.spaced(eval_tokens // self.spec.context))

    def describe(self, augment=None) -> dict:
        """What a manifest records of the data (in place of an image pipeline: text has no augmentation)."""
        s = self.spec
        d = {"tokenizer": s.tokenizer, "vocab_size": s.vocab_size, "context": s.context,
             "train_tokens": len(self.train.tokens), "test_tokens": len(self.test.tokens),
             "test_files": [str(f) for f in self.test_files]}
        if s.tokenizer != "byte":
            d.update(tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=s.tokenizer_sha256, test_bytes=self.test_bytes)
        return d


def check_eval_tokens(eval_tokens: int, windows: int, context: int) -> None:
    if eval_tokens and not 1 <= eval_tokens // context <= windows:
        raise UserError(f"data.eval_tokens {eval_tokens} must be between one window (data.context = {context}) "
                        f"and the held-out text's {windows * context} predicted tokens; set it in that range, or 0 "
                        f"for the whole held-out split")


def load_text(cfg, path: str, run=None, train_tokenizer: bool = True) -> TextBundle:
    """The corpus at `path` (data.source's path; `cfg` the recipe's DataCfg) as token windows, from
    the token cache (RUN/token_cache or data.cache_dir; in memory without either). With
    data.tokenizer: bpe, `run` is the run directory whose tokenizer.json is loaded, or trained and
    saved there when missing and `train_tokenizer`."""
    corpus = Corpus(cfg, _checked_root(cfg, path, run))
    files = corpus.files()
    tok, digest = (run_tokenizer(cfg, run, train_tokenizer, lambda dest: _train_and_save(cfg, corpus, dest))
                   if cfg.tokenizer == "bpe" else (None, ""))
    spec = TextSpec(cfg.context, BYTE_VOCAB if tok is None else tok.get_vocab_size(), cfg.tokenizer, digest)
    settings = {"val_fraction": cfg.val_fraction, "subset_seed": cfg.subset_seed, "tokenizer": cfg.tokenizer,
                "tokenizer_sha256": digest}
    if corpus.kind != "text":      # text files keep the keys their caches were made with
        settings.update(source_kind=corpus.kind, text_column=cfg.text_column)
    where = token_cache.cache_root(cfg, run)
    key = token_cache.corpus_key(corpus.root, files, settings) if where is not None else ""
    tokens = token_cache.load_or_build(where, key, spec.vocab_size, lambda: _tokenize(cfg, corpus, tok),
                                       {"source": str(corpus.root), **settings})
    token_bytes = None if tok is None else torch.tensor([len(tok.id_to_token(i)) for i in range(spec.vocab_size)])
    bundle = TextBundle(TextSplit(tokens.train, cfg.context), TextSplit(tokens.test, cfg.context), spec, cfg.source,
                        tokens.train_files, tokens.test_files, token_bytes)
    for name, split in (("training", bundle.train), ("held-out", bundle.test)):
        _check_windows(name, len(split.tokens), corpus.root, cfg.context)   # a cache made with another data.context
    return bundle.eval_slice(cfg.eval_tokens)


def _tokenize(cfg, corpus: Corpus, tok) -> tuple:
    """What the token cache stores of the corpus: (training token parts, held-out token parts,
    training documents, held-out documents), checked before anything is written."""
    train, test = corpus.tokens(tok)
    train_files, test_files = corpus.split()[2:]
    for name, parts in (("training", train), ("held-out", test)):
        _check_windows(name, sum(len(p) for p in parts), corpus.root, cfg.context)
    windows = (sum(len(p) for p in test) - 1) // cfg.context        # TextSplit's count, stride = context
    check_eval_tokens(cfg.eval_tokens, windows, cfg.context)
    return train, test, train_files, test_files


def _checked_root(cfg, path: str, run) -> Path:
    root = Path(path)
    if not path:
        raise UserError(f"data.source '{cfg.source}' needs a path, e.g. text:/usr/share/common-licenses")
    if not root.exists():
        raise UserError(f"data path {path} (from data.source '{cfg.source}') does not exist")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.train_fraction < 1.0:
        raise UserError(f"data.train_fraction {cfg.train_fraction} takes a class-balanced subset of images; "
                        f"text has no classes: remove it (or give fewer files in text:PATH)")
    if cfg.context < 1:
        raise UserError(f"data.context must be >= 1 token, got {cfg.context}")
    if source_kind(cfg) == "text" and cfg.text_column != "text":
        raise UserError(f"data.text_column '{cfg.text_column}' names a column of records, but data.source "
                        f"'{cfg.source}' reads text files; remove it, or use jsonl:, parquet: or hf_disk:PATH")
    if cfg.tokenizer not in ("byte", "bpe"):
        raise UserError(f"data.tokenizer must be byte or bpe, got {cfg.tokenizer!r}")
    if cfg.tokenizer == "byte" and run is not None and (Path(run) / TOKENIZER_FILE).exists():
        raise UserError(f"{Path(run) / TOKENIZER_FILE} is the BPE tokenizer of a data.tokenizer: bpe run, but the "
                        f"recipe says data.tokenizer: byte; use data.tokenizer: bpe as that run did, or a new --out")
    return root


def _check_windows(name: str, n_tokens: int, root: Path, context: int) -> None:
    if n_tokens < context + 1:
        raise UserError(f"the {name} text of {root} has {n_tokens} tokens, fewer than one window of "
                        f"data.context + 1 = {context + 1}; use a smaller data.context or more text")


def _train_and_save(cfg, corpus: Corpus, path: Path):
    """Train BPE on the training split, check that both splits still make a window, save it."""
    from ..store.checkpoint import write_bytes_atomic
    tok, data = train_checked(pieces(corpus.split()[0]), cfg.vocab_size, corpus.root)
    (train,), (test,) = corpus.tokens(tok)
    n_train = len(train)
    for name, n in (("training", n_train), ("held-out", len(test))):
        _check_windows(name, n, corpus.root, cfg.context)
    write_bytes_atomic(path, data)
    print(f"tokenizer: byte-level BPE of {tok.get_vocab_size()} tokens trained on the training split "
          f"({corpus.documents()}, {n_train} tokens); saved as {path}", flush=True)
    return tok, hashlib.sha256(data).hexdigest()


class TextLoader:
    """Batches of one split's windows for one rank: `epoch(e)` yields (inputs, targets) on `device`."""

    def __init__(self, bundle: TextBundle, split: TextSplit, cfg, reader: Reader):
        self.bundle, self.split, self.reader = bundle, split, reader
        self.batch, self.train, self.seed = reader.batch, reader.train, reader.seed
        self.rank, self.world, self.device = reader.rank, reader.world, reader.device

    def __len__(self):
        n = len(self.split)
        if self.train:
            return n // (self.batch * self.world)
        return -(-len(range(self.rank, n, self.world)) // self.batch)

    def epoch(self, epoch: int, start: int = 0):
        """Batches of `epoch` from batch `start` on (a mid-epoch resume): the same batches an
        uninterrupted epoch yields from there (the order is the only randomness)."""
        order = epoch_order(len(self.split), epoch, self.reader)
        for start in range(start * self.batch, len(order), self.batch):
            w = self.split.windows(order[start:start + self.batch])
            yield w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def take_skipped(self) -> list[str]:
        return []
