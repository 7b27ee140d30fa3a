"""Adapter for decoder-only language models over Hugging Face transformers.

`model.name` is the transformers model type (llama, mistral, qwen2, qwen3, olmo, olmo2, gemma, phi3,
gpt2: SUPPORTED) and `model.kwargs` its config's arguments (hidden_size, num_attention_heads,
intermediate_size, ...); the model is built from them with AutoConfig.for_model and the model type's
causal-LM class, never downloaded. The depth comes from the division, the vocabulary from the
tokenizer and the context (max_position_embeddings) from `data.context`.

Two layouts (LAYOUTS) cover them: the Llama one (`model.embed_tokens`, decoder layers
`model.layers.N`, `model.norm`, `lm_head`, rotary positions) and GPT-2's (`transformer.wte` and the
learned positions `transformer.wpe`, layers `transformer.h.N`, `transformer.ln_f`, `lm_head`).
Module 0 owns the stem (token and learned position embeddings); module K-1 owns the head (final norm,
lm_head). Rotary position embeddings and the causal mask have no weights: every module computes them
from its input as the model's own forward does (positions 0..T-1, no cache, no padding mask), so
stem + blocks + head is exactly model(input_ids).logits.

Refused when the recipe is read, in one line: tied input and output embeddings (one tensor in module
0 and in module K-1: they are untied, tie_word_embeddings: false), a mixture of experts, layers of
different attention kinds (sliding windows on some layers only: a module's layers are copied between
depths), and any model type outside SUPPORTED.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .base import copy_stem_and_head, init_blocks_from_meta, module_of, remember_spec, stack_blocks


@dataclass(frozen=True)
class Layout:
    """Where a decoder-only model keeps its parts (module paths from the causal-LM model's root)."""
    embed: str                       # token embedding: module 0
    norm: str                        # final norm: module K-1, with lm_head
    layers: str                      # the nn.ModuleList of decoder layers (the blocks)
    residual_outputs: tuple          # in a layer, the projections that end each residual branch
    rotary: str | None = None        # rotary embedding (no weights); None: positions are learned
    positions: str | None = None     # learned position embedding, added to the tokens' in the stem
    embed_dropout: str | None = None
    refused: tuple = ()              # (kwarg, why) that a recipe may not set true
    lm_head: str = "lm_head"

    @property
    def stem_keys(self) -> tuple:
        return tuple(f"{p}." for p in (self.embed, self.positions) if p)

    @property
    def head_keys(self) -> tuple:
        return (f"{self.norm}.", f"{self.lm_head}.")


LLAMA = Layout(embed="model.embed_tokens", norm="model.norm", layers="model.layers",
               residual_outputs=("self_attn.o_proj", "mlp.down_proj"), rotary="model.rotary_emb")
GPT2 = Layout(embed="transformer.wte", norm="transformer.ln_f", layers="transformer.h",
              residual_outputs=("attn.c_proj", "mlp.c_proj"), positions="transformer.wpe",
              embed_dropout="transformer.drop",
              refused=(("scale_attn_by_inverse_layer_idx", "it scales attention by the layer's place, so a layer "
                        "copied to another depth computes something else"),
                       ("add_cross_attention", "cross-attention reads an encoder's states, and a decoder-only "
                        "run has none")))
# Each passes every check of tests/unit/test_family_contract.py and tests/integration/test_lm.py.
SUPPORTED = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "olmo": LLAMA, "olmo2": LLAMA,
             "gemma": LLAMA, "phi3": LLAMA, "gpt2": GPT2}
LAYOUTS = (LLAMA, GPT2)
# What the recipe may not set: it comes from the division, the data or this adapter.
DERIVED = ("num_hidden_layers", "vocab_size", "max_position_embeddings")
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
MASKS = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask"}


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent) if parent else model, name, new)


def _config_class(name: str):
    from transformers import CONFIG_MAPPING
    return CONFIG_MAPPING[name] if name in CONFIG_MAPPING else None


def _supported() -> str:
    return ", ".join(sorted(SUPPORTED))


