"""A run directory from a script: read any finished stage as a model (the CLI's meta model into a
user's loop), a fresh target of the run, and write a module trained in the script as the finished
module stage `incubate assemble` takes. The folders, manifests, locks and atomic writes are
incubate/store/rundir.py's, the same the CLI's stages use."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .api import Divided, _mark, divide, hybrid, record, trained_module
from .errors import UserError
from .families import get_family
from .store.lock import release
from .modular import Hybrid, load_strict
from .store.rundir import StageDir, begin_stage, finish_stage, meta_fingerprint
from .stage_registry import INCUBATE, META, in_folders
from .stage_registry import stage as registered
from .work import ATTR as WORK

# config entries that change neither the weights nor the forward (a user's own model may keep its defaults)
NOT_ARCHITECTURE = {"bos_token_id", "eos_token_id", "use_cache", "transformers_version", "architectures",
                    "_name_or_path", "dtype", "torch_dtype", "output_attentions", "output_hidden_states", "return_dict"}
# what a module's manifest repeats from the meta model's: the run's data, classes and recipe
SHARED = ("recipe", "classes", "num_classes", "data", "preprocess", "target_model")


def load_into(model: nn.Module, stage: StageDir, what: str) -> nn.Module:
    """Load a finished stage's weights into `model` strictly and record its family and division (a
    meta model: also its target's division and its fingerprint)."""
    m = stage.require_finished()
    load_strict(model, stage.load(), stage.weights, what)
    meta = stage.stage == META
    return _mark(model, Divided(m["family"], tuple(m["division"]),
                                tuple(m["target_division"]) if meta else None,
                                m["sha256"] if meta else None, taken=stage.module is not None))


def _built(m: dict) -> nn.Module:
    """A fresh model of the family, name and arguments a manifest records."""
    return get_family(m["family"]).build(m["model"]["name"], m["model"]["kwargs"])


def load_model(stage: StageDir) -> nn.Module:
    """The model a finished stage left (a module stage: that module alone), built from its manifest
    and loaded strictly: what every reader of a finished stage (API, evaluate, export, sample) uses."""
    m = stage.require_finished()
    model = _built(m)
    if stage.module is not None:
        get_family(m["family"]).keep_only(model, m["division"], stage.module)
    what = f"module {stage.module} of its manifest's model" if stage.module is not None else "its manifest's model"
    return load_into(model, stage, f"{what} ({m['model']['name']})")


def load_hybrid(stage: StageDir) -> Hybrid:
    """A finished module inside its run's finished meta model: incubate.hybrid of the two, the module's
    weights loaded strictly (what the module computes, as it was trained)."""
    m = stage.require_finished()
    meta = load_model(StageDir(stage.run, META))
    net = hybrid(meta, divide(_built(m), m["division"], m["family"]), stage.module)
    load_strict(trained_module(net), stage.load(), stage.weights, f"module {stage.module} of its manifest's model")
    return net


def load_stage(run, stage: str = META, module: int | None = None) -> nn.Module:
    """The model a finished stage of run directory `run` left (stage: meta, assembled, finetune,
    e2e, grow; or incubate with `module`: that module alone), built from its manifest and loaded
    strictly. A meta model read so can make hybrids whose modules `save_module` writes back."""
    known = in_folders()
    if stage not in known:
        raise UserError(f"stage {stage!r} is none of {', '.join(s for s in known if s != INCUBATE)}, {INCUBATE}")
    if registered(stage).per_module != (module is not None):
        raise UserError(f"a module is read with stage='{INCUBATE}' and module=N, and only so")
    return load_model(StageDir(Path(run), stage, module))


def _meta_manifest(run: Path) -> dict:
    meta_fingerprint(run)        # a missing meta model: the one line every stage made from it says
    return StageDir(run, META).manifest()


def target_model(run) -> nn.Module:
    """A freshly initialised target model of run directory `run` (from the current torch seed), divided
    as the run divides it: the target whose modules `incubate assemble` takes from `save_module`."""
    run = Path(run)
    m = _meta_manifest(run)
    spec = m.get("target_model")
    if spec is None:
        raise UserError(f"{StageDir(run, META).manifest_path} names no target model (written before it "
                        f"recorded one); rerun `incubate meta` in a new run directory")
    model = get_family(m["family"]).build(spec["name"], spec["kwargs"])
    return divide(model, m["target_division"], m["family"])


