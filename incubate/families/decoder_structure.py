"""How a transformers decoder-only causal LM is put together, found from the model and proved on a
tiny probe (the causal_lm family's `Structure`).

Found: the token embedding (`get_input_embeddings()`), the head (`get_output_embeddings()`), and
among the children of the base model (`model.base_model`) the one list of `num_hidden_layers`
decoder layers, at most one learned position embedding, one normalised final layer (the only other
child with weights), a rotary embedding and an embedding dropout. Model-level constants that the
forward applies outside the layers come from the config: `embedding_multiplier` and
`embedding_dropout` in the stem, `logits_scaling` (divides), `logit_scale` (multiplies) and
`final_logit_softcapping` in the head. In every layer, the projections that end the residual
branches (zeroed, the layer is the identity: what meta init needs) are found by zeroing.

Proved: a probe of the same class and config with two layers and a small vocabulary runs its own
forward, and stem, layers and head must give bitwise the input of its first layer, the input of its
final norm and its logits. Anything else is refused in one line naming the part that differs; the
same line whether the model came from a recipe or a script (`check_architecture`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError

EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
MASKS = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask"}
# lists that are no per-layer values: a kind a layer (checked on its own), token ids, layer indices
NOT_PER_LAYER = ("layer_types", "token_id", "idxs")
PROBE_VOCAB, PROBE_LAYERS, PROBE_TOKENS = 64, 2, 8
EXAMPLES = "a dense decoder such as llama, qwen3, gemma, phi3, granite or gpt2 (docs/api.md lists them)"
_CACHE: dict = {}
_BY_CONFIG: dict = {}


@dataclass(frozen=True)
class Structure:
    """Where a decoder-only model keeps its parts (module paths from the causal-LM model's root) and
    the constants its forward applies outside them."""
    embed: str                          # token embedding: module 0
    layers: str                         # the nn.ModuleList of decoder layers (the blocks)
    norm: str                           # final norm: module K-1, with the head
    lm_head: str
    residual_outputs: tuple = ()        # in a layer, the projections that end each residual branch
    rotary: str | None = None           # rotary embedding (no weights); None: no rotary positions
    positions: str | None = None        # learned position embedding, added to the tokens' in the stem
    embed_dropout: str | None = None    # a dropout module after the embeddings (GPT-2's `drop`)
    embedding_multiplier: float | None = None
    embedding_dropout: float = 0.0      # a dropout rate the forward applies to the embeddings
    logits_scaling: float | None = None     # logits divided by it (Granite)
    logit_scale: float | None = None        # logits multiplied by it (Cohere)
    softcap: float | None = None            # cap * tanh(logits / cap) (Gemma 2 and 3)

    @property
    def stem_keys(self) -> tuple:
        return tuple(f"{p}." for p in (self.embed, self.positions) if p)

    @property
    def head_keys(self) -> tuple:
        return (f"{self.norm}.", f"{self.lm_head}.")

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = model.get_submodule(self.embed)(x)
        if self.embedding_multiplier is not None:
            h = h * self.embedding_multiplier
        if self.positions:
            h = h + model.get_submodule(self.positions)(positions(h))
        if self.embed_dropout:
            h = model.get_submodule(self.embed_dropout)(h)
        if self.embedding_dropout:
            h = nn.functional.dropout(h, p=self.embedding_dropout, training=model.training)
        return h

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = model.get_submodule(self.lm_head)(model.get_submodule(self.norm)(x))
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def layer_inputs(self, model: nn.Module, h: torch.Tensor) -> dict:
        """What the model's forward hands every decoder layer besides the hidden states, for positions
        0..T-1 without a cache: the causal mask of its (one) attention kind, the position ids and, with
        rotary positions, their cos/sin."""
        from transformers import masking_utils
        position_ids = positions(h)
        make_mask = getattr(masking_utils, MASKS[attention_kinds(model.config)[0]])
        mask = make_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None,
                         position_ids=position_ids)
        inputs = {"attention_mask": mask, "position_ids": position_ids}
        if self.rotary:
            inputs["position_embeddings"] = model.get_submodule(self.rotary)(h, position_ids=position_ids)
        return inputs

    def blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return x
        inputs = self.layer_inputs(model, x)
        for layer in model.get_submodule(self.layers)[start:stop]:
            # transformers recomputes a layer in training mode itself; a hybrid's frozen meta layers run in eval mode
            recompute = getattr(layer, "gradient_checkpointing", False) and not layer.training \
                and torch.is_grad_enabled()
            out = checkpoint(layer, x, use_reentrant=False, **inputs) if recompute else layer(x, **inputs)
            x = out[0] if isinstance(out, tuple) else out     # older transformers return a tuple
        return x


def positions(h: torch.Tensor) -> torch.Tensor:
    return torch.arange(h.shape[1], device=h.device).unsqueeze(0)


def attention_kinds(config) -> list:
    """The attention kind of every layer, as the model's forward picks its mask: `layer_types` where
    the config has them, else one kind for all (sliding where a window is set, as Mistral's)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    window = getattr(config, "sliding_window", None)
    return ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers


def check_config(config) -> None:
    """Refuse a config that is no single dense decoder's, or that sets a layer apart by its place."""
    name = config.model_type
    if getattr(config, "sub_configs", None):
        raise refuse(name, f"it is made of several models (its config holds {', '.join(sorted(config.sub_configs))})")
    if not all(hasattr(config, key) for key in ("vocab_size", "num_hidden_layers")):
        raise refuse(name, "its config has no vocab_size or num_hidden_layers of its own (not one text decoder)")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise refuse(name, "it attends to an encoder's states (cross-attention), which a decoder-only run has none of")
    if any(getattr(config, key, None) for key in EXPERTS):
        raise refuse(name, "it is a mixture of experts (its layouts and meta init know dense MLPs only)")
    n = config.num_hidden_layers
    for key, value in config.to_dict().items():
        if key.endswith(NOT_PER_LAYER):
            continue
        if isinstance(value, list) and len(value) == n and len(set(map(repr, value))) > 1:
            raise refuse(name, f"its config sets {key} differently for its {n} layers ({value}), and a module's "
                               f"layers are copied between depths")


def check_kinds(config) -> None:
    """Refuse layers of different attention kinds (the recipe and the API alike: one line)."""
    kinds = attention_kinds(config)
    if len(set(kinds)) > 1:
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
        raise refuse(config.model_type, f"its {len(kinds)} layers attend differently ({counts}), and a module's "
                                        f"layers are copied between depths (give every layer one kind, e.g. qwen2's "
                                        f"use_sliding_window: false or max_window_layers: 0)")


def refuse(name: str, why: str) -> UserError:
    return UserError(f"the causal_lm family does not build {name}: {why}; use {EXAMPLES}")


def _constants(config) -> dict:
    value = lambda key: getattr(config, key, None)      # noqa: E731
    return {"embedding_multiplier": value("embedding_multiplier"),
            "embedding_dropout": value("embedding_dropout") or 0.0,
            "logits_scaling": value("logits_scaling"), "logit_scale": value("logit_scale"),
            "softcap": value("final_logit_softcapping")}


def _children(model: nn.Module, name: str) -> dict:
    """The parts of the base model besides its layer list, sorted by what they are."""
    names = {id(m): n for n, m in model.named_modules()}
    embed, head, base = model.get_input_embeddings(), model.get_output_embeddings(), model.base_model
    if embed is None or head is None or base is model:
        raise refuse(name, "it has no token embedding, no output head or no base model that transformers names")
    lists = [n for n, c in base.named_children() if isinstance(c, nn.ModuleList)
             and len(c) == model.config.num_hidden_layers]
    if len(lists) != 1:
        raise refuse(name, f"its base model has {len(lists)} lists of num_hidden_layers decoder layers, not one")
    prefix = names[id(base)]
    path = lambda n: f"{prefix}.{n}" if prefix else n      # noqa: E731
    parts = {"embed": names[id(embed)], "lm_head": names[id(head)], "layers": path(lists[0]), "norm": []}
    for n, child in base.named_children():
        if child is embed or n == lists[0]:
            continue
        if isinstance(child, nn.Embedding) and "positions" not in parts:
            parts["positions"] = path(n)
        elif isinstance(child, nn.Dropout):
            parts["embed_dropout"] = path(n)
        elif "rotary" in type(child).__name__.lower() and not list(child.parameters()):
            parts["rotary"] = path(n)
        elif list(child.parameters()) or "norm" in type(child).__name__.lower():   # OLMo's norm has no weights
            parts["norm"].append(path(n))
    if len(parts["norm"]) != 1:
        raise refuse(name, f"besides its embeddings and decoder layers its base model holds {len(parts['norm'])} "
                           f"parts with weights or norms ({', '.join(parts['norm']) or 'none'}), not one final norm")
    parts["norm"] = parts["norm"][0]
    return parts


def _residual_outputs(layer: nn.Module, h: torch.Tensor, inputs: dict, hidden: int) -> tuple:
    """The fewest hidden-sized projections of `layer` whose zeroing makes it the identity."""
    def run():
        out = layer(h, **inputs)
        return out[0] if isinstance(out, tuple) else out

    kept = {n: m for n, m in layer.named_modules()
            if (getattr(m, "out_features", None) or getattr(m, "nf", None)) == hidden and hasattr(m, "weight")}
    saved = {n: [p.detach().clone() for p in m.parameters(recurse=False)] for n, m in kept.items()}
    zero = lambda n: [p.data.zero_() for p in kept[n].parameters(recurse=False)]        # noqa: E731
    back = lambda n: [p.data.copy_(s) for p, s in zip(kept[n].parameters(recurse=False), saved[n])]  # noqa: E731
    with torch.no_grad():
        for n in kept:
            zero(n)
        if not torch.equal(run(), h):
            return ()
        for n in list(kept):
            back(n)
            if torch.equal(run(), h):
                del kept[n]
            else:
                zero(n)
    return tuple(kept)


def _structure(model: nn.Module, name: str) -> Structure:
    parts = _children(model, name)
    layers = model.get_submodule(parts["layers"])
    shapes = {tuple((k, tuple(v.shape)) for k, v in layer.state_dict().items()) for layer in layers}
    if len({type(layer) for layer in layers}) > 1 or len(shapes) > 1:
        raise refuse(name, "its decoder layers differ from each other (a module's layers are copied between depths)")
    found = Structure(**parts, **_constants(model.config))
    hidden = model.get_submodule(parts["embed"]).weight.shape[-1]
    h = torch.randn(1, PROBE_TOKENS, hidden, dtype=model.get_submodule(parts["embed"]).weight.dtype)
    outputs = _residual_outputs(layers[0], h, found.layer_inputs(model, h), hidden)
    if not outputs:
        raise refuse(name, "its decoder layer is not the identity with the projections that end its residual "
                           "branches zeroed, which meta init needs")
    return Structure(**parts, residual_outputs=outputs, **_constants(model.config))


def _probe_config(config):
    probe = copy.deepcopy(config)
    probe.num_hidden_layers = PROBE_LAYERS
    if getattr(probe, "layer_types", None):
        probe.layer_types = list(probe.layer_types[:1]) * PROBE_LAYERS
    probe.vocab_size = min(probe.vocab_size, PROBE_VOCAB)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(probe, key, None)
        if isinstance(value, int) and not 0 <= value < probe.vocab_size:
            setattr(probe, key, None)
    probe.use_cache = False
    return probe


def _prove(model: nn.Module, found: Structure, name: str) -> None:
    """The probe's own forward against stem, layers and head, bitwise, each at its seam."""
    seen = {}
    layers = model.get_submodule(found.layers)

    def take(key):
        def hook(module, args, kwargs):
            seen.setdefault(key, args[0] if args else kwargs["hidden_states"])
        return hook

    hooks = [layers[0].register_forward_pre_hook(take("layers"), with_kwargs=True),
             model.get_submodule(found.norm).register_forward_pre_hook(take("norm"), with_kwargs=True)]
    x = torch.arange(PROBE_TOKENS).remainder(model.config.vocab_size).unsqueeze(0).repeat(2, 1)
    x[1] = x[1].flip(0)
    with torch.no_grad():
        try:
            logits = model(x).logits
        finally:
            for hook in hooks:
                hook.remove()
        h = found.stem(model, x)
        if not torch.equal(h, seen.get("layers", h + math.nan)):
            raise refuse(name, f"its forward does more between the embedding ({found.embed}) and the first decoder "
                               f"layer than the stem does (embedding, positions, multiplier, dropout)")
        h = found.blocks(model, h, 0, len(layers))
        if not torch.equal(h, seen.get("norm", h + math.nan)):
            raise refuse(name, f"its decoder layers ({found.layers}) run with the causal mask, position ids and "
                               f"rotary embedding do not give what its forward gives them")
        if not torch.equal(found.head(model, h), logits):
            raise refuse(name, f"the final norm ({found.norm}) and head ({found.lm_head}) with its logit constants "
                               f"do not give its logits")


def check_architecture(cls: type, config) -> Structure:
    """The structure of causal-LM class `cls` with `config` (any depth), proved on a probe of two
    layers; refused in one line otherwise. Cached a config object (every forward asks) and a class
    and probe config (what is proved)."""
    seen = _BY_CONFIG.get(id(config))
    if seen is not None and seen[0] is config and seen[1] is cls:
        return seen[2]
    name = config.model_type
    check_config(config)
    try:
        probe = _probe_config(config)
    except (AttributeError, TypeError, ValueError, NotImplementedError):      # read-only per-layer properties
        raise refuse(name, "its config cannot be cut to a probe of two layers (its layers are set apart)") from None
    try:
        key = (cls, probe.to_json_string(use_diff=False))
    except (TypeError, ValueError):
        key = (cls, repr(probe))
    if key not in _CACHE:
        _CACHE[key] = _find(cls, config, probe, name)
    _BY_CONFIG[id(config)] = (config, cls, _CACHE[key])      # holds the config, so its id is not reused
    return _CACHE[key]


def _find(cls: type, config, probe, name: str) -> Structure:
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise refuse(name, "it attends to an encoder's states (cross-attention), which a decoder-only run has none of")
    if getattr(config, "sub_configs", None):
        raise refuse(name, f"it is made of several models (its config holds {', '.join(sorted(config.sub_configs))})")
    if any(getattr(config, key, None) for key in EXPERTS):
        raise refuse(name, "it is a mixture of experts (its layouts and meta init know dense MLPs only)")
    check_kinds(config)
    # the probe leaves the caller's random stream as it was, and runs on the CPU whatever the default device
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(0)
        try:
            model = cls(probe).eval()
        except Exception as e:       # noqa: BLE001  a config transformers cannot build is refused, not raised
            raise refuse(name, f"transformers cannot build it ({type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0][:200]})") from None
        try:
            found = _structure(model, name)
            _prove(model, found, name)
        except UserError:
            raise
        except Exception as e:      # noqa: BLE001  a layer that wants more than the family gives it
            raise refuse(name, f"its layers or head do not run as the family runs them ({type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return found
