"""text:PATH data: the held-out split, the windows, and one clear line for each bad corpus."""
import os
from types import SimpleNamespace

import pytest
import torch

from incubate.errors import UserError
from incubate.text_data import TextLoader, load_text, split_corpus

from ..conftest import make_corpus, one_error_line, run_main, write_recipe, TINY_LM


def _cfg(source, context=16, val_fraction=0.2, seed=0):
    return SimpleNamespace(source=source, context=context, val_fraction=val_fraction, subset_seed=seed)


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
    assert bundle.vocab_size == 256 and bundle.test_bytes == len(bundle.test) * 16
    loader = TextLoader(bundle, bundle.train, None, 8, True, 0, 0, 1, "cpu")
    x, y = next(iter(loader.epoch(3)))
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    again = next(iter(TextLoader(bundle, bundle.train, None, 8, True, 0, 0, 1, "cpu").epoch(3)))
    assert torch.equal(x, again[0])
    text = bundle.train.tokens
    start = int(torch.nonzero((text.unfold(0, 17, 1) == torch.cat([x[0], y[0, -1:]])).all(1))[0])
    assert start % 16 == 0                                            # windows follow each other, stride 16
    test_windows = sum(len(xb) for xb, _ in TextLoader(bundle, bundle.test, None, 64, False, 0, 0, 1, "cpu").epoch(0))
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


def test_text_refuses_a_class_balanced_subset(tmp_path):
    cfg = SimpleNamespace(source="text:x", context=16, val_fraction=0.2, subset_seed=0, train_fraction=0.5)
    with pytest.raises(UserError, match="text has no classes"):
        load_text(cfg, str(make_corpus(tmp_path / "c")))
