"""jsonl:, parquet: and hf_disk: data: text in records, read with `datasets`, held out and tokenized as
text files are; the token cache's key; and one clear line for each bad corpus."""
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from incubate.data import corpus as corpus_data, records
from incubate.errors import UserError
from incubate.data.corpus import split_corpus
from incubate.data.text import load_text

from ..conftest import TINY_LM, make_corpus, one_error_line, run_main, text_cfg, write_recipe

KINDS = ("jsonl", "parquet", "hf_disk")


@pytest.fixture
def hf():
    return pytest.importorskip("datasets")


def write_records(path: Path, kind: str, rows: dict) -> Path:
    """`rows` (column -> values) as a JSONL file, a Parquet file or a save_to_disk folder at `path`."""
    if kind == "jsonl":
        n = len(next(iter(rows.values())))
        path.write_text("".join(json.dumps({k: v[i] for k, v in rows.items()}) + "\n" for i in range(n)))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table(rows), path)
    else:
        import datasets
        datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


def corpus(tmp_path: Path, kind: str, files: int = 4) -> tuple[Path, Path]:
    """(a folder of text files, the same texts as records, one a file, in the files' order)."""
    folder = make_corpus(tmp_path / "files", files=files, chars=3000)
    texts = [f.read_text() for f in sorted(folder.iterdir())]
    name = {"jsonl": "c.jsonl", "parquet": "c.parquet", "hf_disk": "saved"}[kind]
    return folder, write_records(tmp_path / name, kind, {"text": texts, "body": [t.upper() for t in texts],
                                                         "id": list(range(len(texts)))})


def _cfg(source, **more):
    return text_cfg(source, **more)


@pytest.mark.parametrize("kind", KINDS)
def test_records_give_the_tokens_of_the_same_text_as_files(tmp_path, hf, kind):
    """A record is a document as a file is: the same seeded choice holds out whole records, joined as
    files are, so the records of a folder's files give its tokens, byte for byte."""
    folder, path = corpus(tmp_path, kind)
    files, recs = load_text(_cfg("text:x"), str(folder)), load_text(_cfg(f"{kind}:x"), str(path))
    assert np.array_equal(files.train.tokens, recs.train.tokens) and np.array_equal(files.test.tokens, recs.test.tokens)
    held = [int(f.stem[4:]) for f in files.test_files]          # part<i>.txt is record i
    group = "rows" if kind == "hf_disk" else path.name
    assert recs.test_files == records.listed([(group, i) for i in held])
    _, test, _, names = split_corpus(path, 0.2, 0, kind=kind, column="body")   # another column, the same rule
    assert names == recs.test_files and test.decode() == b"".join(f.read_bytes() for f in files.test_files).decode().upper()


def test_bpe_on_records_is_the_bpe_of_the_same_files(tmp_path, hf):
    folder, path = corpus(tmp_path, "jsonl")
    bpe = dict(tokenizer="bpe", vocab_size=300)
    files = load_text(_cfg("text:x", **bpe), str(folder), tmp_path / "run_files")
    recs = load_text(_cfg("jsonl:x", **bpe), str(path), tmp_path / "run_records")
    assert (tmp_path / "run_files/tokenizer.json").read_bytes() == (tmp_path / "run_records/tokenizer.json").read_bytes()
    assert np.array_equal(files.train.tokens, recs.train.tokens) and np.array_equal(files.test.tokens, recs.test.tokens)


def test_one_record_holds_out_its_tail_and_a_folder_of_files_is_read_in_order(tmp_path, hf):
    one = write_records(tmp_path / "one.jsonl", "jsonl", {"text": ["abcdefghij" * 10]})
    train, test, train_names, test_names = split_corpus(one, 0.1, 0, kind="jsonl")
    assert (train, test, train_names, test_names) == (b"abcdefghij" * 9, b"abcdefghij", ["one.jsonl:0"], ["one.jsonl:0"])
    folder, path = corpus(tmp_path, "parquet", files=6)
    shards = tmp_path / "shards"
    shards.mkdir()
    texts = [f.read_text() for f in sorted(folder.iterdir())]
    for i, part in enumerate((texts[:2], texts[2:3], [], texts[3:])):     # a shard of no rows is no document
        write_records(shards / f"{i:02d}.parquet", "parquet", {"text": part})
    a, b = split_corpus(folder, 0.3, 0), split_corpus(shards, 0.3, 0, kind="parquet")
    assert a[:2] == b[:2] and len(a[3]) == sum(len(n.partition(":")[2].split(",")) for n in b[3])


