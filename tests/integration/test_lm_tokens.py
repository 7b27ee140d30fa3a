"""Pre-training in tokens: budgets in tokens, evaluation during training, the token cache and G_stack
growth, through `incubate run`, the local launcher and torchrun; kill and resume mid-budget; bad values."""
import copy
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from incubate.store import resume
from incubate.cli import as_in_a_cli_process, main
from ..conftest import (PROCESS_TIMEOUT_S, ROOT, TINY_LM, in_process, make_corpus, one_error_line, run_main,
                        text_cfg)

PER_UPDATE = 16 * 16          # TINY_LM: batch 16 x context 16 tokens an update, one process
BUDGETS = {"meta": 30, "incubate": 8, "finetune": 8, "e2e": 60, "grow": 20}     # updates


def token_recipe(tmp, updates=BUDGETS, **train) -> os.PathLike:
    raw = copy.deepcopy(TINY_LM)
    raw["data"].update(source=f"text:{make_corpus(tmp / 'corpus', files=4, chars=4000)}", eval_tokens=320)
    raw["train"].update(eval_every=7, **train)
    raw["train"].pop("epochs")
    for stage, n in updates.items():
        raw[stage] = {"tokens": n * PER_UPDATE, **({"module_init": "meta"} if stage == "incubate" else {})}
    path = tmp / "tokens.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _manifest(run, stage):
    return json.loads((run / stage / "manifest.json").read_text())


def _rows(run, stage, kind="eval"):
    rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if (r.get("kind") == "eval") == (kind == "eval")]


