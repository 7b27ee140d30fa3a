"""Adapter for timm's ConvNeXt (timm.models.convnext.ConvNeXt: convnext_*, convnextv2_*): a stem,
four stages (a downsampling layer, then blocks of one width), a pre-head norm and a classifier head.

Blocks are stages.0.blocks.0, ..., stages.3.blocks.N flattened in order; module 0 owns the stem,
module K-1 the head (norm_pre, head). As in the ResNet adapter, each meta module has its blocks in
the stage where its target module ends: the meta model is the same network with, in each stage, as
many blocks as the meta modules ending there. Unlike a ResNet block, a ConvNeXt block never changes
shape: the stage's downsampling layer does, and it belongs to the module that holds the stage's
first block (or, for a stage without blocks, the next block's). A stage with no meta blocks keeps
its downsampling layer, so a module may cross any number of stage boundaries: its meta module holds
the same downsampling layers and blocks of its last stage only.
"""
from __future__ import annotations

import re

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.spec import expect
from ..errors import UserError
from .base import (copy_stem_and_head, module_of, recorded_spec, remember_spec, stack_by_shape,
                   timm_export_config)
from .resnet import module_stages

STEM = ("stem.",)
HEAD = ("norm_pre.", "head.")
BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")
DOWN = re.compile(r"stages\.(\d+)\.downsample\.")


def layout(model: nn.Module) -> list[int]:
    """Blocks in each stage; a pruned model keeps its layout (see keep_modules)."""
    return [len(stage.blocks) for stage in model.stages]


