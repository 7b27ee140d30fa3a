"""Adapter for decoder-only language models over Hugging Face transformers.

`model.name` is the transformers model type (llama, qwen3, gemma, granite, gpt2, ...) and
`model.kwargs` its config's arguments (hidden_size, num_attention_heads, intermediate_size, ...);
the model is built from them with AutoConfig.for_model and the model type's causal-LM class, never
downloaded. The depth comes from the division, the vocabulary from the tokenizer and the context
(max_position_embeddings) from `data.context`.

Any dense decoder-only model is taken by its structure (decoder_structure.py: the embedding, the
list of decoder layers, the final norm, the head, how positions and the mask are made, the
model-level constants), proved on a tiny probe to compute the model's own logits bitwise. Module 0
owns the stem (token and learned position embeddings); module K-1 owns the head (final norm,
lm_head). Rotary position embeddings and the causal mask have no weights: every module computes them
from its input as the model's own forward does (positions 0..T-1, no cache, no padding mask).

Refused in one line, by the recipe and the API alike: tied input and output embeddings (one tensor
in module 0 and in module K-1: they are untied, tie_word_embeddings: false), a mixture of experts,
cross-attention, layers of different attention kinds (a module's layers are copied between depths),
and any model whose probe does not reproduce its logits (the line names the part).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..data.spec import expect
from ..errors import UserError
from .base import Slot, copy_stem_and_head, init_blocks_from_meta, module_of, remember_spec, stack_blocks
from .decoder_structure import EXAMPLES, Structure, check_architecture, check_config, check_kinds, refuse


# What the recipe may not set: it comes from the division, the data or this adapter.
DERIVED = ("num_hidden_layers", "vocab_size", "max_position_embeddings")
# config flags that make a layer depend on its place or on an encoder: (kwarg, why)
REFUSED = (("scale_attn_by_inverse_layer_idx", "it scales attention by the layer's place, so a layer copied to "
            "another depth computes something else"),
           ("add_cross_attention", "cross-attention reads an encoder's states, and a decoder-only run has none"))


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent) if parent else model, name, new)


def _config_class(name: str):
    from transformers import CONFIG_MAPPING
    return CONFIG_MAPPING[name] if name in CONFIG_MAPPING else None


def _causal_lm_class(config):
    """transformers' causal-LM class of a config, refused in one line when it has none."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise refuse(config.model_type, "transformers has no causal-LM class for it (not a decoder-only "
                                        "language model)") from None


