"""The causal_lm family: stem + blocks + head is the model, modules own disjoint weights, the
meta and stack initialisations, what is refused, and bits per byte."""
import math
from types import SimpleNamespace

import pytest
import torch

from incubate.errors import UserError
from incubate.families import get_family
from incubate.modular import Hybrid, assemble_state_dict, run_module, split_state_dict
from incubate.tasks import get_task

FAM = get_family("causal_lm")
KW = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32}


def _model(depth, seed=0, **kw):
    cfg = SimpleNamespace(name="llama", kwargs=dict(KW, **kw))
    torch.manual_seed(seed)
    return FAM.build("llama", FAM.model_kwargs(cfg, 256, 1, 24, [depth])).eval()


@pytest.mark.parametrize("division", [[1, 1, 1, 1], [2, 1, 3], [6]])
def test_stem_blocks_head_is_exactly_the_models_logits(division):
    model = _model(sum(division))
    x = torch.randint(0, 256, (3, 24))
    h = x
    for i in range(len(division)):
        h = run_module(FAM, model, division, i, h)
    assert torch.equal(h, model(x).logits)


def test_modules_own_disjoint_weights_and_assemble_back():
    model = _model(4)
    parts = split_state_dict(FAM, model.state_dict(), [2, 1, 1], model)
    assert "model.embed_tokens.weight" in parts[0] and {"lm_head.weight", "model.norm.weight"} <= set(parts[2])
    assert all(k.startswith("model.layers.2.") for k in parts[1])
    assert assemble_state_dict(FAM, parts, [2, 1, 1], model).keys() == model.state_dict().keys()


def test_meta_init_makes_hybrid_and_assembly_start_as_the_meta_model():
    meta, target = _model(2, seed=1), _model(4, seed=2)
    division, meta_division = [2, 2], [1, 1]
    x = torch.randint(0, 256, (2, 24))
    for i in range(2):
        FAM.init_from_meta(target, meta, division, meta_division, i, mode="meta")
    assert torch.allclose(target(x).logits, meta(x).logits, atol=1e-5)
    FAM.keep_only(target, division, 1)
    hybrid = Hybrid(FAM, _model(2, seed=1), meta_division, target, division, 1).eval()
    assert torch.allclose(hybrid(x), meta(x).logits, atol=1e-5)


def test_stack_init_copies_meta_layers_into_every_layer():
    meta, target = _model(2, seed=1), _model(6, seed=2)
    FAM.init_from_meta(target, meta, [3, 3], [1, 1], 1, mode="stack")
    for j in (3, 4, 5):
        a, b = target.model.layers[j].state_dict(), meta.model.layers[1].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(target.lm_head.weight, meta.lm_head.weight)
    assert not torch.equal(target.model.embed_tokens.weight, meta.model.embed_tokens.weight)   # module 0's


@pytest.mark.parametrize("kwargs, expected", [
    ({"tie_word_embeddings": True}, "would share one tensor between module 0"),
    ({"num_hidden_layers": 4}, "model.kwargs.num_hidden_layers is set by deep-incubate"),
    ({"vocab_size": 100}, "model.kwargs.vocab_size is set by deep-incubate"),
])
def test_refused_kwargs(kwargs, expected):
    with pytest.raises(UserError, match=expected):
        FAM.model_kwargs(SimpleNamespace(name="llama", kwargs=dict(KW, **kwargs)), 256, 1, 16, [4])
    with pytest.raises(UserError, match="use model.name: llama"):
        FAM.model_kwargs(SimpleNamespace(name="gpt2", kwargs=KW), 256, 1, 16, [4])


def test_bits_per_byte_is_total_nats_over_ln2_over_bytes():
    task = get_task("causal_lm")
    logits = torch.randn(2, 5, 256)
    y = torch.randint(0, 256, (2, 5))
    sums = task.eval_sums(logits, y)
    m = task.metrics(sums, SimpleNamespace(test_bytes=10))
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="sum").item()
    assert m["bpb"] == pytest.approx(nats / math.log(2) / 10) and m["loss"] == pytest.approx(nats / 10)
    assert m["acc"] == pytest.approx(100 * (logits.argmax(-1) == y).float().mean().item())
    with pytest.raises(UserError, match="mixup and cutmix mix images"):
        task.criteria(SimpleNamespace(mixup=0.8, cutmix=0.0, label_smoothing=0.0), None)


def test_grad_checkpointing_is_refused_for_a_language_model(tmp_path):
    from incubate.config import load_recipe
    from ..conftest import TINY_LM, write_recipe
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, incubate__grad_checkpointing=True)
    with pytest.raises(UserError, match="incubate.grad_checkpointing: not for model.family causal_lm: its decoder layers"):
        load_recipe(recipe)
