"""Adapter for timm's flat-block vision transformers: VisionTransformer (vit_*, deit_*, deit3_*,
flexivit_*, the register, GAP, SigLIP-pooled and parallel-block variants; VisionTransformerDistilled,
deit_*_distilled_*), Eva (eva02_*, vit_*_rope_*) and Beit (beit_*, beitv2_*).

What the family needs is checked on the built model, not assumed from its name (check_structure):
its blocks are one flat sequence of alike blocks of a kind whose residual branches it can start as
the identity, and nothing outside the blocks changes from block to block. So Eva's rotary position
embedding (fixed, computed from the patch grid) is recomputed for every module, and Beit's relative
position bias lives inside each block (a block copied to another depth keeps its own). Models that
break this are refused in one line when the recipe is read.

Module 0 owns the stem (patch embedding, class/distillation/register tokens, position embedding,
pre-norm); module K-1 owns the head (final norm, pooling norm, attention pool, classifier(s));
blocks are split contiguously by the division.
"""
from __future__ import annotations

import timm
import torch
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import (Block, DiffParallelScalingBlock, ParallelScalingBlock,
                                            ParallelThingsBlock, ResPostBlock, VisionTransformer)
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.spec import expect
from ..errors import UserError
from .base import (Slot, copy_stem_and_head, init_blocks_from_meta, module_of, recorded_spec, remember_spec,
                   stack_blocks, timm_export_config)

STEM = ("patch_embed.", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre.")
HEAD = ("norm.", "fc_norm.", "attn_pool.", "head.", "head_dist.")
MODEL_CLASSES = (VisionTransformer, Eva, Beit)


def _pre_norm(blk):
    return blk.attn.proj, blk.mlp.fc2


def _post_norm(blk):
    return blk.norm1, blk.norm2


def _parallel(blk):
    return tuple(m for m in (getattr(blk, n, None) for n in ("out_proj", "attn_out_proj", "mlp_out_proj"))
                 if m is not None)


def _parallel_things(blk):
    return tuple(a.attn.proj for a in blk.attns) + tuple(f.mlp.fc2 for f in blk.ffns)


# the layers that end each residual branch of a block: zeroed, the block returns its input
RESIDUAL_OUTPUTS = {Block: _pre_norm, EvaBlock: _pre_norm, BeitBlock: _pre_norm, ResPostBlock: _post_norm,
                    EvaBlockPostNorm: _post_norm, ParallelScalingBlock: _parallel,
                    DiffParallelScalingBlock: _parallel, ParallelThingsBlock: _parallel_things}


def _other_stacks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_children() if n != "blocks" and isinstance(m, (nn.ModuleList, nn.Sequential))
            and len(m) and all(type(b) is type(m[0]) and len(list(b.children())) > 1 for b in m)]


def check_structure(name: str, model: nn.Module) -> None:
    """Refuse (UserError, one line) a model the family cannot divide, incubate and assemble."""
    kind = type(model).__name__
    if not isinstance(model, MODEL_CLASSES):
        others = _other_stacks(model)
        why = f" (it has more than one stack of blocks: {', '.join(['blocks'] + others)})" if others else ""
        raise UserError(f"model.name '{name}' builds a timm {kind}{why}, whose forward the vit family does not "
                        f"know: it runs VisionTransformer, Eva and Beit, whose blocks are one flat sequence; "
                        f"use a vit_*, deit_*, eva02_* or beit_* name")
    blocks = list(model.blocks)
    kinds = sorted({type(b).__name__ for b in blocks})
    shapes = {tuple((k, tuple(v.shape)) for k, v in b.state_dict().items()) for b in blocks}
    if len(kinds) > 1 or len(shapes) > 1:
        raise UserError(f"model.name '{name}': its blocks are not alike ({', '.join(kinds)}, {len(shapes)} "
                        f"weight layouts), but the vit family copies blocks between depths; use a model whose "
                        f"blocks all have one kind and shape")
    if type(blocks[0]) not in RESIDUAL_OUTPUTS:
        raise UserError(f"model.name '{name}': its blocks are timm {kinds[0]}, whose residual branches the vit "
                        f"family cannot start as the identity (module_init meta); use a model with blocks of "
                        f"{', '.join(sorted({c.__name__ for c in RESIDUAL_OUTPUTS}))}")
    if isinstance(model, Eva):
        _check_rope(name, model)
    if isinstance(model, Beit) and model.rel_pos_bias is not None:
        raise UserError(f"model.name '{name}' with use_shared_rel_pos_bias: one relative position bias outside "
                        f"the blocks serves every block, so it belongs to no one module; set "
                        f"use_shared_rel_pos_bias: false (each block keeps its own: use_rel_pos_bias: true)")


def _check_rope(name: str, model: nn.Module) -> None:
    """Eva's rotary embedding is recomputed for each module: it must be a fixed function of the grid."""
    rope = model.rope
    if rope is None:
        return
    why = None
    if any(True for _ in rope.parameters()):
        why = "its rotary position embedding has weights (rope_type mixed) that every block uses"
    elif getattr(rope, "aug_active", False):
        why = "its rotary position embedding is drawn at random in training (rope_shift/jitter/rescale_coords)"
    elif model.dynamic_img_size:
        why = "dynamic_img_size makes its rotary position embedding depend on each input's grid"
    elif model.patch_drop is not None:
        why = "patch dropout gives each image its own rotary position embedding"
    if why:
        raise UserError(f"model.name '{name}': {why}, which the vit family cannot recompute for every module "
                        f"alike; use fixed rotary embeddings (rope_type cat or dinov3 without coordinate "
                        f"augmentation, no dynamic_img_size, no patch_drop_rate)")


