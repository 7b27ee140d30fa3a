"""Division, hybrid and assembly on a real timm ViT (what every family must do is in
test_family_contract.py; this file keeps the ViT specifics and the hybrid's autograd details)."""
import copy

import torch
import timm

from incubate.families import get_family
from incubate.modular import Hybrid, assemble_state_dict, run_module, split_state_dict

FAMILY = get_family("vit")
KW = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, in_chans=1, num_classes=5)


def vit(depth, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=depth, **dict(KW, **kw))


def test_split_assemble_round_trip_uneven():
    model = vit(7)
    division = [1, 3, 2, 1]
    state = model.state_dict()
    parts = split_state_dict(FAMILY, state, division, model)
    assert {k for k in parts[0] if not k.startswith("blocks.")} == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert {k for k in parts[-1] if not k.startswith("blocks.")} == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert {k.split(".")[1] for k in parts[1]} == {"1", "2", "3"}
    back = assemble_state_dict(FAMILY, parts, division, model)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_assemble_refuses_key_in_wrong_module():
    model = vit(4)
    parts = split_state_dict(FAMILY, model.state_dict(), [2, 2], model)
    import pytest
    from incubate.errors import UserError
    with pytest.raises(UserError, match="belongs to module 1"):
        assemble_state_dict(FAMILY, [parts[1], parts[0]], [2, 2], model)


def _hybrid(index, meta_div=(1, 1, 1), div=(2, 2, 2)):
    meta = vit(sum(meta_div))
    target = FAMILY.keep_only(vit(sum(div), drop_path_rate=0.1), list(div), index)
    return Hybrid(FAMILY, meta, list(meta_div), target, list(div), index)


def test_hybrid_prefix_builds_no_graph_and_suffix_passes_gradient():
    h = _hybrid(1)
    seen = {}
    h.runner.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    out = h(torch.randn(2, 1, 16, 16))
    assert seen["input"].grad_fn is None and not seen["input"].requires_grad   # prefix ran under no_grad
    assert out.requires_grad     # the suffix carries the gradient back to the target module


