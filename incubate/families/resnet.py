"""Adapter for timm's ResNet (timm.models.resnet.ResNet): timm's named ResNets (resnet18,
resnet50, resnet26d, ...) and the CIFAR-style ResNets of He et al. 2016, `cifar_resnet{6n+2}`
(cifar_resnet56, cifar_resnet110: 3 stages of n BasicBlocks of widths 16/32/64, one 3x3 stride-1
stem convolution, no max-pool, global average pooling, a linear classifier).

timm's arguments cannot say "one 3x3 stride-1 stem convolution of width 16" (its single-conv stem
is a 7x7 stride-2 conv of width 64, and forward_features always runs layer4), so a CIFAR ResNet is
timm's `resnet18` with layers (n, n, n, 0) (an empty layer4), channels (16, 32, 64, 64),
stem_type 'deep' with stem_width 8 (only to make the stem 16 wide), whose conv1 is then replaced
by a 3x3 stride-1 convolution and whose max-pool by nn.Identity. Every key stays timm's; the
export's config.json says how to rebuild it with timm alone (docs/interop.md).

Blocks are layer1.0, layer1.1, ..., layer4.N flattened in order; module 0 owns the stem (conv1,
bn1, maxpool), module K-1 the classifier (fc). Each meta block takes the stride and width change
of its target module: the meta model is the same network with, in each stage, as many blocks as
the meta modules ending in that stage (a module that crosses into a new stage gets a strided,
widening meta block: timm makes the first block of a stage so). A module crossing two stage
boundaries would need a meta block with two stride and width changes, so such a division is refused.
"""
from __future__ import annotations

import re

import timm
import torch
from torch import nn

from ..data.spec import expect
from ..errors import UserError
from .base import (copy_stem_and_head, module_of, recorded_spec, remember_spec, stack_by_shape,
                   timm_export_config, weight_shapes)

CIFAR = re.compile(r"cifar_resnet(\d+)$")
STEM = ("conv1.", "bn1.", "maxpool.")
HEAD = ("fc.", "global_pool.")
BLOCK = re.compile(r"layer(\d+)\.(\d+)\.")


def cifar_args(name: str) -> dict | None:
    """timm `resnet18` arguments of the CIFAR ResNet `name` (before its stem is replaced)."""
    found = CIFAR.match(name)
    if not found:
        return None
    depth = int(found.group(1))
    if depth < 8 or (depth - 2) % 6:
        raise UserError(f"model.name {name}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, ...)")
    n = (depth - 2) // 6
    return {"layers": [n, n, n, 0], "channels": [16, 32, 64, 64], "stem_type": "deep", "stem_width": 8}


def layout(model: nn.Module) -> list[int]:
    """Blocks in each stage (layer1..layer4); a pruned model keeps its layout (see keep_modules)."""
    return [len(getattr(model, f"layer{s}")) for s in range(1, 5) if hasattr(model, f"layer{s}")]


def flat_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"layer{s + 1}.{j}", getattr(model, f"layer{s + 1}")[j])
            for s, n in enumerate(layout(model)) for j in range(n)]


def module_stages(layers: list[int], division: list[int]) -> list[tuple[int, int]]:
    """(stage of the module's input, stage of its last block) for every module."""
    stage_of = [s for s, n in enumerate(layers) for _ in range(n)]
    out, end, prev = [], 0, 0
    for d in division:
        end += d
        out.append((prev, stage_of[end - 1]))
        prev = stage_of[end - 1]
    return out


def check_division(name: str, layers: list[int], division: list[int]) -> list[tuple[int, int]]:
    if sum(division) != sum(layers):
        raise UserError(f"model.division {division} has {sum(division)} blocks but {name} has {sum(layers)} "
                        f"(layers {layers}); make the division sum to {sum(layers)}")
    stages = module_stages(layers, division)
    for i, (a, b) in enumerate(stages):
        if b - a > 1:
            raise UserError(f"model.division {division}: module {i} runs from layer{a + 1} into layer{b + 1}, "
                            f"across {b - a} stage changes, but its one meta block can make only one stride "
                            f"and width change; divide so that every module crosses at most one stage boundary")
    return stages


def meta_layers(layers: list[int], stages: list[tuple[int, int]], meta_division: list[int]) -> list[int]:
    """Blocks a stage of the meta model: each meta module's blocks go to the stage its module ends in."""
    out = [0] * len(layers)
    for (_, stage), n in zip(stages, meta_division):
        out[stage] += n
    return out


