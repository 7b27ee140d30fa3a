"""The family contract: every registered family (incubate.families.FAMILIES) must pass these tests,
each with the tiny configurations it gives in TINY (a new family adds its entries here). The checks
themselves are incubate/contract.py's, so that a family of a user's own meets the same ones
(incubate.check_family, incubate.register_family: tests/unit/test_api.py)."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from incubate import check_family, contract
from incubate.recipe.schema import ModelCfg
from incubate.families import FAMILIES, Family
from incubate.errors import UserError
from incubate.modular import split_state_dict
from incubate.data.spec import ImageSpec, TextSpec


def _load_timm_hub_folder(folder, config):
    """What a timm user does with an exported folder: no code of ours."""
    return timm.create_model(f"local-dir:{folder}", pretrained=True, pretrained_strict=True)


def _load_cifar_resnet(folder, config):
    """The rebuild docs/interop.md gives for a CIFAR ResNet: timm, then the 3x3 stem, then a strict load."""
    m = timm.create_model(config["architecture"], **config["model_args"])
    m.conv1 = torch.nn.Conv2d(config["model_args"]["in_chans"], 16, 3, padding=1, bias=False)
    m.maxpool = torch.nn.Identity()
    m.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return m


def _load_transformers_folder(folder, config):
    """What a transformers user does with an exported language model: no code of ours."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder)


# flat-block transformers the vit family runs, one a kind of structure it checks for: a distillation
# token and head; no position embedding for the class token and layer scale; register tokens with
# average pooling and no class token; an attention-pool head; parallel blocks (two kinds); a post-norm
# block; Eva with rotary embeddings (SwiGLU, average pooling / class token, no absolute position
# embedding); Beit with a relative position bias in every block
VIT_KINDS = ["deit_tiny_distilled_patch16_224", "deit3_small_patch16_224", "vit_medium_patch16_reg4_gap_256",
             "vit_base_patch16_siglip_224", "vit_small_patch16_18x2_224", "vit_base_patch16_xp_224",
             "vit_base_patch16_rpn_224", "eva02_tiny_patch14_224", "vit_base_patch16_rope_224",
             "beit_base_patch16_224"]
CONVNEXT = dict(dims=[8, 16, 24, 32], patch_size=1)      # stem stride 1: 16px images reach the last stage
# division / meta_division: a target and meta model whose modules meta-init can honour (ResNet:
# module 0 crosses into layer2, so its meta block is strided and widening); stack: a division
# pair stack init can honour.
TINY = [
    dict(family="vit", name="vit_tiny_patch16_224", kwargs=dict(patch_size=4, embed_dim=32, num_heads=2),
         division=[2, 3, 2], meta_division=[1, 2, 1], stack=([3, 4, 2], [1, 2, 1]), load=_load_timm_hub_folder),
    *[dict(family="vit", name=name, kwargs=dict(patch_size=4, embed_dim=32, num_heads=2), division=[2, 3, 2],
           meta_division=[1, 2, 1], stack=([3, 4, 2], [1, 2, 1]), load=_load_timm_hub_folder) for name in VIT_KINDS],
    dict(family="resnet", name="cifar_resnet20", kwargs={}, division=[4, 3, 2], meta_division=[1, 1, 1],
         stack=([3, 3, 3], [1, 2, 2]), load=_load_cifar_resnet),
    dict(family="resnet", name="resnet18", kwargs=dict(channels=[64, 32, 32, 32]), division=[3, 2, 2, 1],
         meta_division=[1, 1, 1, 1], stack=([2, 2, 2, 2], [1, 2, 2, 2]), load=_load_timm_hub_folder),
    # ConvNeXt: module 1 crosses three stage boundaries (its meta module: three downsampling layers and
    # the block of stage 3); a ConvNeXt-V2 (global response norm, no layer scale)
    dict(family="convnext", name="convnext_tiny", kwargs=dict(CONVNEXT, depths=[2, 1, 1, 2]),
         division=[2, 3, 1], meta_division=[1, 1, 1], stack=([2, 1, 1, 2], [1, 1, 1, 1]), load=_load_timm_hub_folder),
    dict(family="convnext", name="convnextv2_atto", kwargs=dict(CONVNEXT, depths=[2, 2, 2, 1]),
         division=[3, 3, 1], meta_division=[1, 2, 1], stack=([2, 2, 2, 1], [1, 1, 1, 1]), load=_load_timm_hub_folder),
]
# language models: token ids in (vocabulary CLASSES, context IMG), next-token logits out; one a
# transformers model type the causal_lm family builds (mistral: a sliding window shorter than IMG; granite
# and cohere: model-level constants away from 1, carried by the stem and the head)
LM = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
LM_KWARGS = {"llama": LM, "mistral": dict(LM, sliding_window=5), "qwen2": LM, "qwen3": dict(LM, head_dim=8),
             "olmo": LM, "olmo2": LM, "gemma": dict(LM, head_dim=8), "phi3": LM,
             "gpt2": dict(hidden_size=16, num_attention_heads=2, n_inner=32), "starcoder2": LM,
             "granite": dict(LM, embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5,
                             attention_multiplier=0.25),
             "stablelm": LM, "helium": dict(LM, head_dim=8), "cohere": dict(LM, logit_scale=0.5)}
