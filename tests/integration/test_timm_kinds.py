"""timm beyond ViT-and-ResNet through every stage: a distilled DeiT, an EVA-02 (rotary embeddings),
a BEiT (relative position bias in every block) and a ConvNeXt (downsampling between stages), each a
tiny `incubate run` whose fine-tuned model, exported, loads in plain timm with equal logits."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from incubate.families import get_family
from ..conftest import run_main, write_recipe

VIT = {"patch_size": 4, "embed_dim": 16, "num_heads": 2, "depth": 4}
KINDS = {
    "deit_tiny_distilled_patch16_224": dict(family="vit", kwargs=VIT, division=[1, 1, 1, 1]),
    "eva02_tiny_patch14_224": dict(family="vit", kwargs=VIT, division=[1, 1, 1, 1]),
    "beit_base_patch16_224": dict(family="vit", kwargs=VIT, division=[1, 1, 1, 1]),
    # module 1 crosses three stage boundaries; its meta module is three downsampling layers and one block
    "convnext_tiny": dict(family="convnext", kwargs={"depths": [2, 1, 1, 2], "dims": [8, 16, 24, 32],
                                                     "patch_size": 1}, division=[2, 3, 1]),
}


@pytest.mark.parametrize("name", KINDS)
def test_every_stage_then_the_export_loads_in_timm_with_equal_logits(name, tmp_path, capsys):
    model = dict(KINDS[name], name=name)
    recipe = write_recipe(tmp_path / "r.yaml", model=model, data__train_fraction=0.1, meta__epochs=1,
                          incubate__module_init="meta")
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, "run", "--recipe", recipe, "--out", run)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    modules = {f"module_{i}" for i in range(len(model["division"]))}
    assert set(summary) == {"meta", "assembled", "finetune", "e2e"} | modules
    rc, out, err = run_main(capsys, "export", run, "--stage", "finetune", "--to", tmp_path / "hub")
    assert rc == 0, err
    m = json.loads((run / "finetune/manifest.json").read_text())
    ours = get_family(model["family"]).build(name, m["model"]["kwargs"])
    ours.load_state_dict(load_file(run / "finetune/model.safetensors"), strict=True)
    hub = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(hub.eval()(x), ours.eval()(x))
    assert type(hub) is type(ours) and hub.num_classes == 10
