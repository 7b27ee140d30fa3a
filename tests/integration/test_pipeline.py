"""The whole method end to end on the embedded data, through the CLI (in this process: the tests of
processes, launchers and signals start their own)."""
import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

from ..conftest import in_process, write_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp / "tiny.yaml")
    run = tmp / "run"
    proc = in_process("run", "--recipe", recipe, "--out", run, check=True)
    return recipe, run, proc


def test_run_writes_the_run_directory_contract(finished_run):
    recipe, run, proc = finished_run
    assert (run / "recipe.yaml").exists() and (run / "report.png").stat().st_size > 1000
    stages = ["meta", "modules/0", "modules/1", "modules/2", "modules/3", "assembled", "finetune", "e2e"]
    for s in stages:
        m = json.loads((run / s / "manifest.json").read_text())
        for key in ("stage", "module", "family", "model", "division", "meta_fingerprint", "epochs",
                    "finished", "metrics", "seconds", "flops"):
            assert key in m, (s, key)
        assert m["finished"] is True and 0 <= m["metrics"]["top1"] <= 100
        assert not (run / s / "checkpoint.safetensors").exists()
        if s not in ("assembled",):
            lines = (run / s / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == m["epochs"] and m["flops"] > 0
    meta_sha = json.loads((run / "meta/manifest.json").read_text())["sha256"]
    for s in ["modules/0", "modules/3", "assembled", "finetune"]:
        assert json.loads((run / s / "manifest.json").read_text())["meta_fingerprint"] == meta_sha
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"meta", "module_0", "module_1", "module_2", "module_3", "assembled", "finetune", "e2e"}
    assert "| **e2e** |" in proc.stdout and "| assembled |" in proc.stdout
    # `tensorboard --logdir RUN/tensorboard`: one run a trained stage (assembling trains nothing)
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == [
        "e2e", "finetune", "meta", "module_0", "module_1", "module_2", "module_3"]


def test_module_files_hold_only_their_tensors_with_target_names(finished_run):
    _, run, _ = finished_run
    keys = [set(load_file(run / f"modules/{i}/model.safetensors")) for i in range(4)]
    assert "cls_token" in keys[0] and "head.weight" in keys[3]
    assert all(k.startswith("blocks.1.") for k in keys[1]) and all(k.startswith("blocks.2.") for k in keys[2])
    assembled = set(load_file(run / "assembled/model.safetensors"))
    assert assembled == set().union(*keys)


@pytest.mark.parametrize("stage", ["assembled", "finetune", "e2e"])
def test_exports_load_strictly_in_plain_timm(finished_run, stage):
    _, run, _ = finished_run
    m = json.loads((run / stage / "manifest.json").read_text())
    model = timm.create_model(m["model"]["name"], **m["model"]["kwargs"])
    model.load_state_dict(load_file(run / stage / "model.safetensors"), strict=True)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, m["num_classes"])
    assert m["classes"] == [str(i) for i in range(10)]


def test_rerun_skips_finished_stages(finished_run):
    recipe, run, _ = finished_run
    before = (run / "finetune/model.safetensors").read_bytes()
    proc = in_process("run", "--recipe", recipe, "--out", run, check=True)
    assert proc.stdout.count("already finished") == 8
    assert (run / "finetune/model.safetensors").read_bytes() == before


def test_evaluate_any_stage(finished_run):
    recipe, run, _ = finished_run
    for stage in ("meta", "modules/2", "finetune"):
        proc = in_process("evaluate", "--recipe", recipe, "--checkpoint", run / stage, check=True)
        m = json.loads((run / stage / "manifest.json").read_text())
        assert f"test top-1 {m['metrics']['top1']:.2f}%" in proc.stdout


def _copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    shutil.rmtree(dst / "assembled")
    shutil.rmtree(dst / "finetune")
    return dst


def test_assemble_refuses_a_missing_module(finished_run, tmp_path):
    recipe, run, _ = finished_run
    dst = _copy(run, tmp_path)
    shutil.rmtree(dst / "modules/2")
    proc = in_process("assemble", "--recipe", recipe, "--out", dst)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "module 2 is missing" in proc.stderr and "modules/2/manifest.json" in proc.stderr


def test_assemble_refuses_a_module_of_another_meta_model(finished_run, tmp_path):
    recipe, run, _ = finished_run
    dst = _copy(run, tmp_path)
    path = dst / "modules/1/manifest.json"
    m = json.loads(path.read_text())
    m["meta_fingerprint"] = "0" * 64
    path.write_text(json.dumps(m))
    proc = in_process("assemble", "--recipe", recipe, "--out", dst)
    assert proc.returncode == 2 and "modules/1/manifest.json was incubated against another meta model" in proc.stderr
    assert not (dst / "assembled/model.safetensors").exists()


def test_assemble_refuses_a_module_of_another_division(finished_run, tmp_path):
    recipe, run, _ = finished_run
    dst = _copy(run, tmp_path)
    path = dst / "modules/3/manifest.json"
    m = json.loads(path.read_text())
    m["division"] = [2, 1, 1]
    path.write_text(json.dumps(m))
    proc = in_process("assemble", "--recipe", recipe, "--out", dst)
    assert proc.returncode == 2 and "modules/3/manifest.json was incubated for another recipe or division" in proc.stderr