def flat_blocks(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    return [(f"stages.{s}.blocks.{j}", s, stage.blocks[j]) for s, stage in enumerate(model.stages)
            for j in range(len(stage.blocks))]


def stages_starting_at(layers: list[int], block: int) -> list[int]:
    """The stages whose downsampling runs just before flat block `block` (several when stages are empty)."""
    return [s for s in range(len(layers)) if sum(layers[:s]) == block]



def meta_depths(layers: list[int], division: list[int], meta_division: list[int]) -> list[int]:
    """Blocks a stage of the meta model: each meta module's lie in the stage its target module ends in."""
    depths = [0] * len(layers)
    for (_, stage), n in zip(module_stages(layers, division), meta_division):
        depths[stage] += n
    return depths

class ConvNeXtFamily:
    name = "convnext"
    task = "classification"     # incubate/tasks
    modality = "image"          # the data description it reads (incubate/data/spec.py)

    def _layers(self, name: str, kwargs: dict) -> list[int]:
        if "depths" in kwargs:
            return list(kwargs["depths"])
        with torch.device("meta"):      # only the layout is wanted: no memory, no initialisation cost
            return layout(self.build(name, kwargs))

    def _check(self, name: str, layers: list[int], division: list[int]) -> None:
        if sum(division) != sum(layers):
            raise UserError(f"model.division {division} has {sum(division)} blocks but {name} has {sum(layers)} "
                            f"(depths {layers}); make the division sum to {sum(layers)}")

    def validate(self, cfg) -> None:
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("drop_path_rate", "num_classes")}
        with torch.device("meta"):      # the name is checked on the model it builds, as the vit family does
            layers = layout(self.build(cfg.name, kwargs))
        self._check(cfg.name, layers, list(cfg.division))

    def model_kwargs(self, cfg, spec, division: list[int], meta: bool = False) -> dict:
        """timm's keyword arguments (saved in manifests); ConvNeXts take any image size, so the
        size is not one. The meta model is the target with `depths` from the meta division."""
        expect(spec, self.modality, self.name)
        kwargs, in_chans = dict(cfg.kwargs), spec.channels
        if "in_chans" in kwargs and kwargs["in_chans"] != in_chans:
            raise UserError(f"model.kwargs.in_chans={kwargs['in_chans']} but the data has {in_chans} channels; "
                            f"remove it from model.kwargs")
        kwargs.pop("drop_path_rate", None)
        kwargs.update(num_classes=spec.classes, in_chans=in_chans)
        layers = self._layers(cfg.name, kwargs)
        self._check(cfg.name, layers, list(cfg.division))
        kwargs["depths"] = layers
        if meta:
            kwargs["depths"] = meta_depths(layers, list(cfg.division), division)
        return kwargs

    def meta_model(self, target: nn.Module, division: list[int], meta_division: list[int]) -> nn.Module:
        """The target's ConvNeXt with, in each stage, the blocks of the meta modules ending there."""
        spec = recorded_spec(target, self.name)
        layers = layout(target)
        self._check(spec["name"], layers, list(division))
        return self.build(spec["name"], dict(spec["kwargs"], depths=meta_depths(layers, list(division), meta_division)))

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        try:
            model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **kwargs)
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:
            raise UserError(f"cannot build timm model '{name}' with {kwargs}: {e}") from None
        if not isinstance(model, timm.models.convnext.ConvNeXt):
            raise UserError(f"model.name '{name}' builds a timm {type(model).__name__}, not a ConvNeXt; "
                            f"model.family convnext needs a convnext_*/convnextv2_* name")
        return remember_spec(model, name, kwargs)

    def depth(self, model: nn.Module) -> int:
        return sum(layout(model))

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [blk for _, _, blk in flat_blocks(model)]

    def owner(self, key: str, division: list[int], model: nn.Module) -> int:
        layers = layout(model)
        block = None
        if found := BLOCK.match(key):
            block = sum(layers[:int(found.group(1))]) + int(found.group(2))
        elif found := DOWN.match(key):      # with the block it precedes; after the last block: the head's
            block = min(sum(layers[:int(found.group(1))]), sum(layers) - 1)
        return module_of(key, block, division, STEM, HEAD, "ConvNeXt")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.stem(x)

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        layers = layout(model)
        use_ckpt = model.stages[0].grad_checkpointing and torch.is_grad_enabled()
        flat = flat_blocks(model)
        for j in range(start, stop):
            for s in stages_starting_at(layers, j):
                x = model.stages[s].downsample(x)
            blk = flat[j][2]
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        if stop == sum(layers):     # downsampling of trailing stages without blocks
            for s in stages_starting_at(layers, stop):
                x = model.stages[s].downsample(x)
        return x

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm_pre(x))

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        model.set_grad_checkpointing(enable)

    def init_from_meta(self, target: nn.Module, meta: nn.Module, division: list[int],
                       meta_division: list[int], index: int, mode: str = "meta") -> None:
        """Initialise target module `index` from meta module `index`; both hold the same
        downsampling layers, which are copied.

        mode "meta": the module computes exactly what the meta module computes. Its first blocks in
        its last stage take copies of the meta module's blocks (all in that stage); every other block
        starts as the identity (its MLP's last layer zeroed: the residual branch adds 0) and still trains.
        mode "stack": every block is a copy of a meta-module block of the same width, cycling through
        those; a block of an earlier stage than the module's last has none, and is refused.
        Module 0 copies the stem and module K-1 the head in both modes.
        """
        if mode not in ("meta", "stack"):
            raise UserError(f"module_init '{mode}' is not one the ConvNeXt adapter knows; use random, meta or stack")
        start, m_start = sum(division[:index]), sum(meta_division[:index])
        blocks = flat_blocks(target)[start:start + division[index]]
        metas = [b for _, _, b in flat_blocks(meta)[m_start:m_start + meta_division[index]]]
        with torch.no_grad():
            self._copy_downsampling(target, meta, division, meta_division, index)
            (self._init_meta if mode == "meta" else self._init_stack)(blocks, metas, index)
        copy_stem_and_head(target, meta, index, len(division), STEM, HEAD)

    def _copy_downsampling(self, target, meta, division, meta_division, index) -> None:
        meta_state = meta.state_dict()
        for key, value in target.state_dict().items():
            if DOWN.match(key) and self.owner(key, division, target) == index:
                if self.owner(key, meta_division, meta) != index or meta_state[key].shape != value.shape:
                    raise UserError(f"module {index}: weight {key} has no counterpart in meta module {index}; "
                                    f"the meta model was built for another division")
                value.copy_(meta_state[key])

    @staticmethod
    def _init_meta(blocks, metas, index: int) -> None:
        last = blocks[-1][1]
        first = [s for _, s, _ in blocks].index(last)
        if len(blocks) - first < len(metas):
            raise UserError(f"module_init meta: module {index} has {len(blocks) - first} blocks in its last stage "
                            f"(stages.{last}), fewer than the meta module's {len(metas)}; give it more blocks "
                            f"there or the meta module fewer")
        for j, (_, _, blk) in enumerate(blocks):
            if first <= j < first + len(metas):
                blk.load_state_dict(metas[j - first].state_dict())
            else:
                blk.mlp.fc2.weight.zero_()
                if blk.mlp.fc2.bias is not None:
                    blk.mlp.fc2.bias.zero_()

    @staticmethod
    def _init_stack(blocks, metas, index: int) -> None:
        stack_by_shape([(name, blk) for name, _, blk in blocks], metas, lambda name: UserError(
            f"module_init stack: block {name} of module {index} has no block of its width in meta module {index} "
            f"(whose blocks are all in the module's last stage); use module_init meta, or a division whose modules "
            f"each keep to one stage"))

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        return self.keep_modules(model, division, {index})

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Blocks and downsampling layers of other modules become nn.Identity in place, so the stage
        lengths (the layout that owner() reads) stay and the kept keys keep their names."""
        for name, s, _ in flat_blocks(model):
            if self.owner(name + ".", division, model) not in keep:
                model.stages[s].blocks[int(name.rsplit(".", 1)[1])] = nn.Identity()
        for s, stage in enumerate(model.stages):
            if self.owner(f"stages.{s}.downsample.", division, model) not in keep:
                stage.downsample = nn.Identity()
        if 0 not in keep:
            model.stem = nn.Identity()
        if len(division) - 1 not in keep:
            model.norm_pre, model.head = nn.Identity(), nn.Identity()
        return model

    def export_config(self, model: nn.Module, spec: dict, data_config: dict, label_names: list) -> dict:
        return timm_export_config(model, spec["kwargs"], data_config, label_names)
