"""The family contract, runnable on any adapter: what every family (built in or registered with
`incubate.register_family`) must do for divide, hybrid and assemble to be right. Each check takes a
tiny target model of the family, its division, the meta division and an example input, and raises
UserError (one line) naming the first thing that fails; tests/unit/test_family_contract.py runs
them over every built-in family."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import UserError
from .modular import Hybrid, assemble_state_dict, run_module, split_state_dict

METHODS = ("validate", "model_kwargs", "build", "depth", "owner", "stem", "blocks", "head", "set_grad_checkpointing",
           "init_from_meta", "keep_modules", "keep_only", "meta_model", "export_config")


def _fail(family, what: str) -> UserError:
    return UserError(f"family '{getattr(family, 'name', type(family).__name__)}' fails the contract: {what}; "
                     f"fix its adapter (incubate.check_family runs the checks on a tiny model)")


def output(y):
    """The output tensor (a transformers model returns an object holding the logits)."""
    return y.logits if hasattr(y, "logits") else y


def check_protocol(family) -> None:
    """A `name` string and every method of incubate.Family."""
    missing = [m for m in METHODS if not callable(getattr(family, m, None))]
    if not isinstance(getattr(family, "name", None), str) or not family.name:
        missing.insert(0, "name (a string)")
    if missing:
        raise _fail(family, f"it lacks {', '.join(missing)} of the incubate.Family protocol")


def check_round_trip(family, target: nn.Module, division: list[int]) -> None:
    """Every weight belongs to one module; the parts assemble back; keep_only(i) holds exactly part i."""
    state = target.state_dict()
    parts = split_state_dict(family, state, division, target)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise _fail(family, f"module {empty[0]} owns no weight under division {division}")
    back = assemble_state_dict(family, parts, division, target)
    if back.keys() != state.keys() or not all(torch.equal(back[k], state[k]) for k in state):
        raise _fail(family, "the modules' weights do not assemble back into the model's")
    for i in range(len(division)):
        kept = set(family.keep_only(copy.deepcopy(target), division, i).state_dict())
        if kept != set(parts[i]):
            extra = sorted(kept ^ set(parts[i]))[0]
            raise _fail(family, f"keep_only(module {i}) does not hold exactly module {i}'s weights (e.g. {extra})")


def check_modules_compose(family, target: nn.Module, meta: nn.Module, division: list[int],
                          meta_division: list[int], x) -> None:
    """Modules run in sequence compute the model's forward bitwise, and the meta model's modules give
    the target's tensor shape at every module boundary."""
    target, meta = target.eval(), meta.eval()
    if family.depth(meta) != sum(meta_division):
        raise _fail(family, f"meta_model has {family.depth(meta)} blocks, not the meta division's {sum(meta_division)}")
    with torch.no_grad():
        h = hm = x
        for i in range(len(division)):
            h, hm = run_module(family, target, division, i, h), run_module(family, meta, meta_division, i, hm)
            if h.shape != hm.shape:
                raise _fail(family, f"after module {i} the target gives shape {tuple(h.shape)} but the meta model "
                                    f"{tuple(hm.shape)}")
        if not torch.equal(h, output(target(x))):
            raise _fail(family, "stem, blocks and head run in sequence do not compute the model's forward")


def check_hybrid(family, target: nn.Module, meta: nn.Module, division: list[int], meta_division: list[int], x) -> None:
    """In every hybrid only target module i trains, and the meta model (buffers too) stays bitwise."""
    for i in range(len(division)):
        h = Hybrid(family, copy.deepcopy(meta), meta_division,
                   family.keep_only(copy.deepcopy(target), division, i), division, i).train()
        before = {k: v.clone() for k, v in h.meta.state_dict().items()}
        if any(m.training for m in h.meta.modules()) or not h.runner.training:
            raise _fail(family, f"hybrid {i} in train mode does not keep its meta model in eval mode")
        trained = [p for p in h.parameters() if p.requires_grad]
        if {id(p) for p in trained} != {id(p) for p in h.runner.parameters()}:
            raise _fail(family, f"hybrid {i}'s trainable parameters are not exactly target module {i}'s")
        opt = torch.optim.SGD(trained, lr=0.1)
        for _ in range(2):
            output(h(x)).float().pow(2).mean().backward()
            if any(p.grad is not None for p in h.meta.parameters()):
                raise _fail(family, f"hybrid {i} gave a meta model weight a gradient")
            if any(p.grad is None for p in trained):
                raise _fail(family, f"a weight of target module {i} got no gradient in its hybrid")
            opt.step()
            opt.zero_grad()
        after = h.meta.state_dict()
        if not all(torch.equal(before[k], after[k]) for k in before):
            raise _fail(family, f"training hybrid {i} changed the meta model")


def check_meta_init(family, target: nn.Module, meta: nn.Module, division: list[int], meta_division: list[int],
                    x) -> None:
    """module_init "meta": every hybrid, and the modules assembled, compute what the meta model computes."""
    meta = copy.deepcopy(meta)
    with torch.no_grad():      # trained-looking BatchNorm statistics, so that eval mode matters
        meta.train()(x)
    meta.eval()
    with torch.no_grad():
        expected = output(meta(x))
        parts = []
        for i in range(len(division)):
            t = copy.deepcopy(target)
            family.init_from_meta(t, meta, division, meta_division, i, mode="meta")
            parts.append(split_state_dict(family, t.state_dict(), division, t)[i])
            h = Hybrid(family, copy.deepcopy(meta), meta_division, family.keep_only(t, division, i), division, i)
            if not torch.allclose(h.eval()(x), expected, rtol=1e-5, atol=1e-5):
                raise _fail(family, f"with module_init meta, hybrid {i} does not compute the meta model")
        assembled = copy.deepcopy(target).eval()
        assembled.load_state_dict(assemble_state_dict(family, parts, division, assembled), strict=True)
        if not torch.allclose(output(assembled(x)), expected, rtol=1e-5, atol=1e-5):
            raise _fail(family, "with module_init meta, the assembled modules do not compute the meta model")


def check_family(family, target: nn.Module, division: list[int], x, meta_division: list[int] | None = None) -> None:
    """Run the family contract on a tiny `target` of the family (an adapter; `incubate.check_family`
    also takes a registered family's name) divided by `division`, with an example input batch `x`: the protocol's methods, the module
    round trip, modules composing to the forward, meta shapes at every boundary, hybrids training only
    their module, meta init. Raises UserError (one line) at the first failure; the models given are
    not changed."""
    check_protocol(family)
    division = list(division)
    meta_division = list(meta_division or [1] * len(division))
    if family.depth(target) != sum(division):
        raise _fail(family, f"depth() says {family.depth(target)} blocks but the division {division} has "
                            f"{sum(division)}")
    target = copy.deepcopy(target)
    meta = family.meta_model(target, division, meta_division)
    check_round_trip(family, target, division)
    check_modules_compose(family, target, meta, division, meta_division, x)
    check_hybrid(family, target, meta, division, meta_division, x)
    check_meta_init(family, target, meta, division, meta_division, x)
