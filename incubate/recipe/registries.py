"""Names that other libraries' registries define, asked of those registries themselves: timm's
optimizers (its own listing) and schedulers (the names its create_scheduler_v2 accepts: timm has no
listing of them). Used by the recipe's schema (config.py) when a recipe is read."""
from __future__ import annotations

import functools
import warnings

# what create_scheduler_v2 dispatches on (timm/scheduler/scheduler_factory.py); each is asked of it below
SCHEDULER_CANDIDATES = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "wsd", "rsqrt")


@functools.lru_cache(maxsize=None)
def optimizers() -> list:
    from timm.optim import list_optimizers
    return list(list_optimizers())


def is_optimizer(name: str) -> bool:
    """timm's create_optimizer_v2 takes `name`, or `lookahead_<name>`, case aside."""
    parts = name.lower().split("_")
    base = parts[-1] if len(parts) > 1 and parts[0] == "lookahead" else name.lower()
    return base in optimizers()


@functools.lru_cache(maxsize=None)
def is_scheduler(name: str) -> bool:
    """Whether timm's create_scheduler_v2 makes a schedule of `name` (tried on a one-weight optimizer);
    'none' makes no schedule, which our loop steps every update, so it is not one."""
    import torch
    from timm.scheduler import create_scheduler_v2
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    try:
        with warnings.catch_warnings():      # timm's deprecation notes (plateau) are not the recipe's business
            warnings.simplefilter("ignore")
            scheduler, _ = create_scheduler_v2(opt, sched=name, num_epochs=4, warmup_epochs=1, decay_milestones=[1, 2])
    except (ValueError, TypeError, KeyError, AssertionError):
        return False
    return scheduler is not None


def schedulers() -> list:
    return [name for name in SCHEDULER_CANDIDATES if is_scheduler(name)]
