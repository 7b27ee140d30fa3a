"""text:PATH data: the held-out split, the windows, and one clear line for each bad corpus."""
import os
import numpy as np
import pytest
import torch

from incubate.errors import UserError
from incubate.data.order import Reader
from incubate.data.corpus import split_corpus
from incubate.data.text import TextLoader, load_text

from ..conftest import make_corpus, one_error_line, run_main, text_cfg, write_recipe, TINY_LM


def _cfg(source, context=16, val_fraction=0.2, seed=0):
    return text_cfg(source, context=context, val_fraction=val_fraction, subset_seed=seed)


def test_a_folder_holds_out_whole_files_fixed_by_the_seed(tmp_path):
    root = make_corpus(tmp_path / "c", files=5, chars=1000)
    train, test, train_files, test_files = split_corpus(root, 0.2, seed=0)
    assert test_files and train_files and not set(train_files) & set(test_files)
    assert set(train_files) | set(test_files) == set(root.iterdir())
    assert test == b"".join(f.read_bytes() for f in test_files)
    assert split_corpus(root, 0.2, seed=0)[3] == test_files          # the same seed, the same split
    assert any(split_corpus(root, 0.2, seed=s)[3] != test_files for s in range(1, 6))


def test_a_single_file_holds_out_its_tail_and_links_are_read_once(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 10)
    train, test, _, _ = split_corpus(f, 0.1, seed=0)
    assert train + test == f.read_bytes() and len(test) == 10
    root = make_corpus(tmp_path / "c", files=2, chars=500)
    os.symlink(root / "part0.txt", root / "link.txt")
    train, test, train_files, test_files = split_corpus(root, 0.3, seed=0)
    assert len(train) + len(test) == 1000 and all(not p.is_symlink() for p in train_files + test_files)


def test_windows_are_inputs_and_targets_shifted_by_one_and_replayable(tmp_path):
    bundle = load_text(_cfg("text:x"), str(make_corpus(tmp_path / "c")))
    assert bundle.spec.vocab_size == 256 and bundle.test_bytes == len(bundle.test) * 16
    loader = TextLoader(bundle, bundle.train, None, Reader(8, True, 0, 0, 1, "cpu"))
    x, y = next(iter(loader.epoch(3)))
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    again = next(iter(TextLoader(bundle, bundle.train, None, Reader(8, True, 0, 0, 1, "cpu")).epoch(3)))
    assert torch.equal(x, again[0])
    text = torch.from_numpy(bundle.train.tokens.astype(np.int64))
    start = int(torch.nonzero((text.unfold(0, 17, 1) == torch.cat([x[0], y[0, -1:]])).all(1))[0])
    assert start % 16 == 0                                            # windows follow each other, stride 16
    test = TextLoader(bundle, bundle.test, None, Reader(64, False, 0, 0, 1, "cpu"))
    test_windows = sum(len(xb) for xb, _ in test.epoch(0))
    assert test_windows == len(bundle.test) == (len(bundle.test.tokens) - 1) // 16


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("latin1", "is not UTF-8 (byte 0xe9 at offset 9)"),
    ("short", "fewer than one window of data.context + 1 = 17"),
])
def test_bad_corpora_get_one_line_and_write_nothing(tmp_path, capsys, case, expected):
    root = tmp_path / "corpus"
    if case != "missing":
        root.mkdir()
        (root / "a.txt").write_bytes({"empty": b"", "latin1": b"caf\xc3\xa9 caf\xe9 ok" * 20,
                                      "short": "short text".encode()}[case])
        if case == "short":
            (root / "b.txt").write_text("x" * 2000)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"text:{root}")
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run")
    assert rc == 2 and expected in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_families_refuse_the_other_tasks_data(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source="digits")
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run")
    assert rc == 2 and "is a language model but data.source 'digits' holds images" in one_error_line(err)
    recipe = write_recipe(tmp_path / "v.yaml", data__source=f"text:{make_corpus(tmp_path / 'c')}",
                          data__train_fraction=1.0)
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run2")
    assert rc == 2 and "classifies images but data.source" in one_error_line(err)


def test_the_modality_check_refuses_the_other_tasks_data_through_the_api_in_one_line(tmp_path):
    """A stage called as a library function (the CLI's entry) meets the same one check as the CLI."""
    from incubate.recipe.schema import load_recipe
    from incubate.stage_registry import META, stage
    cases = ((write_recipe(tmp_path / "r.yaml", TINY_LM, data__source="digits"),
              "model.family 'causal_lm' is a language model but data.source 'digits' holds images; use text:PATH"),
             (write_recipe(tmp_path / "v.yaml", data__source=f"text:{make_corpus(tmp_path / 'c')}",
                           data__train_fraction=1.0), "model.family 'vit' classifies images but data.source 'text:"))
    for i, (recipe, expected) in enumerate(cases):
        with pytest.raises(UserError) as e:
            stage(META).main()(load_recipe(recipe), tmp_path / f"run{i}")
        assert str(e.value).startswith(expected) and "\n" not in str(e.value)
        assert not (tmp_path / f"run{i}").exists()


