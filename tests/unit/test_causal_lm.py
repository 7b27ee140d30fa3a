"""The causal_lm family: stem + blocks + head is the model, modules own disjoint weights, the
meta and stack initialisations, what is refused, and bits per byte."""
import math
import re
from types import SimpleNamespace

import pytest
import torch

from incubate.errors import UserError
from incubate.families import get_family
from incubate.modular import Hybrid, assemble_state_dict, run_module, split_state_dict
from incubate.tasks import get_task
from incubate.data.spec import TextSpec

from .test_family_contract import LM_KWARGS

FAM = get_family("causal_lm")
KW = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32}


def _model(depth, seed=0, name="llama", **kw):
    cfg = SimpleNamespace(name=name, kwargs=dict(LM_KWARGS[name], **kw))
    torch.manual_seed(seed)
    return FAM.build(name, FAM.model_kwargs(cfg, TextSpec(24, 256), [depth])).eval()


@pytest.mark.parametrize("name", sorted(LM_KWARGS))
@pytest.mark.parametrize("division", [[1, 1, 1, 1], [2, 1, 3], [6]])
def test_stem_blocks_head_is_exactly_the_models_logits(division, name):
    model = _model(sum(division), name=name)
    assert model.config.model_type == name and FAM.depth(model) == sum(division)
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
        FAM.model_kwargs(SimpleNamespace(name="llama", kwargs=dict(KW, **kwargs)), TextSpec(16, 256), [4])


GPT2_KW = LM_KWARGS["gpt2"]
USE = "use a dense decoder such as llama, qwen3, gemma, phi3, granite or gpt2 (docs/api.md lists them)"


@pytest.mark.parametrize("name, kwargs, expected", [
    ("lama", KW, f"model.name 'lama' is no transformers model type; {USE}"),
    ("bert", KW, "the causal_lm family does not build bert: its base model has 0 lists of num_hidden_layers "
                 f"decoder layers, not one; {USE}"),
    ("mixtral", KW, "the causal_lm family does not build mixtral: it is a mixture of experts"),
    ("qwen2_moe", KW, "the causal_lm family does not build qwen2_moe: it is a mixture of experts"),
    ("biogpt", KW, "the causal_lm family does not build biogpt: its forward does more between the embedding "
                   "(biogpt.embed_tokens) and the first decoder layer than the stem does"),
    ("bart", KW, "the causal_lm family does not build bart: it attends to an encoder's states (cross-attention)"),
    ("qwen2", dict(KW, use_sliding_window=True, max_window_layers=2),
     "the causal_lm family does not build qwen2: its 4 layers attend differently (2 full_attention, "
     "2 sliding_attention), and a module's layers are copied between depths (give every layer one kind"),
    ("qwen3", dict(KW, layer_types=["full_attention"] * 4), "model.kwargs.layer_types lists a kind a layer"),
    ("gpt2", dict(GPT2_KW, n_layer=4), "model.kwargs.n_layer is set by deep-incubate"),
    ("gpt2", dict(GPT2_KW, n_positions=64), "model.kwargs.n_positions is set by deep-incubate"),
    ("gpt2", dict(GPT2_KW, scale_attn_by_inverse_layer_idx=True),
     "model.kwargs.scale_attn_by_inverse_layer_idx: true is not for the causal_lm family: it scales attention by "
     "the layer's place"),
    ("gpt2", dict(GPT2_KW, add_cross_attention=True), "model.kwargs.add_cross_attention: true is not for"),
    ("gemma", dict(LM_KWARGS["gemma"], tie_word_embeddings=True), "would share one tensor between module 0"),
    ("llama", dict(KW, num_attention_heads=3), "cannot build a llama model with model.kwargs"),   # transformers' check
])
def test_architectures_the_adapter_cannot_honour_are_refused(name, kwargs, expected):
    cfg = SimpleNamespace(name=name, kwargs=kwargs, division=[1, 1, 1, 1], meta_division=None)
    with pytest.raises(UserError, match=re.escape(expected)):
        FAM.validate(cfg)


@pytest.mark.parametrize("name", ["gemma4_assistant", "dots3_note_vision_encoder"])
def test_a_model_type_whose_bare_config_fails_is_refused_in_one_line(name):
    """Probing a config for experts builds it bare: some cannot be (transformers 5.24), and that is
    no traceback either."""
    with pytest.raises(UserError, match=f"(does not build {name}|cannot build a {name} model)"):
        FAM.validate(SimpleNamespace(name=name, kwargs=KW, division=[1, 1], meta_division=None))


