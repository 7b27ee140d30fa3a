"""Which transformers model types the causal_lm family takes: every type with a causal-LM class in the
installed transformers, read as a recipe would read it (tiny model.kwargs, division [2, 1]), and the
one line that refuses it. Prints a TSV: model type, seconds, "ok" or the refusal.

    python benchmarks/decoder_sweep.py [MODEL_TYPE ...]      # all types: about a minute of CPU
"""
from __future__ import annotations

import sys
import time
import warnings
from types import SimpleNamespace

TINY = (dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, head_dim=8),
        dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32),
        dict(hidden_size=16, num_attention_heads=2, intermediate_size=32))


def verdict(family, name: str) -> str:
    """'ok', or the refusal of the first tiny kwargs transformers accepts for `name`."""
    from incubate.errors import UserError
    line = ""
    for kwargs in TINY:         # the next set where transformers refuses an argument (head_dim, kv heads)
        try:
            family.validate(SimpleNamespace(name=name, kwargs=kwargs, division=[2, 1], meta_division=None))
            return "ok"
        except UserError as e:
            line = str(e)
            if "cannot build a" not in line:
                return line
    return line


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging
    from incubate.families import get_family
    logging.set_verbosity_error()
    family = get_family("causal_lm")
    for name in names or sorted({c.model_type for c in MODEL_FOR_CAUSAL_LM_MAPPING.keys()}):
        start = time.perf_counter()
        line = verdict(family, name)
        print(f"{name}\t{time.perf_counter() - start:.1f}s\t{line}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
