"""Model families. An adapter (implementing base.Family) says how a family is built, divided into
modules, initialised from the meta model and exported; nothing else in the code knows which family
it trains."""
from __future__ import annotations

from ..errors import UserError
from .base import Family
from .causal_lm import CausalLMFamily
from .convnext import ConvNeXtFamily
from .resnet import ResNetFamily
from .vit import ViTFamily

FAMILIES: dict[str, Family] = {"vit": ViTFamily(), "resnet": ResNetFamily(), "causal_lm": CausalLMFamily()}
FAMILIES["convnext"] = ConvNeXtFamily()


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model.family '{name}'; valid: {', '.join(FAMILIES)}") from None
