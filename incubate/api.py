"""The method as a model transformation, for any training loop: divide a target model, make its meta
model, build hybrid i (whose only trainable weights are target module i's) and assemble the trained
modules. The CLI's stages call these same functions (stages/incubate.py, stages/assemble.py).

What incubate knows of a model (its family and division) rides on the model as a plain attribute
(`Divided`, no state-dict key), so that `hybrid(meta, target, i)` needs nothing else."""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .errors import UserError
from .families import get_family
from .modular import Hybrid, assemble_state_dict, load_strict

ATTR = "incubate_division"


@dataclass(frozen=True)
class Divided:
    """A model's family and blocks a module; a meta model also knows its target's division and,
    read from a run directory, its fingerprint (the SHA-256 of its weights file there)."""
    family: str
    division: tuple
    target_division: tuple | None = None
    fingerprint: str | None = None
    taken: bool = False         # a hybrid took the model over (and dropped the parts it does not run)


def record(model: nn.Module) -> Divided | None:
    return getattr(model, ATTR, None)


def _mark(model: nn.Module, divided: Divided) -> nn.Module:
    object.__setattr__(model, ATTR, divided)     # not nn.Module's __setattr__: no submodule, no state-dict key
    return model


def _blocks(division, what: str) -> tuple:
    ok = isinstance(division, (list, tuple)) and division and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in division)
    if not ok:
        raise UserError(f"{what} {division!r} is not a list of positive block counts, one a module; "
                        f"e.g. [2, 2, 2, 2]")
    return tuple(division)


def _depth(fam, model) -> int:
    """The model's block count, or one line when the family cannot read this model at all."""
    if not isinstance(model, nn.Module):
        raise UserError(f"a {type(model).__name__} is no torch model (nn.Module); pass the model itself")
    try:
        depth = fam.depth(model)
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{type(model).__name__} is not a model the {fam.name} family knows ({type(e).__name__}: "
                        f"{e}); pass a model of that family, or register a family for it") from None
    except UserError:
        raise
    if depth < 1:
        raise UserError(f"{type(model).__name__} has no blocks the {fam.name} family finds; pass a model of "
                        f"that family")
    return depth


def divide(model: nn.Module, division: list[int], family: str) -> nn.Module:
    """Record that `model` is of `family` (a registered name: vit, resnet, causal_lm, ...) and that
    `division` splits its blocks into modules (module 0 also owns the stem, module K-1 the head).
    Checks the division covers the model's blocks; returns the same model."""
    fam = get_family(family)
    division = _blocks(division, "division")
    depth = _depth(fam, model)
    if depth != sum(division):
        raise UserError(f"division {list(division)} has {sum(division)} blocks but the {family} model has "
                        f"{depth}; make the division sum to {depth}")
    return _mark(model, Divided(fam.name, division))


def meta_model(target: nn.Module, division: list[int], family: str,
               meta_division: list[int] | None = None) -> nn.Module:
    """The meta model of `target`: a freshly initialised model (from the current torch seed) of the
    same family and width whose module i has meta_division[i] blocks (default one each). Also
    divides `target` (see `divide`). Train it end to end as any model, then build hybrids from it."""
    divide(target, division, family)
    division = record(target).division
    meta_division = _blocks(meta_division or [1] * len(division), "meta_division")
    if len(meta_division) != len(division):
        raise UserError(f"meta_division {list(meta_division)} has {len(meta_division)} modules but the division "
                        f"{list(division)} has {len(division)}; give one meta block count a module")
    fam = get_family(family)
    meta = fam.meta_model(target, list(division), list(meta_division))
    return _mark(meta, Divided(fam.name, meta_division, target_division=division))


def _meta_record(meta: nn.Module) -> Divided:
    m = record(meta)
    if m is None or m.target_division is None:
        raise UserError("`meta` is not a meta model incubate knows; make it with incubate.meta_model(target, ...) "
                        "or read one with incubate.load_stage(run, 'meta')")
    if m.taken:
        raise UserError("this meta model was taken over by a hybrid already (a hybrid drops the meta module it "
                        "replaces); give each hybrid its own copy: incubate.hybrid(copy.deepcopy(meta), target, i)")
    return m