@pytest.mark.parametrize("held_out", ["test", "validation"])
def test_a_dataset_dict_holds_out_its_own_split(tmp_path, hf, held_out):
    splits = {"train": ["training text, " * 20 + str(i) for i in range(5)], held_out: ["held-out text. " * 10] * 2,
              "unsupervised": ["never read " * 50]}
    hf.DatasetDict({k: hf.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(str(tmp_path / "dd"))
    bundle = load_text(_cfg("hf_disk:x", val_fraction=0.5), str(tmp_path / "dd"))
    assert bytes(bundle.train.tokens).decode() == "".join(splits["train"])       # every training record, in order
    assert bytes(bundle.test.tokens).decode() == "".join(splits[held_out])
    assert bundle.train_files == ["train:0-4"] and bundle.test_files == [f"{held_out}:0-1"]


def test_the_key_covers_kind_column_and_bytes_and_the_same_corpus_maps_its_entry(tmp_path, hf, monkeypatch):
    _, path = corpus(tmp_path, "jsonl")
    cache = tmp_path / "cache"
    entries = lambda: sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))     # noqa: E731
    first = load_text(_cfg("jsonl:x", cache_dir=cache), str(path))
    assert len(entries()) == 1
    with monkeypatch.context() as m:        # the same corpus again: mapped, datasets not even imported
        m.setattr(records, "read", lambda *a: pytest.fail("the records were read again"))
        m.setitem(sys.modules, "datasets", None)
        again = load_text(_cfg("jsonl:x", cache_dir=cache), str(path))
    assert isinstance(again.train.tokens, np.memmap) and np.array_equal(first.train.tokens, again.train.tokens)
    load_text(_cfg("jsonl:x", cache_dir=cache, text_column="body"), str(path))
    assert len(entries()) == 2
    write_records(tmp_path / "c.parquet", "parquet", {"text": [json.loads(line)["text"] for line in path.open()]})
    load_text(_cfg("parquet:x", cache_dir=cache), str(tmp_path / "c.parquet"))     # the same texts, another kind
    path.write_text(path.read_text().replace('"id": 0', '"id": 7'))                 # a byte outside the column
    load_text(_cfg("jsonl:x", cache_dir=cache), str(path))
    assert len(entries()) == 4
    load_text(_cfg("text:x", cache_dir=cache), str(make_corpus(tmp_path / "files")))
    from incubate.data import token_cache
    key = token_cache.corpus_key(tmp_path / "files", corpus_data._files(tmp_path / "files"), {
        "val_fraction": 0.2, "subset_seed": 0, "tokenizer": "byte", "tokenizer_sha256": ""})
    assert key in entries()                 # text files keep the key they had before records came


def test_records_are_read_offline_and_leave_no_cache_behind(tmp_path, hf, monkeypatch):
    """No connection is opened, and datasets' Arrow copies live in a temporary folder, then go: nothing
    under ~/.cache (datasets' own cache folder is left as it was)."""
    import tempfile
    home_cache = Path(hf.config.HF_DATASETS_CACHE)
    before = sorted(home_cache.rglob("*")) if home_cache.exists() else None

    def refuse(*a, **k):
        raise AssertionError("a network connection was opened")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for kind in KINDS:
        folder, path = corpus(tmp_path / kind, kind)
        assert np.array_equal(load_text(_cfg(f"{kind}:x"), str(path)).test.tokens,
                              load_text(_cfg("text:x"), str(folder)).test.tokens)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert (sorted(home_cache.rglob("*")) if home_cache.exists() else None) == before


