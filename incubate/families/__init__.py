"""Model families. An adapter says how a family is built and divided into modules; nothing else
in the code knows which family it trains."""
from __future__ import annotations

from ..errors import UserError
from .causal_lm import CausalLMFamily
from .vit import ViTFamily

FAMILIES = {"vit": ViTFamily(), "causal_lm": CausalLMFamily()}


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model.family '{name}'; valid: {', '.join(FAMILIES)}") from None