def _differs(net: Hybrid, spec: dict, family: str) -> str | None:
    """What makes the hybrid's target another model than the run's target `spec` (None: the same):
    the family, the configuration a transformers model carries, then module i's weight names and shapes
    against the run's target built on the meta device (no memory, no init)."""
    target = trained_module(net)
    if net.family.name != family:
        return f"its family is {net.family.name}, the run's {family}"
    import torch
    with torch.device("meta"):
        reference = net.family.build(spec["name"], spec["kwargs"])
    config, want_config = getattr(target, "config", None), getattr(reference, "config", None)
    if hasattr(config, "to_dict") and hasattr(want_config, "to_dict"):        # a transformers model
        have, want = config.to_dict(), want_config.to_dict()
        for key in sorted(have.keys() | want.keys()):
            if key not in NOT_ARCHITECTURE and have.get(key) != want.get(key):
                return f"its config says {key}={have.get(key)!r}, the run's {want.get(key)!r}"
    want = {k: tuple(v.shape) for k, v in net.family.keep_only(reference, net.division, net.index).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            return f"module {net.index}'s weight {key} is {have.get(key)} here, {want.get(key)} in the run's target"
    return None


def _module_manifest(net: Hybrid, run: Path, meta: dict, metrics: dict | None) -> dict:
    target = trained_module(net)
    spec = meta.get("target_model")
    if net.fingerprint != meta["sha256"]:
        raise UserError(f"the hybrid's meta model is not the one in {StageDir(run, META).path}; make the hybrid "
                        f"from incubate.load_stage('{run}', {META!r})")
    if net.division != meta["target_division"]:
        raise UserError(f"the hybrid's target is divided {net.division}, the run's {meta['target_division']}; "
                        f"divide it as the run does")
    why = _differs(net, spec, meta["family"]) if spec else "the run's meta manifest names no target model"
    if why:
        raise UserError(f"the hybrid's target is not the target model of {run}: {why}; build it with the run's "
                        f"configuration, e.g. incubate.target_model('{run}')")
    manifest = {"stage": INCUBATE, "module": net.index, "family": meta["family"], "model": spec,
                "division": net.division, "target_division": net.division, "meta_division": net.meta_division,
                "meta_fingerprint": meta["sha256"], **{k: meta.get(k) for k in SHARED},
                "metrics": dict(metrics or {}), "trainable_params": sum(p.numel() for p in target.parameters()),
                "trained_by": "a script (incubate.save_module)", "finished": False}
    work = getattr(net, WORK, None)         # incubate.track(net) measured the script's loop
    if work is not None:
        manifest.update(work.manifest())
    return manifest


def save_module(net: Hybrid, run, metrics: dict | None = None) -> dict:
    """Write the module `net` (a hybrid of the run's meta model and target, trained by any loop) as
    run directory `run`'s finished module stage, RUN/modules/<i>: weights and manifest, atomically and
    under the stage's lock, as `incubate incubate` writes it; `incubate assemble` then takes it.
    `metrics` (e.g. the task's {"bpb", "loss", "acc"}) go to the manifest and summary.json, and the
    seconds, samples, tokens and FLOPs `incubate.track(net)` measured (0 without it). A module
    that finished already is refused (delete its folder to replace it). Returns the manifest."""
    run = Path(run)
    if not isinstance(net, Hybrid) or record(trained_module(net)) is None:
        raise UserError("save_module takes a hybrid made by incubate.hybrid(meta, target, i)")
    manifest = _module_manifest(net, run, _meta_manifest(run), metrics)
    stage = StageDir(run, INCUBATE, net.index)
    if stage.finished():
        raise UserError(f"{stage.path} holds a finished module {net.index} already; delete that folder to "
                        f"replace it")
    begin_stage(stage, manifest, True)
    try:
        return finish_stage(stage, trained_module(net).state_dict(), manifest)
    finally:
        release(stage.path)