def test_a_text_bundle_declares_text_and_has_no_image_fields(tmp_path):
    from incubate.data.loaders import modality
    from incubate.data.spec import TextSpec
    bundle = load_text(_cfg("text:x"), str(make_corpus(tmp_path / "c")))
    assert bundle.spec == TextSpec(16, 256, "byte", "") and bundle.spec.modality == modality(_cfg("text:x")) == "text"
    for name in ("img_size", "in_chans", "num_classes", "class_names", "mean", "vocab_size", "context"):
        assert not hasattr(bundle, name), name
    assert bundle.describe()["context"] == 16 and bundle.spec.manifest_fields() == {"classes": [], "num_classes": 256}


def test_a_bpe_load_that_trains_the_tokenizer_reads_and_splits_the_corpus_once(tmp_path, monkeypatch):
    """The trainer and the token cache share one read of the corpus; a later load finds the cache
    and the tokenizer and reads no text at all."""
    from incubate.data import corpus
    calls, split = [], corpus._split
    monkeypatch.setattr(corpus, "_split", lambda *a, **k: calls.append(a) or split(*a, **k))
    root, run = make_corpus(tmp_path / "c"), tmp_path / "run"
    first = load_text(_bpe(), str(root), run)
    assert len(calls) == 1 and (run / "tokenizer.json").exists()
    again = load_text(_bpe(), str(root), run)
    assert len(calls) == 1 and np.array_equal(again.train.tokens, first.train.tokens)


def test_text_refuses_a_class_balanced_subset(tmp_path):
    cfg = text_cfg(train_fraction=0.5)
    with pytest.raises(UserError, match="text has no classes"):
        load_text(cfg, str(make_corpus(tmp_path / "c")))


# ---------------------------------------------------------------- byte-level BPE (data.tokenizer: bpe)

def _bpe(vocab_size=300, context=16, val_fraction=0.2):
    return text_cfg(context=context, val_fraction=val_fraction, tokenizer="bpe", vocab_size=vocab_size)


def test_bpe_is_trained_on_the_training_split_only(tmp_path, capsys):
    """A word repeated only in the held-out file is not learnt (no merge holds it); the same word in a
    training file becomes one token. So the trainer saw the training files and nothing else."""
    word = " quokkazyzzyva"
    held, trained = [], []
    for where in ("held", "train"):
        root = make_corpus(tmp_path / where)
        _, _, train_files, test_files = split_corpus(root, 0.2, seed=0)
        f = (test_files if where == "held" else train_files)[0]
        f.write_text(f.read_text() + word * 40)
        assert f in split_corpus(root, 0.2, seed=0)[3 if where == "held" else 2]    # still in that split
        bundle = load_text(_bpe(), str(root), tmp_path / f"run_{where}")
        from incubate.data.text import read_tokenizer
        tok, digest = read_tokenizer(tmp_path / f"run_{where}" / "tokenizer.json", 300)
        assert bundle.spec.vocab_size == 300 and bundle.spec.tokenizer_sha256 == digest
        (held if where == "held" else trained).extend([len(tok.encode(word).ids),
                                                       [t for t in tok.get_vocab() if "zyzzy" in t]])
        assert tok.decode(bundle.test.tokens.tolist()) == b"".join(p.read_bytes() for p in test_files).decode()
    assert held[0] > 5 and held[1] == []                # only in the held-out text: bytes and small merges
    assert trained[0] == 1 and "Ġquokkazyzzyva" in trained[1]


def test_bpe_is_saved_once_in_the_run_and_loaded_after(tmp_path, capsys):
    """The first call trains and writes RUN/tokenizer.json; four at once (threads: each its own flock)
    write it once and all read the same file; a later call loads it; training is deterministic."""
    import threading
    root = make_corpus(tmp_path / "c")
    run = tmp_path / "run"
    bundles = [None] * 4

    def one(i):
        bundles[i] = load_text(_bpe(), str(root), run)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = capsys.readouterr().out
    assert out.count("saved as") == 1 and all(b is not None for b in bundles)
    saved = (run / "tokenizer.json").read_bytes()
    stat = (run / "tokenizer.json").stat()
    assert all(b.spec.tokenizer_sha256 == bundles[0].spec.tokenizer_sha256 for b in bundles)
    assert all(np.array_equal(b.train.tokens, bundles[0].train.tokens) for b in bundles)
    again = load_text(_bpe(), str(root), run)
    assert "saved as" not in capsys.readouterr().out and (run / "tokenizer.json").stat().st_mtime_ns == stat.st_mtime_ns
    assert np.array_equal(again.test.tokens, bundles[0].test.tokens)
    load_text(_bpe(), str(root), tmp_path / "run2")
    assert (tmp_path / "run2/tokenizer.json").read_bytes() == saved
    assert sorted(p.name for p in run.iterdir()) == [".tokenizer.lock", "token_cache", "tokenizer.json"]   # no temporary file left
    assert not [p for p in (run / "token_cache").iterdir() if ".tmp" in p.name]
    with pytest.raises(UserError, match="tokenizer.json does not exist"):     # evaluate never trains one
        load_text(_bpe(), str(root), tmp_path / "run3", train_tokenizer=False)