def test_assemble_refuses_a_corrupt_module_file(finished_run, tmp_path):
    recipe, run, _ = finished_run
    dst = _copy(run, tmp_path)
    f = dst / "modules/0/model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    proc = in_process("assemble", "--recipe", recipe, "--out", dst)
    assert proc.returncode == 2 and "modules/0/model.safetensors does not match the SHA-256" in proc.stderr


@pytest.mark.parametrize("stage", ["finetune", "e2e"])
def test_export_loads_as_a_timm_hub_folder(finished_run, stage, tmp_path):
    _, run, _ = finished_run
    proc = in_process("export", run, "--stage", stage, "--to", tmp_path / "hub", check=True)
    assert f"timm.create_model('local-dir:{tmp_path / 'hub'}', pretrained=True)" in proc.stdout
    m = json.loads((run / stage / "manifest.json").read_text())
    ours = timm.create_model(m["model"]["name"], **m["model"]["kwargs"])
    ours.load_state_dict(load_file(run / stage / "model.safetensors"), strict=True)
    hub = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(hub.eval()(x), ours.eval()(x))
    cfg = hub.pretrained_cfg
    assert list(cfg["mean"]) == m["preprocess"]["mean"] and list(cfg["input_size"]) == [1, 8, 8]


def _metrics(run, stage):
    return [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


def test_report_figure_plots_meta_e2e_and_ours_from_their_metrics(finished_run, tmp_path):
    from incubate.report import plot
    from incubate.tasks import get_task
    _, run, _ = finished_run
    summary = json.loads((run / "summary.json").read_text())
    data = plot(run, summary, tmp_path / "r.png", get_task("classification"))
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert set(data) == {"meta", "e2e", "assembled", "ours"}
    for name, stage in (("meta", "meta"), ("e2e", "e2e"), ("ours", "finetune")):
        rows, m = _metrics(run, stage), json.loads((run / stage / "manifest.json").read_text())
        assert data[name]["top1"] == [r["test_top1"] for r in rows]       # one point an epoch, in order
        assert data[name]["epoch"] == list(range(1, m["epochs"] + 1))
        per_epoch = m["flops_per_step"] * m["steps"] / m["epochs"]
        assert data[name]["flops"][0] == pytest.approx(data[name]["flops"][-1] - per_epoch * (m["epochs"] - 1))
        assert data[name]["seconds"][-1] - data[name]["seconds"][0] == pytest.approx(
            (rows[-1]["seconds"] - rows[0]["seconds"]) * m["world_size"])
    # the meta model and E2E start from nothing and end at their own total cost
    assert data["meta"]["flops"][-1] == pytest.approx(summary["meta"]["flops"])
    assert data["e2e"]["flops"][-1] == pytest.approx(summary["e2e"]["flops"])
    # ours: the fine-tune's epochs after the meta model and every module
    before = summary["meta"]["flops"] + sum(summary[f"module_{i}"]["flops"] for i in range(4))
    assert data["assembled"]["flops"] == [pytest.approx(before)]
    assert data["ours"]["flops"][-1] == pytest.approx(before + summary["finetune"]["flops"])
    assert data["assembled"]["top1"] == [summary["assembled"]["top1"]]


def test_report_table_gives_each_stages_share_of_ours(finished_run):
    from incubate.report import shares, table
    from incubate.tasks import get_task
    _, run, _ = finished_run
    summary = json.loads((run / "summary.json").read_text())
    ours = ["meta", "module_0", "module_1", "module_2", "module_3", "finetune"]
    got = shares(summary)
    for unit in ("flops", "seconds"):
        total = sum(summary[k][unit] for k in ours)
        assert sum(got[k][unit] for k in ours) == pytest.approx(100.0)
        for k in ours + ["e2e"]:
            assert got[k][unit] == pytest.approx(100.0 * summary[k][unit] / total)
    assert got["assembled"]["flops"] == 0.0
    meta_row = next(r for r in table(summary, get_task("classification")).splitlines() if r.startswith("| meta |"))
    assert f"| {got['meta']['flops']:.1f} | {got['meta']['seconds']:.1f} |" in meta_row


def test_status_of_a_finished_run(finished_run, capsys):
    from incubate.status import status
    _, run, _ = finished_run
    rows = status(run)
    out = capsys.readouterr().out
    assert [r["stage"] for r in rows] == ["meta", "module 0", "module 1", "module 2", "module 3", "assembled",
                                          "finetune", "e2e"]
    assert all(r["state"] == "finished" for r in rows)
    m = json.loads((run / "finetune/manifest.json").read_text())
    assert rows[6]["top1"] == m["metrics"]["top1"] and rows[6]["finished_at"] == m["finished_at"]
    assert f"  finetune   finished     top-1 {m['metrics']['top1']:.2f}% after 1 epoch(s), finished " in out
