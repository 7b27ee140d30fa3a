"""Adapter for decoder-only language models over Hugging Face transformers (LlamaForCausalLM).

The model is built from the recipe (`model.name: llama`, `model.kwargs`: hidden_size,
num_attention_heads, num_key_value_heads, intermediate_size, rope_theta, ...), never downloaded.
The depth comes from the division, the vocabulary from the tokenizer and the context
(max_position_embeddings) from `data.context`.

Module 0 owns the stem (token embedding); module K-1 owns the head (final norm, lm_head); blocks
are the decoder layers `model.layers.N`. Rotary position embeddings and the causal mask have no
weights: every module computes them from its input as LlamaModel.forward does (positions
0..T-1, no cache, no padding mask), so stem + blocks + head is exactly model(input_ids).logits.
Tied input and output embeddings would put one tensor in module 0 and in module K-1: they are
untied (tie_word_embeddings: false) and a recipe asking for them is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .base import copy_stem_and_head, init_blocks_from_meta, module_of, stack_blocks

STEM = ("model.embed_tokens.",)
HEAD = ("model.norm.", "lm_head.")
LAYERS = "model.layers."
# What the recipe may not set: it comes from the division, the data or this adapter.
DERIVED = ("num_hidden_layers", "vocab_size", "max_position_embeddings")


class CausalLMFamily:
    name = "causal_lm"
    task = "causal_lm"

    # the recipe's validation turns this into a one-line refusal of train.grad_checkpointing
    no_grad_checkpointing = "its decoder layers are not recomputed in backward yet"

    def validate(self, cfg) -> None:
        """Refuse, when the recipe is read, a model section this adapter cannot honour."""
        if cfg.name != "llama":
            raise UserError(f"model.name '{cfg.name}' is not an architecture the causal_lm family builds; "
                            f"use model.name: llama")
        kwargs = cfg.kwargs or {}
        for key in DERIVED:
            if key in kwargs:
                raise UserError(f"model.kwargs.{key} is set by deep-incubate (layers: model.division; vocabulary: "
                                f"the tokenizer; context: data.context); remove it from model.kwargs")
        if kwargs.get("tie_word_embeddings"):
            raise UserError("model.kwargs.tie_word_embeddings: true would share one tensor between module 0 "
                            "(embedding) and module K-1 (lm_head); deep-incubate trains them untied: remove it")

    def model_kwargs(self, cfg, num_classes: int, in_chans: int, img_size: int, division: list[int],
                     meta: bool = False) -> dict:
        """The LlamaConfig arguments that fix the architecture (saved in manifests): the recipe's,
        with one layer a block of the division. For a text bundle `num_classes` is the vocabulary and
        `img_size` the context (data.TextBundle)."""
        self.validate(cfg)
        kwargs = dict(cfg.kwargs)
        kwargs.update(num_hidden_layers=sum(division), vocab_size=num_classes, max_position_embeddings=img_size,
                      tie_word_embeddings=False)
        return kwargs

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM
        if drop_path:
            raise UserError(f"drop_path {drop_path}: the causal_lm family has no drop-path; set drop_path: 0")
        try:
            config = LlamaConfig(**kwargs, use_cache=False)
            config._attn_implementation = "sdpa"
            model = LlamaForCausalLM(config)
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot build a Llama model with model.kwargs {kwargs}: {e}") from None
        return model

    def depth(self, model: nn.Module) -> int:
        return len(model.model.layers)

    def owner(self, key: str, division: list[int], model: nn.Module = None) -> int:
        """Index of the module that owns a state-dict key (the layout is fixed: `model` is not needed)."""
        block = int(key.split(".")[2]) if key.startswith(LAYERS) else None
        return module_of(key, block, division, STEM, HEAD, "causal_lm")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(x)

    def _rotary_and_mask(self, model: nn.Module, h: torch.Tensor):
        """What LlamaModel.forward hands every decoder layer, for positions 0..T-1 without a cache."""
        from transformers.masking_utils import create_causal_mask
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        return model.model.rotary_emb(h, position_ids=position_ids), mask, position_ids

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return x
        rotary, mask, position_ids = self._rotary_and_mask(model, x)
        for layer in model.model.layers[start:stop]:
            out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
            x = out[0] if isinstance(out, tuple) else out     # older transformers return a tuple
        return x

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm(x))

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        if enable:
            raise UserError(f"train.grad_checkpointing: not for model.family causal_lm: {self.no_grad_checkpointing}; "
                            f"set it to false")

    def export_config(self, model: nn.Module, spec: dict, data_config: dict, label_names: list) -> dict:
        """The config.json that transformers' save_pretrained writes for `model`, so that
        `AutoModelForCausalLM.from_pretrained(DIR)` rebuilds it (`incubate export` of a language model
        writes its folder with save_pretrained itself: incubate/lm_tools.py)."""
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        config["deep_incubate"] = {"rebuild": "transformers.AutoModelForCausalLM.from_pretrained(DIR)"}
        return config

    def grow_from_meta(self, target: nn.Module, meta: nn.Module) -> None:
        """G_stack growth: the target's blocks repeat the meta model's in order; stem and head copied."""
        stack_blocks(target.model.layers, meta.model.layers)
        copy_stem_and_head(target, meta, 0, 1, STEM, HEAD)

    def init_from_meta(self, target: nn.Module, meta: nn.Module, division: list[int],
                       meta_division: list[int], index: int, mode: str = "meta") -> None:
        """Initialise target module `index` from meta module `index` (as the ViT adapter does).

        mode "meta": its first layers are copies of the meta module's layers and the others start as
        the identity (attention o_proj and MLP down_proj zeroed: both residual branches add 0), so
        the module computes what the meta module computes. mode "stack": depthwise stacking, every
        layer a copy of a meta layer, cycling through the meta module's layers.
        Module 0 copies the embedding and module K-1 the final norm and lm_head in both modes.
        """
        init_blocks_from_meta(target.model.layers, meta.model.layers, division, meta_division, index, mode,
                              lambda layer: (layer.self_attn.o_proj, layer.mlp.down_proj), "causal_lm")
        copy_stem_and_head(target, meta, index, len(division), STEM, HEAD)

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        """Drop every part of `model` that module `index` does not own, keeping key names."""
        return self.keep_modules(model, division, {index})

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Drop every part of `model` that no module in `keep` owns, keeping key names. The rotary
        embedding (no weights) stays: every module needs it."""
        for j in range(len(model.model.layers)):
            if self.owner(f"{LAYERS}{j}.", division, model) not in keep:
                model.model.layers[j] = nn.Identity()
        if 0 not in keep:
            model.model.embed_tokens = nn.Identity()
        if len(division) - 1 not in keep:
            model.model.norm = nn.Identity()
            model.lm_head = nn.Identity()
        return model
