"""Recipes: every shipped one validates and builds; overrides and errors are exact."""
from pathlib import Path

import pytest
import torch

from incubate.recipe.schema import load_recipe
from incubate.errors import UserError
from incubate.families import get_family
from incubate.data.spec import ImageSpec, TextSpec

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_there_are_the_recipes_the_readme_names():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "fashion_mnist", "imagenet_vit_base", "imagenet_vit_large", "imagenet_vit_huge",
            "cifar100_deit_tiny_32", "cifar100_resnet110", "fashion_mnist_resnet"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_builds_on_meta_device(path):
    recipe = load_recipe(path)
    family = get_family(recipe.model.family)
    classes = {"imagenet": 1000, "cifar100": 100}.get(path.stem.split("_")[0], 10)
    chans = 1 if recipe.data.source.startswith(("idx", "digits")) else 3
    d = recipe.data
    spec = (TextSpec(d.context, 256 if d.tokenizer == "byte" else d.vocab_size) if family.modality == "text"
            else ImageSpec.unnamed(chans, d.img_size, classes))
    for meta, div in ((False, recipe.model.division), (True, recipe.meta_division)):
        kwargs = family.model_kwargs(recipe.model, spec, div, meta=meta)
        with torch.device("meta"):
            model = family.build(recipe.model.name, kwargs)
        assert family.depth(model) == sum(div)
        # every weight is owned by exactly one module of the division
        owners = {family.owner(k, div, model) for k in model.state_dict()}
        assert owners == set(range(len(div)))
    for stage in ("meta", "incubate", "finetune", "e2e"):
        assert recipe.stage(stage).epochs > 0


def test_paper_values():
    b = load_recipe(RECIPES[0].parent / "imagenet_vit_huge.yaml")
    assert b.model.division == [8, 8, 8, 8] and b.meta_division == [1, 1, 1, 1]
    assert (b.stage("meta").epochs, b.stage("incubate").epochs, b.stage("finetune").epochs) == (300, 100, 100)
    ft = b.stage("finetune")
    assert ft.warmup_epochs == 0 and ft.clip_grad == 1.0 and ft.drop_path == 0.6
    assert b.train.lr == 5e-4 and b.train.lr_base_batch == 512


def test_set_overrides_and_stage_merge(tiny_recipe):
    assert load_recipe(tiny_recipe, ["train.lr=5e-4"]).train.lr == 5e-4     # YAML reads 5e-4 as a string
    r = load_recipe(tiny_recipe, ["train.lr=0.01", "finetune.clip_grad=2", "data.augment.shift=3",
                                  "model.division=[2,2]", "model.kwargs.depth=4"])
    assert r.train.lr == 0.01 and r.stage("meta").lr == 0.01
    assert r.stage("finetune").clip_grad == 2.0 and r.stage("meta").clip_grad is None
    assert r.data.augment.shift == 3 and r.model.division == [2, 2] and r.meta_division == [1, 1]


@pytest.mark.parametrize("sets, match", [
    (["train.lrr=1"], r"unknown recipe key 'train.lrr'; valid keys under train: epochs, batch_size"),
    (["finetune.bogus=1"], r"unknown recipe key 'finetune.bogus'"),
    (["modle.name=x"], r"unknown recipe key 'modle'; valid keys: name, seed"),
    (["train.epochs=ten"], r"'train.epochs' must be of type int, got 'ten'"),
    (["meta.lr=fast"], r"'meta.lr' must be of type float"),
    (["model.division=[2,1]"], r"sums to 3 blocks but model.kwargs.depth is 4"),
    (["model.division=[1,1,1,1,1]", "model.kwargs.depth=5", "model.meta_division=[1,1]"], r"has 2 modules"),
    (["model.division=[0,4]"], r"model.division\[0\] must be >= 1, got 0"),
    (["data.train_fraction=0"], r"train_fraction must be in"),
    (["train.amp=fp8"], r"amp must be none, bf16 or fp16"),
    (["incubate.module_init=copy"], r"incubate.module_init must be random, meta or stack"),
    (["data.tokenizer=wordpiece"], r"data.tokenizer must be byte or bpe, got 'wordpiece'"),
    (["data.tokenizer=bpe"], r"data.tokenizer: bpe tokenizes text for a language model, but model.family 'vit'"),
])
def test_bad_values_are_one_clear_error(tiny_recipe, sets, match):
    with pytest.raises(UserError, match=match):
        load_recipe(tiny_recipe, sets)