class CausalLMFamily:
    name = "causal_lm"
    task = "causal_lm"
    modality = "text"           # the data description it reads (incubate/data/spec.py)

    def structure(self, model: nn.Module) -> Structure:
        """Where `model` keeps its parts, proved on a probe of its class and config (cached); a model
        the family cannot run is refused in one line naming the part that did not match."""
        config = getattr(model, "config", None)
        if not isinstance(model, nn.Module) or not isinstance(getattr(config, "model_type", None), str):
            raise UserError(f"{type(model).__name__} is not a transformers causal LM (it has no transformers config); "
                            f"the causal_lm family takes e.g. LlamaForCausalLM(config): {EXAMPLES}")
        return check_architecture(type(model), config)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers (its blocks), in forward order."""
        return _get(model, self.structure(model).layers)

    def validate(self, cfg) -> None:
        """Refuse, when the recipe is read, a model section this adapter cannot honour: the recipe's
        own fields here, the architecture as the API refuses it (check_architecture)."""
        config_class = _config_class(cfg.name)
        if config_class is None:
            raise UserError(f"model.name '{cfg.name}' is no transformers model type; use {EXAMPLES}")
        kwargs = cfg.kwargs or {}
        self._refuse_kwargs(config_class, kwargs)
        division = getattr(cfg, "division", None) or [1]
        meta_division = getattr(cfg, "meta_division", None) or [1] * len(division)
        for depth in sorted({sum(division), sum(meta_division)}):     # the target's layers and the meta model's
            config = self._config(cfg.name, dict(kwargs, num_hidden_layers=depth))
            if getattr(config, "sub_configs", None) or not hasattr(config, "num_hidden_layers"):
                check_config(config)        # no single decoder: refused before its layers are asked
            check_kinds(config)
            check_config(config)
        check_architecture(_causal_lm_class(config), config)

    def _refuse_kwargs(self, config_class, kwargs: dict) -> None:
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
        for key, why in REFUSED:
            if kwargs.get(key):
                raise UserError(f"model.kwargs.{key}: true is not for the causal_lm family: {why}; remove it")

    def model_kwargs(self, cfg, spec, division: list[int], meta: bool = False) -> dict:
        """The config arguments that fix the architecture (saved in manifests): the recipe's, with one
        layer a block of the division, the text's vocabulary and its context as the positions."""
        expect(spec, self.modality, self.name)
        self.validate(cfg)
        kwargs = dict(cfg.kwargs)
        kwargs.update(num_hidden_layers=sum(division), vocab_size=spec.vocab_size,
                      max_position_embeddings=spec.context, tie_word_embeddings=False)
        kwargs.update(self._no_special_tokens(cfg.name, kwargs, spec.vocab_size))
        check_kinds(self._config(cfg.name, kwargs))
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
        # transformers 5 configs are strict dataclasses, and some of their properties have no setter
        refused = (TypeError, ValueError, AttributeError, NotImplementedError, StrictDataclassError)
        try:
            return AutoConfig.for_model(name, **kwargs, use_cache=False)
        except refused as e:
            why = " ".join(line.strip() for line in str(e).strip().splitlines())
            error = UserError(f"cannot build a {name} model with model.kwargs {kwargs}: {why}; fix model.kwargs")
        raise error from None

    def build(self, name: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
        if drop_path:
            raise UserError(f"drop_path {drop_path}: the causal_lm family has no drop-path; set drop_path: 0")
        if _config_class(name) is None:
            raise UserError(f"model.name '{name}' is no transformers model type; use {EXAMPLES}")
        config = self._config(name, kwargs)
        config._attn_implementation = "sdpa"
        cls = _causal_lm_class(config)
        check_architecture(cls, config)
        try:
            model = cls(config)
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot build a {name} model with model.kwargs {kwargs}: {e}") from None
        return remember_spec(model, name, kwargs)

    def meta_model(self, target: nn.Module, division: list[int], meta_division: list[int]) -> nn.Module:
        """The target's architecture (its transformers config, so any model the family takes, built
        here or not) with sum(meta_division) layers; untied embeddings as every model of this family."""
        self.structure(target)
        config = target.config
        if config.tie_word_embeddings:
            raise UserError("the target ties its input and output embeddings (tie_word_embeddings: true), one "
                            "tensor in module 0 and module K-1; build it with tie_word_embeddings=False")
        config = copy.deepcopy(config)
        config.num_hidden_layers = sum(meta_division)
        if getattr(config, "layer_types", None):       # one kind for every layer (refused otherwise)
            config.layer_types = config.layer_types[:1] * sum(meta_division)
        return type(target)(config)

    def depth(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.layers(model))

    def owner(self, key: str, division: list[int], model: nn.Module = None) -> int:
        """Index of the module that owns a state-dict key of `model`."""
        found = self.structure(model)
        if key.startswith(f"{found.layers}."):
            block = int(key[len(found.layers) + 1:].split(".")[0])
            return module_of(key, block, division, (), (), "causal_lm")
        return module_of(key, None, division, found.stem_keys, found.head_keys, "causal_lm")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.structure(model).stem(model, x)

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.structure(model).blocks(model, x, start, stop)

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.structure(model).head(model, x)

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        """transformers' own: every decoder layer's forward recomputed in backward while it trains (its
        FSDP2 hooks stay outside); blocks() recomputes a frozen (eval-mode) layer the same way."""
        if enable and not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"train.grad_checkpointing: transformers cannot recompute the layers of "
                            f"{type(model).__name__} (supports_gradient_checkpointing is false); set it to false")
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()

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
        layout = self.structure(target)
        stack_blocks(self.layers(target), self.layers(meta))
        copy_stem_and_head(target, meta, 0, 1, layout.stem_keys, layout.head_keys)

    def init_from_meta(self, target: nn.Module, meta: nn.Module, division: list[int],
                       meta_division: list[int], index: int, mode: str = "meta") -> None:
        """Initialise target module `index` from meta module `index` (as the ViT adapter does).

        mode "meta": its first layers are copies of the meta module's layers and the others start as
        the identity (the projections that end both residual branches zeroed, e.g. Llama's o_proj and
        down_proj, GPT-2's attn.c_proj and mlp.c_proj), so the module computes what the meta module
        computes (the projections found on the probe: decoder_structure.py). mode "stack": depthwise
        stacking, every layer a copy of a meta layer, cycling through the meta module's layers.
        Module 0 copies the embeddings and module K-1 the final norm and lm_head in both modes.
        """
        layout = self.structure(target)
        init_blocks_from_meta(self.layers(target), self.layers(meta), Slot(division, meta_division, index), mode,
                              lambda layer: [layer.get_submodule(p) for p in layout.residual_outputs], "causal_lm")
        copy_stem_and_head(target, meta, index, len(division), layout.stem_keys, layout.head_keys)

    def keep_only(self, model: nn.Module, division: list[int], index: int) -> nn.Module:
        """Drop every part of `model` that module `index` does not own, keeping key names."""
        return self.keep_modules(model, division, {index})

    def keep_modules(self, model: nn.Module, division: list[int], keep: set) -> nn.Module:
        """Drop every part of `model` that no module in `keep` owns, keeping key names. The rotary
        embedding (no weights) stays: every module needs it."""
        layout, layers = self.structure(model), self.layers(model)
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
