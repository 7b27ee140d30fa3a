"""The public API (import incubate): a family of the user's own through register_family and the
contract, a plain PyTorch loop training hybrids, the run directory read and written from a script
so that `incubate assemble` takes the modules, and the refusals (docs/errors.md rows 68-74)."""
import copy

import pytest
import torch
from torch import nn

import incubate
from incubate import families
from incubate.families.base import module_of, remember_spec

from ..conftest import one_error_line, run_main


class Stack(nn.Module):
    """A model of a user's own: an input projection, residual MLP blocks, a classifier."""

    def __init__(self, width=8, depth=4, classes=3):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        x = self.inp(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.out(x)


class StackFamily:
    """Its adapter: the Family protocol, each method a line or two."""
    name = "stack"

    def validate(self, cfg):
        pass

    def model_kwargs(self, cfg, spec, division, meta=False):
        return dict(cfg.kwargs, depth=sum(division), classes=spec.classes)

    def build(self, name, kwargs, drop_path=0.0):
        return remember_spec(Stack(**kwargs), name, kwargs)

    def depth(self, model):
        return len(model.blocks)

    def owner(self, key, division, model=None):
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        return module_of(key, block, division, ("inp.",), ("out.",), "stack")

    def stem(self, model, x):
        return model.inp(x)

    def blocks(self, model, x, start, stop):
        for blk in model.blocks[start:stop]:
            x = x + blk(x)
        return x

    def head(self, model, x):
        return model.out(x)

    def set_grad_checkpointing(self, model, enable=True):
        pass

    def init_from_meta(self, target, meta, division, meta_division, index, mode="meta"):
        from incubate.families.base import Slot, copy_stem_and_head, init_blocks_from_meta
        init_blocks_from_meta(target.blocks, meta.blocks, Slot(division, meta_division, index), mode,
                              lambda blk: [blk[0]], "stack")
        copy_stem_and_head(target, meta, index, len(division), ("inp.",), ("out.",))

    def keep_modules(self, model, division, keep):
        for j in range(len(model.blocks)):
            if self.owner(f"blocks.{j}.", division) not in keep:
                model.blocks[j] = nn.Identity()
        if 0 not in keep:
            model.inp = nn.Identity()
        if len(division) - 1 not in keep:
            model.out = nn.Identity()
        return model

    def keep_only(self, model, division, index):
        return self.keep_modules(model, division, {index})

    def meta_model(self, target, division, meta_division):
        width, classes = target.blocks[0][0].in_features, target.out.out_features
        return Stack(width, sum(meta_division), classes)

    def export_config(self, model, spec, data_config, label_names):
        return {"kwargs": spec["kwargs"]}


class HeadlessFamily(StackFamily):
    """A broken adapter: it says the classifier belongs to module 0, so module K-1's keep_only keeps it
    out while the split gives it to module 0."""
    name = "headless"

    def owner(self, key, division, model=None):
        return 0 if key.startswith("out.") else super().owner(key, division, model)


@pytest.fixture
def registry(monkeypatch):
    """A registry this test may add to; the built-in one is left as it was."""
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    return families.FAMILIES


X = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 3


def test_public_names_are_few_and_documented():
    assert set(incubate.__all__) <= set(dir(incubate))
    for name in incubate.__all__:
        assert getattr(incubate, name).__doc__, name


def test_a_family_of_ones_own_registers_and_a_plain_loop_trains_every_hybrid(registry):
    fam = incubate.register_family(StackFamily(), Stack(depth=4), [2, 2], X)
    assert incubate.get_family("stack") is fam
    torch.manual_seed(0)
    target = Stack(depth=4)
    meta = incubate.meta_model(target, [2, 2], "stack")
    assert len(meta.blocks) == 2 and meta.blocks[0][0].in_features == 8
    nets = []
    for i in range(2):
        net = incubate.hybrid(copy.deepcopy(meta), copy.deepcopy(target), i, module_init="meta")
        trained = [p for p in net.parameters() if p.requires_grad]
        assert {id(p) for p in trained} == {id(p) for p in net.runner.parameters()}
        before = {k: v.clone() for k, v in net.meta.state_dict().items()}
        opt = torch.optim.AdamW(trained, lr=1e-2)
        losses = []
        for _ in range(30):        # a plain PyTorch loop
            loss = nn.functional.cross_entropy(net(X), Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert all(torch.equal(before[k], v) for k, v in net.meta.state_dict().items())
        nets.append(net)
    whole = incubate.assemble(incubate.divide(Stack(depth=4), [2, 2], "stack"), nets)
    for i, net in enumerate(nets):         # the assembled model holds every trained module's weights
        for key, value in net.runner.model.state_dict().items():
            assert torch.equal(whole.state_dict()[key], value), (i, key)


def test_a_family_failing_the_contract_is_refused_in_one_line_and_not_registered(registry):
    with pytest.raises(incubate.UserError) as e:
        incubate.register_family(HeadlessFamily(), Stack(depth=4), [2, 2], X)
    assert str(e.value).startswith("family 'headless' fails the contract: keep_only(module 0) does not hold exactly")
    assert "headless" not in registry
    half = type("Half", (), {"name": "half", "depth": StackFamily.depth})()
    with pytest.raises(incubate.UserError, match="'half' fails the contract: it lacks validate, model_kwargs, build, owner"):
        incubate.check_family(half, Stack(depth=4), [2, 2], X)
    with pytest.raises(incubate.UserError, match="a family named 'vit' is registered already"):
        incubate.register_family(type("Vit", (StackFamily,), {"name": "vit"})(), Stack(depth=4), [2, 2], X)


def test_refusals_of_the_api(registry):
    incubate.register_family(StackFamily(), Stack(depth=4), [2, 2], X)
    target = Stack(depth=4)
    meta = incubate.meta_model(target, [2, 2], "stack")
    with pytest.raises(incubate.UserError, match=r"^module index 2 is out of range: the target is divided into 2 "
                                                 r"modules \(0..1\)$"):
        incubate.hybrid(meta, target, 2)
    with pytest.raises(incubate.UserError, match="at weight 'inp.weight' .* not the same width"):
        incubate.hybrid(meta, Stack(width=6, depth=4), 0)
    with pytest.raises(incubate.UserError, match=r"made for a stack target divided \[2, 2\], not this stack target "
                                                 r"divided \[1, 3\]"):
        incubate.hybrid(meta, incubate.divide(Stack(depth=4), [1, 3], "stack"), 0)
    with pytest.raises(incubate.UserError, match=r"the target has 6 blocks but its meta model was made for a "
                                                 r"division of 4 \(\[2, 2\]\)"):
        incubate.hybrid(meta, Stack(depth=6), 0)
    with pytest.raises(incubate.UserError, match=r"division \[2, 3\] has 5 blocks but the stack model has 4"):
        incubate.meta_model(Stack(depth=4), [2, 3], "stack")
    with pytest.raises(incubate.UserError, match="not a list of positive block counts"):
        incubate.divide(Stack(depth=4), [4, 0], "stack")
    with pytest.raises(incubate.UserError, match="unknown model.family 'stak'"):
        incubate.divide(Stack(depth=4), [2, 2], "stak")
    with pytest.raises(incubate.UserError, match="is not a meta model incubate knows"):
        incubate.hybrid(Stack(depth=2), target, 0)
    net0 = incubate.hybrid(meta, copy.deepcopy(target), 0)
    with pytest.raises(incubate.UserError, match="taken over by a hybrid already"):
        incubate.hybrid(meta, target, 1)
    fresh = incubate.divide(Stack(depth=4), [2, 2], "stack")
    with pytest.raises(incubate.UserError, match=r"1 modules given for a target divided into 2"):
        incubate.assemble(fresh, [net0])
    with pytest.raises(incubate.UserError, match=r"modules\[1\] is the hybrid of module 0"):
        incubate.assemble(fresh, [net0, net0])
    with pytest.raises(incubate.UserError, match="module 1 holds weight 'inp.weight' that belongs to module 0"):
        incubate.assemble(fresh, [net0.runner.model.state_dict(), net0.runner.model.state_dict()])
    taken = copy.deepcopy(target)
    incubate.hybrid(incubate.meta_model(taken, [2, 2], "stack"), taken, 0)
    with pytest.raises(incubate.UserError, match="this target was taken over by a hybrid already"):
        incubate.hybrid(incubate.meta_model(Stack(depth=4), [2, 2], "stack"), taken, 1)
    with pytest.raises(incubate.UserError, match="assemble needs a whole, divided target"):
        incubate.assemble(taken, [net0, net0])


def _train_a_little(net, x, y, steps=3):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_modules_trained_in_a_script_are_assembled_by_the_cli(tiny_recipe, tmp_path, capsys):
    """The CLI's meta model into a script, hybrids trained by a plain loop, written back with
    save_module: `incubate assemble` takes them (its weights are incubate.assemble's) and
    `incubate finetune` fine-tunes them."""
    import json
    from safetensors.torch import load_file
    run = tmp_path / "run"
    assert run_main(capsys, "meta", "--recipe", tiny_recipe, "--out", run)[0] == 0
    meta = incubate.load_stage(run, "meta")
    shape = json.loads((run / "meta/manifest.json").read_text())["preprocess"]["input_size"]
    x, y = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    nets = []
    for i in range(4):
        torch.manual_seed(i)
        net = incubate.hybrid(copy.deepcopy(meta), incubate.target_model(run), i)
        _train_a_little(net, x, y)
        m = incubate.save_module(net, run, metrics={"top1": 10.0, "loss": 2.3})
        assert m["finished"] and (run / f"modules/{i}/model.safetensors").exists()
        nets.append(net)
    rc, out, _ = run_main(capsys, "incubate", "--recipe", tiny_recipe, "--out", run, "--module", "1")
    assert rc == 0 and "already finished" in out            # the CLI takes the script's module as done
    assert run_main(capsys, "assemble", "--recipe", tiny_recipe, "--out", run)[0] == 0
    cli = load_file(run / "assembled/model.safetensors")
    ours = incubate.assemble(incubate.target_model(run), nets).state_dict()
    assert cli.keys() == ours.keys() and all(torch.equal(cli[k], ours[k]) for k in cli)
    other = copy.deepcopy(nets[1])
    other.fingerprint = "f" * 64              # as a hybrid of another run's meta model
    with pytest.raises(incubate.UserError, match="the hybrids were made from 2 different meta models"):
        incubate.assemble(incubate.target_model(run), [nets[0], other, nets[2], nets[3]])
    assembled = incubate.load_stage(run, "assembled")
    assert all(torch.equal(assembled.state_dict()[k], cli[k]) for k in cli)
    assert set(incubate.load_stage(run, "incubate", module=2).state_dict()) == set(
        load_file(run / "modules/2/model.safetensors"))

    with pytest.raises(incubate.UserError, match=r"modules/0 holds a finished module 0 already; delete that folder"):
        incubate.save_module(incubate.hybrid(copy.deepcopy(meta), incubate.target_model(run), 0), run)
    foreign = incubate.meta_model(incubate.target_model(run), [1, 1, 1, 1], "vit")
    with pytest.raises(incubate.UserError, match="the hybrid's meta model is not the one in"):
        incubate.save_module(incubate.hybrid(foreign, incubate.target_model(run), 3), run)
    with pytest.raises(incubate.UserError, match="finetune has not finished"):
        incubate.load_stage(run, "finetune")
    with pytest.raises(incubate.UserError, match="stage 'meta_model' is none of meta, assembled"):
        incubate.load_stage(run, "meta_model")
    assert run_main(capsys, "finetune", "--recipe", tiny_recipe, "--out", run)[0] == 0     # and fine-tunes them
    assert set(incubate.load_stage(run, "finetune").state_dict()) == set(cli)


def test_meta_model_refuses_a_target_whose_architecture_it_cannot_tell():
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=2)
    with pytest.raises(incubate.UserError, match="this VisionTransformer was not built by the vit family"):
        incubate.meta_model(vit, [1, 1], "vit")
    tied = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                        intermediate_size=32, num_hidden_layers=2, vocab_size=32,
                                        tie_word_embeddings=True))
    with pytest.raises(incubate.UserError, match="the target ties its input and output embeddings"):
        incubate.meta_model(tied, [1, 1], "causal_lm")