def test_a_sliding_window_on_every_layer_is_honoured_and_one_on_the_target_only_is_refused():
    """qwen2's max_window_layers: the first layers attend fully, the rest through the window; the
    meta model (one layer a module) is as much the recipe's as the target."""
    sliding = dict(KW, use_sliding_window=True, sliding_window=4)
    for max_window_layers in (0, 8):       # every layer sliding, every layer full
        FAM.validate(SimpleNamespace(name="qwen2", kwargs=dict(sliding, max_window_layers=max_window_layers),
                                     division=[2, 2, 2, 2], meta_division=None))
    with pytest.raises(UserError, match="its 8 layers attend differently"):
        FAM.validate(SimpleNamespace(name="qwen2", kwargs=dict(sliding, max_window_layers=4),
                                     division=[2, 2, 2, 2], meta_division=None))
    FAM.validate(SimpleNamespace(name="qwen2", kwargs=dict(sliding, max_window_layers=2), division=[1, 1],
                                 meta_division=None))        # 2 layers, both full
    with pytest.raises(UserError, match="its 4 layers attend differently"):     # the meta model's
        FAM.validate(SimpleNamespace(name="qwen2", kwargs=dict(sliding, max_window_layers=2), division=[1, 1],
                                     meta_division=[2, 2]))


@pytest.mark.parametrize("name", ["mixtral", "gpt2"])
def test_refusals_come_when_the_recipe_is_read(tmp_path, name):
    from incubate.recipe.schema import load_recipe
    from ..conftest import TINY_LM, write_recipe
    kwargs = dict(KW) if name == "mixtral" else dict(GPT2_KW, n_layer=4)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, model__name=name, model__kwargs=kwargs)
    with pytest.raises(UserError, match="mixture of experts" if name == "mixtral" else "model.kwargs.n_layer"):
        load_recipe(recipe)


def test_special_token_ids_that_mean_nothing_here_are_dropped_and_llamas_kwargs_stay_the_recipes():
    """Byte and BPE tokens have no special tokens: a padding id would freeze a row of the embedding,
    an id outside the vocabulary would point nowhere."""
    def kwargs(name, **kw):
        return FAM.model_kwargs(SimpleNamespace(name=name, kwargs=dict(LM_KWARGS[name], **kw)), TextSpec(16, 256), [4])
    assert kwargs("llama") == dict(KW, num_hidden_layers=4, vocab_size=256, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    assert kwargs("gemma")["pad_token_id"] is None and "bos_token_id" not in kwargs("gemma")     # gemma's is 0
    assert {k: kwargs("gpt2")[k] for k in ("bos_token_id", "eos_token_id")} == {"bos_token_id": None,
                                                                               "eos_token_id": None}   # 50256
    assert kwargs("olmo", pad_token_id=3)["pad_token_id"] == 3          # the recipe's own stands
    model = FAM.build("gemma", kwargs("gemma"))
    assert model.model.embed_tokens.padding_idx is None


def test_gpt2_meta_init_zeroes_both_conv1d_residual_outputs():
    meta, target = _model(2, seed=1, name="gpt2"), _model(4, seed=2, name="gpt2")
    FAM.init_from_meta(target, meta, [2, 2], [1, 1], 1, mode="meta")
    extra = target.transformer.h[3]
    assert all(not p.any() for p in (extra.attn.c_proj.weight, extra.attn.c_proj.bias, extra.mlp.c_proj.weight,
                                     extra.mlp.c_proj.bias))
    assert torch.equal(target.transformer.ln_f.weight, meta.transformer.ln_f.weight)
    assert not torch.equal(target.transformer.wpe.weight, meta.transformer.wpe.weight)    # module 0's
    assert set(FAM.keep_only(target, [2, 2], 1).state_dict()) == {
        k for k in _model(4, name="gpt2").state_dict() if k.startswith(("transformer.h.2.", "transformer.h.3.",
                                                                         "transformer.ln_f.", "lm_head."))}


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


def _net(kind: str):
    """A whole tiny Llama, or the hybrid of its module 0 or 1 (division [2, 2]) in a 2-layer meta model."""
    if kind == "whole":
        net = _model(4).train()
        return net, net
    index = int(kind[-1])
    target = FAM.keep_only(_model(4, seed=2), [2, 2], index)
    net = Hybrid(FAM, _model(2, seed=1), [1, 1], target, [2, 2], index).train()
    return net, net.runner.model


@pytest.mark.parametrize("kind, layers_run, recomputed", [("whole", 4, 4), ("hybrid0", 3, 3), ("hybrid1", 3, 2)])
def test_grad_checkpointing_recomputes_decoder_layers_with_the_same_loss_and_grads(kind, layers_run, recomputed):
    """transformers' checkpointing of the trained layers, ours of a hybrid's frozen meta suffix (hybrid0's
    last layer); the meta prefix runs without gradients (hybrid1's first), so nothing of it is recomputed."""
    from incubate.train.step import enable_grad_checkpointing
    x, y = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    results = []
    for on in (False, True):
        net, trained = _net(kind)
        if on:
            enable_grad_checkpointing(net, trained, FAM)
        calls = []
        for m in net.modules():
            if type(m).__name__ == "LlamaAttention":
                m.register_forward_hook(lambda *_: calls.append(1))
        out = net(x)
        loss = torch.nn.functional.cross_entropy(getattr(out, "logits", out).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in trained.named_parameters()}, len(calls)))
    (ref_loss, ref, ref_calls), (got_loss, got, calls) = results
    assert (ref_calls, calls) == (layers_run, layers_run + recomputed)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
