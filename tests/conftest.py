import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

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


def write_recipe(path: Path, **changes) -> Path:
    import copy
    raw = copy.deepcopy(TINY)
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


def cli(*args, check=False, env=None, timeout=600):
    """Run the CLI in a fresh process; returns CompletedProcess."""
    import os
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "incubate.cli", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"incubate {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
