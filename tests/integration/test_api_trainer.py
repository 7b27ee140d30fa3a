"""An outside training loop, transformers' Trainer, trains every hybrid of a tiny causal LM from the
CLI's meta model; `incubate assemble` and `incubate finetune` then take the modules it leaves."""
import copy
import json

import pytest
import torch

import incubate

from ..conftest import TINY_LM, make_corpus, run_main, write_recipe

pytest.importorskip("accelerate")     # Trainer needs it (the test extra installs it)


def byte_windows(corpus, context: int) -> list[dict]:
    """The corpus as byte tokens (the recipe's tokenizer: byte), cut into windows of `context`."""
    ids = torch.tensor(list(b"".join(p.read_bytes() for p in sorted(corpus.iterdir()))))
    n = len(ids) // context
    return [{"x": w, "labels": w} for w in ids[:n * context].view(n, context)]


def next_token_loss(logits, labels, num_items_in_batch=None):
    """The hybrid returns the family's output, a causal LM's logits: Trainer's loss is ours to give."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def test_trainer_trains_hybrids_that_the_cli_assembles_and_finetunes(tmp_path, capsys):
    from transformers import Trainer, TrainingArguments
    corpus = make_corpus(tmp_path / "corpus")
    recipe = write_recipe(tmp_path / "lm.yaml", TINY_LM, data__source=f"text:{corpus}", meta__epochs=1)
    run = tmp_path / "run"
    assert run_main(capsys, "meta", "--recipe", recipe, "--out", run)[0] == 0
    meta = incubate.load_stage(run, "meta")
    data = byte_windows(corpus, TINY_LM["data"]["context"])
    for i in range(len(TINY_LM["model"]["division"])):
        net = incubate.hybrid(copy.deepcopy(meta), incubate.target_model(run), i, module_init="meta")
        frozen = {k: v.clone() for k, v in net.meta.state_dict().items()}
        start = {k: v.clone() for k, v in net.runner.state_dict().items()}
        args = TrainingArguments(output_dir=str(tmp_path / f"trainer{i}"), max_steps=3, per_device_train_batch_size=8,
                                 learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", remove_unused_columns=False, disable_tqdm=True, seed=i)
        trainer = Trainer(model=net, args=args, train_dataset=data, compute_loss_func=next_token_loss)
        trainer.train()
        assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
            id(p) for p in net.runner.parameters()}                     # Trainer steps target module i only
        assert all(torch.equal(frozen[k], v) for k, v in net.meta.state_dict().items())
        assert any(not torch.equal(start[k], v) for k, v in net.runner.state_dict().items())
        incubate.save_module(net, run)
    assert run_main(capsys, "assemble", "--recipe", recipe, "--out", run)[0] == 0
    rc, out, _ = run_main(capsys, "finetune", "--recipe", recipe, "--out", run)
    assert rc == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert {"module_0", "module_3", "assembled", "finetune"} <= set(summary)
    assert 0 < summary["finetune"]["bpb"] < 8.5
    modules = [json.loads((run / f"modules/{i}/manifest.json").read_text()) for i in range(4)]
    assert all(m["trained_by"] == "a script (incubate.save_module)" for m in modules)
    rc, out, _ = run_main(capsys, "report", run)          # a module saved without metrics: "-" in its row
    assert rc == 0 and "| module 0 | - | - | - |" in out and "| finetune | " in out
