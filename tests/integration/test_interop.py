"""Official Deep-Incubation checkpoints in (built here in their layout), timm/hub folders out."""
import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from incubate.families import get_family
from ..conftest import one_error_line, run_main, write_recipe

KW = dict(patch_size=4, embed_dim=16, num_heads=2, in_chans=1)


def official_checkpoint(path, division, num_classes=10, img_size=8, embed_dim=16, stages=True, seed=1):
    """A checkpoint as the official code saves it: `model` (root names and `stages.I.*` duplicates),
    `model_stages` (blocks counted from 0 inside each module), optimizer, epoch, argparse args."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **dict(KW, embed_dim=embed_dim), depth=sum(division),
                              img_size=img_size, num_classes=num_classes)
    full = model.state_dict()
    family = get_family("vit")
    parts = [{} for _ in division]
    for key, value in full.items():
        i = family.owner(key, division, None)
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            key = f"blocks.{int(n) - sum(division[:i])}.{rest}"
        parts[i][key] = value.clone()
    dup = {f"stages.{i}.{k}": v for i, part in enumerate(parts) for k, v in part.items()}
    ckpt = {"model": dict(full, **dup), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
            "lr_scheduler": {"last_epoch": 299}, "epoch": 299, "scaler": {},
            "args": argparse.Namespace(phase="PT", divided_depths=list(division))}
    if stages:
        ckpt["model_stages"] = parts
    torch.save(ckpt, path)
    return model


def test_import_meta_with_another_head_then_incubate(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    src = official_checkpoint(tmp_path / "meta.pth", [1, 1, 1, 1], num_classes=1000)
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, "import-official", tmp_path / "meta.pth", "--recipe", recipe, "--out", run,
                            "--as", "meta")
    assert rc == 0, err
    assert err.strip() == (f"incubate: warning: {tmp_path / 'meta.pth'} has a 1000-class head but the data has "
                           f"10 classes; the head is re-initialised (as DeiT does when fine-tuning)")
    m = json.loads((run / "meta/manifest.json").read_text())
    assert m["finished"] and m["stage"] == "meta" and m["imported_from"].endswith("meta.pth")
    ours, theirs = load_file(run / "meta/model.safetensors"), src.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        if not k.startswith("head."):
            assert torch.equal(ours[k], theirs[k]), k
    assert ours["head.weight"].shape == (10, 16)
    rc, out, err = run_main(capsys, "incubate", "--recipe", recipe, "--out", run, "--module", "3")
    assert rc == 0, err
    module = json.loads((run / "modules/3/manifest.json").read_text())
    assert module["finished"] and module["meta_fingerprint"] == m["sha256"]


def test_import_assembled_renumbers_blocks_by_division_and_exports_to_timm(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model__division=[1, 2, 1])
    src = official_checkpoint(tmp_path / "target.pth", [1, 2, 1])
    run, dest = tmp_path / "run", tmp_path / "hub"
    rc, out, err = run_main(capsys, "import-official", tmp_path / "target.pth", "--recipe", recipe, "--out", run,
                            "--as", "assembled")
    assert rc == 0 and err == "", err
    ours, theirs = load_file(run / "assembled/model.safetensors"), src.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    rc, out, err = run_main(capsys, "export", run, "--stage", "assembled", "--to", dest)
    assert rc == 0, err
    config = json.loads((dest / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    assert config["model_args"]["depth"] == 4 and config["pretrained_cfg"]["input_size"] == [1, 8, 8]
    assert config["label_names"] == [str(i) for i in range(10)] and "license" not in config["pretrained_cfg"]
    x = torch.randn(3, 1, 8, 8)
    want = src.eval()(x)
    # 1) as a hub folder: timm reads config.json itself
    hub = timm.create_model(f"local-dir:{dest}", pretrained=True).eval()
    assert torch.equal(hub(x), want)
    # 2) by name with the weights file; num_classes must reach pretrained_cfg too, or timm drops the head
    plain = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(dest / "model.safetensors"), num_classes=config["num_classes"]), **config["model_args"]).eval()
    assert torch.equal(plain(x), want)
    # exporting the same stage again into the same folder is allowed
    assert run_main(capsys, "export", run, "--stage", "assembled", "--to", dest)[0] == 0


def test_import_model_only_drops_stage_copies_and_resamples_pos_embed(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", data__img_size=16)
    src = official_checkpoint(tmp_path / "meta.pth", [1, 1, 1, 1], img_size=8, stages=False)
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, "import-official", tmp_path / "meta.pth", "--recipe", recipe, "--out", run,
                            "--as", "meta")
    assert rc == 0, err
    assert "position embedding resampled from a 2x2 to a 4x4 grid" in out
    ours, theirs = load_file(run / "meta/model.safetensors"), src.state_dict()
    assert not any(k.startswith("stages.") for k in ours)
    assert torch.allclose(ours["pos_embed"], resample_abs_pos_embed(theirs["pos_embed"], new_size=[4, 4],
                                                                     num_prefix_tokens=1))
    assert torch.equal(ours["blocks.2.attn.qkv.weight"], theirs["blocks.2.attn.qkv.weight"])


def test_import_refuses_another_architecture(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    official_checkpoint(tmp_path / "big.pth", [1, 1, 1, 1], embed_dim=32)
    rc, _, err = run_main(capsys, "import-official", tmp_path / "big.pth", "--recipe", recipe, "--out",
                          tmp_path / "run", "--as", "meta")
    line = one_error_line(err)
    assert rc == 2 and "holds weights of another architecture than the recipe's meta model: " in line
    assert "of another shape (e.g. cls_token (1, 1, 32) vs (1, 1, 16))" in line
    assert not (tmp_path / "run/meta/model.safetensors").exists()


def test_import_refuses_another_division(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    official_checkpoint(tmp_path / "t.pth", [2, 2])
    rc, _, err = run_main(capsys, "import-official", tmp_path / "t.pth", "--recipe", recipe, "--out",
                          tmp_path / "run", "--as", "assembled")
    assert rc == 2 and "has 2 modules in model_stages but the recipe divides this model into 4" in one_error_line(err)


class _Payload:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(str(self.marker)),))


def test_import_never_unpickles_code_nor_reads_garbage(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    evil = _Payload()
    evil.marker = tmp_path / "pwned"
    torch.save({"model": {}, "x": evil}, tmp_path / "evil.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "evil.pth").read_bytes()[:60])
    expected = {"evil.pth": "holds objects other than tensors and plain containers (",
                "junk.pth": "is not a readable PyTorch checkpoint (Unsupported operand",
                "cut.pth": "is not a readable PyTorch checkpoint (PytorchStreamReader failed reading zip archive"}
    for name, text in expected.items():
        rc, _, err = run_main(capsys, "import-official", tmp_path / name, "--recipe", recipe, "--out",
                              tmp_path / "run", "--as", "meta")
        assert rc == 2 and f"{tmp_path / name} {text}" in one_error_line(err)
    assert not (tmp_path / "pwned").exists()


def test_import_never_overwrites_a_finished_stage(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    official_checkpoint(tmp_path / "a.pth", [1, 1, 1, 1])
    run = tmp_path / "run"
    assert run_main(capsys, "import-official", tmp_path / "a.pth", "--recipe", recipe, "--out", run, "--as", "meta")[0] == 0
    before = (run / "meta/model.safetensors").read_bytes()
    official_checkpoint(tmp_path / "b.pth", [1, 1, 1, 1], seed=2)
    rc, _, err = run_main(capsys, "import-official", tmp_path / "b.pth", "--recipe", recipe, "--out", run, "--as", "meta")
    assert rc == 2 and "already holds a finished meta model; importing would overwrite it" in one_error_line(err)
    assert (run / "meta/model.safetensors").read_bytes() == before


def test_export_refusals(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml")
    official_checkpoint(tmp_path / "t.pth", [1, 1, 1, 1])
    run = tmp_path / "run"
    assert run_main(capsys, "import-official", tmp_path / "t.pth", "--recipe", recipe, "--out", run,
                    "--as", "assembled")[0] == 0
    rc, _, err = run_main(capsys, "export", run, "--stage", "finetune", "--to", tmp_path / "hub")
    assert rc == 2 and "finetune has not finished" in one_error_line(err) and "incubate finetune" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"someone else's model")
    rc, _, err = run_main(capsys, "export", run, "--stage", "assembled", "--to", other)
    assert rc == 2 and "already holds another model" in one_error_line(err)
    assert (other / "model.safetensors").read_bytes() == b"someone else's model"
