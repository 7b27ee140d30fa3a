"""Divide, hybrid and assemble: family-agnostic, on top of a family adapter."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .train.parallel import Trainee


def bounds(division: list[int], index: int) -> tuple[int, int]:
    start = sum(division[:index])
    return start, start + division[index]


def run_module(family, model: nn.Module, division: list[int], index: int, x: torch.Tensor):
    """Module `index` of `model` (divided by `division`): stem first, head last."""
    if index == 0:
        x = family.stem(model, x)
    start, stop = bounds(division, index)
    x = family.blocks(model, x, start, stop)
    if index == len(division) - 1:
        x = family.head(model, x)
    return x


def split_state_dict(family, state: dict, division: list[int], model: nn.Module) -> list[dict]:
    """One state dict a module, each with the model's own key names (`model`: the architecture the
    state belongs to, which tells the family how its blocks are laid out)."""
    parts: list[dict] = [{} for _ in division]
    for key, value in state.items():
        parts[family.owner(key, division, model)][key] = value
    return parts


def assemble_state_dict(family, parts: list[dict], division: list[int], model: nn.Module) -> dict:
    """Stitch module state dicts back into one; every key must sit in the module that owns it."""
    state: dict = {}
    for index, part in enumerate(parts):
        for key, value in part.items():
            owner = family.owner(key, division, model)
            if owner != index:
                raise UserError(f"module {index} holds weight '{key}' that belongs to module {owner}; "
                                f"it was divided with another division")
            state[key] = value
    return state


def load_strict(model: nn.Module, state: dict, where, what: str) -> None:
    """load_state_dict(strict=True), refusing weights of another architecture in one line that says
    how they differ (missing, unexpected and differently shaped tensors, with an example of each)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(keys)} {name} (e.g. {keys[0]})" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]
        raise UserError(f"{where} holds weights of another architecture than {what}: {'; '.join(parts)}; "
                        f"check model.name, model.kwargs and the division")
    model.load_state_dict(state, strict=True)


class ModuleRunner(nn.Module):
    """Runs one module of a (possibly pruned) model: the part that trains and that DDP wraps."""

    def __init__(self, family, model: nn.Module, division: list[int], index: int):
        super().__init__()
        self.family, self.division, self.index = family, list(division), index
        self.model = model

    def forward(self, x):
        return run_module(self.family, self.model, self.division, self.index, x)


class HybridOutput(dict):
    """A hybrid's output with labels: a dict (what Trainer reads) whose keys are attributes too."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class Hybrid(nn.Module):
    """The meta model with meta module `index` replaced by target module `index`.

    Every meta parameter is frozen and the meta model always runs in eval mode (no drop-path or
    dropout: it was trained without its target-time regularisation). Meta modules before the
    target run under no_grad (no autograd graph at all); those after it pass gradients to their
    input but compute no weight gradients (their parameters do not require grad).

    `frozen_suffix_grads=False` reproduces the official code for ablations: the meta modules after
    the target keep requires_grad=True, so backward also computes their weight gradients, which
    nobody steps (they are not the trained part) and nobody clears (they accumulate). The target's
    gradients are the same either way; only the cost differs.

    The hybrid takes `meta` over and drops meta module `index` from it (the target module replaces
    it, so its weights would only occupy memory): a job holds the meta model less one module.
    """

    def __init__(self, family, meta: nn.Module, meta_division: list[int], target: nn.Module,
                 division: list[int], index: int, frozen_suffix_grads: bool = True):
        super().__init__()
        if len(meta_division) != len(division):
            raise UserError(f"meta model has {len(meta_division)} modules, target {len(division)}")
        self.family, self.index = family, index
        self.division, self.meta_division = list(division), list(meta_division)
        self.frozen_suffix_grads = frozen_suffix_grads
        keep = set(range(len(meta_division))) - {index}
        self.meta = family.keep_modules(meta, self.meta_division, keep).requires_grad_(False).eval()
        if not frozen_suffix_grads:
            for p in self.meta_suffix_parameters():
                p.requires_grad_(True)
        self.runner = ModuleRunner(family, target, division, index)
        self.fingerprint = None     # the meta model's SHA-256 in its run directory, when it was read from one

    def meta_suffix_parameters(self) -> list[nn.Parameter]:
        """Parameters of the meta modules after the target (those backward passes through)."""
        return [p for name, p in self.meta.named_parameters()
                if self.family.owner(name, self.meta_division, self.meta) > self.index]

    def trainee(self):
        """The trained part as the loop wraps it: the module runner (DDP's wrapper goes in its place)."""
        return Trainee(self, self.runner.model, self.runner, self.family, put_root=self._put_runner)

    def _put_runner(self, runner: nn.Module) -> None:
        self.runner = runner

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in backward: the target module's, and the meta suffix's (whose
        activations backward also keeps to pass the gradient through). The no_grad prefix keeps none."""
        for model in (self.runner.model, self.meta):
            self.family.set_grad_checkpointing(model, enable)

    def train(self, mode: bool = True):
        super().train(mode)
        self.meta.eval()
        return self

    def forward(self, x=None, labels=None, input_ids=None, pixel_values=None):
        """The family's output for input `x` (or, by the names transformers' Trainer and datasets use,
        `input_ids` / `pixel_values`). With `labels` (a class or the next token at every position,
        aligned with the output: not shifted) a dict of `loss` (cross-entropy, -100 ignored) and
        `logits`, as Trainer expects; without, the output itself."""
        x = next((v for v in (x, input_ids, pixel_values) if v is not None), None)
        if x is None:
            raise UserError("a hybrid's forward takes its input as x, input_ids or pixel_values; none was given")
        out = self._run(x)
        if labels is None:
            return out
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1))
        return HybridOutput(loss=loss, logits=out)

    def _run(self, x):
        with torch.no_grad():
            for j in range(self.index):
                x = run_module(self.family, self.meta, self.meta_division, j, x)
        x = self.runner(x)
        for j in range(self.index + 1, len(self.meta_division)):
            x = run_module(self.family, self.meta, self.meta_division, j, x)
        return x
