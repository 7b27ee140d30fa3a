"""Accuracy and loss of any stage's weights on the recipe's test split."""
from __future__ import annotations

from pathlib import Path

from ..recipe.schema import Recipe
from ..data.loaders import load_data, make_loader, modality
from ..data.order import Reader
from ..train.dist import setup_dist
from ..train.engine import evaluate
from ..errors import UserError
from ..families import get_family
from ..store.rundir import StageDir, check_tokenizer
from ..runs import load_hybrid, load_model
from ..tasks import check_modality, task_of
from ..data.text import TOKENIZER_FILE


def _check_tokens(bundle, m: dict, sd: StageDir) -> None:
    """Refuse to evaluate a BPE model with bytes, or with a tokenizer other than its stage's."""
    have = bundle.spec.tokenizer_sha256 if bundle.spec.modality == "text" else ""
    if (m.get("preprocess") or {}).get("tokenizer_sha256") and not have:
        raise UserError(f"{sd.weights} was trained on BPE tokens (data.tokenizer: bpe) but the recipe reads bytes; "
                        f"evaluate it with the recipe of its run directory")
    check_tokenizer(m, have, sd.run / TOKENIZER_FILE, sd.weights)


def _stage_of(checkpoint) -> StageDir:
    """The finished stage whose folder (or model.safetensors) `checkpoint` names."""
    path = Path(checkpoint)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a stage folder or its model.safetensors")
    if not (weights.parent / "manifest.json").exists():
        raise UserError(f"{weights} has no manifest.json beside it; evaluate a stage folder of a run directory")
    return StageDir.at(weights.parent)


def main(recipe: Recipe, checkpoint) -> dict:
    sd = _stage_of(checkpoint)
    m = sd.require_finished()
    dist = setup_dist(recipe.device)
    net = load_hybrid(sd) if sd.module is not None else load_model(sd)   # a module runs inside its meta model
    task = task_of(get_family(m["family"]))
    check_modality(task, modality(recipe.data), m["family"], recipe.data.source)
    bundle = load_data(recipe.data, sd.run, train_tokenizer=False)   # BPE: the run's tokenizer.json, never a new one
    _check_tokens(bundle, m, sd)
    if bundle.spec.outputs != m["num_classes"]:
        raise UserError(f"{sd.weights} predicts {m['num_classes']} classes but {recipe.data.source} has "
                        f"{bundle.spec.outputs}; evaluate on the data it was trained on")
    net.to(dist.device)
    loader = make_loader(bundle, bundle.test, recipe.data, Reader(
        recipe.data.eval_batch_size, False, recipe.seed, dist.rank, dist.world, dist.device))
    result = evaluate(net, loader, dist, task=task)
    if dist.main:
        unit = {"image": "images", "text": "tokens"}[bundle.spec.modality]
        print(f"{sd.label}: {task.text(result)}  loss {result['loss']:.4f}  ({result['n']} {unit})")
    return result
