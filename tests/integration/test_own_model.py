"""Bring your own model: a user-built model of an architecture the causal_lm family takes by its
structure goes meta model (CLI) -> hybrids trained by transformers' Trainer with its defaults on the
run's own data -> save_module -> `incubate assemble`, `finetune`, `export` -> AutoModelForCausalLM."""
import copy
import json

import pytest
import torch

import incubate

from ..conftest import TINY_LM, make_corpus, run_main, write_recipe

pytest.importorskip("accelerate")     # Trainer needs it (the test extra installs it)

KWARGS = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32}


def _own_target(context: int):
    """What a user writes: the architecture's own classes, the recipe's sizes, untied embeddings."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM
    config = Starcoder2Config(**KWARGS, num_hidden_layers=3, vocab_size=256, max_position_embeddings=context,
                              tie_word_embeddings=False)
    torch.manual_seed(0)
    return incubate.divide(Starcoder2ForCausalLM(config), [2, 1], "causal_lm")


def _trainer(net, data, out):
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=8, learning_rate=3e-3,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    return Trainer(model=net, args=args, train_dataset=data.train, eval_dataset=data.held_out)


def _meta_run(tmp_path, capsys):
    """A Starcoder2 run (the project lists no such name) with its meta model trained by the CLI."""
    corpus = make_corpus(tmp_path / "corpus", files=2, chars=1500)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_LM, data__source=f"text:{corpus}", model__name="starcoder2",
                          model__kwargs=KWARGS, model__division=[2, 1], meta__epochs=1)
    run = tmp_path / "run"
    assert run_main(capsys, "meta", "--recipe", recipe, "--out", run)[0] == 0
    return recipe, run


def test_own_model_trained_by_trainer_on_the_runs_data_goes_through_the_cli(tmp_path, capsys):
    recipe, run = _meta_run(tmp_path, capsys)
    meta, data = incubate.load_stage(run, "meta"), incubate.run_data(run)
    assert data.tokenizer is None and len(data.train) > 0 and len(data.held_out) > 0
    target = _own_target(TINY_LM["data"]["context"])
    for i in range(2):
        net = incubate.hybrid(copy.deepcopy(meta), copy.deepcopy(target), i, module_init="meta")
        trainer = _trainer(net, data, tmp_path / f"trainer{i}")
        with incubate.track(net) as work:
            trainer.train()
        metrics = trainer.evaluate()
        assert work.steps == 3 and work.tokens == 3 * 8 * TINY_LM["data"]["context"] and work.flops > 0
        assert metrics["eval_loss"] > 0          # Trainer's defaults: labels kept, the hybrid's loss
        incubate.save_module(net, run, metrics={"loss": metrics["eval_loss"]})
    for stage in ("assemble", "finetune"):
        assert run_main(capsys, stage, "--recipe", recipe, "--out", run)[0] == 0
    assert run_main(capsys, "export", run, "--stage", "finetune", "--to", tmp_path / "hf")[0] == 0
    from transformers import AutoModelForCausalLM
    from incubate.lm_tools import load_lm
    plain, ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), load_lm(run, "finetune")[0]
    x = torch.tensor([list(b"def dumps(obj):")])
    assert plain.config.model_type == "starcoder2" and torch.equal(plain(x).logits, ours(x).logits)
    summary = json.loads((run / "summary.json").read_text())
    assert all(summary[f"module_{i}"]["flops"] > 0 and summary[f"module_{i}"]["seconds"] > 0 for i in range(2))
    rc, out, _ = run_main(capsys, "report", run)
    assert rc == 0 and "| module 0 | - | " in out and "| module 0 | - | - | - | 0.0 |" not in out


def test_save_module_names_what_differs_from_the_runs_target(tmp_path, capsys):
    recipe, run = _meta_run(tmp_path, capsys)
    from transformers import Starcoder2Config, Starcoder2ForCausalLM
    config = Starcoder2Config(**KWARGS, num_hidden_layers=3, vocab_size=256, max_position_embeddings=16,
                              tie_word_embeddings=False, norm_epsilon=1e-3)      # same shapes, another norm
    other = incubate.divide(Starcoder2ForCausalLM(config), [2, 1], "causal_lm")
    net = incubate.hybrid(incubate.load_stage(run, "meta"), other, 1)
    with pytest.raises(incubate.UserError, match=r"is not the target model of .*: its config says "
                                                 r"norm_epsilon=0.001, the run's 1e-05; build it with"):
        incubate.save_module(net, run)
