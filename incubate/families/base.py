"""The family interface: what an adapter must say about one kind of network so that the rest of the
code (modular.py, the stages, interop.py) can divide, incubate, assemble and export it without
knowing which kind it is. A new family is one new file implementing `Family`, registered in
`FAMILIES` (incubate/families/__init__.py: a `Builtin` entry naming its module, class and task),
plus a tiny test configuration in
tests/unit/test_family_contract.py, whose tests every registered family must pass.

Words: the model's *blocks* are its repeated units, flattened in forward order and numbered from 0
(ViT: blocks.0, blocks.1, ...; ResNet: layer1.0, ..., layer4.N). A *division* [n_0, ..., n_{K-1}]
splits them contiguously into K *modules*; module 0 also owns the *stem* (everything before the
first block) and module K-1 the *head* (everything after the last block). Every weight (state-dict
key) belongs to exactly one module, and keeps the model's own key name in module files.

Optional: `grow_from_meta(target, meta)`, depthwise growth (G_stack: the target's blocks are the
whole meta model's blocks repeated in order, stem and head copied), where the family's blocks are
one stack of equal shapes (ViT, decoder layers); `incubate grow` refuses a family without it.

Optional: `block_modules(model)`, the model's blocks as modules in forward order (a pruned model's
remaining ones): the units that `train.parallel: fsdp` shards one by one, and that `incubate plan`
counts; fsdp refuses a family without it.

`meta_model(target, division, meta_division)` makes the meta model of a target the family built
(its `build` records the name and kwargs on the model: `remember_spec`), or of one the user made
where the model says its architecture (a transformers model's config): what `incubate.meta_model`
calls.

Optional attributes: `task` (incubate/tasks: classification when none) and `modality`, the data
description its model_kwargs reads ("image" or "text", the task's); `imports_official = True` where `incubate import-official` can read the
official code's checkpoints of the family (ViT); `no_grad_checkpointing = "why"` where
train.grad_checkpointing must be refused (ResNet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import UserError

@runtime_checkable
class Family(Protocol):
    """What an adapter says about one kind of network (this module's docstring gives the words);
    incubate.check_family checks an implementation, incubate.register_family adds one."""
    name: str

    def validate(self, cfg) -> None:
        """Refuse, when the recipe is loaded (UserError, one line), a model section (ModelCfg:
        name, kwargs, division) the family cannot honour, e.g. a division of the wrong length."""

    def model_kwargs(self, cfg, spec, division: list[int], meta: bool = False) -> dict:
        """The keyword arguments that, with `cfg.name`, fix the architecture (saved in manifests).
        `cfg` is the recipe's ModelCfg; `spec` what the data is (incubate/data/spec.py: ImageSpec's
        channels, size and classes, or TextSpec's context and vocabulary), refused in one line when
        of the other modality; `division` the division of the model being built (the meta division
        when `meta`). The meta model has the division's blocks and must produce, at every module
        boundary, the tensor shape the target produces there; refuse (UserError, one line) a
        division that cannot be honoured."""

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        """A freshly initialised model (random weights from the current torch seed)."""

    def depth(self, model: nn.Module) -> int:
        """Number of blocks."""

    def owner(self, key: str, division: list[int], model: nn.Module) -> int:
        """The module that owns state-dict key `key` of `model` (which may be pruned by
        keep_modules: it still tells how blocks are laid out)."""

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Model input -> input of block 0."""

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks start..stop-1 in order (recomputed in backward when grad checkpointing is on)."""

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> the model's output (logits)."""

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        """Make `blocks` recompute activations in backward. A family that cannot (ResNet: its
        BatchNorm statistics) says why in a `no_grad_checkpointing` attribute, which the recipe's
        validation turns into a one-line refusal, and raises UserError here."""

    def init_from_meta(self, target: nn.Module, meta: nn.Module, division: list[int],
                       meta_division: list[int], index: int, mode: str = "meta") -> None:
        """Initialise target module `index` from meta module `index`. mode "meta": the module then
        computes exactly what the meta module computes (in eval mode); mode "stack": its blocks
        are copies of the meta module's blocks (depthwise stacking). Module 0 copies the stem and
        module K-1 the head. Refuse (UserError, one line) what the family cannot honour."""

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Drop every part of `model` that no module in `keep` owns, keeping key names; the
        kept modules still run through stem/blocks/head."""

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        """keep_modules with one module."""

    def meta_model(self, target: nn.Module, division: list[int], meta_division: list[int]) -> nn.Module:
        """A freshly initialised model (current torch seed) of the target's family and width whose
        modules have `meta_division`'s blocks: the same model `build` makes from the recipe's meta
        kwargs. Refuse (UserError, one line) a target whose architecture it cannot tell."""

    def export_config(self, model: nn.Module, spec: dict, data_config: dict, label_names: list) -> dict:
        """The config.json written beside model.safetensors by `incubate export`, such that the
        family's own library rebuilds the model from it (spec: the manifest's {"name", "kwargs"})."""


SPEC = "incubate_spec"      # the attribute where `build` leaves {"name", "kwargs"} on a model


def remember_spec(model: nn.Module, name: str, kwargs: dict) -> nn.Module:
    """Record on `model` the name and kwargs it was built from (a plain attribute: no state-dict key)."""
    setattr(model, SPEC, {"name": name, "kwargs": dict(kwargs)})
    return model


def recorded_spec(model: nn.Module, family: str) -> dict:
    """The {"name", "kwargs"} that `build` recorded on `model`; refused in one line for a model it did not build."""
    spec = getattr(model, SPEC, None)
    if spec is None:
        raise UserError(f"this {type(model).__name__} was not built by the {family} family, so its arguments are "
                        f"unknown; build the target with incubate.get_family('{family}').build(name, kwargs)")
    return spec


def module_of(key: str, block: int | None, division: list[int], stem: tuple, head: tuple, family: str) -> int:
    """The module that owns state-dict key `key`, for `owner`: flat block `block` (None when the key
    is no block's) by the division; stem keys module 0, head keys module K-1."""
    if block is not None:
        end = 0
        for i, d in enumerate(division):
            end += d
            if block < end:
                return i
        raise UserError(f"weight '{key}' lies beyond the division {division}")
    if key.startswith(stem):
        return 0
    if key.startswith(head):
        return len(division) - 1
    raise UserError(f"weight '{key}' belongs to no module of the {family} adapter")


def copy_stem_and_head(target: nn.Module, meta: nn.Module, index: int, k: int, stem: tuple, head: tuple) -> None:
    """For init_from_meta: module 0 takes the meta model's stem, module K-1 its head (same key names)."""
    owned = (stem if index == 0 else ()) + (head if index == k - 1 else ())
    target_state = target.state_dict()
    with torch.no_grad():
        for key, value in meta.state_dict().items():
            if key.startswith(owned) and key in target_state:
                target_state[key].copy_(value)


@dataclass(frozen=True)
class Slot:
    """Module `index` of a division: its blocks under `division`, the meta module's under `meta_division`."""
    division: list[int]
    meta_division: list[int]
    index: int


def init_blocks_from_meta(blocks, meta_blocks, slot: Slot, mode: str, residual_outputs, family: str) -> None:
    """For init_from_meta of a residual stack (ViT blocks, decoder layers), module `slot.index`.
    mode "meta": the module's first blocks copy the meta module's, the others start as the identity
    (`residual_outputs(block)`, the projections that end each residual branch, are zeroed); mode
    "stack": every block copies a meta block, cycling through the meta module's."""
    division, meta_division, index = slot.division, slot.meta_division, slot.index
    start, m_start, n_meta = sum(division[:index]), sum(meta_division[:index]), meta_division[index]
    if mode not in ("meta", "stack"):
        raise UserError(f"module_init '{mode}' is not one the {family} adapter knows; use random, meta or stack")
    if n_meta > division[index]:
        raise UserError(f"module {index} has {division[index]} blocks, fewer than the meta module's "
                        f"{n_meta}; module_init: {mode} needs division >= meta_division")
    with torch.no_grad():
        for j in range(division[index]):
            blk = blocks[start + j]
            if mode == "stack" or j < n_meta:
                blk.load_state_dict(meta_blocks[m_start + j % n_meta].state_dict())
                continue
            for proj in residual_outputs(blk):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()


def stack_blocks(blocks, meta_blocks) -> None:
    """G_stack's operator (Du et al. 2024): block j of the target copies meta block j mod the meta
    depth, so the target is the whole meta stack repeated in order (0..n-1, 0..n-1, ...)."""
    with torch.no_grad():
        for j, blk in enumerate(blocks):
            blk.load_state_dict(meta_blocks[j % len(meta_blocks)].state_dict())


def weight_shapes(block: nn.Module) -> tuple:
    """A block's weight names and shapes: blocks alike in this can take each other's weights."""
    return tuple((k, tuple(v.shape)) for k, v in block.state_dict().items())


def stack_by_shape(blocks, metas, missing) -> None:
    """module_init stack for staged families: each (name, block) takes, in turn, the weights of the
    meta blocks of its shape; `missing(name)` is the UserError for a block with none."""
    used: dict = {}
    for name, blk in blocks:
        sig = weight_shapes(blk)
        same = [m for m in metas if weight_shapes(m) == sig]
        if not same:
            raise missing(name)
        n = used.get(sig, 0)
        blk.load_state_dict(same[n % len(same)].state_dict())
        used[sig] = n + 1


def timm_export_config(model: nn.Module, model_args: dict, data_config: dict, label_names: list) -> dict:
    """config.json in the layout timm's save_for_hf/push_to_hub writes (timm families), so that
    `timm.create_model('local-dir:DIR', pretrained=True)` rebuilds `model` from `model_args`."""
    import json
    import os
    import tempfile

    from timm.models._hub import save_config_for_hf
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        save_config_for_hf(model, path, model_config={"label_names": list(label_names)},
                           model_args=dict(model_args), data_config=data_config)
        with open(path) as f:
            config = json.load(f)
    # the source cfg's licence describes timm's released weights, not these
    config["pretrained_cfg"].pop("license", None)
    return config
