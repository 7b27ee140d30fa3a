"""What a new user of the API meets first: every entry point refuses a model it cannot read in one
line, the recipe and the API accept and refuse the same architectures with the same line, a hybrid
speaks Trainer's language (labels in, loss out), and a script reads the run's own data."""
import pytest
import torch
from torch import nn

import incubate
from incubate.recipe.schema import load_recipe
from incubate.families import FAMILIES

from ..conftest import TINY_LM, make_corpus, write_recipe

KW = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("model", [nn.Linear(2, 2), "a model"])
def test_divide_and_meta_model_refuse_what_a_family_cannot_read_in_one_line(family, model):
    for call in (lambda: incubate.divide(model, [1], family), lambda: incubate.meta_model(model, [1], family)):
        with pytest.raises(incubate.UserError) as e:
            call()
        assert "\n" not in str(e.value) and ("Linear" in str(e.value) or "str" in str(e.value))


def _hf_model(name: str, **kw):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig
    config = AutoConfig.for_model(name, **dict(KW, **kw), num_hidden_layers=2, vocab_size=64,
                                  tie_word_embeddings=False)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


@pytest.mark.parametrize("name", ["mixtral", "biogpt", "gpt_neox_japanese", "gemma2"])
def test_the_recipe_and_the_api_refuse_an_architecture_with_the_same_line(name, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, model__name=name, model__kwargs=KW, model__division=[1, 1])
    with pytest.raises(incubate.UserError) as by_recipe:
        load_recipe(recipe)
    with pytest.raises(incubate.UserError) as by_api:
        incubate.meta_model(_hf_model(name), [1, 1], "causal_lm")
    assert str(by_api.value) in str(by_recipe.value) and f"does not build {name}: " in str(by_api.value)


def test_an_architecture_the_family_takes_is_taken_by_both(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, model__name="starcoder2", model__kwargs=KW)
    assert load_recipe(recipe).model.name == "starcoder2"
    meta = incubate.meta_model(_hf_model("starcoder2"), [1, 1], "causal_lm")
    assert incubate.get_family("causal_lm").depth(meta) == 2


def test_check_family_takes_an_adapter_or_a_registered_name():
    target = _hf_model("llama")
    x = torch.randint(0, 64, (2, 8))
    incubate.check_family("causal_lm", target, [1, 1], x)
    incubate.check_family(FAMILIES["causal_lm"], target, [1, 1], x)
    with pytest.raises(incubate.UserError, match="no_such"):
        incubate.check_family("no_such", target, [1, 1], x)


def test_a_hybrid_takes_labels_and_returns_the_loss_trainer_reads():
    target = incubate.divide(_hf_model("llama"), [1, 1], "causal_lm")
    net = incubate.hybrid(incubate.meta_model(target, [1, 1], "causal_lm"), target, 0)
    ids = torch.randint(0, 64, (2, 8))
    labels = torch.randint(0, 64, (2, 8))
    labels[0, 0] = -100         # ignored, as transformers' models ignore it
    logits = net(ids)
    out = net(input_ids=ids, labels=labels)
    assert torch.equal(out["logits"], logits) and torch.equal(out.logits, logits)
    want = nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1))
    assert torch.equal(out["loss"], want)
    with pytest.raises(incubate.UserError, match="takes its input as x, input_ids or pixel_values"):
        net(labels=labels)


def test_run_data_is_the_stages_data_with_the_runs_bpe_tokenizer(tmp_path):
    from incubate.data.loaders import Reader, load_data, make_loader
    from incubate.store.rundir import write_run_recipe
    corpus = make_corpus(tmp_path / "corpus")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"text:{corpus}",
                                      data__tokenizer="bpe", data__vocab_size=300))
    run = tmp_path / "run"
    write_run_recipe(run, recipe)
    bundle = load_data(recipe.data, run)            # what a stage does first: trains RUN/tokenizer.json
    data = incubate.run_data(run)
    assert data.tokenizer.get_vocab_size() == bundle.spec.vocab_size == 300
    assert len(data.train) == len(bundle.train) and len(data.held_out) == len(bundle.test)
    w = bundle.test.windows(torch.tensor([1]))[0]
    assert torch.equal(data.held_out[1]["input_ids"], w[:-1]) and torch.equal(data.held_out[1]["labels"], w[1:])
    ours = next(data.loader("train", batch=4, seed=3).epoch(0))
    stage = next(make_loader(bundle, bundle.train, recipe.data, Reader(4, True, 3, 0, 1, "cpu")).epoch(0))
    assert all(torch.equal(a, b) for a, b in zip(ours, stage))
    with pytest.raises(incubate.UserError, match="holds no recipe.yaml"):
        incubate.run_data(tmp_path / "nowhere")


def test_run_data_of_an_image_run_gives_the_stages_images_and_transforms(tmp_path):
    from incubate.data.loaders import Reader, load_data, make_loader
    from incubate.store.rundir import write_run_recipe
    from ..conftest import TINY
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", TINY))
    run = tmp_path / "run"
    write_run_recipe(run, recipe)
    bundle, data = load_data(recipe.data, run), incubate.run_data(run)
    assert data.tokenizer is None and len(data.train) == len(bundle.train.labels)
    item = data.held_out[2]
    held = next(make_loader(bundle, bundle.test, recipe.data, Reader(4, False, 0, 0, 1, "cpu")).epoch(0))
    assert item["labels"] == int(held[1][2]) and torch.equal(item["pixel_values"], held[0][2])
    assert callable(data.transform(train=True))
