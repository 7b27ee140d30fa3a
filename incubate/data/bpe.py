"""Byte-level BPE for `data.tokenizer: bpe`: trained with the `tokenizers` library, deterministically,
and kept as RUN/tokenizer.json.

The vocabulary is the 256 bytes (GPT-2's byte-to-character map) and the merges, `data.vocab_size`
tokens in all, with no special tokens: any UTF-8 text encodes, so there is no unknown token. A run
trains its tokenizer once: every later stage, module job, process and resume loads that file
instead of training again (the first process to need it trains it under a lock,
RUN/.tokenizer.lock, and writes it atomically; the others wait and load it). What it is trained on
(the training split only, never the held-out text) is the caller's: text.py, on corpus.py's split.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError

TOKENIZER_FILE = "tokenizer.json"       # in the run directory, with data.tokenizer: bpe
BPE_MIN_FREQUENCY = 2                   # a merge joins a pair seen at least twice in the training text
PIECE_CHARS = 1 << 20                   # BPE sees a file in pieces of about this many characters

RETRAIN = "delete it and the next stage trains it again from the training split, or use a new --out"
RESTORE = ("restore the run's own tokenizer.json, or delete any other and rerun a stage of the run with its recipe: "
           "that trains the same tokenizer again from the training split")


def pieces(texts: list[bytes]) -> list[str]:
    """What BPE is trained on and encodes, one at a time: each file's text, a big one cut after a
    newline into pieces of about PIECE_CHARS characters (so encoding runs in parallel)."""
    out = []
    for raw in texts:
        text, start = raw.decode("utf-8"), 0
        while len(text) - start > PIECE_CHARS:
            nl = text.rfind("\n", start, start + PIECE_CHARS)
            cut = nl + 1 if nl >= start else start + PIECE_CHARS
            out.append(text[start:cut])
            start = cut
        if start < len(text):
            out.append(text[start:])
    return out


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's byte-to-character map: all 256 bytes are tokens, so any
    UTF-8 text encodes) of at most `vocab_size` tokens, learnt from `texts`. No special tokens.
    Deterministic: the same texts give the same file, whatever the process or thread count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=BPE_MIN_FREQUENCY, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def train_checked(texts: list[str], vocab_size: int, where) -> tuple:
    """(tokenizer, its file's bytes) trained on `texts` (the training text of `where`), refusing a
    `vocab_size` the text cannot fill. The tokenizer is read back from those bytes, as later stages
    read the saved file."""
    from tokenizers import Tokenizer
    trained = train_bpe(texts, vocab_size)
    most = trained.get_vocab_size()
    if most < vocab_size:
        raise UserError(f"data.vocab_size {vocab_size} is more than byte-level BPE learns from the "
                        f"training text of {where} ({sum(len(t.encode()) for t in texts)} bytes): it stops at "
                        f"{most} tokens (no pair of tokens left that occurs at least {BPE_MIN_FREQUENCY} "
                        f"times); set data.vocab_size <= {most}, or give more text")
    data = trained.to_str().encode("utf-8")
    return Tokenizer.from_str(data.decode("utf-8")), data


def read_tokenizer(path: Path, vocab_size: int | None = None, hint: str = RETRAIN):
    """(tokenizer, SHA-256 of the file) of a saved byte-level BPE tokenizer, refusing anything else
    (and, given `vocab_size`, another vocabulary size) in one line."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the tokenizer {path}: {e.strerror}; {hint}") from None
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:      # tokenizers raises its own Exception type for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not a tokenizer file ({first}); {hint}") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    byte_level = (isinstance(tok.model, models.BPE) and isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel)
                  and all(tok.token_to_id(c) is not None for c in pre_tokenizers.ByteLevel.alphabet())
                  and max(tok.get_vocab(with_added_tokens=True).values()) == n - 1)
    if not byte_level:
        raise UserError(f"{path} is not a byte-level BPE tokenizer with every byte a token (what data.tokenizer: "
                        f"bpe trains); {hint}")
    if vocab_size is not None and n != vocab_size:
        raise UserError(f"{path} has {n} tokens but data.vocab_size is {vocab_size}: it was not trained for this "
                        f"recipe; {hint}")
    return tok, hashlib.sha256(data).hexdigest()


def encode(tok, texts: list[str]) -> np.ndarray:
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def run_tokenizer(cfg, run, train_tokenizer: bool, train_and_save: Callable[[Path], tuple]):
    """(tokenizer, SHA-256 of its file): RUN/tokenizer.json, made there first by
    `train_and_save(path)` when missing (one process at a time)."""
    if run is None:
        raise UserError("data.tokenizer: bpe keeps its tokenizer in the run directory, and none was given; "
                        "run a stage with --out RUN")
    run = Path(run)
    path = run / TOKENIZER_FILE
    if path.exists():
        return read_tokenizer(path, cfg.vocab_size)
    if not train_tokenizer:
        raise UserError(f"{path} does not exist: a data.tokenizer: bpe run keeps the tokenizer its stages were "
                        f"trained with there; {RESTORE}")
    made = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the run directory {run}: {e.strerror}; choose a writable --out") from None
    from ..store.lock import waiting
    try:
        with waiting(run / ".tokenizer.lock"):      # one process trains; the others wait, then load its file
            if path.exists():
                return read_tokenizer(path, cfg.vocab_size)
            return train_and_save(path)
    except UserError:
        if made:        # leave no run directory behind a refused recipe
            (run / ".tokenizer.lock").unlink(missing_ok=True)
            try:
                run.rmdir()
            except OSError:
                pass
        raise
