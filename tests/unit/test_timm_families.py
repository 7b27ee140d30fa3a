"""timm beyond ViT and ResNet: what the vit family refuses after looking at the built model, and the
convnext family's own refusals and grad checkpointing (tests/unit/test_family_contract.py runs the
contract over one tiny model of every kind they accept)."""
import pytest
import timm
import torch

from incubate.recipe.schema import ModelCfg
from incubate.errors import UserError
from incubate.families import FAMILIES
from incubate.families.vit import check_structure
from incubate.modular import run_module
from incubate.data.spec import ImageSpec
from ..conftest import one_error_line, run_main, write_recipe

TINY_VIT = {"patch_size": 4, "embed_dim": 16, "num_heads": 2}
TINY_CONVNEXT = {"depths": [2, 1, 1, 2], "dims": [8, 16, 24, 32], "patch_size": 1}
SPEC = ImageSpec.unnamed(1, 16, 5)      # 16 px one-channel images of 5 classes


@pytest.mark.parametrize("name, kwargs, expected", [
    ("samvit_base_patch16", {}, "model.name 'samvit_base_patch16' builds a timm VisionTransformerSAM, whose forward "
     "the vit family does not know: it runs VisionTransformer, Eva and Beit, whose blocks are one flat sequence; "
     "use a vit_*, deit_*, eva02_* or beit_* name"),
    ("cait_xxs24_224", {}, "model.name 'cait_xxs24_224' builds a timm Cait (it has more than one stack of blocks: "
     "blocks, blocks_token_only), whose forward the vit family does not know"),
    ("vit_relpos_small_patch16_224", {}, "builds a timm VisionTransformerRelPos, whose forward"),
    ("vit_base_patch16_rope_mixed_224", {}, "model.name 'vit_base_patch16_rope_mixed_224': its rotary position "
     "embedding has weights (rope_type mixed) that every block uses, which the vit family cannot recompute for "
     "every module alike; use fixed rotary embeddings (rope_type cat or dinov3 without coordinate augmentation, "
     "no dynamic_img_size, no patch_drop_rate)"),
    ("vit_base_patch16_rope_224", {"rope_shift_coords": 1.0}, "its rotary position embedding is drawn at random "
     "in training (rope_shift/jitter/rescale_coords)"),
    ("vit_7b_patch16_dinov3", {}, "dynamic_img_size makes its rotary position embedding depend on each input's grid"),
    ("eva02_tiny_patch14_224", {"patch_drop_rate": 0.1}, "patch dropout gives each image its own rotary position "
     "embedding"),
    ("beit_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False},
     "model.name 'beit_base_patch16_224' with use_shared_rel_pos_bias: one relative position bias outside the "
     "blocks serves every block, so it belongs to no one module; set use_shared_rel_pos_bias: false (each block "
     "keeps its own: use_rel_pos_bias: true)"),
], ids=["samvit", "cait", "relpos", "rope_mixed", "rope_shift", "dinov3_dynamic", "eva_patch_drop", "beit_shared"])
def test_vit_refusals_come_when_the_recipe_is_read_and_write_nothing(tmp_path, capsys, name, kwargs, expected):
    recipe = write_recipe(tmp_path / "r.yaml", model__name=name, model__kwargs=dict(TINY_VIT, **kwargs))
    rc, _, err = run_main(capsys, "run", "--recipe", recipe, "--out", tmp_path / "run")
    assert rc == 2 and expected in one_error_line(err)
    assert not (tmp_path / "run").exists()