def test_meta_init_blocks_still_train():
    meta_div, div = [1, 1], [3, 3]
    meta = vit(2)
    target = vit(6)
    FAMILY.init_from_meta(target, meta, div, meta_div, 1)
    h = Hybrid(FAMILY, meta, meta_div, FAMILY.keep_only(target, div, 1), div, 1)
    torch.nn.functional.cross_entropy(h(torch.randn(4, 1, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    zeroed = target.blocks[4].attn.proj.weight
    assert zeroed.abs().sum() == 0 and zeroed.grad is not None and zeroed.grad.abs().sum() > 0


def test_stack_init_copies_the_meta_block_into_every_block_of_the_module():
    meta_div, div = [1, 2, 1], [3, 4, 2]
    meta = vit(sum(meta_div)).eval()
    target = vit(sum(div)).eval()
    FAMILY.init_from_meta(target, meta, div, meta_div, 1, mode="stack")
    for j, m in zip(range(3, 7), (1, 2, 1, 2)):       # module 1's blocks cycle through meta blocks 1, 2
        for (name, a), b in zip(target.blocks[j].state_dict().items(), meta.blocks[m].state_dict().values()):
            assert torch.equal(a, b), (j, name)
    untouched = vit(sum(div))
    for j in (0, 1, 2, 7, 8):                          # other modules keep their own initialisation
        assert all(torch.equal(a, b) for a, b in zip(target.blocks[j].state_dict().values(),
                                                      untouched.blocks[j].state_dict().values()))
    # the hybrid applies meta block 1 and 2 twice each, so it no longer computes the meta model
    x = torch.randn(2, 1, 16, 16)
    h = Hybrid(FAMILY, copy.deepcopy(meta), meta_div, FAMILY.keep_only(target, div, 1), div, 1).eval()
    tokens = meta.norm_pre(meta._pos_embed(meta.patch_embed(x)))
    tokens = meta.blocks[0](tokens)
    for m in (1, 2, 1, 2, 3):
        tokens = meta.blocks[m](tokens)
    torch.testing.assert_close(h(x), meta.forward_head(meta.norm(tokens)), rtol=1e-5, atol=1e-5)


def test_stack_init_copies_stem_and_head():
    meta_div, div = [1, 1], [2, 2]
    meta = vit(2)
    target = vit(4)
    FAMILY.init_from_meta(target, meta, div, meta_div, 0, mode="stack")
    FAMILY.init_from_meta(target, meta, div, meta_div, 1, mode="stack")
    for key in ("pos_embed", "cls_token", "patch_embed.proj.weight", "norm.weight", "head.weight"):
        assert torch.equal(target.state_dict()[key], meta.state_dict()[key]), key


def test_official_suffix_semantics_same_target_grads_but_wasted_suffix_grads():
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    for index in range(3):
        grads, suffix = {}, {}
        for frozen in (True, False):
            h = Hybrid(FAMILY, vit(3), [1, 1, 1], FAMILY.keep_only(vit(6), [2, 2, 2], index), [2, 2, 2], index,
                       frozen_suffix_grads=frozen).train()
            for _ in range(2):     # two backwards: official suffix grads accumulate (nobody clears them)
                torch.nn.functional.cross_entropy(h(x), y).backward()
            grads[frozen] = {k: p.grad.clone() for k, p in h.runner.named_parameters()}
            suffix[frozen] = h.meta_suffix_parameters()
            owned = {id(p) for p in suffix[frozen]}
            others = [p for p in h.meta.parameters() if id(p) not in owned]
            assert all(p.grad is None and not p.requires_grad for p in others)   # prefix and module i
            if frozen:
                assert all(p.grad is None and not p.requires_grad for p in suffix[frozen])
            else:
                assert all(p.requires_grad for p in suffix[frozen])
                # every weight of every later meta module got a gradient (none after the last module)
                assert all(p.grad is not None for p in suffix[frozen])
                assert index == 2 or any(p.grad.abs().sum() > 0 for p in suffix[frozen])
        # the later meta blocks, plus norm.* and head.* that the last module owns
        assert len(suffix[True]) == (2 - index) * len(list(vit(1).blocks[0].parameters())) + (4 if index < 2 else 0)
        assert grads[True].keys() == grads[False].keys()
        for k in grads[True]:
            assert torch.equal(grads[True][k], grads[False][k]), k


def test_frozen_suffix_grads_is_a_typed_incubate_setting(tiny_recipe):
    from incubate.recipe.schema import load_recipe
    from incubate.errors import UserError
    r = load_recipe(tiny_recipe, ["incubate.frozen_suffix_grads=false"])
    assert r.stage("incubate").frozen_suffix_grads is False and r.stage("meta").frozen_suffix_grads is True
    import pytest
    with pytest.raises(UserError, match="frozen_suffix_grads' must be of type bool"):
        load_recipe(tiny_recipe, ["incubate.frozen_suffix_grads=maybe"])


def test_hybrid_holds_the_meta_model_less_the_replaced_module():
    meta_keys = split_state_dict(FAMILY, vit(3).state_dict(), [1, 1, 1], vit(3))
    x = torch.randn(2, 1, 16, 16)
    for index in range(3):
        h = _hybrid(index)
        expected = {k for j, part in enumerate(meta_keys) if j != index for k in part}
        assert set(h.meta.state_dict()) == expected
        assert h(x).shape == (2, 5)        # and the hybrid still runs end to end


def test_shared_data_order_gives_every_module_job_the_same_seed(tiny_recipe, tmp_path, monkeypatch):
    """Ours: each module job its own data order (seed + 1 + module); shared_data_order: the official
    code's single order (seed + 1 for every job)."""
    from incubate.recipe.schema import load_recipe
    from incubate.stages import incubate, meta
    run = tmp_path / "run"
    meta.main(load_recipe(tiny_recipe), run)
    seen = {}

    def fake_fit(part, cfg, bundle, data_cfg, run):
        seen.setdefault(cfg.shared_data_order, []).append(run.seed)
        raise RuntimeError("stop after the seed is known")

    monkeypatch.setattr(incubate, "fit", fake_fit)
    import pytest
    for shared in (False, True):
        for module in (0, 2):
            with pytest.raises(RuntimeError, match="stop after"):
                incubate.main(load_recipe(tiny_recipe, [f"incubate.shared_data_order={str(shared).lower()}"]),
                              run, module)
            from incubate.store.lock import release
            release(run / "modules" / str(module))
    assert seen == {False: [1, 3], True: [1, 1]}
