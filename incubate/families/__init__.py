"""Model families. An adapter (implementing base.Family) says how a family is built, divided into
modules, initialised from the meta model and exported; nothing else in the code knows which family
it trains. The built-in ones are below; `register_family` adds one of the user's own."""
from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from typing import NamedTuple

from ..errors import UserError


class Builtin(NamedTuple):
    """Where a built-in adapter lives, imported on its first lookup: a run needs one family, and timm
    or transformers cost seconds to import (`incubate status` and `report` need neither)."""
    module: str
    cls: str
    task: str


class Registry(MutableMapping):
    """name -> adapter; built-in adapters are imported when first looked up."""

    def __init__(self, entries: dict):
        self._entries = dict(entries)

    def __getitem__(self, name):
        entry = self._entries[name]
        if isinstance(entry, Builtin):
            entry = getattr(importlib.import_module(f"{__name__}.{entry.module}"), entry.cls)()
            self._entries[name] = entry
        return entry

    def __setitem__(self, name, family):
        self._entries[name] = family

    def __delitem__(self, name):
        del self._entries[name]

    def __contains__(self, name):       # Mapping's would look the adapter up, importing it
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def task_name(self, name) -> str:
        """The task family `name` trains for, without importing a built-in adapter."""
        entry = self._entries[name]
        return entry.task if isinstance(entry, Builtin) else adapter_task(entry)


FAMILIES: MutableMapping = Registry({
    "vit": Builtin("vit", "ViTFamily", "classification"),
    "resnet": Builtin("resnet", "ResNetFamily", "classification"),
    "causal_lm": Builtin("causal_lm", "CausalLMFamily", "causal_lm"),
    "convnext": Builtin("convnext", "ConvNeXtFamily", "classification"),
})


def get_family(name: str):
    """The registered family adapter called `name` (vit, resnet, causal_lm, or one registered)."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown model.family '{name}'; valid: {', '.join(FAMILIES)}") from None


def task_name(family: str) -> str:
    """The task the family called `family` trains for (ViT: classification), its adapter not imported."""
    if isinstance(FAMILIES, Registry) and family in FAMILIES:
        return FAMILIES.task_name(family)
    return adapter_task(get_family(family))


def adapter_task(adapter) -> str:
    """The task an adapter names (`task`); one that names none classifies."""
    return getattr(adapter, "task", "classification")


def register_family(family, target, division: list[int], x, meta_division: list[int] | None = None) -> Family:
    """Add an adapter of the user's own (an object implementing incubate.Family) under `family.name`,
    after the family contract passes on the tiny example given: `target` a small model of the family,
    `division` its blocks a module, `x` an input batch (incubate.check_family runs the same checks).
    Registering the same object again is allowed; another family under a registered name is refused."""
    from ..contract import check_family
    name = getattr(family, "name", None)
    if isinstance(name, str) and name in FAMILIES and FAMILIES[name] is not family:
        raise UserError(f"a family named '{name}' is registered already ({type(FAMILIES[name]).__name__}); "
                        f"give yours another name")
    check_family(family, target, division, x, meta_division)
    FAMILIES[name] = family
    return family


def check_family(family, target, division: list[int], x, meta_division: list[int] | None = None) -> None:
    """incubate.check_family: the family contract (contract.check_family) on an adapter or on the
    registered family of that name."""
    from ..contract import check_family as run_contract
    run_contract(get_family(family) if isinstance(family, str) else family, target, division, x, meta_division)


def __getattr__(name: str):
    if name == "Family":          # the protocol imports torch
        from .base import Family
        return Family
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