def _last_bn(block: nn.Module) -> nn.Module:
    return block.bn3 if hasattr(block, "bn3") else block.bn2


class ResNetFamily:
    name = "resnet"
    task = "classification"     # incubate/tasks
    modality = "image"          # the data description it reads (incubate/data/spec.py)
    # torch's checkpointing reruns each block's forward in backward, and a training BatchNorm
    # updates its running statistics on every forward (measured: twice a step, not once)
    no_grad_checkpointing = "BatchNorm would update its running statistics twice a step (again when a block is recomputed)"

    def _layers(self, name: str, kwargs: dict) -> list[int]:
        if "layers" in kwargs:
            return list(kwargs["layers"])
        cifar = cifar_args(name)
        if cifar:
            return cifar["layers"]
        with torch.device("meta"):      # only the layout is wanted: no memory, no initialisation cost
            return layout(self.build(name, kwargs))

    def validate(self, cfg) -> None:
        check_division(cfg.name, self._layers(cfg.name, dict(cfg.kwargs)), list(cfg.division))

    def model_kwargs(self, cfg, spec, division: list[int], meta: bool = False) -> dict:
        """timm's keyword arguments (saved in manifests). ResNets take any image size, so the
        size is not one. The meta model is the target with `layers` from the meta division."""
        expect(spec, self.modality, self.name)
        kwargs, in_chans = dict(cfg.kwargs), spec.channels
        if "in_chans" in kwargs and kwargs["in_chans"] != in_chans:
            raise UserError(f"model.kwargs.in_chans={kwargs['in_chans']} but the data has {in_chans} channels; "
                            f"remove it from model.kwargs")
        kwargs.pop("drop_path_rate", None)
        kwargs.update(num_classes=spec.classes, in_chans=in_chans)
        layers = self._layers(cfg.name, kwargs)
        stages = check_division(cfg.name, layers, list(cfg.division))
        if meta:
            kwargs["layers"] = meta_layers(layers, stages, division)
        return kwargs

    def meta_model(self, target: nn.Module, division: list[int], meta_division: list[int]) -> nn.Module:
        """The target's ResNet with, in each stage, the blocks of the meta modules ending there."""
        spec = recorded_spec(target, self.name)
        layers = layout(target)
        stages = check_division(spec["name"], layers, list(division))
        return self.build(spec["name"], dict(spec["kwargs"], layers=meta_layers(layers, stages, meta_division)))

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        cifar = cifar_args(name)
        args = dict(cifar or {}, **kwargs)
        if cifar and len(args["layers"]) == 3:
            args["layers"] = list(args["layers"]) + [0]
        try:
            model = timm.create_model("resnet18" if cifar else name, pretrained=False, drop_path_rate=drop_path,
                                      **args)
        except (RuntimeError, TypeError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"cannot build timm model '{name}' with {kwargs}: {e}") from None
        if not isinstance(model, timm.models.resnet.ResNet):
            raise UserError(f"timm model '{name}' is not a ResNet; model.family 'resnet' needs a resnet*/"
                            f"cifar_resnet* name")
        if cifar:
            model.conv1 = nn.Conv2d(args.get("in_chans", 3), 16, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")   # as timm's init
            model.maxpool = nn.Identity()
        return remember_spec(model, name, kwargs)

    def depth(self, model: nn.Module) -> int:
        return sum(layout(model))

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [blk for _, blk in flat_blocks(model)]

    def owner(self, key: str, division: list[int], model: nn.Module) -> int:
        found = BLOCK.match(key)
        block = None
        if found:
            stage, j = int(found.group(1)) - 1, int(found.group(2))
            block = sum(layout(model)[:stage]) + j
        return module_of(key, block, division, STEM, HEAD, "ResNet")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.maxpool(model.act1(model.bn1(model.conv1(x))))

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for _, blk in flat_blocks(model)[start:stop]:
            x = blk(x)
        return x

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(x)

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        if enable:
            raise UserError(f"train.grad_checkpointing: not for model.family resnet: {self.no_grad_checkpointing}; "
                            f"set it to false")
        model.set_grad_checkpointing(False)

    def init_from_meta(self, target: nn.Module, meta: nn.Module, division: list[int],
                       meta_division: list[int], index: int, mode: str = "meta") -> None:
        """Initialise target module `index` from meta module `index` (see docs/resnet.md).

        mode "meta": the module computes exactly what the meta module computes. The module's
        shape-changing block (the one with a downsample path; else its first block) and the blocks
        after it take copies of the meta module's blocks in order; every other block starts as the
        identity: the last BatchNorm of its residual branch gets weight and bias 0 (timm's
        zero_init_last, plus the bias), so the block returns relu(x) = x (its input is the output
        of a ReLU) and its weights still train.
        mode "stack": every block is a copy of a meta-module block of the same shape, cycling
        through those; a block with none (e.g. a 32->32 block when the meta module holds only the
        strided 16->32 block) is refused: give that meta module more blocks (model.meta_division).
        Module 0 copies the stem and module K-1 the classifier in both modes.
        """
        if mode not in ("meta", "stack"):
            raise UserError(f"module_init '{mode}' is not one the ResNet adapter knows; use random, meta or stack")
        start, m_start = sum(division[:index]), sum(meta_division[:index])
        blocks = flat_blocks(target)[start:start + division[index]]
        metas = [b for _, b in flat_blocks(meta)[m_start:m_start + meta_division[index]]]
        with torch.no_grad():
            if mode == "meta":
                self._init_meta(blocks, metas, index)
            else:
                self._init_stack(blocks, metas, index)
        copy_stem_and_head(target, meta, index, len(division), STEM, HEAD)

    @staticmethod
    def _init_meta(blocks, metas, index: int) -> None:
        changing = [name for name, b in blocks if getattr(b, "downsample", None) is not None]
        if len(changing) > 1:
            raise UserError(f"module_init meta: module {index} has {len(changing)} blocks that change shape "
                            f"({', '.join(changing)}) but one meta module; use module_init random, or a "
                            f"division whose modules hold at most one")
        c = [name for name, _ in blocks].index(changing[0]) if changing else 0
        if c + len(metas) > len(blocks):
            raise UserError(f"module_init meta: module {index} has {len(blocks) - c} blocks from its "
                            f"shape-changing one on, fewer than the meta module's {len(metas)}; "
                            f"give it more blocks or the meta module fewer")
        for j, (name, blk) in enumerate(blocks):
            if c <= j < c + len(metas):
                if weight_shapes(blk) != weight_shapes(metas[j - c]):
                    raise UserError(f"module_init meta: block {name} of module {index} has another shape than "
                                    f"meta block {j - c} of that module; use module_init random")
                blk.load_state_dict(metas[j - c].state_dict())
            else:
                bn = _last_bn(blk)
                bn.weight.zero_()
                bn.bias.zero_()

    @staticmethod
    def _init_stack(blocks, metas, index: int) -> None:
        stack_by_shape(blocks, metas, lambda name: UserError(
            f"module_init stack: block {name} of module {index} has no block of its shape in meta module {index}; "
            f"give that meta module more blocks (model.meta_division, e.g. 2: a strided block and one of the new "
            f"width) or use module_init meta"))

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        return self.keep_modules(model, division, {index})

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Blocks of other modules become nn.Identity in place, so the stage lengths (the layout
        that owner() reads) stay and the kept keys keep their names."""
        for name, _ in flat_blocks(model):
            if self.owner(name + ".", division, model) not in keep:
                stage, j = name.split(".")
                getattr(model, stage)[int(j)] = nn.Identity()
        if 0 not in keep:
            model.conv1, model.bn1, model.maxpool = nn.Identity(), nn.Identity(), nn.Identity()
        if len(division) - 1 not in keep:
            model.fc = nn.Identity()
        return model

    def export_config(self, model: nn.Module, spec: dict, data_config: dict, label_names: list) -> dict:
        cifar = cifar_args(spec["name"])
        args = dict(cifar or {}, **spec["kwargs"])
        config = timm_export_config(model, args, data_config, label_names)
        if cifar:
            config["architecture"] = "resnet18"
            config["deep_incubate"] = {"rebuild": (
                f"m = timm.create_model('resnet18', **config['model_args']); "
                f"m.conv1 = torch.nn.Conv2d({args.get('in_chans', 3)}, 16, 3, padding=1, bias=False); "
                f"m.maxpool = torch.nn.Identity(); "
                f"m.load_state_dict(safetensors.torch.load_file('DIR/model.safetensors'))")}
        return config
