"""A tiny CIFAR-style ResNet through every stage of `incubate run` under torchrun (2 processes,
DDP over BatchNorm), exported and loaded strictly in plain timm; a stopped module job resumes."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from incubate.store.checkpoint import load_training_state
from ..conftest import PROCESS_TIMEOUT_S, ROOT, write_recipe

RESNET = dict(model={"family": "resnet", "name": "cifar_resnet14", "kwargs": {}, "division": [2, 2, 2]},
              train__opt="momentum", train__lr=0.05, train__weight_decay=1e-4, train__label_smoothing=0.0)


def resnet_recipe(path, **changes):
    return write_recipe(path, **dict(RESNET, **changes))


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resnet")
    recipe = resnet_recipe(tmp / "r.yaml", train__batch_size=16)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "incubate.cli", "run", "--recipe", str(recipe), "--out", str(tmp / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, tmp / "run", proc


def test_every_stage_runs_under_torchrun(resnet_run):
    _, run, proc = resnet_run
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"meta", "module_0", "module_1", "module_2", "assembled", "finetune", "e2e"}
    meta = json.loads((run / "meta/manifest.json").read_text())
    assert meta["model"] == {"name": "cifar_resnet14",
                             "kwargs": {"num_classes": 10, "in_chans": 1, "layers": [1, 1, 1, 0]}}
    for stage in ("meta", "modules/1", "finetune", "e2e"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["finished"] and m["world_size"] == 2 and m["flops"] > 0
    keys = [set(load_file(run / f"modules/{i}/model.safetensors")) for i in range(3)]
    assert "conv1.weight" in keys[0] and "fc.weight" in keys[2]
    assert all(k.startswith("layer2.") for k in keys[1])    # module 1 = layer2.0, layer2.1 (the strided one first)
    assert proc.stdout.count("| **e2e** |") == 1      # only rank 0 reports
    for stage in ("meta", "module_1", "finetune", "e2e"):  # and only rank 0 writes event files
        assert len(list((run / "tensorboard" / stage).glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("stage", ["assembled", "finetune"])
def test_export_loads_strictly_in_plain_timm_and_predicts_the_same(resnet_run, stage, tmp_path, capsys):
    from incubate.cli import main
    from incubate.families import get_family
    _, run, _ = resnet_run
    assert main(["export", str(run), "--stage", stage, "--to", str(tmp_path / "hub")]) == 0
    config = json.loads((tmp_path / "hub/config.json").read_text())
    assert "m.conv1 = torch.nn.Conv2d(1, 16, 3" in capsys.readouterr().out    # the printed rebuild
    # docs/interop.md's rebuild, with timm and torch alone
    plain = timm.create_model(config["architecture"], **config["model_args"])
    plain.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=False)
    plain.maxpool = torch.nn.Identity()
    plain.load_state_dict(load_file(tmp_path / "hub/model.safetensors"), strict=True)
    m = json.loads((run / stage / "manifest.json").read_text())
    ours = get_family("resnet").build(m["model"]["name"], m["model"]["kwargs"])
    ours.load_state_dict(load_file(run / stage / "model.safetensors"), strict=True)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(plain.eval()(x), ours.eval()(x), rtol=0, atol=0)
    assert config["pretrained_cfg"]["input_size"] == [1, 8, 8]


def test_a_module_job_stopped_after_an_epoch_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    """In-process stand-in for a kill (tests/gpu/test_cuda.py kills a real process; the GPU run's smoke test
    runs it on the CPU): the job dies in its second evaluation, after epoch 1's checkpoint, and a rerun goes on."""
    from incubate.train import engine
    from incubate.recipe.schema import load_recipe
    from incubate.store.lock import release
    from incubate.stages import incubate, meta
    recipe = load_recipe(resnet_recipe(tmp_path / "r.yaml", incubate__epochs=3, deterministic=True))
    for out in ("a", "b"):
        meta.main(recipe, tmp_path / out)
    incubate.main(recipe, tmp_path / "a", 1)
    calls, real = [], engine.evaluate

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        incubate.main(recipe, tmp_path / "b", 1)
    monkeypatch.setattr(engine, "evaluate", real)
    release(tmp_path / "b/modules/1")          # the killed process's lock dies with it
    _, _, state = load_training_state(tmp_path / "b/modules/1/checkpoint.safetensors")
    assert state["epoch"] == 0
    capsys.readouterr()
    incubate.main(recipe, tmp_path / "b", 1)
    assert "resuming after epoch 1/3" in capsys.readouterr().out
    a, b = (load_file(tmp_path / r / "modules/1/model.safetensors") for r in ("a", "b"))
    assert any("running_mean" in k for k in a)           # BatchNorm statistics resume too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_division_the_adapter_cannot_honour_is_one_line(tmp_path, capsys):
    from ..conftest import one_error_line, run_main
    # cifar_resnet14 has 2 blocks a stage: module 1 (blocks 1-4) would run from layer1 into layer3
    recipe = resnet_recipe(tmp_path / "r.yaml", model={**RESNET["model"], "division": [1, 4, 1]})
    rc, _, err = run_main(capsys, "meta", "--recipe", recipe, "--out", tmp_path / "run")
    assert rc == 2 and "across 2 stage changes" in one_error_line(err)
    assert not (tmp_path / "run").exists()        # refused when the recipe is read: nothing written


def test_evaluate_a_module_inside_its_hybrid_gives_its_recorded_accuracy(resnet_run, capsys):
    from ..conftest import run_main
    recipe, run, _ = resnet_run
    rc, out, _ = run_main(capsys, "evaluate", "--recipe", recipe, "--checkpoint", run / "modules/1")
    m = json.loads((run / "modules/1/manifest.json").read_text())
    assert rc == 0 and f"test top-1 {m['metrics']['top1']:.2f}%" in out