BAD = {     # case: (kind, what to write, the line's words)
    "no_column": ("jsonl", {"body": ["some text " * 30] * 3}, "has no column 'text' (its columns: body); set "
                  "data.text_column"),
    "not_strings": ("parquet", {"text": [1, 2, 3]}, "column 'text' of"),
    "lists": ("hf_disk", {"text": [["a", "b"]] * 3}, "holds List(Value('string')), not strings"),
    "empty": ("jsonl", {"text": ["", None, ""]}, "jsonl corpus"),
    "not_jsonl": ("jsonl", "this is not json\n", "is not a jsonl file that datasets can read (JSON parse error"),
    "not_parquet": ("parquet", "PAR1 and then not parquet", "is not a parquet file that datasets can read (Parquet"),
    "wrong_name": ("jsonl", "notes.txt", "is not a jsonl file (its name does not end in .jsonl, .json"),
    "not_saved": ("hf_disk", "folder", "is not a folder written by datasets' save_to_disk"),
    "no_train": ("hf_disk", "dict", "holds the splits test but no 'train'"),
    "no_datasets": ("parquet", {"text": ["some text " * 30] * 3}, "reads records with the datasets library, which "
                    "cannot be imported"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_record_corpora_get_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, case):
    kind, what, expected = BAD[case]
    path = tmp_path / ("corpus" if kind == "hf_disk" or case == "wrong_name" else f"corpus.{kind}")
    if case != "no_datasets":
        pytest.importorskip("datasets")
    if isinstance(what, dict):
        write_records(path, kind, what)
    elif case == "wrong_name":
        write_records(tmp_path / "good.jsonl", kind, {"text": ["some text " * 30] * 3})
        path.mkdir()
        (tmp_path / "good.jsonl").rename(path / "a.jsonl")
        (path / what).write_text("a note")
    elif case == "not_saved":
        path.mkdir()
        (path / "data.arrow").write_bytes(b"not arrow")
    elif case == "no_train":
        import datasets
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x" * 100]})}).save_to_disk(str(path))
    else:
        path.write_text(what)
    if case == "no_datasets":
        monkeypatch.setitem(sys.modules, "datasets", None)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"{kind}:{path}")
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run")
    assert rc == 2 and expected in one_error_line(err)
    assert set(tmp_path.iterdir()) == {path, tmp_path / "r.yaml"}        # no run directory, nothing else


def test_text_column_settings_are_checked(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"text:{make_corpus(tmp_path / 'c')}")
    for value, expected in (("body", "data.text_column 'body' names a column of records, but data.source"),
                            ("''", "data.text_column must name the column of text")):
        rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run",
                              "--set", f"data.text_column={value}")
        assert rc == 2 and expected in one_error_line(err) and not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="text has no classes"):      # the text checks hold for records too
        load_text(_cfg("jsonl:x", train_fraction=0.5), str(tmp_path / "c"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_record_corpus_trains_and_the_next_start_maps_its_cache(tmp_path, capsys, hf, monkeypatch, kind):
    from incubate.recipe.schema import load_recipe
    folder, path = corpus(tmp_path, kind)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"{kind}:{path}")
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, "meta", "--recipe", recipe, "--out", run, "--set", "meta.tokens=1280")
    assert rc == 0, err
    manifest = json.loads((run / "meta/manifest.json").read_text())
    held = [(path.name if kind != "hf_disk" else "rows", int(f.stem[4:])) for f in split_corpus(folder, 0.2, 0)[3]]
    assert manifest["updates"] == 5 and manifest["preprocess"]["test_files"] == records.listed(held)
    monkeypatch.setattr(records, "read", lambda *a: pytest.fail("the records were read again"))
    cfg = load_recipe(recipe).data
    bundle = load_text(cfg, str(path), run)
    assert isinstance(bundle.train.tokens, np.memmap)
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", run, "--set", "data.text_column=body")
    assert rc == 2 and "was made with data.text_column='text'" in one_error_line(err)
    assert len([p for p in (run / "token_cache").iterdir() if not p.name.startswith(".")]) == 1   # nothing read