TINY += [dict(family="causal_lm", name=name, kwargs=kwargs, division=[2, 3, 2], meta_division=[1, 2, 1],
              stack=([3, 4, 2], [1, 2, 1]), load=_load_transformers_folder, tokens=True)
         for name, kwargs in LM_KWARGS.items()]
IDS = [f"{c['family']}-{c['name']}" for c in TINY]
IN_CHANS, IMG, CLASSES = 1, 16, 5


def build(c, division=None, meta=False, seed=0, meta_division=None):
    family = FAMILIES[c["family"]]
    division = division or c["division"]
    cfg = ModelCfg(family=c["family"], name=c["name"], kwargs=dict(c["kwargs"]), division=list(division))
    div = (meta_division or c["meta_division"]) if meta else division
    spec = TextSpec(IMG, CLASSES) if c.get("tokens") else ImageSpec.unnamed(IN_CHANS, IMG, CLASSES)
    kwargs = family.model_kwargs(cfg, spec, list(div), meta=meta)
    torch.manual_seed(seed)
    return family.build(c["name"], kwargs), {"name": c["name"], "kwargs": kwargs}


def x_batch(c):
    g = torch.Generator().manual_seed(1)
    if c.get("tokens"):
        return torch.randint(0, CLASSES, (3, IMG), generator=g)
    return torch.randn(3, IN_CHANS, IMG, IMG, generator=g)


def out(model, x):
    """The model's output tensor (a transformers model returns an output object holding logits)."""
    y = model(x)
    return y.logits if hasattr(y, "logits") else y


def test_every_registered_family_has_a_tiny_config_and_implements_the_protocol():
    assert {c["family"] for c in TINY} == set(FAMILIES)
    assert all(isinstance(f, Family) and f.name == name for name, f in FAMILIES.items())


