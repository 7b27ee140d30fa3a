"""What a person does with a trained language model: export it for transformers, and sample from it.

export: DIR/config.json + DIR/model.safetensors as transformers' save_pretrained writes them, so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it with no code of ours. With byte
tokens (vocabulary 256) there is no tokenizer file: token i is byte i. With BPE the run's
tokenizer.json and a tokenizer_config.json go beside them, so `transformers.AutoTokenizer
.from_pretrained(DIR)` loads the tokenizer the model was trained with (a PreTrainedTokenizerFast:
no special tokens, nothing added to the text); the exported config then names no BOS/EOS token
(an architecture's defaults, e.g. Llama's ids 1 and 2, are ordinary BPE tokens here that generate()
would stop at).
sample: greedy (temperature 0) or seeded sampling of a continuation of a prompt, in the run's tokens.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .store.checkpoint import read_json, umask_mode, write_json_atomic
from .errors import UserError
from .families import task_name
from .store.rundir import StageDir, check_tokenizer
from .runs import load_model
from .stage_registry import whole_models
from .data.text import RESTORE, TOKENIZER_FILE, read_tokenizer

LM_STAGES = whole_models()     # the stages whose weights are one whole language model


def load_lm(run, stage_name: str):
    """The model of a finished stage of a language-model run, and its manifest."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if stage_name not in LM_STAGES:
        raise UserError(f"--stage must be one of {', '.join(LM_STAGES)}, got {stage_name!r}")
    stage = StageDir(run, stage_name)
    m = stage.require_finished()
    if task_name(m["family"]) != "causal_lm":
        raise UserError(f"{run} trains a '{m['family']}' model, not a language model (model.family causal_lm)")
    return load_model(stage).eval(), m, stage


def stage_tokenizer(run, m: dict):
    """The tokenizer a finished stage was trained with: (None, None) for byte tokens, else
    (a tokenizers.Tokenizer, RUN/tokenizer.json), refused in one line unless it is the very file the
    stage used."""
    pre = m.get("preprocess") or {}
    if pre.get("tokenizer", "byte") == "byte":
        return None, None
    path = Path(run) / pre.get("tokenizer_file", TOKENIZER_FILE)
    if not path.exists():
        raise UserError(f"{path} does not exist: this run's models read its BPE tokens; {RESTORE}")
    tok, digest = read_tokenizer(path, m["num_classes"], RESTORE)
    check_tokenizer(m, digest, path, m["stage"])
    return tok, path


def export_lm(run, stage_name: str, to) -> Path:
    model, m, stage = load_lm(run, stage_name)
    tok, tok_path = stage_tokenizer(run, m)
    dest = Path(to)
    old = dest / "config.json"
    same = old.exists() and (read_json(old, dict, fix="export into an empty or new folder").get("deep_incubate")
                             or {}).get("sha256") == m["sha256"]
    if not same and (old.exists() or (dest / "model.safetensors").exists()):
        raise UserError(f"{dest} already holds another model; export into an empty or new folder")
    scratch = dest.parent / f".{dest.name}.export-{os.getpid()}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()       # one line of output, not transformers' bars
        if tok is not None:         # no token of a BPE vocabulary is a BOS or EOS token
            for cfg in (model.config, model.generation_config):
                cfg.bos_token_id = cfg.eos_token_id = None
        model.save_pretrained(scratch, safe_serialization=True)
        config = read_json(scratch / "config.json")
        config["deep_incubate"] = {"run": str(Path(run).resolve()), "stage": stage_name, "sha256": m["sha256"],
                                   "tokenizer": "byte: token i is byte i of the UTF-8 text"}
        if tok is not None:
            pre = m["preprocess"]
            shutil.copyfile(tok_path, scratch / TOKENIZER_FILE)      # the very bytes the run trained with
            write_json_atomic(scratch / "tokenizer_config.json", {
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": pre["context"],
                "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False})
            config["deep_incubate"]["tokenizer"] = (f"bpe: byte-level BPE of {m['num_classes']} tokens, "
                                                    f"{TOKENIZER_FILE} (SHA-256 {pre['tokenizer_sha256']})")
        for f in sorted(scratch.iterdir()):
            if f.name != "config.json":
                umask_mode(f)           # transformers' safetensors writer leaves the weights 0600
                os.replace(f, dest / f.name)
        write_json_atomic(dest / "config.json", config)      # last: a folder with a config is complete
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror}; choose a writable --to") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if tok is None:
        print(f"exported {stage.path} to {dest}: load it with transformers.AutoModelForCausalLM.from_pretrained"
              f"('{dest}'); tokens are bytes (vocabulary 256), so there is no tokenizer file")
    else:
        print(f"exported {stage.path} to {dest}: load it with transformers.AutoModelForCausalLM.from_pretrained"
              f"('{dest}') and its tokenizer with transformers.AutoTokenizer.from_pretrained('{dest}')")
    return dest


@torch.no_grad()
def sample(run, stage_name: str, prompt: str, tokens: int = 200, temperature: float = 0.0, seed: int = 0) -> str:
    """The prompt's continuation: `tokens` tokens (bytes, or BPE tokens decoded with the run's
    tokenizer), greedy at temperature 0, else seeded sampling."""
    if tokens < 1 or temperature < 0:
        raise UserError(f"--tokens must be >= 1 and --temperature >= 0, got {tokens} and {temperature}")
    model, m, _ = load_lm(run, stage_name)
    tok, _ = stage_tokenizer(run, m)
    context = m["model"]["kwargs"]["max_position_embeddings"]
    if tok is not None:
        ids = tok.encode(prompt or "\n", add_special_tokens=False).ids
    else:
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
    if tok is not None:
        return tok.decode(ids[start:], skip_special_tokens=False)
    return bytes(ids[start:]).decode("utf-8", errors="replace")
