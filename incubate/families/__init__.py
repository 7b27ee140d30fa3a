"""Model families. An adapter (implementing base.Family) says how a family is built, divided into
modules, initialised from the meta model and exported; nothing else in the code knows which family
it trains. The built-in ones are below; `register_family` adds one of the user's own."""
from __future__ import annotations

from ..contract import check_family
from ..errors import UserError
from .base import Family
from .causal_lm import CausalLMFamily
from .convnext import ConvNeXtFamily
from .resnet import ResNetFamily
from .vit import ViTFamily

FAMILIES: dict[str, Family] = {"vit": ViTFamily(), "resnet": ResNetFamily(), "causal_lm": CausalLMFamily()}
FAMILIES["convnext"] = ConvNeXtFamily()


def get_family(name: str):
    """The registered family adapter called `name` (vit, resnet, causal_lm, or one registered)."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown model.family '{name}'; valid: {', '.join(FAMILIES)}") from None


def register_family(family, target, division: list[int], x, meta_division: list[int] | None = None) -> Family:
    """Add an adapter of the user's own (an object implementing incubate.Family) under `family.name`,
    after the family contract passes on the tiny example given: `target` a small model of the family,
    `division` its blocks a module, `x` an input batch (incubate.check_family runs the same checks).
    Registering the same object again is allowed; another family under a registered name is refused."""
    name = getattr(family, "name", None)
    if isinstance(name, str) and name in FAMILIES and FAMILIES[name] is not family:
        raise UserError(f"a family named '{name}' is registered already ({type(FAMILIES[name]).__name__}); "
                        f"give yours another name")
    check_family(family, target, division, x, meta_division)
    FAMILIES[name] = family
    return family