def test_every_built_in_family_declares_its_tasks_modality_and_refuses_the_other_ones_spec():
    """The API can hand a family the other modality's data description; it is refused in one line."""
    from incubate.tasks import task_of
    for c in {c["family"]: c for c in TINY}.values():
        family = FAMILIES[c["family"]]
        assert family.modality == task_of(family).modality
        cfg = ModelCfg(family=c["family"], name=c["name"], kwargs=dict(c["kwargs"]), division=list(c["division"]))
        other = ImageSpec.unnamed(IN_CHANS, IMG, CLASSES) if c.get("tokens") else TextSpec(IMG, CLASSES)
        with pytest.raises(UserError) as e:
            family.model_kwargs(cfg, other, list(c["division"]))
        assert str(e.value).startswith(f"the {family.name} family builds {family.modality} models but was handed "
                                       f"a description of {other.modality} data") and "\n" not in str(e.value)


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_split_assemble_round_trip(c):
    contract.check_round_trip(FAMILIES[c["family"]], build(c)[0], c["division"])


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_modules_in_sequence_equal_the_model_and_meta_shapes_match_at_every_boundary(c):
    contract.check_modules_compose(FAMILIES[c["family"]], build(c)[0], build(c, meta=True)[0], c["division"],
                                   c["meta_division"], x_batch(c))


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_hybrid_trains_only_its_module_and_leaves_the_meta_model_bitwise(c):
    contract.check_hybrid(FAMILIES[c["family"]], build(c)[0], build(c, meta=True)[0], c["division"],
                          c["meta_division"], x_batch(c))


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_meta_init_makes_every_hybrid_and_the_assembly_compute_the_meta_model(c):
    x = x_batch(c) if c.get("tokens") else x_batch(c) * 2 + 1     # BatchNorm statistics away from 0 and 1
    contract.check_meta_init(FAMILIES[c["family"]], build(c)[0], build(c, meta=True, seed=3)[0], c["division"],
                             c["meta_division"], x)


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_meta_model_of_a_target_is_the_recipes_meta_model_bitwise(c):
    """family.meta_model(target) under a seed builds what the CLI builds from the recipe's meta kwargs."""
    family = FAMILIES[c["family"]]
    target, _ = build(c)
    torch.manual_seed(5)
    made = family.meta_model(target, c["division"], c["meta_division"]).state_dict()
    want = build(c, meta=True, seed=5)[0].state_dict()
    assert made.keys() == want.keys() and all(torch.equal(made[k], want[k]) for k in want)


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_check_family_passes_on_every_registered_family(c):
    """The whole contract as a user's family must meet it (incubate.check_family, run by register_family)."""
    check_family(FAMILIES[c["family"]], build(c)[0], c["division"], x_batch(c), c["meta_division"])


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_stack_init_makes_every_block_a_copy_of_a_meta_block_of_its_module(c):
    family = FAMILIES[c["family"]]
    div, mdiv = c["stack"]
    meta = build(c, division=div, meta=True, meta_division=mdiv, seed=3)[0]
    parts_meta = split_state_dict(family, meta.state_dict(), mdiv, meta)
    for i in range(len(div)):
        target, _ = build(c, division=div)
        family.init_from_meta(target, meta, div, mdiv, i, mode="stack")
        part = split_state_dict(family, target.state_dict(), div, target)[i]
        meta_values = [v for v in parts_meta[i].values()]
        # every tensor of the module equals some tensor of its meta module (block copies, stem, head)
        for key, value in part.items():
            assert any(v.shape == value.shape and torch.equal(v, value) for v in meta_values), (i, key)


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_growth_repeats_the_whole_meta_stack_in_order(c):
    """G_stack (grow_from_meta): target block j is meta block j mod the meta depth; the target's stem
    and head are the meta model's. A family whose blocks are no stack of equal shapes has no such method."""
    family = FAMILIES[c["family"]]
    if not hasattr(family, "grow_from_meta"):
        assert c["family"] in ("resnet", "convnext")   # stages change width: `incubate grow` refuses it in one line
        return
    div, mdiv = [2, 3, 2], [1, 1, 1]
    meta = build(c, division=div, meta=True, meta_division=mdiv, seed=3)[0]
    target, _ = build(c, division=div)
    family.grow_from_meta(target, meta)
    meta_parts = split_state_dict(family, meta.state_dict(), mdiv, meta)
    parts = split_state_dict(family, target.state_dict(), div, target)
    own = lambda part, prefix: {k[len(prefix):]: v for k, v in part.items() if k.startswith(prefix)}
    stacks = (torch.nn.ModuleList, torch.nn.Sequential)
    layers = lambda m: next(n for n, mod in m.named_modules()      # the block stack: the first list of depth blocks
                            if isinstance(mod, stacks) and len(mod) == family.depth(m))
    t_prefix, m_prefix = layers(target), layers(meta)
    t_state, m_state = target.state_dict(), meta.state_dict()
    for j in range(sum(div)):
        t, m = own(t_state, f"{t_prefix}.{j}."), own(m_state, f"{m_prefix}.{j % sum(mdiv)}.")
        assert t.keys() == m.keys() and all(torch.equal(t[k], m[k]) for k in t), j
    for i in (0, len(div) - 1):     # stem and head: every non-block tensor equals the meta model's
        blocks = lambda k: k.startswith(f"{t_prefix}.")
        for key, value in parts[i].items():
            if not blocks(key):
                assert torch.equal(value, meta_parts[i][key]), key


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_export_loads_in_the_familys_own_library(c, tmp_path):
    """timm for the image families, transformers for causal_lm: the export's config.json and weights
    rebuild the model with no code of ours."""
    family = FAMILIES[c["family"]]
    model, spec = build(c)
    model.eval()
    data_config = {"input_size": (IN_CHANS, IMG, IMG), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0,
                   "interpolation": "bilinear"}
    config = family.export_config(model, spec, data_config, [str(i) for i in range(CLASSES)])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = c["load"](tmp_path, json.loads((tmp_path / "config.json").read_text())).eval()
    torch.testing.assert_close(out(plain, x_batch(c)), out(model, x_batch(c)), rtol=0, atol=0)


@pytest.mark.parametrize("c", TINY, ids=IDS)
def test_block_modules_are_the_depths_blocks_in_order_and_hold_every_block_weight(c):
    """What fsdp shards one by one: one module a block, distinct, in forward order, and together with
    the stem and head every parameter of the model."""
    family = FAMILIES[c["family"]]
    model = build(c)[0]
    blocks = family.block_modules(model)
    assert len(blocks) == family.depth(model) and len({id(b) for b in blocks}) == len(blocks)
    names = {id(m): n for n, m in model.named_modules()}
    order = [list(names).index(id(b)) for b in blocks]
    assert order == sorted(order)
    one_each = [1] * len(blocks)        # module i is block i: the owner of a block's weight is its index
    block_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in block_of]
    assert len(named) < len(list(model.parameters()))      # the stem and the head stay outside
    assert all(family.owner(n, one_each, model) == block_of[id(p)] for n, p in named)
