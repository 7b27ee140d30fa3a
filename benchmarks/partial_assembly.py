"""Where does an assembly break? Top-1 of every mix of target (T) and meta (M) modules.

For a finished run directory, evaluates the 2^K chains that take module i from the assembled target
(T) or from the meta model (M): MMMM is the meta model, TTTT the assembled target, and one T
among Ms is hybrid(i). Also prints the mean token norm after each module boundary.

  python -m benchmarks.partial_assembly RUN [--images 2000]
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from incubate.store.checkpoint import load_weights
from incubate.recipe.schema import load_recipe
from incubate.data.loaders import Loader, Reader, load_data
from incubate.families import get_family
from incubate.modular import run_module


def load(family, run: Path, stage: str):
    m = json.loads((run / stage / "manifest.json").read_text())
    model = family.build(m["model"]["name"], m["model"]["kwargs"])
    model.load_state_dict(load_weights(run / stage / "model.safetensors", m["sha256"]), strict=True)
    return model.eval()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=2000, help="test images to use (from the start of the split)")
    args = ap.parse_args()
    run = Path(args.run)
    recipe = load_recipe(run / "recipe.yaml")
    family = get_family(recipe.model.family)
    meta, target = load(family, run, "meta"), load(family, run, "assembled")
    div, mdiv = recipe.model.division, recipe.meta_division
    bundle = load_data(recipe.data)
    loader = Loader(bundle, bundle.test, recipe.data, Reader(args.images, False, 0, 0, 1, "cpu"))
    x, y = next(iter(loader.epoch(0)))
    print(f"{run}: {len(y)} test images\n\n| chain | top-1 (%) | token norm after each boundary |\n|---|---:|---|")
    for chain in itertools.product("MT", repeat=len(div)):
        h, norms = x, []
        for i, src in enumerate(chain):
            h = run_module(family, target, div, i, h) if src == "T" else run_module(family, meta, mdiv, i, h)
            if i < len(div) - 1:
                norms.append(f"{h.norm(dim=-1).mean().item():.2f}")
        acc = 100.0 * (h.argmax(-1) == y).float().mean().item()
        print(f"| {''.join(chain)} | {acc:.1f} | {' / '.join(norms)} |")


if __name__ == "__main__":
    main()
