"""One cell of the map (benchmarks/accuracy_vs_cost.py's map studies) trained for real on a tiny model:
ours and growth from the meta model not annealed start from that meta run, not the study's own."""
import yaml
import torch
from safetensors.torch import load_file

from benchmarks import accuracy_vs_cost as avc
from benchmarks.studies import MAP_FLAT_META, STUDIES
from ..conftest import make_corpus

BUDGET = (0.002, "B")       # TFLOPs: a few dozen updates of the tiny model


def tiny_cell(tmp_path, monkeypatch) -> str:
    corpus = make_corpus(tmp_path / "corpus", files=4, chars=4000)
    study = dict(STUDIES["map_rich_d16"], depth=8, prefix="map_tiny_",
                 meta_variants={"flatmeta": (MAP_FLAT_META["flatmeta"][0], [BUDGET])})
    study["sets"] = [f"data.source=text:{corpus}", "data.val_fraction=0.25", "data.eval_tokens=0", "data.context=16",
                     "model.kwargs.hidden_size=16", "model.kwargs.intermediate_size=32", "train.batch_size=8",
                     "model.kwargs.num_attention_heads=2", "model.kwargs.num_key_value_heads=2",
                     "train.eval_every=10", "train.checkpoint_minutes=0"]
    monkeypatch.setitem(STUDIES, "map_tiny_d8", study)
    return "map_tiny_d8"


def weights(run, stage="meta"):
    return load_file(run / stage / "model.safetensors")


def test_ours_and_growth_from_the_meta_model_not_annealed_start_from_it(tmp_path, monkeypatch):
    study = tiny_cell(tmp_path, monkeypatch)
    rows = {(m, v): avc.run_tok(m, tmp_path, study, 8, 1.0, BUDGET, 0, [], v)
            for m, v in (("ours", "meta"), ("ours", "flatmeta"), ("grow", "flatmeta"))}
    base = tmp_path / "map_tiny_d8_f1.0_s0"
    annealed, flat = weights(base / "meta_0.0005"), weights(base / "meta-flatmeta_0.0005")
    assert any(not torch.equal(annealed[k], flat[k]) for k in annealed)
    for run, want in (("ours-meta_0.002B", annealed), ("ours-flatmeta_0.002B", flat), ("grow-flatmeta_0.002B", flat)):
        got = weights(base / run)
        assert all(torch.equal(got[k], want[k]) for k in want), run
    recipe = yaml.safe_load((base / "meta-flatmeta_0.0005" / "recipe.yaml").read_text())
    assert (recipe["meta"]["sched"], recipe["meta"]["decay_milestones"]) == ("multistep", [1000000000])
    assert yaml.safe_load((base / "ours-flatmeta_0.002B" / "recipe.yaml").read_text())["incubate"]["module_init"] == "meta"
    assert [rows[k]["variant"] for k in rows] == ["meta", "flatmeta", "flatmeta"]
    assert all(r["bpb"] > 0 and r["evals"] for r in rows.values())


def test_a_fine_tune_lr_variant_of_ours_starts_from_the_recipe_points_modules_and_counts_them(tmp_path, monkeypatch):
    study = tiny_cell(tmp_path, monkeypatch)
    recipe_point = avc.run_tok("ours", tmp_path, study, 8, 1.0, BUDGET, 0, [], "meta")
    swept = avc.run_tok("ours", tmp_path, study, 8, 1.0, BUDGET, 0, [], "ft0.004")
    base = tmp_path / "map_tiny_d8_f1.0_s0"
    for stage in ("modules/0", "modules/3", "assembled"):       # copied, not trained again: the same manifests
        a, b = (base / run / stage / "manifest.json" for run in ("ours-meta_0.002B", "ours-ft0.004_0.002B"))
        assert a.read_text() == b.read_text(), stage
    a, b = weights(base / "ours-meta_0.002B", "finetune"), weights(base / "ours-ft0.004_0.002B", "finetune")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    ft = yaml.safe_load((base / "ours-ft0.004_0.002B" / "recipe.yaml").read_text())["finetune"]
    assert ft["lr"] == 0.004 and ft["warmup_tokens"] == int(0.05 * ft["tokens"]) > 0
    assert swept["flops"] == recipe_point["flops"] and swept["evals"][0] == recipe_point["evals"][0]   # same assembly