def _check_pair(fam, m: Divided, target: nn.Module, meta: nn.Module) -> None:
    """Refuse a target the meta model was not made for: another family or division, or another width."""
    t = record(target)
    if t is not None and t.taken:
        raise UserError("this target was taken over by a hybrid already (it keeps only the trained module); "
                        "give each hybrid a fresh target, e.g. incubate.target_model(run) or copy.deepcopy")
    if t is not None and (t.family, t.division) != (m.family, m.target_division):
        raise UserError(f"the meta model was made for a {m.family} target divided {list(m.target_division)}, not "
                        f"this {t.family} target divided {list(t.division)}; make the meta model from this target")
    if fam.depth(target) != sum(m.target_division):
        raise UserError(f"the target has {fam.depth(target)} blocks but its meta model was made for a division of "
                        f"{sum(m.target_division)} ({list(m.target_division)}); use the target it was made for")
    own, theirs = meta.state_dict(), target.state_dict()
    for key in own:
        if key in theirs and own[key].shape != theirs[key].shape:
            raise UserError(f"the meta model and the target differ at weight '{key}' ({tuple(own[key].shape)} vs "
                            f"{tuple(theirs[key].shape)}): not the same width; make the meta model from this target")


def hybrid(meta: nn.Module, target: nn.Module, index: int, module_init: str = "random",
           frozen_suffix_grads: bool = True) -> Hybrid:
    """Hybrid `index`: the meta model with meta module `index` replaced by target module `index`, an
    nn.Module with the family's forward (input -> output) whose trainable parameters are exactly
    target module `index`'s. The meta modules before it run without autograd, those after it pass
    gradients to their input but compute no weight gradients, and the meta model stays in eval mode.

    `module_init`: "random" keeps the target's own weights; "meta" starts the module as its meta
    module (extra blocks as the identity); "stack" makes its blocks copies of the meta module's.
    The hybrid takes `meta` and `target` over (it drops what it does not run): pass copies to keep
    them. `net.runner` is the trained module: the part to wrap in DistributedDataParallel."""
    m = _meta_record(meta)
    fam = get_family(m.family)
    k = len(m.target_division)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < k:
        raise UserError(f"module index {index!r} is out of range: the target is divided into {k} modules (0..{k - 1})")
    _check_pair(fam, m, target, meta)
    division, meta_division = list(m.target_division), list(m.division)
    if module_init != "random":
        fam.init_from_meta(target, meta, division, meta_division, index, mode=module_init)
    fam.keep_only(target, division, index)
    net = Hybrid(fam, meta, meta_division, target, division, index, frozen_suffix_grads=frozen_suffix_grads)
    _mark(meta, replace(m, taken=True))
    _mark(target, Divided(fam.name, m.target_division, taken=True))
    net.fingerprint = m.fingerprint
    return net


def trained_module(net: Hybrid) -> nn.Module:
    """The target model a hybrid trains (pruned to its module), through a DDP wrapper if any."""
    runner = net.runner
    return getattr(runner, "module", runner).model


def _part(i: int, module, division: tuple) -> dict:
    if isinstance(module, Hybrid):
        if module.index != i:
            raise UserError(f"modules[{i}] is the hybrid of module {module.index}; pass them in order 0..K-1")
        if tuple(module.division) != division:
            raise UserError(f"modules[{i}] was divided {list(module.division)}, the target "
                            f"{list(division)}; assemble modules of this target's division")
        return trained_module(module).state_dict()
    return module.state_dict() if isinstance(module, nn.Module) else dict(module)


def assemble(target: nn.Module, modules: list) -> nn.Module:
    """Load the trained modules into `target` (divided: made by `divide`, `meta_model` or
    `incubate.target_model(run)`) and return it. `modules[i]` is hybrid i, its trained module, or
    that module's state dict. Refused: a count other than K, a hybrid out of order or of another
    division, modules of different meta models, a weight in a module that does not own it, and
    weights of another architecture than the target's."""
    t = record(target)
    if t is None or t.taken:
        raise UserError("assemble needs a whole, divided target: incubate.divide(model, division, family), or "
                        "incubate.target_model(run)")
    fam, modules = get_family(t.family), list(modules)
    if len(modules) != len(t.division):
        raise UserError(f"{len(modules)} modules given for a target divided into {len(t.division)}; "
                        f"pass one a module, in order")
    metas = {m.fingerprint for m in modules if isinstance(m, Hybrid) and m.fingerprint}     # read from runs
    if len(metas) > 1:
        raise UserError(f"the hybrids were made from {len(metas)} different meta models (their fingerprints "
                        f"differ); assemble modules incubated against one meta model")
    parts = [_part(i, m, t.division) for i, m in enumerate(modules)]
    state = assemble_state_dict(fam, parts, list(t.division), target)
    load_strict(target, state, "the assembled state", "the target")
    return target
