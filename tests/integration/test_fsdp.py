"""train.parallel: fsdp on 2 gloo ranks: the same weights as DDP in every stage (a tiny ViT and a tiny
Llama, `incubate run --grow`: meta, module hybrids, assemble, fine-tune, E2E, growth), a kill -9 in the
middle of a stage resumes to the uninterrupted weights, a failing rank stops both with one line, and its
2-rank sharded checkpoint resumes in one process; the bad values get one line each.

The four pipelines (the LM's without E2E, which trains as meta and growth do) run in one pair of ranks
(tests/integration/fsdp_runs.py): torch's imports once."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from incubate.launchers import command, free_port
from ..conftest import PROCESS_TIMEOUT_S, ROOT, TINY_LM, in_process, make_corpus, one_error_line, write_recipe
from .fsdp_runs import in_one_process
from .test_launchers import _descendants
from .test_rank_faults import _wait

ENV = dict(os.environ, OMP_NUM_THREADS="1")
STAGES = ("meta", "modules/0", "modules/1", "assembled", "finetune", "e2e", "grow")


def _vit(path, **changes):
    return write_recipe(path, **{"model__division": [2, 2], "train__batch_size": 16, "train__clip_grad": 1.0,
                                 "train__checkpoint_every": 2, "meta__epochs": 1, "data__train_fraction": 0.15,
                                 **changes})


def _lm(path, corpus):
    return write_recipe(path, TINY_LM, model__division=[2, 2], data__source=f"text:{corpus}", train__clip_grad=1.0,
                        meta__epochs=1)


def _torchrun(module_args: list) -> list:
    """torchrun's command for 2 ranks of a module other than incubate.cli."""
    cmd = command(["-"], 2)
    at = cmd.index("incubate.cli")
    return cmd[:at] + module_args


def _meta(recipe, out, parallel="fsdp", **hooks) -> dict:
    """fsdp_runs' entry for `incubate meta` under `parallel`, with its hooks (stop, dump)."""
    argv = ["meta", "--recipe", str(recipe), "--out", str(out), "--set", f"train.parallel={parallel}"]
    return {"argv": argv, **hooks}


