"""deep-incubate: train large models by Deep Model Assembling / Deep Incubation.

The method as a model transformation, usable from any training loop (docs/api.md):

    meta = incubate.meta_model(target, [2, 2, 2, 2], "causal_lm")   # same family and width, one block a module
    net = incubate.hybrid(meta, target, 1)                            # only target module 1 trains
    incubate.assemble(whole_target, [net0, net1, net2, net3])         # the trained modules, stitched

The CLI (`incubate`) is one client of these functions. Names load on first use, so `import incubate`
stays cheap for the CLI.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_WHERE = {
    "divide": "api", "meta_model": "api", "hybrid": "api", "assemble": "api", "Hybrid": "modular",
    "load_stage": "runs", "target_model": "runs", "save_module": "runs", "run_data": "run_data", "track": "work",
    "register_family": "families", "get_family": "families", "check_family": "families", "Family": "families",
    "UserError": "errors",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'incubate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
