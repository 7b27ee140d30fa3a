"""A tiny language model through every stage of `incubate run`, export to transformers, sampling,
evaluation and the report."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


from ..conftest import (TINY_LM, in_process, make_corpus, one_error_line, run_main, text_cfg,
                        write_recipe)
from ..unit.test_family_contract import LM_KWARGS


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    recipe = write_recipe(tmp / "lm.yaml", TINY_LM, data__source=f"text:{make_corpus(tmp / 'corpus')}",
                          meta__tensorboard=True)
    run = tmp / "run"
    return recipe, run, in_process("run", "--recipe", recipe, "--out", run, check=True)


def test_lm_run_writes_every_stage_with_bits_per_byte(lm_run):
    recipe, run, proc = lm_run
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"meta", "module_0", "module_1", "module_2", "module_3", "assembled", "finetune", "e2e"}
    for key, entry in summary.items():
        assert 0 < entry["bpb"] < 8.5 and 0 <= entry["acc"] <= 100, key     # 8 bits a byte: chance
        if key != "assembled":
            assert entry["flops"] > 0
    rows = [json.loads(l) for l in (run / "meta/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and {"test_bpb", "test_acc", "test_loss"} <= set(rows[0])
    assert rows[-1]["test_bpb"] < rows[0]["test_bpb"]                       # it learns
    assert "| **e2e** |" in proc.stdout and "val bits/byte" in proc.stdout
    assert (run / "report.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard/meta")).Reload()
    assert [e.value for e in events.Scalars("eval/bpb")] == pytest.approx([r["test_bpb"] for r in rows], rel=1e-6)
    m = json.loads((run / "meta/manifest.json").read_text())
    assert m["preprocess"]["tokenizer"] == "byte" and m["model"]["kwargs"]["tie_word_embeddings"] is False
    assert "tokenizer_sha256" not in m["preprocess"] and not (run / "tokenizer.json").exists()
    keys = set(load_file(run / "modules/0/model.safetensors"))
    assert keys == {k for k in load_file(run / "assembled/model.safetensors") if not k.startswith(
        ("model.layers.1.", "model.layers.2.", "model.layers.3.", "model.norm.", "lm_head."))}


def _fresh_python(code: str, cwd, *args):
    """`code` run by a new Python (none of our modules imported) with `args` as sys.argv[1:]."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_sample_evaluate_and_refusals(lm_run, capsys):
    recipe, run, _ = lm_run
    greedy = [run_main(capsys, "sample", run, "--prompt", "def ", "--tokens", "20") for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0][0] == 0 and greedy[0][1].startswith("def ")
    assert len(greedy[0][1].rstrip("\n")) > 4
    seeded = [run_main(capsys, "sample", run, "--prompt", "import", "--tokens", "20", "--temperature", "1.0",
                       "--seed", "7") for _ in range(2)]
    assert seeded[0] == seeded[1]
    rc, out, _ = run_main(capsys, "evaluate", "--recipe", recipe, "--checkpoint", run / "modules/2")
    bpb = json.loads((run / "modules/2/manifest.json").read_text())["metrics"]["bpb"]
    assert rc == 0 and f"val bits/byte {bpb:.4f}" in out
    rc, _, err = run_main(capsys, "sample", run, "--stage", "finetune", "--prompt", "x", "--tokens", "0")
    assert rc == 2 and "--tokens must be >= 1" in err