def _saved(stage: Path, out: Path) -> dict:
    """A sharded checkpoint's whole state, read without a process group, before a resume replaces it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(stage / "checkpoint.dcp"), str(out))
    return torch.load(out, weights_only=False)


TOKENS = 3072       # 6 updates of 2 ranks x 16 windows x 16 tokens: part of the tiny LM's first epoch


def _lm_variants(recipe: Path, tmp: Path) -> list:
    """The LM's meta model and module 1 under fsdp with gradient checkpointing (against the LM run's
    own), and its E2E with a token budget under ddp, fsdp and, with INCUBATE_TEST_COMPILE=1, compiled."""
    fsdp = ["--set", "train.parallel=fsdp"]
    gc = [[*stage, "--recipe", str(recipe), "--out", str(tmp / "lm_gc"), *fsdp, "--set",
           "train.grad_checkpointing=true"] for stage in (["meta"], ["incubate", "--module", "1"])]
    kinds = {"ddp": ["--set", "train.parallel=ddp"], "fsdp": fsdp}
    if os.environ.get("INCUBATE_TEST_COMPILE"):
        kinds["compiled"] = [*fsdp, "--set", "train.compile=true"]
    return gc + [["e2e", "--recipe", str(recipe), "--out", str(tmp / f"lm_tokens_{kind}"), "--set",
                  f"e2e.tokens={TOKENS}", *sets] for kind, sets in kinds.items()]


def _vit_variants(recipe: Path, tmp: Path) -> list:
    """The ViT's E2E under ddp and fsdp with gradient accumulation, mixup and cutmix, and evaluations
    inside the epoch: the loop's other parts, under both wrappings."""
    extra = ["--set", "train.accum_steps=2", "--set", "train.mixup=0.8", "--set", "train.cutmix=1.0",
             "--set", "train.eval_every=1"]
    return [["e2e", "--recipe", str(recipe), "--out", str(tmp / f"vit_parts_{par}"), "--set", f"train.parallel={par}",
             *extra] for par in ("ddp", "fsdp")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`incubate run --grow` of each tiny model under fsdp and under ddp, 2 ranks; and, in the same pair of
    ranks, the ViT's meta stage stopped after its first mid-epoch checkpoint, and one written so by one
    process resumed."""
    tmp = tmp_path_factory.mktemp("fsdp")
    recipes = {"vit": _vit(tmp / "vit.yaml"), "lm": _lm(tmp / "lm.yaml", make_corpus(tmp / "corpus"))}
    in_one_process(_meta(recipes["vit"], tmp / "one", stop=True))
    _saved(tmp / "one/meta", tmp / "one_saved.pt")
    in_one_process(_meta(recipes["vit"], tmp / "one_ddp", "ddp", stop=True))     # DDP's one-file checkpoint
    # E2E trains as meta and growth do (stages/train.py): the LM's is left out to save the suite 10 s
    argvs = [["run", "--grow", "--recipe", str(r), "--out", str(tmp / f"{name}_{par}"), "--set", f"train.parallel={par}",
              *(["--no-e2e"] if name == "lm" else [])] for name, r in recipes.items() for par in ("fsdp", "ddp")]
    argvs += [_meta(recipes["vit"], tmp / "one", dump=str(tmp / "one_to_two.pt")),
              _meta(recipes["vit"], tmp / "one_ddp", "ddp", dump=str(tmp / "one_ddp_to_two.pt")),
              _meta(recipes["vit"], tmp / "two", stop=True)]
    argvs += _lm_variants(recipes["lm"], tmp) + _vit_variants(recipes["vit"], tmp)
    t0 = time.time()
    proc = subprocess.run(_torchrun(["tests.integration.fsdp_runs", json.dumps(argvs)]), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"four 2-rank pipelines: {time.time() - t0:.1f}s")
    (tmp / "torchrun.out").write_text(proc.stdout)
    return tmp, recipes


def _losses(stage: Path) -> list:
    return [json.loads(l)["train_loss"] for l in (stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["vit", "lm"])
def test_fsdp_and_ddp_reach_the_same_weights_and_losses_in_every_stage(runs, name):
    tmp, _ = runs
    for stage in STAGES if name == "vit" else [s for s in STAGES if s != "e2e"]:
        fsdp, ddp = tmp / f"{name}_fsdp" / stage, tmp / f"{name}_ddp" / stage
        a, b = load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors")
        assert a.keys() == b.keys(), stage
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=f"{stage} {k}")
        if (fsdp / "metrics.jsonl").exists():
            assert _losses(fsdp) == pytest.approx(_losses(ddp), abs=1e-4), stage
            assert json.loads((fsdp / "manifest.json").read_text())["train"]["parallel"] == "fsdp"
        assert not list(fsdp.glob("checkpoint*")), stage     # a finished stage keeps its weights alone


def test_kill_9_in_the_middle_of_an_fsdp_stage_resumes_to_the_uninterrupted_weights(runs, tmp_path):
    tmp, recipes = runs
    args = ["meta", "--recipe", str(recipes["vit"]), "--out", str(tmp_path / "run"), "--set", "train.parallel=fsdp"]
    proc = subprocess.Popen(command(args, 2), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state, deadline = tmp_path / "run/meta/checkpoint.dcp/state.json", time.time() + 240
    while proc.poll() is None and not state.exists() and time.time() < deadline:
        time.sleep(0.01)
    for pid in [pid for pid, _ in _descendants(proc.pid)] + [proc.pid]:     # both ranks, then torchrun
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (tmp_path / "run/meta/model.safetensors").exists()
    again = subprocess.run(command(args, 2), cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=PROCESS_TIMEOUT_S)
    assert again.returncode == 0 and "resuming in epoch 1/1 after step" in again.stdout, again.stdout + again.stderr
    resumed, reference = load_file(tmp_path / "run/meta/model.safetensors"), load_file(tmp / "vit_fsdp/meta/model.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)


def _close(a_stage: Path, b_stage: Path) -> None:
    """The same weights within float tolerance, and the same losses."""
    a, b = load_file(a_stage / "model.safetensors"), load_file(b_stage / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=f"{a_stage} {k}")
    assert _losses(a_stage) == pytest.approx(_losses(b_stage), abs=1e-4)


def test_gradient_checkpointing_of_a_language_model_under_fsdp_changes_no_result(runs):
    tmp, _ = runs
    for stage in ("meta", "modules/1"):
        _close(tmp / "lm_gc" / stage, tmp / "lm_fsdp" / stage)
        assert json.loads((tmp / "lm_gc" / stage / "manifest.json").read_text())["train"]["grad_checkpointing"]


COMPILE = pytest.mark.skipif(not os.environ.get("INCUBATE_TEST_COMPILE"),
                             reason="torch.compile on CPU takes minutes; set INCUBATE_TEST_COMPILE=1 to run")


@pytest.mark.parametrize("kind", ["fsdp", pytest.param("compiled", marks=COMPILE)])
def test_a_token_budget_under_fsdp_ends_where_ddp_does(runs, kind):
    tmp, _ = runs
    _close(tmp / f"lm_tokens_{kind}/e2e", tmp / "lm_tokens_ddp/e2e")
    manifest = json.loads((tmp / f"lm_tokens_{kind}/e2e/manifest.json").read_text())
    assert (manifest["tokens"], manifest["updates"], manifest["train"]["compile"]) == (TOKENS, 6, kind == "compiled")


def test_accumulation_mixup_and_evaluations_inside_an_epoch_under_fsdp_match_ddp(runs):
    tmp, _ = runs
    fsdp, ddp = tmp / "vit_parts_fsdp/e2e", tmp / "vit_parts_ddp/e2e"
    _close(fsdp, ddp)
    evals = [[json.loads(l) for l in (s / "metrics.jsonl").read_text().splitlines()] for s in (fsdp, ddp)]
    evals = [[(r["update"], r["test_top1"]) for r in rows if r.get("kind") == "eval"] for rows in evals]
    assert len(evals[0]) >= 2 and [u for u, _ in evals[0]] == [u for u, _ in evals[1]]
    assert [a for _, a in evals[0]] == pytest.approx([a for _, a in evals[1]], abs=1e-6)
    manifest = json.loads((fsdp / "manifest.json").read_text())["train"]
    assert (manifest["accum_steps"], manifest["mixup"], manifest["parallel"]) == (2, 0.8, "fsdp")


def _cosine_lr(base: float, update: int, updates: int) -> float:
    """timm's cosine schedule without warm-up, at `update` of `updates` (min_lr 1e-6: the recipe's default)."""
    return 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * update / updates))


def _restored_as_saved(saved: dict, got: dict) -> None:
    assert saved["model"].keys() == got["model"].keys()
    assert all(torch.equal(saved["model"][k], got["model"][k]) for k in saved["model"])
    assert saved["optim"]["state"].keys() == got["optim"]["state"].keys()
    for k, state in saved["optim"]["state"].items():
        assert all(torch.equal(state[n], got["optim"]["state"][k][n]) for n in state), k


@pytest.mark.parametrize("parallel, saved_by, resumed_by", [("fsdp", 1, 2), ("fsdp", 2, 1), ("ddp", 1, 2)])
def test_a_mid_epoch_checkpoint_resumes_at_another_number_of_processes(runs, capsys, parallel, saved_by, resumed_by):
    """Stopped after its 2nd update, by 1 process (resumed by 2 in the fixture's torchrun) or by 2 (resumed
    here): the sharded state restored is the state saved, the epoch goes on at the same point of its order
    (at 2 processes an epoch is 6 updates, at 1 it is 12), the lr follows the new world's schedule."""
    tmp, recipes = runs
    name = {1: "one", 2: "two"}[saved_by] + ("_ddp" if parallel == "ddp" else "")
    if resumed_by == 1:
        saved = _saved(tmp / name / "meta", tmp / f"{name}_saved.pt")
        capsys.readouterr()
        in_one_process(_meta(recipes["vit"], tmp / name, dump=str(tmp / f"{name}_to_one.pt")))
        out = capsys.readouterr().out
    else:
        out = (tmp / "torchrun.out").read_text()
        saved = torch.load(tmp / "one_saved.pt", weights_only=False) if parallel == "fsdp" else None
    got = torch.load(tmp / f"{name}_to_{'two' if resumed_by == 2 else 'one'}.pt", weights_only=False)
    if saved is not None:
        _restored_as_saved(saved, got)
    at, updates = 2 * saved_by // resumed_by, 12 // resumed_by
    ckpt = "checkpoint.dcp" if parallel == "fsdp" else "checkpoint.safetensors"
    assert (f"resuming in epoch 1/1 after step {at}/{updates} from {tmp / name / 'meta' / ckpt}, saved by "
            f"{saved_by} process{'es' * (saved_by > 1)} and resumed by {resumed_by}") in out
    manifest = json.loads((tmp / name / "meta/manifest.json").read_text())
    assert (got["resumed_at"], got["ended_at"], manifest["updates"]) == (at, updates, updates)
    lr = 2e-3 * 16 * resumed_by / 32        # the recipe's lr x global batch / lr_base_batch
    assert got["lr"] == pytest.approx(_cosine_lr(lr, at, updates))
    assert not list((tmp / name / "meta").glob("checkpoint*"))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _fail_rank_1_in_epoch_2(runs, tmp_path) -> tuple:
    """Rank 1's first optimizer step of epoch 2 raises: both ranks stop, rank 0 with one line."""
    tmp, _ = runs
    updates = json.loads((tmp / "vit_fsdp/meta/manifest.json").read_text())["updates"]   # one epoch's, at 2 ranks
    recipe = _vit(tmp_path / "r.yaml", meta__epochs=2, train__checkpoint_every=0, train__parallel="fsdp")
    procs = []
    port = str(free_port())
    for rank in (0, 1):
        env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.integration.rank_fault", f"step:{updates + 1}",
                                       str(tmp_path / "stamp"), "meta", "--recipe", str(recipe), "--out",
                                       str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    _, outs = _wait(procs)
    return recipe, procs, outs


