"""Accuracy and loss of any stage's weights on the recipe's test split."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_weights, read_json
from ..config import Recipe
from ..data import load_data, make_loader
from ..dist import setup_dist
from ..engine import evaluate
from ..errors import UserError
from ..families import get_family
from ..modular import Hybrid, load_strict
from ..rundir import StageDir
from ..tasks import task_of
from ..text_data import RESTORE, TOKENIZER_FILE


def check_tokenizer(bundle, m: dict, weights, run) -> None:
    """Refuse to evaluate a BPE model with a tokenizer other than the one its stage was trained with."""
    want = (m.get("preprocess") or {}).get("tokenizer_sha256")
    have = getattr(bundle, "tokenizer_sha256", "")
    if want and not have:
        raise UserError(f"{weights} was trained on BPE tokens (data.tokenizer: bpe) but the recipe reads bytes; "
                        f"evaluate it with the recipe of its run directory")
    if want and want != have:
        raise UserError(f"{Path(run) / TOKENIZER_FILE} (SHA-256 {have[:12]}) is not the tokenizer {weights} was "
                        f"trained with ({want[:12]}, its manifest); {RESTORE}")


def main(recipe: Recipe, checkpoint) -> dict:
    path = Path(checkpoint)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a stage folder or its model.safetensors")
    manifest_path = weights.parent / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{weights} has no manifest.json beside it; evaluate a stage folder of a run directory")
    m = read_json(manifest_path)
    dist = setup_dist(recipe.device)
    family = get_family(m["family"])
    state = load_weights(weights, m.get("sha256"))
    model = family.build(m["model"]["name"], m["model"]["kwargs"])
    if m["stage"] == "incubate":
        run = weights.parent.parent.parent
        meta_stage = StageDir(run, "meta")
        meta_m = meta_stage.require_finished("a module is evaluated inside its run's meta model")
        meta = family.build(meta_m["model"]["name"], meta_m["model"]["kwargs"])
        load_strict(meta, meta_stage.load(), meta_stage.weights, "its manifest's meta model")
        family.keep_only(model, m["division"], m["module"])
        load_strict(model, state, weights, f"module {m['module']} of its manifest's model")
        net = Hybrid(family, meta, meta_m["division"], model, m["division"], m["module"])
    else:
        load_strict(model, state, weights, f"its manifest's model ({m['model']['name']})")
        net = model
    run = weights.parent.parent.parent if m["stage"] == "incubate" else weights.parent.parent
    bundle = load_data(recipe.data, run, train_tokenizer=False)   # BPE: the run's tokenizer.json, never a new one
    check_tokenizer(bundle, m, weights, run)
    if bundle.num_classes != m["num_classes"]:
        raise UserError(f"{weights} predicts {m['num_classes']} classes but {recipe.data.source} has "
                        f"{bundle.num_classes}; evaluate on the data it was trained on")
    net.to(dist.device)
    loader = make_loader(bundle, bundle.test, recipe.data, recipe.data.eval_batch_size, False, recipe.seed,
                    dist.rank, dist.world, dist.device)
    task = task_of(family)
    task.check_data(bundle, m["family"])
    result = evaluate(net, loader, dist, task=task)
    if dist.main:
        label = f"module {m['module']}" if m["stage"] == "incubate" else m["stage"]
        unit = "images" if task.name == "classification" else "tokens"
        print(f"{label}: {task.text(result)}  loss {result['loss']:.4f}  ({result['n']} {unit})")
    return result