def test_bpe_bits_per_byte_count_the_bytes_of_the_predicted_tokens(tmp_path):
    """The denominator of bits per byte is the UTF-8 bytes the predicted (target) tokens stand for: what
    a byte run of the same corpus divides by, less what BPE's first token and tail leave unpredicted."""
    from incubate.data.text import read_tokenizer
    root = make_corpus(tmp_path / "c")
    held = split_corpus(root, 0.2, seed=0)[1]
    for context in (1, 16):
        byte = load_text(_cfg("text:x", context=context), str(root))
        bpe = load_text(_bpe(context=context), str(root), tmp_path / "run")
        tok, _ = read_tokenizer(tmp_path / "run/tokenizer.json")
        ids = torch.from_numpy(bpe.test.tokens.astype(np.int64))
        assert int(bpe.token_bytes[ids].sum()) == len(held)             # every token's bytes: the whole text
        n = len(bpe.test) * context
        first, tail = tok.decode(ids[:1].tolist()).encode(), tok.decode(ids[1 + n:].tolist()).encode()
        assert bpe.test_bytes == len(tok.decode(ids[1:1 + n].tolist()).encode()) == len(held) - len(first) - len(tail)
        loader = TextLoader(bpe, bpe.test, None, Reader(64, False, 0, 0, 1, "cpu"))
        targets = torch.cat([y.reshape(-1) for _, y in loader.epoch(0)])
        assert int(bpe.token_bytes[targets].sum()) == bpe.test_bytes      # what the evaluation predicts
        if context == 1:    # every token after the first is predicted, by either tokenizer
            assert byte.test_bytes == len(held) - 1 and bpe.test_bytes == byte.test_bytes + 1 - len(first)
        assert bpe.describe()["test_bytes"] == bpe.test_bytes and "test_bytes" not in byte.describe()


def test_bpe_cuts_a_single_file_at_a_character(tmp_path):
    from incubate.data.bpe import pieces
    from incubate.data.corpus import _split
    f = tmp_path / "one.txt"
    f.write_text("é" * 200)                       # 400 bytes; a 10.25% tail would cut a character in two
    train, test, _, _ = split_corpus(f, 0.1025, seed=0)
    assert len(test) == 41                        # bytes keep their cut
    train, test, _, _ = _split(f, 0.1025, 0, char_boundary=True)
    assert pieces(train) == ["é" * 179] and pieces(test) == ["é" * 21]
    big = ("x" * 99 + "\n") * 30_000              # 3 MB: pieces of at most 1 Mi characters, cut after a newline
    assert "".join(pieces([big.encode()])) == big and all(p.endswith("\n") for p in pieces([big.encode()]))


@pytest.mark.parametrize("case, expected", [
    ("too_large", "data.vocab_size 5000 is more than byte-level BPE learns from the training text of"),
    ("too_small", "data.vocab_size must be more than 256 with data.tokenizer: bpe"),
    ("unknown", "data.tokenizer must be byte or bpe, got 'wordpiece'"),
])
def test_bad_bpe_settings_get_one_line_and_write_nothing(tmp_path, capsys, case, expected):
    corpus = make_corpus(tmp_path / "c")
    sets = {"too_large": ["data.vocab_size=5000"], "too_small": ["data.vocab_size=256"],
            "unknown": ["data.tokenizer=wordpiece"]}[case]
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"text:{corpus}", data__tokenizer="bpe")
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run",
                          *[a for s in sets for a in ("--set", s)])
    assert rc == 2 and expected in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_a_mismatching_tokenizer_in_the_run_is_refused(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "c")
    load_text(_bpe(vocab_size=320), str(corpus), tmp_path / "other")
    run = tmp_path / "run"
    run.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"text:{corpus}", data__tokenizer="bpe",
                          data__vocab_size=300)
    cases = [((tmp_path / "other/tokenizer.json").read_bytes(), "has 320 tokens but data.vocab_size is 300"),
             (b'{"version": "1.0", "truncated', "is not a tokenizer file"),
             (None, "is not a byte-level BPE tokenizer with every byte a token")]
    for data, expected in cases:
        if data is None:        # a valid tokenizer of another kind
            from tokenizers import Tokenizer, models
            Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(run / "tokenizer.json"))
        else:
            (run / "tokenizer.json").write_bytes(data)
        before = (run / "tokenizer.json").read_bytes()
        rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", run)
        assert rc == 2 and expected in one_error_line(err) and str(run / "tokenizer.json") in err
        assert (run / "tokenizer.json").read_bytes() == before and not (run / "meta").exists()
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", run, "--set", "data.tokenizer=byte")
    assert rc == 2 and "is the BPE tokenizer of a data.tokenizer: bpe run, but the recipe says" in one_error_line(err)