@pytest.mark.parametrize("sets, line", [
    (["train.epoch=3"], "; did you mean train.epochs?"),
    (["finetune.clipgrad=1"], "; did you mean finetune.clip_grad?"),
    (["modle.name=x"], "; did you mean model?"),
])
def test_an_unknown_key_names_the_closest_valid_one(tiny_recipe, sets, line):
    with pytest.raises(UserError) as e:
        load_recipe(tiny_recipe, sets)
    assert str(e.value).endswith(line) and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        load_recipe(tiny_recipe, ["train.zzz=1"])
    assert "did you mean" not in str(e.value)          # nothing close: no guess


@pytest.mark.parametrize("sets, line", [
    (["grow.amp=fp8"], "grow.amp must be none, bf16 or fp16, got 'fp8'"),
    (["finetune.batch_size=0"], "finetune.batch_size must be >= 1, got 0"),
    (["e2e.checkpoint_minutes=-1"], "e2e.checkpoint_minutes must be >= 0 (0: save only at the end of each epoch), got -1.0"),
    (["meta.frozen_suffix_grads=maybe"], "recipe key 'meta.frozen_suffix_grads' must be of type bool, got 'maybe'; "
                                         "fix the recipe or the --set value"),
    (["launch.retries=-1"], "launch.retries must be >= 0, got -1"),
    (["device=tpu"], "device must be auto, cpu or cuda, got 'tpu'"),
])
def test_stage_overrides_are_checked_as_train_keys_are(tiny_recipe, sets, line):
    with pytest.raises(UserError) as e:
        load_recipe(tiny_recipe, sets)
    assert str(e.value) == line


def test_stage_overrides_hold_typed_values(tiny_recipe):
    r = load_recipe(tiny_recipe, ["finetune.clip_grad=2", "meta.lr=5e-4", "incubate.epochs=2.0"])
    assert r.finetune["clip_grad"] == 2.0 and r.meta["lr"] == 5e-4 and r.incubate["epochs"] == 2
    assert type(r.stage("incubate").epochs) is int and r.stage("meta").lr == 5e-4


def test_amp_choices_are_the_configs_literal():
    import typing
    from incubate.recipe.schema import Amp, TrainCfg
    from incubate.recipe.typed import field_types
    assert typing.get_args(Amp) == ("none", "bf16", "fp16") and field_types(TrainCfg)["amp"] is Amp


def test_missing_and_invalid_recipe_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)


def test_tokenizer_settings_and_what_a_run_directory_fixes(tmp_path):
    from incubate.store.rundir import write_run_recipe
    from ..conftest import TINY_LM, write_recipe
    lm = write_recipe(tmp_path / "lm.yaml", TINY_LM)
    r = load_recipe(lm)
    assert (r.data.tokenizer, r.data.vocab_size) == ("byte", 1024)          # the defaults: bytes as before
    assert load_recipe(lm, ["data.tokenizer=bpe", "data.vocab_size=257"]).data.vocab_size == 257
    with pytest.raises(UserError, match=r"data.vocab_size must be more than 256 with data.tokenizer: bpe .* got 256"):
        load_recipe(lm, ["data.tokenizer=bpe", "data.vocab_size=256"])
    write_run_recipe(tmp_path / "byte", r)
    write_run_recipe(tmp_path / "byte", load_recipe(lm, ["data.vocab_size=4096"]))   # bytes: vocab_size unused
    with pytest.raises(UserError, match=r"made with data.tokenizer='byte' \(its recipe.yaml\), not 'bpe'"):
        write_run_recipe(tmp_path / "byte", load_recipe(lm, ["data.tokenizer=bpe"]))
    write_run_recipe(tmp_path / "bpe", load_recipe(lm, ["data.tokenizer=bpe", "data.vocab_size=300"]))
    with pytest.raises(UserError, match=r"made with data.vocab_size=300 \(its recipe.yaml\), not 320"):
        write_run_recipe(tmp_path / "bpe", load_recipe(lm, ["data.tokenizer=bpe", "data.vocab_size=320"]))


