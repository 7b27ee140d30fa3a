"""Text in records: `data.source: jsonl:PATH` or `parquet:PATH` (a file, or a folder of such files)
and `hf_disk:PATH` (a folder written by the `datasets` library's save_to_disk), the text in the
column `data.text_column` (default `text`).

They are read with `datasets` (the optional extra deep-incubate[datasets]), imported here only when
such a corpus is tokenized (a stage that finds its token cache never imports it), from local files
only, offline: load_dataset("json" | "parquet", data_files=FILE) one file at a time, with its Arrow
copy in a temporary folder removed after reading (never ~/.cache), and load_from_disk(PATH), which
maps the folder's own Arrow files. A record is a document, as a file is for text:PATH: corpus.py
holds out whole records by the same seeded rule and joins them as it joins files. A DatasetDict
folder trains on its `train` split and holds out its `test` split (else `validation`); its other
splits are not read. A null text is an empty document, skipped as an empty file is.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError

RECORD_SOURCES = ("jsonl", "parquet", "hf_disk")
SUFFIXES = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"), "parquet": (".parquet",)}
BUILDERS = {"jsonl": "json", "parquet": "parquet"}      # datasets' packaged readers of local files
HELD_OUT_SPLITS = ("test", "validation")                # a DatasetDict's split held out, the first found
INSTALL = "pip install 'deep-incubate[datasets]' (or pip install datasets)"


@dataclass
class Documents:
    """A corpus's documents in order: a name and its UTF-8 text each. A file's name is its path; a
    record's is (group, row): its file relative to the corpus, or its split, and its row there."""
    names: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    held: Optional["Documents"] = None      # the held-out split the source brings (a DatasetDict's test)


def corpus_files(kind: str, root: Path, files: list[Path]) -> list[Path]:
    """The files of a record corpus (what the token cache's key digests), refused by their names
    when they are not of the kind data.source says, before anything is read."""
    if kind == "hf_disk":
        if not (root / "dataset_dict.json").is_file() and not (
                (root / "state.json").is_file() and (root / "dataset_info.json").is_file()):
            raise UserError(f"{root} is not a folder written by datasets' save_to_disk (it has no dataset_dict.json, "
                            f"nor state.json and dataset_info.json); save the records with Dataset.save_to_disk, or "
                            f"use jsonl:PATH or parquet:PATH for files")
        return files
    for f in files:
        if not f.name.endswith(SUFFIXES[kind]):
            raise UserError(f"{f} is not a {kind} file (its name does not end in {', '.join(SUFFIXES[kind])}), in the "
                            f"corpus of data.source {kind}:{root}; remove it from the folder, or point data.source at "
                            f"the {kind} files alone")
    return files


def read(kind: str, root: Path, files: list[Path], column: str) -> Documents:
    """Every record's text in column `column`, in file (or split) and row order."""
    ds = _datasets(kind)
    with _quiet(ds):
        if kind == "hf_disk":
            return _saved(ds, root, column)
        base = root if root.is_dir() else root.parent
        docs = Documents()
        with tempfile.TemporaryDirectory(prefix="incubate-datasets-") as cache:
            for f in files:
                table = _load_file(ds, kind, f, cache)
                texts = [] if table is None else _texts(ds, table, column, str(f))
                docs.names += [(str(f.relative_to(base)), row) for row in range(len(texts))]
                docs.texts += texts
        return docs


def _datasets(kind: str):
    before = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"     # read when datasets is first imported: it never asks the Hub
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"data.source {kind}:PATH reads records with the datasets library, which cannot be imported "
                        f"({e}); {INSTALL}") from None
    finally:        # child processes get the environment they were given
        if before is None:
            del os.environ["HF_DATASETS_OFFLINE"]
        else:
            os.environ["HF_DATASETS_OFFLINE"] = before
    return datasets


@contextlib.contextmanager
def _quiet(ds):
    """No progress bars and no log lines from datasets (a refusal is one line: ours)."""
    level, bars = ds.utils.logging.get_verbosity(), not ds.are_progress_bars_disabled()
    ds.utils.logging.set_verbosity(ds.utils.logging.CRITICAL + 1)
    ds.disable_progress_bars()
    try:
        yield
    finally:
        ds.utils.logging.set_verbosity(level)
        if bars:
            ds.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    return (str(cause).splitlines() or [""])[0] or type(cause).__name__


def _load_file(ds, kind: str, path: Path, cache: str):
    """One file as a datasets table (None: a file of no records), its Arrow copy under `cache`."""
    if path.stat().st_size == 0 or kind == "parquet" and _parquet_rows(path) == 0:
        return None
    try:
        return ds.load_dataset(BUILDERS[kind], data_files=[str(path)], split="train", cache_dir=cache)
    except StopIteration:       # datasets' json reader on a compressed file of no lines
        return None
    except Exception as e:      # pyarrow's and datasets' own errors, whatever the file holds
        raise UserError(f"{path} is not a {kind} file that datasets can read ({_first_line(e)}); fix or remove it, "
                        f"or use the data.source kind it is (jsonl:, parquet:, hf_disk:, text:)") from None


def _parquet_rows(path: Path) -> int:
    """Rows of a Parquet file by its footer (datasets cannot read one of no rows); -1 if unreadable."""
    import pyarrow.parquet as pq
    try:
        return pq.read_metadata(path).num_rows
    except Exception:       # not Parquet: datasets' reader says why
        return -1


def _texts(ds, table, column: str, where: str) -> list[bytes]:
    if column not in table.column_names:
        raise UserError(f"{where} has no column '{column}' (its columns: {', '.join(table.column_names)}); set "
                        f"data.text_column to the one that holds the text")
    feature = table.features[column]
    if not (isinstance(feature, ds.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"column '{column}' of {where} holds {feature}, not strings; set data.text_column to a "
                        f"column of text")
    import pyarrow as pa
    texts = table.with_format("arrow")[column].cast(pa.large_binary())     # the UTF-8 bytes, no Python strings
    return [t or b"" for t in texts.to_pylist()]


def _saved(ds, root: Path, column: str) -> Documents:
    try:
        saved = ds.load_from_disk(str(root))
    except Exception as e:
        raise UserError(f"cannot read {root} with datasets.load_from_disk ({_first_line(e)}); save it again with "
                        f"save_to_disk") from None
    if not isinstance(saved, ds.DatasetDict):
        texts = _texts(ds, saved, column, str(root))
        return Documents([("rows", row) for row in range(len(texts))], texts)
    if "train" not in saved:
        raise UserError(f"{root} holds the splits {', '.join(saved)} but no 'train'; save the training records as "
                        f"the split 'train' ({' or '.join(HELD_OUT_SPLITS)} is held out)")
    docs = [_split_docs(ds, saved, name, root, column) for name in ("train", *HELD_OUT_SPLITS) if name in saved]
    return Documents(docs[0].names, docs[0].texts, docs[1] if len(docs) > 1 else None)


def _split_docs(ds, saved, name: str, root: Path, column: str) -> Documents:
    texts = _texts(ds, saved[name], column, f"{root} (split '{name}')")
    return Documents([(name, row) for row in range(len(texts))], texts)


def listed(names: list) -> list[str]:
    """Records' (group, row) names, in order, as one line a group: 'a.jsonl:0-4,7,9-12'."""
    spans: dict = {}
    for group, row in names:
        runs = spans.setdefault(group, [])
        if runs and runs[-1][1] == row - 1:
            runs[-1][1] = row
        else:
            runs.append([row, row])
    return [f"{g}:" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) for g, runs in spans.items()]