@pytest.mark.parametrize("name", sorted(set(LM_KWARGS) - {"llama"}))       # llama: lm_run above
def test_every_architecture_runs_every_stage_and_exports_to_transformers(name, tmp_path, capsys):
    """A tiny run of each transformers model type the causal_lm family builds (2 modules, one extra
    layer that meta init starts as the identity, 1 epoch a stage), and its export loaded by
    AutoModelForCausalLM with the very weights and logits of the run's fine-tuned model."""
    from transformers import AutoModelForCausalLM
    from incubate.lm_tools import load_lm
    corpus = make_corpus(tmp_path / "corpus", files=2, chars=1500)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"text:{corpus}", model__name=name,
                          model__kwargs=LM_KWARGS[name], model__division=[2, 1], meta__epochs=1)
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, "run", "--recipe", recipe, "--out", run)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"meta", "module_0", "module_1", "assembled", "finetune", "e2e"}
    assert all(0 < entry["bpb"] < 8.5 for entry in summary.values())
    assert run_main(capsys, "export", run, "--stage", "finetune", "--to", tmp_path / "hf")[0] == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, m, _ = load_lm(run, "finetune")
    assert plain.config.model_type == m["model"]["name"] == name and type(plain) is type(ours)
    assert plain.state_dict().keys() == load_file(run / "finetune/model.safetensors").keys()
    x = torch.tensor([list(b"def dumps(obj):")])
    assert torch.equal(plain(x).logits, ours(x).logits)


# kill -9 and resume: tests/gpu/test_cuda.py kills a real stage process (on the CPU in the GPU run's smoke
# test; the checkpoint files are the family's own only in their tensors); test_lm_tokens.py stops an LM
# mid-budget and resumes it to the uninterrupted weights and evaluation rows

# launchers: an LM job is a CLI process like any other; test_launchers.py runs module jobs at once and
# test_lm_tokens.py an LM's growth job, each ending at the in-process weights
# torchrun: test_lm_tokens.py runs every stage of an LM (E2E and growth too) in two processes


# ---------------------------------------------------------------- byte-level BPE (data.tokenizer: bpe)

@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    corpus = make_corpus(tmp / "corpus")
    recipe = write_recipe(tmp / "bpe.yaml", TINY_LM, data__source=f"text:{corpus}", data__tokenizer="bpe",
                          data__vocab_size=300)
    run = tmp / "run"
    return recipe, run, in_process("run", "--recipe", recipe, "--out", run, check=True).stdout


