"""What a person does with a trained language model: export it for transformers, and sample from it.

export: DIR/config.json + DIR/model.safetensors as transformers' save_pretrained writes them, so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it with no code of ours. Tokens
are bytes (vocabulary 256), so there is no tokenizer file: token i is byte i.
sample: greedy (temperature 0) or seeded sampling of a continuation of a prompt.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .checkpoint import read_json, write_json_atomic
from .errors import UserError
from .families import get_family
from .modular import load_strict
from .stages.common import StageDir

LM_STAGES = ("meta", "assembled", "finetune", "e2e")


def load_lm(run, stage_name: str):
    """The model of a finished stage of a language-model run, and its manifest."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if stage_name not in LM_STAGES:
        raise UserError(f"--stage must be one of {', '.join(LM_STAGES)}, got {stage_name!r}")
    stage = StageDir(run, stage_name)
    m = stage.require_finished(f"run `incubate {'assemble' if stage_name == 'assembled' else stage_name}` first")
    if m["family"] != "causal_lm":
        raise UserError(f"{run} trains a '{m['family']}' model, not a language model (model.family causal_lm)")
    model = get_family("causal_lm").build(m["model"]["name"], m["model"]["kwargs"])
    load_strict(model, stage.load(), stage.weights, f"its manifest's model ({m['model']['name']})")
    return model.eval(), m, stage


def export_lm(run, stage_name: str, to) -> Path:
    model, m, stage = load_lm(run, stage_name)
    dest = Path(to)
    old = dest / "config.json"
    same = old.exists() and (read_json(old).get("deep_incubate") or {}).get("sha256") == m["sha256"]
    if not same and (old.exists() or (dest / "model.safetensors").exists()):
        raise UserError(f"{dest} already holds another model; export into an empty or new folder")
    scratch = dest.parent / f".{dest.name}.export-{os.getpid()}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()       # one line of output, not transformers' bars
        model.save_pretrained(scratch, safe_serialization=True)
        config = read_json(scratch / "config.json")
        config["deep_incubate"] = {"run": str(Path(run).resolve()), "stage": stage_name, "sha256": m["sha256"],
                                   "tokenizer": "byte: token i is byte i of the UTF-8 text"}
        for f in sorted(scratch.iterdir()):
            if f.name != "config.json":
                os.replace(f, dest / f.name)
        write_json_atomic(dest / "config.json", config)      # last: a folder with a config is complete
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror}; choose a writable --to") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"exported {stage.path} to {dest}: load it with transformers.AutoModelForCausalLM.from_pretrained"
          f"('{dest}'); tokens are bytes (vocabulary 256), so there is no tokenizer file")
    return dest


@torch.no_grad()
def sample(run, stage_name: str, prompt: str, tokens: int = 200, temperature: float = 0.0, seed: int = 0) -> str:
    """The prompt's continuation: `tokens` bytes, greedy at temperature 0, else seeded sampling."""
    if tokens < 1 or temperature < 0:
        raise UserError(f"--tokens must be >= 1 and --temperature >= 0, got {tokens} and {temperature}")
    model, m, _ = load_lm(run, stage_name)
    context = m["model"]["kwargs"]["max_position_embeddings"]
    ids = list(prompt.encode("utf-8")) or [ord("\n")]
    g = torch.Generator().manual_seed(seed)
    start = len(ids)
    for _ in range(tokens):
        logits = model(torch.tensor([ids[-context:]])).logits[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
        ids.append(nxt)
    return bytes(ids[start:]).decode("utf-8", errors="replace")