def _block_kwargs(model: nn.Module) -> dict:
    """What timm's forward passes every block besides the tokens (computed outside the blocks)."""
    if isinstance(model, Eva):
        rope = model.rope
        if rope is None:
            return {"rope": None}
        return {"rope": rope.get_embed() if hasattr(rope, "feat_shape") else
                rope.get_embed(shape=model.patch_embed.grid_size)}
    if isinstance(model, Beit):
        return {"shared_rel_pos_bias": None}
    return {}


class ViTFamily:
    name = "vit"
    task = "classification"     # incubate/tasks
    modality = "image"          # the data description it reads (incubate/data/spec.py)
    imports_official = True      # the official code released ViT checkpoints (incubate/interop.py)

    def model_kwargs(self, cfg, spec, division: list[int], meta: bool = False) -> dict:
        """The timm keyword arguments that fix the architecture (saved in manifests): the recipe's,
        with the images' channels and size, and depth = the division's blocks (the meta model is the
        target at depth K)."""
        expect(spec, self.modality, self.name)
        kwargs = dict(cfg.kwargs)
        for key, value in (("in_chans", spec.channels), ("img_size", spec.size)):
            if key in kwargs and kwargs[key] != value:
                raise UserError(f"model.kwargs.{key}={kwargs[key]} but the data has {key}={value}; "
                                f"remove it from model.kwargs or change data.img_size")
            kwargs[key] = value
        kwargs.pop("drop_path_rate", None)
        kwargs.update(num_classes=spec.classes, depth=sum(division))
        return kwargs

    def validate(self, cfg) -> None:
        depth = cfg.kwargs.get("depth")
        if isinstance(depth, int) and len(cfg.division) > depth:
            raise UserError(f"model.division has {len(cfg.division)} modules but the target has only {depth} "
                            f"blocks (model.kwargs.depth); K can be at most the depth: use fewer modules")
        if depth is not None and sum(cfg.division) != depth:
            raise UserError(f"model.division {cfg.division} sums to {sum(cfg.division)} blocks but "
                            f"model.kwargs.depth is {depth}; make them agree")
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("drop_path_rate", "num_classes")}
        with torch.device("meta"):      # only the structure is checked: no memory, no initialisation cost
            self.build(cfg.name, dict(kwargs, depth=sum(cfg.division)))

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        try:
            model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **kwargs)
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:
            raise UserError(f"cannot build timm model '{name}' with {kwargs}: {e}") from None
        check_structure(name, model)
        return remember_spec(model, name, kwargs)

    def meta_model(self, target: nn.Module, division: list[int], meta_division: list[int]) -> nn.Module:
        """The target's timm ViT at depth sum(meta_division) (what model_kwargs gives the meta model)."""
        spec = recorded_spec(target, self.name)
        return self.build(spec["name"], dict(spec["kwargs"], depth=sum(meta_division)))

    def depth(self, model: nn.Module) -> int:
        return len(model.blocks)

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def owner(self, key: str, division: list[int], model: nn.Module | None = None) -> int:
        """Index of the module that owns a state-dict key (block keys number blocks globally, so
        the model is not needed)."""
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        return module_of(key, block, division, STEM, HEAD, "ViT")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        if isinstance(model, Beit):
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            return model.pos_drop(x if model.pos_embed is None else x + model.pos_embed)
        if isinstance(model, Eva):
            x, _ = model._pos_embed(x)      # its rotary embedding is recomputed in blocks()
            return model.norm_pre(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        use_ckpt = getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled()
        kwargs = _block_kwargs(model)
        for blk in model.blocks[start:stop]:
            x = checkpoint(blk, x, use_reentrant=False, **kwargs) if use_ckpt else blk(x, **kwargs)
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
        (the layers RESIDUAL_OUTPUTS names: attention and MLP output projections, or a post-norm
        block's norms), so they start as the identity and still train.
        mode "stack": depthwise stacking (as in LLM growth work): every block of the module is a copy
        of a meta block, cycling through the meta module's blocks (with one meta block a module,
        every block copies it). The module then applies the meta block several times, so the
        assembly does not start as the meta model.
        Module 0 copies the stem and module K-1 the head in both modes.
        """
        init_blocks_from_meta(target.blocks, meta.blocks, Slot(division, meta_division, index), mode,
                              lambda blk: RESIDUAL_OUTPUTS[type(blk)](blk), "ViT")
        copy_stem_and_head(target, meta, index, len(division), STEM, HEAD)

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        """Drop every part of `model` that module `index` does not own, keeping key names."""
        return self.keep_modules(model, division, {index})

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Drop every part of `model` that no module in `keep` owns, keeping key names (tokens and
        position embeddings become None, modules nn.Identity; Eva's weightless rope stays)."""
        for j in range(len(model.blocks)):
            if self.owner(f"blocks.{j}.", division) not in keep:
                model.blocks[j] = nn.Identity()
        dropped = (STEM if 0 not in keep else ()) + (HEAD if len(division) - 1 not in keep else ())
        for part in (p.rstrip(".") for p in dropped):
            value = getattr(model, part, None)
            if value is None:
                continue
            if isinstance(value, nn.Parameter) or part == "attn_pool":
                setattr(model, part, None)
            elif isinstance(value, nn.Module):
                setattr(model, part, nn.Identity())
        return model