def _same_weights(a, b, stage):
    x, y = load_file(a / stage / "model.safetensors"), load_file(b / stage / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokens")
    recipe = token_recipe(tmp)
    run = tmp / "run"
    return recipe, run, in_process("run", "--recipe", recipe, "--out", run, "--grow", check=True).stdout


def test_every_stage_trains_its_tokens_and_evaluates_every_n_updates(token_run):
    _, run, out = token_run
    for stage, updates in (("meta", 30), ("modules/0", 8), ("finetune", 8), ("e2e", 60), ("grow", 20)):
        m = _manifest(run, stage)
        assert (m["updates"], m["tokens"]) == (updates, updates * PER_UPDATE), stage
        assert m["flops"] == m["flops_per_step"] * m["steps"] and m["steps"] == updates, stage
        evals = _rows(run, stage)
        want = [u for u in range(7, updates + 1, 7)] + ([updates] if updates % 7 else [])
        assert [r["update"] for r in evals] == want, stage     # every 7 updates, and the last one
        assert all(r["tokens"] == r["update"] * PER_UPDATE and r["flops"] == r["update"] * m["flops_per_step"]
                   for r in evals), stage
        assert evals[-1]["test_bpb"] == pytest.approx(m["metrics"]["bpb"]), stage   # one slice for both
    e2e = _manifest(run, "e2e")
    assert e2e["epochs"] == 2 and len(_rows(run, "e2e", "epoch")) == 2    # 60 updates: an epoch and a part
    assert _manifest(run, "meta")["epochs"] == 1                          # 30 updates: less than one pass
    assert _manifest(run, "meta")["preprocess"]["test_tokens"] == 20 * 17   # the slice: 320 tokens, 20 windows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["grow"]["flops"] == _manifest(run, "grow")["flops"]
    assert "[meta] update 7/30, 1,792 tokens: held-out val bits/byte" in out
    assert "| **grow (G_stack)** (meta + grow) |" in out
    from incubate.status import status
    rows = {r["stage"]: r["state"] for r in status(run, io.StringIO())}
    assert rows["grow"] == "finished" and rows["e2e"] == "finished"     # growth listed once it has begun


def test_growth_starts_from_the_meta_layers_repeated_in_order(token_run, tmp_path):
    """The grow stage's first update leaves from G_stack's operator: checked by building it again."""
    from incubate.families import get_family
    _, run, _ = token_run
    fam = get_family("causal_lm")
    meta_m, grow_m = _manifest(run, "meta"), _manifest(run, "grow")
    assert grow_m["meta_fingerprint"] == meta_m["sha256"]
    meta = fam.build(meta_m["model"]["name"], meta_m["model"]["kwargs"])
    meta.load_state_dict(load_file(run / "meta/model.safetensors"))
    target = fam.build(grow_m["model"]["name"], grow_m["model"]["kwargs"])
    fam.grow_from_meta(target, meta)
    for j, layer in enumerate(target.model.layers):
        src = meta.model.layers[j % 4].state_dict()
        assert all(torch.equal(v, src[k]) for k, v in layer.state_dict().items())
    assert torch.equal(target.lm_head.weight, meta.lm_head.weight)
    assert torch.equal(target.model.embed_tokens.weight, meta.model.embed_tokens.weight)


def test_mid_budget_kill_and_resume_ends_at_the_uninterrupted_weights(token_run, tmp_path, capsys, monkeypatch):
    recipe, reference, _ = token_run
    run = tmp_path / "run"
    sets = ["--set", "e2e.checkpoint_every=4"]

    class Stop(Exception):
        pass
    real, saves = resume.save_training_state, []

    def stop_after_the_third_mid_epoch_save(path, *args):
        real(path, *args)
        if args[-1].get("step") is not None:
            saves.append(args[-1]["num_updates"])
            if len(saves) == 3:
                raise Stop
    monkeypatch.setattr(resume, "save_training_state", stop_after_the_third_mid_epoch_save)
    with pytest.raises(Stop), as_in_a_cli_process():
        main(["e2e", "--recipe", str(recipe), "--out", str(run), *sets])
    monkeypatch.undo()
    assert saves == [4, 8, 12]
    rc, out, _ = run_main(capsys, "e2e", "--recipe", recipe, "--out", run, *sets)
    assert rc == 0 and "[e2e] resuming in epoch 1/2 after step 12/40" in out
    assert _same_weights(reference, run, "e2e")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(_rows(run, "e2e")) == strip(_rows(reference, "e2e"))     # each evaluation once, the same


def test_the_token_cache_is_made_once_and_mapped_after(token_run, monkeypatch):
    from incubate.data import corpus, text as text_data
    from incubate.recipe.schema import load_recipe
    recipe, run, _ = token_run
    entries = [p for p in (run / "token_cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == ["meta.json", "test.bin", "train.bin"]
    monkeypatch.setattr(corpus, "_split", lambda *a, **k: pytest.fail("the corpus was split and read again"))
    bundle = text_data.load_text(load_recipe(recipe).data, load_recipe(recipe).data.source[5:], run)
    assert isinstance(bundle.train.tokens, np.memmap) and bundle.train.tokens.dtype == np.uint8


def test_gz_files_are_read_as_text(tmp_path):
    import gzip
    from incubate.data.text import load_text
    plain = make_corpus(tmp_path / "plain", files=4, chars=3000)
    packed = tmp_path / "packed"
    packed.mkdir()
    for f in plain.iterdir():
        (packed / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    cfg = text_cfg()
    a, b = load_text(cfg, str(plain)), load_text(cfg, str(packed))
    assert np.array_equal(a.train.tokens, b.train.tokens) and np.array_equal(a.test.tokens, b.test.tokens)


@pytest.mark.slow
def test_local_launcher_runs_growth_and_gives_the_in_process_weights(token_run, tmp_path):
    """The growth job through the local launcher; the other stages are copied from the in-process run (the
    launcher's module jobs in tokens give its weights too: test_lm.py's four-job test does the same in epochs)."""
    import shutil
    recipe, reference, _ = token_run
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("grow", "e2e", "summary.json", "report.png"))
    proc = in_process("run", "--recipe", recipe, "--out", run, "--no-e2e", "--grow", "--launcher", "local", "--jobs",
                      "4", check=True)
    assert "[grow] finished in" in proc.stdout and "[meta] skipped: already finished" in proc.stdout
    assert _same_weights(reference, run, "grow")
    assert _rows(run, "grow") == _rows(reference, "grow") or [r["update"] for r in _rows(run, "grow")] == [
        r["update"] for r in _rows(reference, "grow")]


def test_torchrun_two_processes_run_every_stage_and_split_the_token_budget(tmp_path):
    """Every stage of an LM (E2E and growth too) under torchrun: two processes read twice the tokens an
    update, and only rank 0 writes rows and reports."""
    recipe = token_recipe(tmp_path, updates={"meta": 10, "incubate": 4, "finetune": 4, "e2e": 4, "grow": 6})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "incubate.cli", "run", "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                           "--grow"],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage, updates in (("meta", 5), ("modules/0", 2), ("modules/3", 2), ("finetune", 2), ("e2e", 2), ("grow", 3)):
        m = _manifest(tmp_path / "run", stage)      # two processes read twice the tokens an update
        assert m["world_size"] == 2 and (m["updates"], m["tokens"]) == (updates, updates * 2 * PER_UPDATE), stage
        assert m["finished"] and 0 < m["metrics"]["bpb"] < 8, stage   # bits per byte of a byte model: 8 untrained
        assert [r["update"] for r in _rows(tmp_path / "run", stage)] == [updates], stage    # rank 0 writes, once
    assert _manifest(tmp_path / "run", "assembled")["finished"]
    assert proc.stdout.count("| **e2e** |") == 1      # only rank 0 reports


def test_bad_budgets_and_slices_get_one_line_and_write_nothing(tmp_path, capsys):
    recipe = token_recipe(tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({**raw, "meta": {"tokens": 1000, "epochs": 2}}))
    rc, _, err = run_main(capsys, "meta", "--recipe", both, "--out", tmp_path / "r1")
    assert rc == 2 and "meta sets both epochs (2) and tokens (1000)" in one_error_line(err)
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "r2", "--set", "data.eval_tokens=10000000")
    assert rc == 2 and "data.eval_tokens 10000000 must be between one window" in one_error_line(err)
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "r3", "--set", "meta.tokens=100")
    assert rc == 2 and "meta: tokens 100 is less than one optimizer update" in one_error_line(err)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2"))
    assert not (tmp_path / "r3" / "meta" / "checkpoint.safetensors").exists()
    rc, out, _ = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "r4", "--set", "meta.epochs=1")
    m = _manifest(tmp_path / "r4", "meta")      # --set meta.epochs replaces the file's tokens
    assert rc == 0 and m["train"]["tokens"] == 0 and m["epochs"] == 1 and m["tokens"] == m["updates"] * PER_UPDATE


def test_a_damaged_token_cache_is_refused_in_one_line_and_harms_nothing(token_run, tmp_path, capsys):
    import shutil
    recipe, reference, _ = token_run
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("modules", "assembled", "finetune", "e2e", "grow"))
    entry = next(p for p in (run / "token_cache").iterdir() if not p.name.startswith("."))
    data = bytearray((entry / "train.bin").read_bytes())
    data[100] ^= 0xFF
    (entry / "train.bin").write_bytes(bytes(data))
    before = (run / "meta/model.safetensors").read_bytes()
    rc, _, err = run_main(capsys, "incubate", "--recipe", recipe, "--out", run, "--module", "0")
    line = one_error_line(err)
    assert rc == 2 and f"the token cache {entry} is damaged (train.bin does not match its SHA-256" in line
    assert "delete that folder and rerun" in line
    assert (run / "meta/model.safetensors").read_bytes() == before and not (run / "modules").exists()
    shutil.rmtree(entry)
    assert run_main(capsys, "incubate", "--recipe", recipe, "--out", run, "--module", "0")[0] == 0
    assert _same_weights(reference, run, "modules/0")