def test_a_failing_rank_stops_both_and_the_sharded_checkpoint_resumes_in_one_process(runs, tmp_path):
    recipe, procs, ((_, err0), (_, err1)) = _fail_rank_1_in_epoch_2(runs, tmp_path)
    assert [p.returncode for p in procs] == [2, 2], (err0, err1)
    line = one_error_line(err0)
    assert line.startswith("incubate: error: rank 1 of 2 failed at epoch 2 step ") and "in the optimizer step" in line
    assert "every rank stopped" in line and err1.strip() == "", err1
    ckpt = tmp_path / "run/meta/checkpoint.dcp"
    before = _digest(ckpt)

    # the same run under ddp, or the checkpoint in a run of another model: one line each, nothing harmed
    proc = in_process("meta", "--recipe", recipe, "--out", tmp_path / "run", "--set", "train.parallel=ddp")
    assert "holds a sharded checkpoint of train.parallel: fsdp" in one_error_line(proc.stderr)
    other = tmp_path / "other/meta"
    other.mkdir(parents=True)
    shutil.copytree(ckpt, other / ckpt.name)
    wider = _vit(tmp_path / "wider.yaml", meta__epochs=2, train__parallel="fsdp", model__kwargs__embed_dim=32)
    proc = in_process("meta", "--recipe", wider, "--out", tmp_path / "other")
    assert "holds another model than this recipe trains" in one_error_line(proc.stderr)
    assert _digest(ckpt) == before == _digest(other / ckpt.name)

    proc = in_process("meta", "--recipe", recipe, "--out", tmp_path / "run", check=True)   # one process
    assert "resuming after epoch 1/2" in proc.stdout
    assert (tmp_path / "run/meta/model.safetensors").exists() and not ckpt.exists()


@pytest.mark.parametrize("sets, message", [
    (["train.amp=fp16"], "meta.parallel: fsdp trains with amp bf16 or none, not fp16"),
    (["meta.parallel=ddp", "e2e.parallel=fsdp", "e2e.amp=fp16"], "e2e.parallel: fsdp trains with amp bf16"),
    ([], "meta.parallel: fsdp shards a model block by block, and model.family vit names no blocks"),
], ids=["fp16", "fp16_in_one_stage", "no_blocks"])
def test_bad_fsdp_values_are_one_line_before_anything_is_written(tmp_path, monkeypatch, sets, message):
    from incubate.families import get_family
    if not sets:
        monkeypatch.delattr(type(get_family("vit")), "block_modules")
    recipe = _vit(tmp_path / "r.yaml", train__parallel="fsdp")
    proc = in_process("meta", "--recipe", recipe, "--out", tmp_path / "run", *[a for s in sets for a in ("--set", s)])
    assert message in one_error_line(proc.stderr)
    assert not (tmp_path / "run").exists()
