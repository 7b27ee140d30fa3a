"""Other people's formats: official Deep-Incubation checkpoints in, timm/hub folders out.

import: the official code (LeapLabTHU/Deep-Incubation) saves a torch pickle holding `model` (the
full state dict, every tensor also under `stages.*` names) and `model_stages` (one state dict a
module, blocks counted from 0 inside each module). It is read with torch.load(weights_only=True),
the only unpickling in this package, mapped to our key names, fitted to the recipe's model
(position embeddings resampled to another image size; a classifier of another size re-initialised,
as DeiT does when fine-tuning) and written as a finished stage of a run directory.

export: a finished stage as DIR/model.safetensors + DIR/config.json in the layout timm's
save_for_hf/push_to_hub writes, so `timm.create_model('local-dir:DIR', pretrained=True)` (or the
same folder pushed to a hub, 'hf-hub:user/repo') loads it with no code of ours.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from .store.checkpoint import read_json, save_weights, sha256_file, write_json_atomic
from .recipe.schema import Recipe
from .data.loaders import Loader, load_data
from .data.order import Reader
from .train.engine import evaluate
from .errors import UserError
from .families import get_family, task_name
from .modular import load_strict
from .store.rundir import StageDir, check_destination, claim, write_run_recipe
from .runs import load_model
from .stage_registry import META, names
from .stages.common import finish, prepare


def warn(text: str) -> None:
    print(f"incubate: warning: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- import

def read_official(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the .pth file the official code saved")
    try:
        # DeiT-style scripts also save their argparse.Namespace: a plain attribute holder, safe to allow
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many types here (zip, pickle, weights-only refusals)
        raise UserError(_load_failure(path, str(e))) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict with 'model' or 'model_stages'")
    return obj


def _load_failure(path: Path, msg: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if found:
        return (f"{path} holds objects other than tensors and plain containers ({found.group(1)}); refusing to "
                f"unpickle them: if you trust the file, re-save just its state dicts with torch.save")
    found = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
    reason = found.group(1).strip() if found else re.split(r"(?<=\.) ", msg.strip() or "unknown error")[0]
    return f"{path} is not a readable PyTorch checkpoint ({reason.rstrip('.')}); check the file (a truncated copy?)"


def _strip(state: dict, where: str) -> dict:
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{where} is not a state dict of named tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def official_state(obj: dict, division: list[int], path: Path) -> dict:
    """One state dict with our key names; `model_stages` is used when present (blocks renumbered)."""
    stages = obj.get("model_stages")
    if stages is not None:
        if not isinstance(stages, (list, tuple)) or len(stages) != len(division):
            n = len(stages) if isinstance(stages, (list, tuple)) else "?"
            raise UserError(f"{path} has {n} modules in model_stages but the recipe divides this model into "
                            f"{len(division)} (division {division}); use the division it was trained with")
        state, offset = {}, 0
        for i, (part, blocks) in enumerate(zip(stages, division)):
            for key, value in _strip(part, f"{path} model_stages[{i}]").items():
                if key.startswith("blocks."):
                    _, n, rest = key.split(".", 2)
                    if int(n) >= blocks:
                        raise UserError(f"{path}: module {i} of model_stages has block {n} but division {division} "
                                        f"gives it {blocks} blocks; use the division it was trained with")
                    key = f"blocks.{offset + int(n)}.{rest}"
                state[key] = value
            offset += blocks
        return state
    model = obj.get("model", obj)
    if not isinstance(model, dict) or not model:
        raise UserError(f"{path} has neither 'model_stages' nor a 'model' state dict")
    return {k: v for k, v in _strip(model, f"{path} 'model'").items() if not k.startswith("stages.")}


def fit_state(model: torch.nn.Module, state: dict, path: Path, what: str) -> None:
    """Load `state` into `model` strictly, after resampling pos_embed and re-initialising a foreign head."""
    own = model.state_dict()
    pe, want = state.get("pos_embed"), own.get("pos_embed")
    if pe is not None and want is not None and pe.shape != want.shape and pe.shape[-1] == want.shape[-1]:
        from timm.layers import resample_abs_pos_embed
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        side = int(round((pe.shape[1] - prefix) ** 0.5))
        if side * side != pe.shape[1] - prefix:
            raise UserError(f"{path}: pos_embed has {pe.shape[1]} positions, not {prefix} + a square grid")
        grid = list(model.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(pe.float(), new_size=grid, old_size=[side, side],
                                                    num_prefix_tokens=prefix)
        print(f"[import] position embedding resampled from a {side}x{side} to a {grid[0]}x{grid[1]} grid", flush=True)
    head, own_head = state.get("head.weight"), own.get("head.weight")
    if head is not None and own_head is not None and head.shape != own_head.shape \
            and head.shape[1:] == own_head.shape[1:]:
        warn(f"{path} has a {head.shape[0]}-class head but the data has {own_head.shape[0]} classes; "
             f"the head is re-initialised (as DeiT does when fine-tuning)")
        state["head.weight"], state["head.bias"] = own_head, own["head.bias"]
    load_strict(model, state, path, f"the recipe's {what}")


def _refuse_to_overwrite(stage: StageDir) -> None:
    if stage.finished():
        raise UserError(f"{stage.path} already holds a finished {stage.label} model; importing would overwrite "
                        f"it: use a new --out or move that folder away")
    training = stage.training_checkpoint()
    if training is not None:
        raise UserError(f"{stage.path} holds a {stage.label} model in training ({training.name}); "
                        f"use a new --out or move that folder away")


def import_official(recipe: Recipe, ckpt, out, as_: str) -> dict:
    """Write an official checkpoint as RUN/meta (then `incubate incubate` works) or RUN/assembled."""
    ckpt = Path(ckpt)
    meta = as_ == META
    if not getattr(get_family(recipe.model.family), "imports_official", False):     # only ViTs were released
        raise UserError(f"import-official reads the official code's ViT checkpoints; model.family "
                        f"'{recipe.model.family}' has none to import: use a vit recipe, or train its meta model "
                        f"with `incubate meta`")
    ctx = prepare(recipe, out)
    stage = StageDir(ctx.run, as_)
    state = official_state(read_official(ckpt), recipe.meta_division if meta else recipe.model.division, ckpt)
    _refuse_to_overwrite(stage)        # before anything is written: a refused import leaves the run as it was
    model = ctx.build(meta=meta)
    fit_state(model, state, ckpt, "meta model" if meta else "target model")
    write_run_recipe(ctx.run, recipe)
    claim(stage)
    _refuse_to_overwrite(stage)        # again under the lock: another process may have written it meanwhile
    t0 = time.perf_counter()
    model.to(ctx.dist.device)
    loader = Loader(ctx.bundle, ctx.bundle.test, recipe.data, Reader(
        recipe.data.eval_batch_size, False, recipe.seed, ctx.dist.rank, ctx.dist.world, ctx.dist.device))
    metrics = evaluate(model, loader, ctx.dist)
    print(f"[import] {stage.label} from {ckpt}: test top-1 {metrics['top1']:.2f}%", flush=True)
    seconds = time.perf_counter() - t0
    manifest = ctx.base_manifest(stage, meta=meta)
    manifest.update(imported_from=str(ckpt.resolve()), imported_sha256=sha256_file(ckpt),
                    metrics={"top1": metrics["top1"], "loss": metrics["loss"]}, epochs=0, seconds=seconds,
                    process_seconds=seconds, flops=0, steps=0, trainable_params=0, world_size=1)
    return finish(ctx, stage, model.state_dict(), manifest)


# ---------------------------------------------------------------- export

def _manifest_preprocess(run: Path, m: dict) -> dict:
    if m.get("preprocess"):
        return m["preprocess"]
    from .recipe.schema import load_recipe     # runs from before manifests recorded it
    data = load_recipe(run / "recipe.yaml").data
    return load_data(data).describe(data.augment)


EXPORT_FIX = "export into an empty or new folder"


def export(run, stage_name: str, to) -> Path:
    run, dest, targets = Path(run), Path(to), names(weights="target")
    check_destination(to, "--to", run)       # not the run itself, nor any run's folders
    m = StageDir(run, stage_name).manifest() if run.is_dir() and stage_name in targets else None
    if m and task_name(m["family"]) == "causal_lm":     # a language model: a transformers folder
        from .lm_tools import export_lm
        return export_lm(run, stage_name, to)
    if stage_name not in targets:
        raise UserError(f"--stage must be one of {', '.join(targets)} (a target model), got {stage_name!r}")
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    stage = StageDir(run, stage_name)
    m = stage.require_finished()
    model = load_model(stage)
    state, family = model.state_dict(), get_family(m["family"])
    provenance = {"run": str(run.resolve()), "stage": stage_name, "sha256": m["sha256"]}
    old = dest / "config.json"
    provenance_of_old = (read_json(old, dict, fix=EXPORT_FIX).get("deep_incubate") or {}) if old.exists() else {}
    same = old.exists() and provenance_of_old.get("sha256") == m["sha256"]
    if not same and (old.exists() or (dest / "model.safetensors").exists()):
        raise UserError(f"{dest} already holds another model; export into an empty or new folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest}: {e.strerror}; choose a writable --to") from None
    p = _manifest_preprocess(run, m)
    data_config = {"input_size": tuple(p["input_size"]), "mean": tuple(p["mean"]), "std": tuple(p["std"]),
                   "crop_pct": p["crop_pct"], "interpolation": p["interpolation"]}
    save_weights(state, dest / "model.safetensors", metadata={"format": "pt"})
    config = family.export_config(model, m["model"], data_config, list(m.get("classes") or []))
    config.setdefault("pretrained_cfg", {})["tag"] = f"deep_incubate_{stage_name}"
    config["deep_incubate"] = dict(config.get("deep_incubate") or {}, **provenance)
    write_json_atomic(dest / "config.json", config)
    how = config["deep_incubate"].get("rebuild") or f"timm.create_model('local-dir:{dest}', pretrained=True)"
    print(f"exported {stage.path} to {dest}: load it with {how}")
    return dest

