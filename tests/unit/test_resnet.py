"""The ResNet adapter's own rules: the CIFAR ResNet of He et al., the meta model's layout, the
divisions and initialisations it refuses (one line each), and identity blocks that still train."""
from pathlib import Path

import pytest
import torch

from incubate.recipe.schema import ModelCfg
from incubate.errors import UserError
from incubate.families import get_family
from incubate.modular import Hybrid
from incubate.data.spec import ImageSpec

FAMILY = get_family("resnet")


def kwargs(name, division, meta_division=None, **kw):
    cfg = ModelCfg(family="resnet", name=name, kwargs=kw, division=list(division))
    div = meta_division or division
    return FAMILY.model_kwargs(cfg, ImageSpec.unnamed(1, 28, 10), list(div), meta=meta_division is not None)


def build(name, division, meta_division=None, seed=0, **kw):
    torch.manual_seed(seed)
    return FAMILY.build(name, kwargs(name, division, meta_division, **kw))


def test_cifar_resnet110_is_he_et_al_2016():
    cfg = ModelCfg(family="resnet", name="cifar_resnet110", division=[18, 18, 18])
    model = FAMILY.build("cifar_resnet110", FAMILY.model_kwargs(cfg, ImageSpec.unnamed(3, 32, 100), [18, 18, 18]))
    assert [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)] == [18, 18, 18, 0]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 16
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert model.fc.in_features == 64
    assert 1.72e6 < sum(p.numel() for p in model.parameters()) < 1.74e6      # "1.7M" in the paper
    assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 8, 8)


def test_meta_blocks_take_their_module_s_stride_and_width_change():
    # module 0 = layer1.0-2 + layer2.0, module 1 = layer2.1-2 + layer3.0, module 2 = layer3.1-2
    assert kwargs("cifar_resnet20", [4, 3, 2], [1, 1, 1])["layers"] == [0, 1, 2, 0]
    assert kwargs("cifar_resnet20", [3, 3, 3], [1, 2, 2])["layers"] == [1, 2, 2, 0]
    meta = build("cifar_resnet20", [4, 3, 2], [1, 1, 1])
    first = meta.layer2[0]
    assert first.conv1.stride == (2, 2) and (first.conv1.in_channels, first.conv1.out_channels) == (16, 32)
    with torch.device("meta"):     # a named ImageNet ResNet: its layout is read from timm
        assert kwargs("resnet50", [3, 4, 6, 3], [1, 1, 1, 1])["layers"] == [1, 1, 1, 1]


@pytest.mark.parametrize("name,division,match", [
    ("cifar_resnet20", [2, 6, 1], "module 1 runs from layer1 into layer3, across 2 stage changes"),
    ("cifar_resnet20", [3, 3, 2], "has 8 blocks but cifar_resnet20 has 9"),
    ("cifar_resnet21", [3, 3, 3], "depth 6n\\+2"),
])
def test_divisions_it_cannot_honour_are_refused_in_one_line(name, division, match):
    with pytest.raises(UserError, match=match) as e:
        kwargs(name, division, [1] * len(division))
    assert "\n" not in str(e.value)


def test_a_module_with_two_shape_changes_cannot_start_as_its_meta_module():
    # resnet26 (Bottleneck): layer1.0 widens 64 -> 32 * 4 and layer2.0 is strided: two changes in module 0
    div, mdiv = [3, 2, 2, 1], [1, 1, 1, 1]
    kw = dict(channels=[32, 32, 32, 32])
    target, meta = build("resnet26", div, **kw), build("resnet26", div, mdiv, **kw)
    with pytest.raises(UserError, match="module 0 has 2 blocks that change shape \\(layer1.0, layer2.0\\)"):
        FAMILY.init_from_meta(target, meta, div, mdiv, 0, mode="meta")
    FAMILY.init_from_meta(target, meta, div, mdiv, 1, mode="meta")     # module 1 holds one: fine


def test_stack_needs_a_meta_block_of_every_shape_in_the_module():
    div = [3, 3, 3]
    target, meta = build("cifar_resnet20", div), build("cifar_resnet20", div, [1, 1, 1])
    FAMILY.init_from_meta(target, meta, div, [1, 1, 1], 0, mode="stack")     # all 16 -> 16: fine
    with pytest.raises(UserError, match="block layer2.1 of module 1 has no block of its shape in meta module 1"):
        FAMILY.init_from_meta(target, meta, div, [1, 1, 1], 1, mode="stack")
    meta2 = build("cifar_resnet20", div, [1, 2, 2])
    FAMILY.init_from_meta(target, meta2, div, [1, 2, 2], 1, mode="stack")
    for j, m in ((0, 0), (1, 1), (2, 1)):     # the strided block from meta block 0, the others from 1
        assert torch.equal(target.layer2[j].conv1.weight, meta2.layer2[m].conv1.weight)


def test_identity_blocks_of_meta_init_still_train():
    div, mdiv = [3, 3, 3], [1, 1, 1]
    target, meta = build("cifar_resnet20", div), build("cifar_resnet20", div, mdiv)
    FAMILY.init_from_meta(target, meta, div, mdiv, 1, mode="meta")
    assert torch.equal(target.layer2[0].conv1.weight, meta.layer2[0].conv1.weight)
    bn = target.layer2[2].bn2
    assert bn.weight.abs().sum() == 0 and bn.bias.abs().sum() == 0
    h = Hybrid(FAMILY, meta, mdiv, FAMILY.keep_only(target, div, 1), div, 1).train()
    torch.nn.functional.cross_entropy(h(torch.randn(4, 1, 12, 12)), torch.tensor([0, 1, 2, 3])).backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0


def test_not_a_resnet_is_refused():
    with pytest.raises(UserError, match="is not a ResNet"):
        FAMILY.build("vit_tiny_patch16_224", {"depth": 2, "num_classes": 2})


def test_import_official_is_refused_for_resnets(tmp_path):
    from incubate.recipe.schema import load_recipe
    from incubate.interop import import_official
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes/fashion_mnist_resnet.yaml")
    with pytest.raises(UserError, match="import-official reads the official code's ViT checkpoints"):
        import_official(recipe, tmp_path / "x.pth", tmp_path / "run", "meta")
    assert not (tmp_path / "run").exists()


def test_grad_checkpointing_is_refused_as_it_would_update_batchnorm_twice(tmp_path):
    from incubate.recipe.schema import load_recipe
    torch.manual_seed(0)
    model = FAMILY.build("cifar_resnet20", {"num_classes": 10, "in_chans": 1}).train()
    model.set_grad_checkpointing(True)        # what timm's own flag does to a training BatchNorm
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 12, 12)), torch.tensor([0, 1, 2, 3])).backward()
    assert model.layer2[0].bn1.num_batches_tracked.item() == 2       # one step, two updates
    recipe = Path(__file__).resolve().parents[2] / "recipes/fashion_mnist_resnet.yaml"
    with pytest.raises(UserError, match="e2e.grad_checkpointing: not for model.family resnet: BatchNorm"):
        load_recipe(recipe, ["e2e.grad_checkpointing=true"])
    with pytest.raises(UserError, match="not for model.family resnet"):
        FAMILY.set_grad_checkpointing(model, True)