class _Other(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(x)


def test_blocks_of_two_kinds_or_of_an_unknown_kind_are_refused():
    """A model whose blocks are not alike, or of a kind whose residual branches the family does not know
    (timm adds block kinds: the check looks at the blocks, not at the name)."""
    model = timm.create_model("vit_tiny_patch16_224", depth=3, **TINY_VIT, img_size=16)
    model.blocks[1] = _Other(16)
    with pytest.raises(UserError, match=r"^model.name 'x': its blocks are not alike \(Block, _Other, 2 weight "
                                        r"layouts\), but the vit family copies blocks between depths"):
        check_structure("x", model)
    model.blocks = torch.nn.Sequential(*[_Other(16) for _ in range(3)])
    with pytest.raises(UserError, match=r"^model.name 'x': its blocks are timm _Other, whose residual branches the "
                                        r"vit family cannot start as the identity \(module_init meta\)"):
        check_structure("x", model)


def _convnext_cfg(name="convnext_tiny", division=(2, 3, 1), **kwargs):
    return ModelCfg(family="convnext", name=name, kwargs=dict(TINY_CONVNEXT, **kwargs), division=list(division))


def test_convnext_refusals(tmp_path, capsys):
    family = FAMILIES["convnext"]
    with pytest.raises(UserError, match=r"^model.name 'resnet18' builds a timm ResNet, not a ConvNeXt; "
                                        r"model.family convnext needs a convnext_\*/convnextv2_\* name$"):
        family.validate(ModelCfg(family="convnext", name="resnet18", kwargs={"layers": [1, 1, 1, 1]}, division=[2, 2]))
    recipe = write_recipe(tmp_path / "r.yaml", model=dict(family="convnext", name="convnext_tiny",
                                                          kwargs=TINY_CONVNEXT, division=[2, 2]))
    rc, _, err = run_main(capsys, "run", "--recipe", recipe, "--out", tmp_path / "run")
    assert rc == 2 and one_error_line(err) == ("incubate: error: model.division [2, 2] has 4 blocks but convnext_tiny "
                                               "has 6 (depths [2, 1, 1, 2]); make the division sum to 6")
    assert not (tmp_path / "run").exists()
    cfg = _convnext_cfg(division=(3, 3))      # module 1: stages.1-3, with 2 blocks in stages.3
    target = family.build(cfg.name, family.model_kwargs(cfg, SPEC, [3, 3]))
    meta = family.build(cfg.name, family.model_kwargs(cfg, SPEC, [1, 2], meta=True))
    family.init_from_meta(target, meta, [3, 3], [1, 2], 1, mode="meta")      # 2 blocks there: honoured
    meta = family.build(cfg.name, family.model_kwargs(cfg, SPEC, [1, 3], meta=True))
    with pytest.raises(UserError, match=r"^module_init meta: module 1 has 2 blocks in its last stage \(stages.3\), "
                                        r"fewer than the meta module's 3; give it more blocks there"):
        family.init_from_meta(target, meta, [3, 3], [1, 3], 1, mode="meta")
    with pytest.raises(UserError, match=r"^module_init stack: block stages.0.blocks.0 of module 0 has no block of "
                                        r"its width in meta module 0 \(whose blocks are all in the module's last "
                                        r"stage\); use module_init meta"):
        family.init_from_meta(target, meta, [3, 3], [1, 3], 0, mode="stack")


def test_convnext_meta_model_keeps_the_downsampling_of_stages_without_blocks():
    family, cfg = FAMILIES["convnext"], _convnext_cfg()
    kwargs = family.model_kwargs(cfg, SPEC, [1, 1, 1], meta=True)
    assert kwargs["depths"] == [1, 0, 0, 2]     # module 1 ends in stage 3: its meta block is there
    meta = family.build(cfg.name, kwargs)
    owners = {k: family.owner(k, [1, 1, 1], meta) for k in meta.state_dict() if "downsample" in k}
    assert {k.split(".")[1] for k in owners} == {"1", "2", "3"} and set(owners.values()) == {1}


def test_convnext_grad_checkpointing_recomputes_blocks_and_gives_the_same_gradients(monkeypatch):
    import incubate.families.convnext as mod
    family, cfg = FAMILIES["convnext"], _convnext_cfg()
    torch.manual_seed(0)
    model = family.build(cfg.name, family.model_kwargs(cfg, SPEC, [2, 3, 1]))
    x = torch.randn(2, 1, 16, 16)

    def loss_and_grads():
        model.zero_grad()
        h = x
        for i in range(3):
            h = run_module(family, model, [2, 3, 1], i, h)
        h.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = loss_and_grads()
    seen = []
    monkeypatch.setattr(mod, "checkpoint", lambda *a, **k: seen.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))
    family.set_grad_checkpointing(model, True)
    got = loss_and_grads()
    assert len(seen) == 6
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
