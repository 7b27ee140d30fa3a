"""Adapter for timm VisionTransformer (vit_* and deit_* names).

Module 0 owns the stem (patch embedding, class/register tokens, position embedding, pre-norm);
module K-1 owns the head (final norm, pooling norm, attention pool, classifier); blocks are split
contiguously by the division.
"""
from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .base import (copy_stem_and_head, init_blocks_from_meta, module_of, recorded_spec, remember_spec, stack_blocks,
                   timm_export_config)

STEM = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.")
HEAD = ("norm.", "fc_norm.", "attn_pool.", "head.")


class ViTFamily:
    name = "vit"
    task = "classification"     # incubate/tasks
    imports_official = True      # the official code released ViT checkpoints (incubate/interop.py)

    def model_kwargs(self, cfg, num_classes: int, in_chans: int, img_size: int, division: list[int],
                     meta: bool = False) -> dict:
        """The timm keyword arguments that fix the architecture (saved in manifests): the recipe's,
        with depth = the division's blocks (the meta model is the target at depth K)."""
        kwargs = dict(cfg.kwargs)
        for key, value in (("in_chans", in_chans), ("img_size", img_size)):
            if key in kwargs and kwargs[key] != value:
                raise UserError(f"model.kwargs.{key}={kwargs[key]} but the data has {key}={value}; "
                                f"remove it from model.kwargs or change data.img_size")
            kwargs[key] = value
        kwargs.pop("drop_path_rate", None)
        kwargs.update(num_classes=num_classes, depth=sum(division))
        return kwargs

    def validate(self, cfg) -> None:
        depth = cfg.kwargs.get("depth")
        if isinstance(depth, int) and len(cfg.division) > depth:
            raise UserError(f"model.division has {len(cfg.division)} modules but the target has only {depth} "
                            f"blocks (model.kwargs.depth); K can be at most the depth: use fewer modules")
        if depth is not None and sum(cfg.division) != depth:
            raise UserError(f"model.division {cfg.division} sums to {sum(cfg.division)} blocks but "
                            f"model.kwargs.depth is {depth}; make them agree")

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        try:
            model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"cannot build timm model '{name}' with {kwargs}: {e}") from None
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise UserError(f"timm model '{name}' is not a VisionTransformer; model.family 'vit' "
                            f"needs a vit_*/deit_* name")
        return remember_spec(model, name, kwargs)

    def meta_model(self, target: nn.Module, division: list[int], meta_division: list[int]) -> nn.Module:
        """The target's timm ViT at depth sum(meta_division) (what model_kwargs gives the meta model)."""
        spec = recorded_spec(target, self.name)
        return self.build(spec["name"], dict(spec["kwargs"], depth=sum(meta_division)))

    def depth(self, model: nn.Module) -> int:
        return len(model.blocks)

    def owner(self, key: str, division: list[int], model: nn.Module | None = None) -> int:
        """Index of the module that owns a state-dict key (block keys number blocks globally, so
        the model is not needed)."""
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        return module_of(key, block, division, STEM, HEAD, "ViT")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        use_ckpt = getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled()
        for blk in model.blocks[start:stop]:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return x

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(x))

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        model.set_grad_checkpointing(enable)

    def export_config(self, model: nn.Module, spec: dict, data_config: dict, label_names: list) -> dict:
        return timm_export_config(model, spec["kwargs"], data_config, label_names)

    def grow_from_meta(self, target: nn.Module, meta: nn.Module) -> None:
        """G_stack growth: the target's blocks repeat the meta model's in order; stem and head copied."""
        stack_blocks(target.blocks, meta.blocks)
        copy_stem_and_head(target, meta, 0, 1, STEM, HEAD)

    def init_from_meta(self, target: nn.Module, meta: nn.Module, division: list[int],
                       meta_division: list[int], index: int, mode: str = "meta") -> None:
        """Initialise target module `index` from meta module `index`.

        mode "meta": the module computes exactly what the meta module computes. Its first blocks are
        copies of the meta module's blocks; its other blocks get zero-initialised residual branches
        (attention and MLP output projections), so they start as the identity and still train.
        mode "stack": depthwise stacking (as in LLM growth work): every block of the module is a copy
        of a meta block, cycling through the meta module's blocks (with one meta block a module,
        every block copies it). The module then applies the meta block several times, so the
        assembly does not start as the meta model.
        Module 0 copies the stem and module K-1 the head in both modes.
        """
        init_blocks_from_meta(target.blocks, meta.blocks, division, meta_division, index, mode,
                              lambda blk: (blk.attn.proj, blk.mlp.fc2), "ViT")
        copy_stem_and_head(target, meta, index, len(division), STEM, HEAD)

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        """Drop every part of `model` that module `index` does not own, keeping key names."""
        return self.keep_modules(model, division, {index})

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Drop every part of `model` that no module in `keep` owns, keeping key names."""
        for j in range(len(model.blocks)):
            if self.owner(f"blocks.{j}.", division) not in keep:
                model.blocks[j] = nn.Identity()
        if 0 not in keep:
            model.patch_embed = nn.Identity()
            model.norm_pre = nn.Identity()
            for token in ("cls_token", "reg_token", "pos_embed"):
                if getattr(model, token, None) is not None:
                    setattr(model, token, None)
        if len(division) - 1 not in keep:
            model.norm = nn.Identity()
            model.fc_norm = nn.Identity()
            model.head = nn.Identity()
            if getattr(model, "attn_pool", None) is not None:
                model.attn_pool = None
        return model
