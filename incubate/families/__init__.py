"""Model families. An adapter says how a family is built and divided into modules; nothing else
in the code knows which family it trains."""
from __future__ import annotations

from ..errors import UserError
from .vit import ViTFamily

FAMILIES = {"vit": ViTFamily()}


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model.family '{name}'; valid: {', '.join(FAMILIES)}") from None
