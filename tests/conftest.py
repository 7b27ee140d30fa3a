import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS_ON = "INCUBATE_GPU_TESTS_ON"


def gpu_test_device():
    """Where tests marked `gpu` run: CUDA when torch sees it; else the CPU when INCUBATE_GPU_TESTS_ON=cpu
    (the smoke run of benchmarks/gpu_run.sh sets it, so their code runs before a GPU meets it);
    else None, and they are skipped."""
    import os
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if os.environ.get(GPU_TESTS_ON) == "cpu" else None


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the tests in the reverse order: no test may depend on another having run first")


def pytest_collection_modifyitems(config, items):
    # pytest-xdist (`make test`: `-n 2 --dist loadfile`, a file's tests on one worker, so that its module
    # fixtures are built once): files with `slow` tests are handed out first, so that both workers end
    # together instead of one starting the slowest test last
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)      # stable: else as collected
    if config.getoption("reverse_order"):
        items.reverse()
    if gpu_test_device() is not None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device ({GPU_TESTS_ON}=cpu runs it on the CPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def gpu_device():
    return gpu_test_device()

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"name": "vit_tiny_patch16_224",
              "kwargs": {"patch_size": 4, "embed_dim": 16, "depth": 4, "num_heads": 2},
              "division": [1, 1, 1, 1]},
    "data": {"source": "digits", "img_size": 8, "train_fraction": 0.3, "augment": {"shift": 1}},
    "train": {"batch_size": 32, "lr": 2e-3, "lr_base_batch": 32, "epochs": 2, "warmup_epochs": 0},
    "meta": {"epochs": 2}, "incubate": {"epochs": 1}, "finetune": {"epochs": 1}, "e2e": {"epochs": 1},
}


# A tiny language model: 4 decoder layers of width 16 on byte tokens, 16-token windows.
TINY_LM = {
    "name": "tiny_lm",
    "seed": 0,
    "device": "cpu",
    "model": {"family": "causal_lm", "name": "llama",
              "kwargs": {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
                         "intermediate_size": 32},
              "division": [1, 1, 1, 1]},
    "data": {"source": "text:CORPUS", "context": 16, "val_fraction": 0.2, "eval_batch_size": 64},
    "train": {"batch_size": 16, "lr": 3e-3, "lr_base_batch": 16, "epochs": 2, "warmup_epochs": 0,
              "label_smoothing": 0.0},
    "meta": {"epochs": 2}, "incubate": {"epochs": 1, "module_init": "meta"}, "finetune": {"epochs": 1},
    "e2e": {"epochs": 1},
}


def make_corpus(root: Path, files: int = 3, chars: int = 2500) -> Path:
    """A folder of real UTF-8 text nobody wrote for the tests: slices of Python's own json package."""
    import json as stdlib_json
    src = sorted(Path(stdlib_json.__file__).parent.glob("*.py"))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"part{i}.txt").write_text(src[i % len(src)].read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return root


def text_cfg(source: str = "text:x", **changes):
    """The recipe's typed data section (DataCfg) of a tiny text corpus: 16-token windows, 20% held out."""
    from incubate.recipe.schema import DataCfg
    return DataCfg(**{"source": source, "context": 16, "val_fraction": 0.2, "subset_seed": 0, **changes})


def write_recipe(path: Path, base: dict | None = None, **changes) -> Path:
    import copy
    raw = copy.deepcopy(base or TINY)
    for key, value in changes.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml")


def default_signals() -> None:
    """preexec_fn for a child the test will signal: SIGINT and SIGTERM back to their defaults.

    A shell starts a background job (`make test &` in a script, nohup ... &) with SIGINT ignored,
    and children inherit an ignored signal: a Ctrl-C the test sends would then do nothing."""
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


PROCESS_TIMEOUT_S = 1200      # what a whole `incubate run` of processes may take on a loaded 2-core machine


def cli(*args, check=False, env=None, timeout=PROCESS_TIMEOUT_S):
    """Run the CLI in a fresh process; returns CompletedProcess."""
    import os
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "incubate.cli", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"incubate {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_process(*args, check=False):
    """The CLI in this process, its output captured without capsys (so module fixtures can use it):
    a CompletedProcess-like (returncode, stdout, stderr). A fresh process costs 8 s of imports here;
    the tests that are about processes (launchers, signals, torchrun) still start them."""
    import io
    from types import SimpleNamespace
    from incubate.cli import as_in_a_cli_process, main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), as_in_a_cli_process():
        rc = main([str(a) for a in args])
    if check and rc != 0:
        raise AssertionError(f"incubate {' '.join(map(str, args))} failed:\n{out.getvalue()}\n{err.getvalue()}")
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def run_main(capsys, *args):
    """The CLI in this process (cheaper than a subprocess): returns (exit code, stdout, stderr)."""
    from incubate.cli import as_in_a_cli_process, main
    capsys.readouterr()
    with as_in_a_cli_process():
        rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """The single line a refused command prints; fails on tracebacks or extra lines."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("incubate: error: "), err
    return lines[0]


def make_image_folder(root: Path, train=("a", "b"), val=("a", "b"), per_class=4, size=8) -> Path:
    """DATA/train/CLASS/*.png and DATA/val/CLASS/*.png of tiny random RGB images."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, classes, n in (("train", train, per_class), ("val", val, max(1, per_class // 2))):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root