LM_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart_lm.yaml"


@pytest.mark.parametrize("recipe, sets, match", [
    (None, ["meta.tokens=1000"], r"meta.tokens is a budget in text tokens, but the model classifies images"),
    (LM_RECIPE, ["meta.tokens=-1"], r"meta.tokens must be >= 0, got -1"),
    (LM_RECIPE, ["train.eval_every=-2"], r"train.eval_every must be >= 0, got -2"),
    (LM_RECIPE, ["meta.tokens=4096", "meta.warmup_epochs=1"], r"meta.warmup_epochs 1 with a budget in tokens"),
    (LM_RECIPE, ["meta.warmup_tokens=100"], r"meta.warmup_tokens is the warm-up of a budget in tokens"),
    (LM_RECIPE, ["meta.tokens=4096", "meta.warmup_tokens=9000"], r"meta.warmup_tokens 9000 exceeds the budget"),
    (None, ["data.eval_tokens=100"], r"data.eval_tokens and data.cache_dir are for text"),
    (LM_RECIPE, ["meta.tokens=10", "meta.epochs=2"], r"meta sets both epochs \(2\) and tokens \(10\)"),
])
def test_token_budget_settings_are_checked(recipe, sets, match):
    with pytest.raises(UserError, match=match):
        load_recipe(recipe, sets)


def test_a_stage_budget_in_tokens_replaces_the_shared_epochs_and_reads_1e6():
    recipe = load_recipe(LM_RECIPE, ["meta.tokens=1e6", "e2e.tokens=2.5e5"])
    assert (recipe.stage("meta").tokens, recipe.stage("e2e").tokens) == (1_000_000, 250_000)
    assert recipe.stage("incubate").tokens == 0 and recipe.stage("incubate").epochs == 1
    assert load_recipe(LM_RECIPE, ["train.tokens=4096", "meta.epochs=3"]).stage("meta").tokens == 0   # its own budget


@pytest.mark.parametrize("sets, match", [
    (["data.persistent_workers=true"], r"data.persistent_workers keeps DataLoader workers alive, but data.num_workers is 0"),
    (["data.augment.shift=8"], r"data.augment.shift 8 moves images by their whole size \(data.img_size 8\)"),
    (["meta.sched=rsqrt"], r"meta.sched rsqrt decays over the warm-up's length, and meta has none"),
    (["train.sched=none"], r"train.sched must be one of timm's schedulers: cosine, .*; got 'none'"),
    (["data.augment.crop_scale=[0.9, 0.2]"], r"data.augment.crop_scale must be in increasing order, got \[0.9, 0.2\]"),
])
def test_keys_that_only_make_sense_together(tiny_recipe, sets, match):
    with pytest.raises(UserError, match=match):
        load_recipe(tiny_recipe, sets)


def test_digits_takes_no_path():
    from incubate.recipe.schema import DataCfg
    from incubate.data.loaders import load_data
    with pytest.raises(UserError, match=r"data.source 'digits:/data': digits is the built-in data set and takes no path"):
        load_data(DataCfg(source="digits:/data"))


@pytest.mark.parametrize("argv, line", [
    (["run", "--recipe", "R", "--out", "OUT", "--launcher", "local", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["sample", "OUT", "--prompt", "x", "--seed", "-1"], "--seed must be in [0, 4294967296) (a 32-bit seed, as numpy takes), got -1"),
    (["sample", "OUT", "--prompt", "", "--tokens", "5"], "--prompt must not be empty (the text to continue)"),
    (["sample", "OUT", "--prompt", "x", "--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["evaluate", "--recipe", "R", "--checkpoint", ""], "--checkpoint must not be empty (name a folder or a file)"),
])
def test_command_line_values_are_checked_by_the_schema(tiny_recipe, tmp_path, argv, line):
    from tests.conftest import in_process, one_error_line
    argv = [{"R": str(tiny_recipe), "OUT": str(tmp_path / "run")}.get(a, a) for a in argv]
    proc = in_process(*argv)
    assert proc.returncode == 2 and one_error_line(proc.stderr) == f"incubate: error: {line}"
    assert not (tmp_path / "run").exists()