def attention_kinds(config) -> list:
    """The attention kind of every layer, as the model's forward picks its mask: `layer_types` where
    the config has them, else one kind for all (sliding where a window is set, as Mistral's)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    window = getattr(config, "sliding_window", None)
    return ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers


class CausalLMFamily:
    name = "causal_lm"
    task = "causal_lm"

    # the recipe's validation turns this into a one-line refusal of train.grad_checkpointing
    no_grad_checkpointing = "its decoder layers are not recomputed in backward yet"

    def layout(self, model_or_name) -> Layout:
        """The layout of a model (or of a model type)."""
        name = model_or_name if isinstance(model_or_name, str) else model_or_name.config.model_type
        return SUPPORTED[name]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers (its blocks), in forward order."""
        return _get(model, self.layout(model).layers)

    def validate(self, cfg) -> None:
        """Refuse, when the recipe is read, a model section this adapter cannot honour."""
        config_class = _config_class(cfg.name)
        if config_class is None:
            raise UserError(f"model.name '{cfg.name}' is no transformers model type; the causal_lm family "
                            f"builds {_supported()}")
        self._refuse_experts(cfg.name, config_class)
        if cfg.name not in SUPPORTED:
            raise UserError(f"model.name '{cfg.name}' is not an architecture the causal_lm family builds (a "
                            f"decoder-only model of the Llama or GPT-2 layout); use one of {_supported()}")
        kwargs = cfg.kwargs or {}
        self._refuse_kwargs(cfg.name, config_class, kwargs)
        division = getattr(cfg, "division", None) or [1]
        meta_division = getattr(cfg, "meta_division", None) or [1] * len(division)
        for depth in sorted({sum(division), sum(meta_division)}):     # the target's layers and the meta model's
            self._refuse_mixed_layers(cfg.name, self._config(cfg.name, dict(kwargs, num_hidden_layers=depth)))

    def _refuse_experts(self, name: str, config_class) -> None:
        try:
            default = config_class()
            experts = any(getattr(default, key, None) for key in EXPERTS)
        except Exception:      # a config that cannot be built bare (or asked per layer) is no decoder of ours
            return
        if experts:
            raise UserError(f"model.name '{name}' is a mixture of experts, which the causal_lm family does not "
                            f"build (its layouts and meta init know dense MLPs only); use one of {_supported()}")

    def _refuse_kwargs(self, name: str, config_class, kwargs: dict) -> None:
        aliases = getattr(config_class, "attribute_map", {}) or {}
        for key in kwargs:
            if key in DERIVED or key in {aliases.get(d) for d in DERIVED}:
                raise UserError(f"model.kwargs.{key} is set by deep-incubate (layers: model.division; vocabulary: "
                                f"the tokenizer; context: data.context); remove it from model.kwargs")
        if kwargs.get("tie_word_embeddings"):
            raise UserError("model.kwargs.tie_word_embeddings: true would share one tensor between module 0 "
                            "(embedding) and module K-1 (lm_head); deep-incubate trains them untied: remove it")
        if "layer_types" in kwargs:
            raise UserError("model.kwargs.layer_types lists a kind a layer, but the layers come from "
                            "model.division (and the meta model has fewer): remove it")
        for key, why in SUPPORTED[name].refused:
            if kwargs.get(key):
                raise UserError(f"model.kwargs.{key}: true is not for the causal_lm family: {why}; remove it")

    def _refuse_mixed_layers(self, name: str, config) -> None:
        kinds = attention_kinds(config)
        if len(set(kinds)) > 1:
            counts = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
            raise UserError(f"model.kwargs give the {len(kinds)} layers of {name} different attention ({counts}: "
                            f"a sliding window on some layers only); the causal_lm family needs every layer alike "
                            f"(a module's layers are copied between depths): e.g. use_sliding_window: false, or "
                            f"max_window_layers: 0")

    def model_kwargs(self, cfg, num_classes: int, in_chans: int, img_size: int, division: list[int],
                     meta: bool = False) -> dict:
        """The config arguments that fix the architecture (saved in manifests): the recipe's, with one
        layer a block of the division. For a text bundle `num_classes` is the vocabulary and
        `img_size` the context (data.TextBundle)."""
        self.validate(cfg)
        kwargs = dict(cfg.kwargs)
        kwargs.update(num_hidden_layers=sum(division), vocab_size=num_classes, max_position_embeddings=img_size,
                      tie_word_embeddings=False)
        kwargs.update(self._no_special_tokens(cfg.name, kwargs, num_classes))
        self._refuse_mixed_layers(cfg.name, self._config(cfg.name, kwargs))
        return kwargs

    def _no_special_tokens(self, name: str, kwargs: dict, vocab: int) -> dict:
        """Special token ids an architecture's defaults name that mean nothing here (the tokens are bytes
        or a BPE without special tokens): a padding id (nn.Embedding would never train its row) and a
        BOS/EOS id outside the vocabulary. Llama names neither, so its kwargs stay the recipe's."""
        default = _config_class(name)()
        drop = {}
        if "pad_token_id" not in kwargs and default.pad_token_id is not None:
            drop["pad_token_id"] = None
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(default, key, None)
            if key not in kwargs and isinstance(value, int) and not 0 <= value < vocab:
                drop[key] = None
        return drop

    def _config(self, name: str, kwargs: dict):
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig
        try:
            return AutoConfig.for_model(name, **kwargs, use_cache=False)
        except (TypeError, ValueError, StrictDataclassError) as e:     # transformers 5 configs are strict dataclasses
            why = " ".join(line.strip() for line in str(e).strip().splitlines())
            error = UserError(f"cannot build a {name} model with model.kwargs {kwargs}: {why}; fix model.kwargs")
        raise error from None

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
        if drop_path:
            raise UserError(f"drop_path {drop_path}: the causal_lm family has no drop-path; set drop_path: 0")
        if name not in SUPPORTED:
            raise UserError(f"model.name '{name}' is not an architecture the causal_lm family builds; "
                            f"use one of {_supported()}")
        config = self._config(name, kwargs)
        config._attn_implementation = "sdpa"
        try:
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot build a {name} model with model.kwargs {kwargs}: {e}") from None
        return remember_spec(model, name, kwargs)

    def meta_model(self, target: nn.Module, division: list[int], meta_division: list[int]) -> nn.Module:
        """The target's architecture (its transformers config, so any model of SUPPORTED, built here or
        not) with sum(meta_division) layers; untied embeddings as every model of this family."""
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
        config = getattr(target, "config", None)
        if getattr(config, "model_type", None) not in SUPPORTED:
            raise UserError(f"{type(target).__name__} is not a transformers causal LM the causal_lm family builds; "
                            f"use a model of {_supported()}")
        if config.tie_word_embeddings:
            raise UserError("the target ties its input and output embeddings (tie_word_embeddings: true), one "
                            "tensor in module 0 and module K-1; build it with tie_word_embeddings=False")
        config = copy.deepcopy(config)
        config.num_hidden_layers = sum(meta_division)
        if getattr(config, "layer_types", None):       # one kind for every layer (refused otherwise)
            self._refuse_mixed_layers(config.model_type, target.config)
            config.layer_types = config.layer_types[:1] * sum(meta_division)
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)

    def depth(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.layers(model))

    def owner(self, key: str, division: list[int], model: nn.Module = None) -> int:
        """Index of the module that owns a state-dict key (the layouts' key names differ, so `model` is
        not needed)."""
        for layout in LAYOUTS:
            if key.startswith(f"{layout.layers}."):
                block = int(key[len(layout.layers) + 1:].split(".")[0])
                return module_of(key, block, division, (), (), "causal_lm")
        stem = tuple(k for layout in LAYOUTS for k in layout.stem_keys)
        head = tuple(k for layout in LAYOUTS for k in layout.head_keys)
        return module_of(key, None, division, stem, head, "causal_lm")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout(model)
        h = _get(model, layout.embed)(x)
        if layout.positions:
            h = h + _get(model, layout.positions)(self._positions(h))
        if layout.embed_dropout:
            h = _get(model, layout.embed_dropout)(h)
        return h

    @staticmethod
    def _positions(h: torch.Tensor) -> torch.Tensor:
        return torch.arange(h.shape[1], device=h.device).unsqueeze(0)

    def _layer_inputs(self, model: nn.Module, h: torch.Tensor) -> dict:
        """What the model's forward hands every decoder layer besides the hidden states, for
        positions 0..T-1 without a cache: the causal mask of its (one) attention kind, the position
        ids and, with rotary positions, their cos/sin."""
        from transformers import masking_utils
        layout, position_ids = self.layout(model), self._positions(h)
        make_mask = getattr(masking_utils, MASKS[attention_kinds(model.config)[0]])
        mask = make_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None,
                         position_ids=position_ids)
        inputs = {"attention_mask": mask, "position_ids": position_ids}
        if layout.rotary:
            inputs["position_embeddings"] = _get(model, layout.rotary)(h, position_ids=position_ids)
        return inputs

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return x
        inputs = self._layer_inputs(model, x)
        for layer in self.layers(model)[start:stop]:
            out = layer(x, **inputs)
            x = out[0] if isinstance(out, tuple) else out     # older transformers return a tuple
        return x

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout(model)
        return _get(model, layout.lm_head)(_get(model, layout.norm)(x))

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
        layout = self.layout(target)
        stack_blocks(self.layers(target), self.layers(meta))
        copy_stem_and_head(target, meta, 0, 1, layout.stem_keys, layout.head_keys)

    def init_from_meta(self, target: nn.Module, meta: nn.Module, division: list[int],
                       meta_division: list[int], index: int, mode: str = "meta") -> None:
        """Initialise target module `index` from meta module `index` (as the ViT adapter does).

        mode "meta": its first layers are copies of the meta module's layers and the others start as
        the identity (the projections that end both residual branches zeroed: Llama's o_proj and
        down_proj, GPT-2's attn.c_proj and mlp.c_proj), so the module computes what the meta module
        computes. mode "stack": depthwise stacking, every layer a copy of a meta layer, cycling
        through the meta module's layers.
        Module 0 copies the embeddings and module K-1 the final norm and lm_head in both modes.
        """
        layout = self.layout(target)
        init_blocks_from_meta(self.layers(target), self.layers(meta), division, meta_division, index, mode,
                              lambda layer: [layer.get_submodule(p) for p in layout.residual_outputs], "causal_lm")
        copy_stem_and_head(target, meta, index, len(division), layout.stem_keys, layout.head_keys)

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        """Drop every part of `model` that module `index` does not own, keeping key names."""
        return self.keep_modules(model, division, {index})

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Drop every part of `model` that no module in `keep` owns, keeping key names. The rotary
        embedding (no weights) stays: every module needs it."""
        layout, layers = self.layout(model), self.layers(model)
        for j in range(len(layers)):
            if self.owner(f"{layout.layers}.{j}.", division, model) not in keep:
                layers[j] = nn.Identity()
        if 0 not in keep:
            for path in (layout.embed, layout.positions):
                if path:
                    _replace(model, path, nn.Identity())
        if len(division) - 1 not in keep:
            for path in (layout.norm, layout.lm_head):
                _replace(model, path, nn.Identity())
        return model