def test_bpe_run_trains_one_tokenizer_that_every_stage_reads(bpe_run, capsys):
    import hashlib
    recipe, run, stdout = bpe_run
    assert stdout.count("saved as") == 1 and f"saved as {run / 'tokenizer.json'}" in stdout   # trained once
    digest = hashlib.sha256((run / "tokenizer.json").read_bytes()).hexdigest()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"meta", "module_0", "module_1", "module_2", "module_3", "assembled", "finetune", "e2e"}
    pre = []
    for stage in ("meta", "modules/0", "modules/1", "modules/2", "modules/3", "assembled", "finetune", "e2e"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["finished"] and m["num_classes"] == 300 and m["model"]["kwargs"]["vocab_size"] == 300, stage
        assert 0 < m["metrics"]["bpb"] < 8, stage
        pre.append(m["preprocess"])
    assert all(p == pre[0] for p in pre) and pre[0]["tokenizer"] == "bpe" and pre[0]["tokenizer_sha256"] == digest
    assert load_file(run / "finetune/model.safetensors")["lm_head.weight"].shape == (300, 16)
    rows = [json.loads(l) for l in (run / "meta/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_bpb"] < rows[0]["test_bpb"]                        # it learns
    mtime = (run / "tokenizer.json").stat().st_mtime_ns
    rc, out, _ = run_main(capsys, "meta", "--recipe", recipe, "--out", run)    # a later command loads it
    assert rc == 0 and "already finished" in out and "saved as" not in out
    assert (run / "tokenizer.json").stat().st_mtime_ns == mtime


def test_exports_load_in_transformers_with_no_code_of_ours(lm_run, bpe_run, tmp_path, capsys):
    """Both runs' fine-tuned models, exported, in one new Python: the byte model alone, the BPE one with
    its tokenizer (the same ids as our tokenizer.json, and no end-of-text token it never saw)."""
    for name, (_, run, _) in (("bytes", lm_run), ("bpe", bpe_run)):
        rc, out, _ = run_main(capsys, "export", run, "--stage", "finetune", "--to", tmp_path / name)
        assert rc == 0, name
    bpe = bpe_run[1]
    assert "transformers.AutoTokenizer.from_pretrained" in out
    assert (tmp_path / "bpe/tokenizer.json").read_bytes() == (bpe / "tokenizer.json").read_bytes()
    code = ("import sys, torch, transformers, tokenizers; from safetensors.torch import load_file\n"
            "def load(folder, weights):\n"
            "    m = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()\n"
            "    sd = load_file(weights); own = m.state_dict()\n"
            "    assert all(torch.equal(own[k], v) for k, v in sd.items()) and own.keys() == sd.keys()\n"
            "    return m\n"
            "m = load(sys.argv[1], sys.argv[2])\n"
            "print(type(m).__name__, tuple(m(torch.tensor([list(b'def ')])).logits.shape))\n"
            "tok = transformers.AutoTokenizer.from_pretrained(sys.argv[3])\n"
            "m = load(sys.argv[3], sys.argv[4])\n"
            "s = 'def dumps(obj):\\n    return \"h\\u00e9llo \\u2211 \\U0001f600\"  # caf\\u00e9'\n"
            "ids = tok(s)['input_ids']\n"
            "assert tok.decode(ids) == s, tok.decode(ids)\n"
            "assert ids == tokenizers.Tokenizer.from_file(sys.argv[5]).encode(s).ids\n"
            "assert m.config.eos_token_id is None and m.generation_config.eos_token_id is None\n"
            "print(type(m).__name__, len(tok), tuple(m(torch.tensor([ids[:8]])).logits.shape))")
    proc = _fresh_python(code, tmp_path, tmp_path / "bytes", lm_run[1] / "finetune/model.safetensors",
                         tmp_path / "bpe", bpe / "finetune/model.safetensors", bpe / "tokenizer.json")
    assert proc.stdout.splitlines() == ["LlamaForCausalLM (1, 4, 256)", "LlamaForCausalLM 300 (1, 8, 300)"]


def test_bpe_sample_evaluate_and_a_replaced_tokenizer(bpe_run, tmp_path, capsys):
    import shutil
    from incubate.data.text import load_text
    recipe, run, _ = bpe_run
    greedy = [run_main(capsys, "sample", run, "--prompt", "def ", "--tokens", "12") for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0][0] == 0 and greedy[0][1].startswith("def ")
    assert len(greedy[0][1].rstrip("\n")) > 4
    rc, out, _ = run_main(capsys, "evaluate", "--recipe", recipe, "--checkpoint", run / "modules/2")
    bpb = json.loads((run / "modules/2/manifest.json").read_text())["metrics"]["bpb"]
    assert rc == 0 and f"val bits/byte {bpb:.4f}" in out
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    other = make_corpus(tmp_path / "other", files=2, chars=3000)
    load_text(text_cfg(tokenizer="bpe", vocab_size=300), str(other), tmp_path / "other_run")
    shutil.copyfile(tmp_path / "other_run/tokenizer.json", copy / "tokenizer.json")    # 300 tokens, other merges
    rc, _, err = run_main(capsys, "sample", copy, "--prompt", "def ")
    assert rc == 2 and "is not the tokenizer finetune was trained with" in one_error_line(err)
    rc, _, err = run_main(capsys, "finetune", "--recipe", recipe, "--out", copy)
    line = one_error_line(err)
    assert rc == 2 and f"{copy / 'tokenizer.json'} (SHA-256 " in line and f"not the tokenizer {copy / 'meta'} was" in line
    rc, _, err = run_main(capsys, "evaluate", "--recipe", recipe, "--checkpoint", copy / "modules/2")
    assert rc == 2 and "is not the tokenizer" in one_error_line(err)
    (copy / "tokenizer.json").unlink()
    for args in (("evaluate", "--recipe", recipe, "--checkpoint", copy / "finetune"), ("sample", copy, "--prompt", "x")):
        rc, _, err = run_main(capsys, *args)
        assert rc == 2 and f"{copy / 'tokenizer.json'} does not exist" in one_error_line(err)
    assert not (copy / "tokenizer.json").exists()     # neither trains one
    # the next stage trains it again: the same file, so the finished stages stand
    rc, out, _ = run_main(capsys, "finetune", "--recipe", recipe, "--out", copy)
    assert rc == 0 and "saved as" in out and "already finished" in out
    assert (copy / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
