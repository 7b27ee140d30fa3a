"""benchmarks/accuracy_vs_cost.py --collect: run directories become rows, tables and curves.

Finished stages are faked (a manifest and an empty weights file): no training here."""
import json
from pathlib import Path

import pytest

from benchmarks import accuracy_vs_cost as avc, studies
from benchmarks import results_report as rr


def _stage(path: Path, top1: float, flops: float, seconds: float = 1.0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"")
    (path / "manifest.json").write_text(json.dumps(
        {"finished": True, "metrics": {"top1": top1}, "flops": flops, "process_seconds": seconds}))


def _ours(run: Path, meta_top1: float, top1: float, k: int = 4) -> None:
    _stage(run / "meta", meta_top1, 1e12)
    for i in range(k):
        _stage(run / "modules" / str(i), 70.0 + i, 1e11)
    _stage(run / "assembled", 60.0, 0)
    _stage(run / "finetune", top1, 2e12)


def test_collect_reads_meta_alone_e2e_and_ours_per_meta_budget(tmp_path):
    for seed in (0, 1, 3):    # seed 3 is in no study's default list: collect finds it on disk
        base = tmp_path / f"d32_f0.1_s{seed}"
        _stage(base / "e2e_40" / "e2e", 80.0 + seed, 9e12)
        _stage(base / "meta_40" / "meta", 77.0, 1.2e12)
        _stage(base / "meta_80" / "meta", 80.0, 2.4e12)
        _ours(base / "metainit" / "ours_40_2+2", 77.0, 78.0)
        _ours(base / "metainit" / "ours_80_2+2", 80.0, 81.0)
    (tmp_path / "d32_f0.1_s0" / "e2e_20" / "e2e").mkdir(parents=True)   # unfinished: left out
    rows = [r for r in avc.collect(tmp_path) if r["study"] == "budget"]

    by = {(rr.label(r), r["budget"], r["seed"]): r for r in rows}
    assert {k[2] for k in by} == {0, 1, 3}
    assert by[("meta-alone", "80", 0)]["top1"] == 80.0 and by[("meta-alone", "80", 0)]["flops"] == 2.4e12
    assert ("e2e", "20", 0) not in by
    ours80 = by[("ours-metainit", "80/2+2", 1)]
    assert ours80["meta_epochs"] == 80 and ours80["meta_top1"] == 80.0 and ours80["assembled_top1"] == 60.0
    assert ours80["flops"] == 1e12 + 4 * 1e11 + 2e12
    # ours from a 40- and an 80-epoch meta model are one method in the table, two curves in the figure
    assert rr.label(ours80) == rr.label(by[("ours-metainit", "40/2+2", 1)])
    assert rr.curve(ours80) != rr.curve(by[("ours-metainit", "40/2+2", 1)])

    table = rr.table(rows, "budget")
    assert "| 32 | 0.1 | meta-alone | 80 | 3 | 80.00 ± 0.00 |" in table
    assert "| 32 | 0.1 | e2e | 40 | 3 | 81.33 ± 1.53 |" in table
    assert "| 32 | 0.1 | ours-metainit | 80/2+2 | 3 | 81.00 ± 0.00 |  | 60.00 |" in table   # no metrics.jsonl: no loss


def test_write_report_replaces_only_the_tables(tmp_path):
    _stage(tmp_path / "runs" / "d32_f0.1_s0" / "meta_40" / "meta", 77.0, 1.2e12)
    rows = avc.collect(tmp_path / "runs")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(f"# kept\n\n{rr.BEGIN}\nold\n{rr.END}\n\nkept too\n")
    rr.write_report(rows, docs)
    text = (docs / "results.md").read_text()
    assert text.startswith("# kept") and text.endswith("kept too\n") and "old" not in text
    assert "| 32 | 0.1 | meta-alone | 40 | 1 | 77.00 ± 0.00 |" in text
    assert (docs / "accuracy_vs_cost.png").stat().st_size > 0


def test_budgets_select_points_by_their_table_label():
    pts = list(studies.points("budget", [0], ["160/4+4", "80"]))
    assert [(m, b) for m, _, _, b, _ in pts] == [("meta", 80), ("ours", (160, 4, 4)), ("e2e", 80)]


def test_depths_and_fractions_select_points():
    pts = list(studies.points("data", [1], ["40", "20"], fractions=[0.25]))
    assert [(m, f, b) for m, _, f, b, _ in pts] == [("meta", 0.25, 40), ("e2e", 0.25, 20)]
    assert {d for _, d, _, _, _ in studies.points("depth", [0], depths=[8, 64])} == {8, 64}


def _metrics(stage: Path, rows) -> None:
    stage.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": loss, "test_top1": top1}) + "\n" for e, loss, top1 in rows))


def test_regime_cells_have_their_own_folders_train_loss_and_curve(tmp_path):
    base = tmp_path / "w192_d12_f0.1_s1"        # a regime cell; a plain d12 folder would be another study
    _stage(base / "e2e_10" / "e2e", 78.0, 33e12)
    _metrics(base / "e2e_10" / "e2e", [(1, 1.9, 60.0), (2, 0.95, 78.0)])
    _ours(base / "stack-ftlr3e-4" / "ours_30_2+2", 83.0, 84.0)
    _metrics(base / "stack-ftlr3e-4" / "ours_30_2+2" / "finetune", [(1, 0.8, 83.5), (2, 0.75, 84.0)])
    _stage(tmp_path / "d12_f0.1_s1" / "e2e_10" / "e2e", 50.0, 1e12)   # not the regime's: no regime row
    rows = [r for r in avc.collect(tmp_path) if r["study"] == "regime"]
    by = {(rr.label(r), r["budget"]): r for r in rows}
    assert set(by) == {("e2e", "10"), ("ours-stack-ftlr3e-4", "30/2+2")}
    assert by[("e2e", "10")]["top1"] == 78.0 and by[("e2e", "10")]["train_loss"] == 0.95
    assert by[("e2e", "10")]["curve"] == [[1, 1.9, 60.0], [2, 0.95, 78.0]]
    assert by[("ours-stack-ftlr3e-4", "30/2+2")]["train_loss"] == 0.75     # the fine-tune's last epoch
    table = rr.table(rows, "regime")
    assert "| 12 | 0.1 | e2e | 10 | 1 | 78.00 ± 0.00 | 0.950 |" in table
    pts = rr.regime_points(rows, "regime", 12, 0.1)
    assert pts["ours-stack-ftlr3e-4"] == [(pytest.approx(1 + 0.4 + 2), 84.0, 0.0, "30/2+2")]
    docs = tmp_path / "docs"
    rr.write_report(rows, docs)
    assert (docs / "regime.png").stat().st_size > 0
    assert "### Regime study: ViT embed 192, the plain recipe" in (docs / "results.md").read_text()


def test_collect_merge_keeps_earlier_rows_whose_runs_are_not_on_this_machine():
    old = [{"study": "budget", "variant": "paper", "depth": 32, "fraction": 0.1, "method": "e2e", "budget": "80",
            "seed": 0, "top1": 83.0},
           {"study": "budget", "variant": "paper", "depth": 32, "fraction": 0.1, "method": "e2e", "budget": "10",
            "seed": 0, "top1": 70.0}]
    found = [dict(old[1], top1=71.0)]
    merged = avc.merge(old, found)
    assert sorted((r["budget"], r["top1"]) for r in merged) == [("10", 71.0), ("80", 83.0)]


def test_missing_trains_only_the_points_without_a_row_and_shards_split_them(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(avc, "train_point", lambda root, study, method, depth, fraction, budget, seed, args, variant:
                        trained.append((method, studies.budget_label(method, budget), seed, variant)))
    monkeypatch.setattr(avc, "publish", lambda results, root: [])
    monkeypatch.setattr(avc, "ensure_data", lambda **kw: None)
    row = lambda method, budget, variant="paper", seed=0: {"study": "lm_tokens", "variant": variant, "depth": 16,
                                                           "fraction": 1.0, "method": method, "budget": budget, "seed": seed}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([row("meta", "30"), row("ours", "30/A", "stack"), row("e2e", "60")]))
    common = ["--study", "lm_tokens", "--seeds", "0", "--results", str(results), "--root", str(tmp_path)]
    avc.main(common + ["--methods", "meta,e2e", "--missing"])
    assert trained == [("meta", "60", 0, "paper"), ("e2e", "30", 0, "paper")]
    trained.clear()
    avc.main(common + ["--methods", "ours", "--budgets", "30/A", "--missing"])
    assert trained == [("ours", "30/A", 0, "meta"), ("ours", "30/A", 0, "random")]      # stack has its row
    shards = []
    for k in (0, 1):
        trained.clear()
        avc.main(common + ["--missing", "--shard", f"{k}/2"])
        shards.append(list(trained))
    assert not set(shards[0]) & set(shards[1]) and abs(len(shards[0]) - len(shards[1])) <= 1
    assert len(shards[0]) + len(shards[1]) == len(avc.planned(avc.parse_args(common))) - 3     # every point once


def test_every_planned_point_carries_the_variant_its_row_will_have(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(avc, "train_point", lambda root, study, method, depth, fraction, budget, seed, args, variant:
                        trained.append((method, variant)))
    monkeypatch.setattr(avc, "publish", lambda results, root: [])
    monkeypatch.setattr(avc, "ensure_data", lambda **kw: None)
    args = ["--study", "budget", "--seeds", "0", "--methods", "ours,e2e", "--variant", "stack"]
    assert {(p[1], p[-1]) for p in avc.planned(avc.parse_args(args))} == {("ours", "stack"), ("e2e", "paper")}
    done = [{"study": "budget", "variant": p[-1], "depth": p[2], "fraction": p[3], "method": p[1],
             "budget": studies.budget_label(p[1], p[4]), "seed": 0} for p in avc.planned(avc.parse_args(args))]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(done[1:]))
    avc.main(args + ["--missing", "--results", str(results), "--root", str(tmp_path)])
    assert trained == [(done[0]["method"], done[0]["variant"])]       # only the point without its row


def test_plan_prints_the_points_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(avc, "train_point", None)
    monkeypatch.setattr(avc, "publish", None)
    avc.main(["--study", "lm_tokens", "--seeds", "1", "--methods", "ours,e2e", "--budgets", "30/A,60", "--plan",
              "--results", str(tmp_path / "none.json"), "--missing"])
    assert capsys.readouterr().out.splitlines() == [
        "lm_tokens ours 30/A seed 1 (meta)", "lm_tokens ours 30/A seed 1 (stack)", "lm_tokens ours 30/A seed 1 (random)",
        "lm_tokens e2e 60 seed 1"]


def test_resnet_study_points_have_their_own_folders_recipe_and_three_modules(tmp_path):
    base = tmp_path / "resnet_d56_f0.1_s0"
    _stage(base / "e2e_20" / "e2e", 85.0, 6.8e13)
    _ours(base / "ours_40_2+2", 80.0, 86.0, k=3)
    rows = avc.collect(tmp_path)
    assert {r["study"] for r in rows} == {"resnet"}      # not read as a ViT of depth 56
    ours = next(r for r in rows if r["method"] == "ours")
    assert ours["hybrid_top1"] == [70.0, 71.0, 72.0] and ours["flops"] == 1e12 + 3 * 1e11 + 2e12
    assert "| 56 | 0.1 | ours | 40/2+2 | 1 | 86.00 ± 0.00 |  | 60.00 | 70.0/71.0/72.0 |" in rr.table(rows, "resnet")
    recipe = studies.make_recipe(56, 0.1, 1, ["finetune.epochs=3"], "resnet")
    assert (recipe.model.family, recipe.model.name, recipe.model.division) == ("resnet", "cifar_resnet56", [9, 9, 9])
    assert recipe.stage("incubate").module_init == "random" and recipe.stage("finetune").lr == 0.1
    assert recipe.stage("incubate").lr == 0.1       # the paper's: the recipe's own 0.01 is for meta init
    low = studies.make_recipe(56, 0.1, 0, ["incubate.lr=0.01"], "resnet")   # a variant's --set wins
    assert low.stage("incubate").lr == 0.01
    assert recipe.seed == 1 and recipe.stage("finetune").epochs == 3
    rr.write_report(rows, tmp_path / "docs")
    assert (tmp_path / "docs/resnet.png").stat().st_size > 1000 and not (tmp_path / "docs/regime.png").exists()
    assert "### ResNet study" in (tmp_path / "docs/results.md").read_text()


def _lm_stage(path: Path, bpb: float, flops: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"")
    (path / "manifest.json").write_text(json.dumps(
        {"finished": True, "metrics": {"bpb": bpb, "loss": bpb * 0.69, "acc": 50.0}, "flops": flops,
         "process_seconds": 1.0}))
    path.joinpath("metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.5, "test_bpb": bpb}) + "\n")


def test_lm_study_rows_tables_and_figure_are_in_bits_per_byte(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.02)):
        base = tmp_path / f"lm_d16_f1.0_s{seed}"
        _lm_stage(base / "e2e_8" / "e2e", 2.10 + shift, 8e12)
        run = base / "stack" / "ours_16_2+2"
        _lm_stage(run / "meta", 2.3, 4e12)
        for i in range(4):
            _lm_stage(run / "modules" / str(i), 2.2 - i / 100, 1e12)
        _lm_stage(run / "assembled", 2.25, 0)
        _lm_stage(run / "finetune", 2.00 + shift, 2e12)
    rows = [r for r in avc.collect(tmp_path) if r["study"] == "lm"]
    assert {(rr.label(r), r["budget"]) for r in rows} == {("e2e", "8"), ("ours-stack", "16/2+2")}
    table = rr.table(rows, "lm")
    assert "val bits/byte mean ± sd" in table and "top-1" not in table
    assert "| 16 | 1 | e2e | 8 | 2 | 2.1100 ± 0.0141 | 1.500 |" in table
    assert "| 16 | 1 | ours-stack | 16/2+2 | 2 | 2.0100 ± 0.0141 | 1.500 | 2.2500 | 2.200/2.190/2.180/2.170 | 2.3000 |" \
        in table
    assert rr.regime_points(rows, "lm", 16, 1.0)["ours-stack"] == [(pytest.approx(10.0), 2.01, pytest.approx(0.0141, abs=1e-4),
                                                                    "16/2+2")]
    avc.publish(tmp_path / "results.json", tmp_path, tmp_path / "docs")     # what the benchmark's main writes
    assert {r["study"] for r in json.loads((tmp_path / "results.json").read_text())} == {"lm"}
    assert (tmp_path / "docs/lm.png").stat().st_size > 1000
    text = (tmp_path / "docs/results.md").read_text()
    assert "### Language-model study" in text and "--variant stack --set incubate.module_init=stack" in text


def _row(method, budget, seed, top1, tflops, variant="paper", study="regime"):
    return {"study": study, "variant": variant, "depth": 12, "fraction": 0.1, "method": method, "budget": budget,
            "seed": seed, "top1": top1, "flops": tflops * 1e12, "seconds": 1.0}


def test_baseline_at_equal_flops_is_the_best_affordable_budget_or_the_line_between_two():
    pts = [(10.0, 70.0, 1.0, "10"), (30.0, 80.0, 3.0, "30"), (90.0, 78.0, 1.0, "90")]
    assert rr.baseline_at(pts, 5.0) is None                            # every budget costs more
    assert rr.baseline_at(pts, 9.9) == (70.0, 1.0, "10", False)        # 1% more: counted as equal
    score, sd, how, lower = rr.baseline_at(pts, 20.0)                  # halfway between 10 and 30
    assert (round(score, 6), round(sd, 6), how, lower) == (75.0, 2.0, "10..30", False)
    # past the peak the line falls below the best budget that costs less: that budget is taken
    assert rr.baseline_at(pts, 60.0) == (80.0, 3.0, "30", False)
    assert rr.baseline_at(pts, 200.0) == (80.0, 3.0, "30", True)       # beyond the largest: a lower bound


def test_bar_needs_both_margins_beyond_the_spread_two_seeds_and_no_lower_bound():
    rows = []
    for seed, d in ((0, -0.5), (1, 0.5)):
        rows += [_row("e2e", "10", seed, 70 + d, 10), _row("e2e", "30", seed, 80 + d, 30),
                 _row("meta", "30", seed, 78 + d, 10), _row("meta", "90", seed, 82 + d, 30),
                 _row("ours", "30/2+2", seed, 84 + d, 15, "stack"),      # 20 TFLOPs-equivalent
                 _row("ours", "30/4+4", seed, 84 + 4 * d, 20, "stack"),  # wide spread
                 _row("ours", "90/2+2", seed, 90 + d, 40, "stack")]      # costs more than every baseline
    rows.append(_row("ours", "30/2+2", 0, 90, 15, "metainit"))          # one seed
    br = {(r["method"], r["budget"]): r for r in rr.bar_rows(rows, "regime")}
    cheap = br[("ours-stack", "30/2+2")]
    # E2E at 15 TFLOPs: the line 70 -> 80 a quarter of the way; meta alone: 78 -> 82 at a quarter
    assert round(cheap["e2e_margin"], 6) == 11.5 and round(cheap["meta_margin"], 6) == 5.0
    assert cheap["e2e_clear"] and cheap["meta_clear"] and cheap["met"]
    assert cheap["half"]          # 84 >= E2E's best (80 at 30 TFLOPs) with 15 <= 30 / 2
    wide = br[("ours-stack", "30/4+4")]        # meta alone at 20: 80 +- 0.71; ours 84 +- 2.83: 4 > 3.54
    assert wide["meta_clear"] and wide["met"] and not wide["half"]
    assert not br[("ours-stack", "90/2+2")]["meta_clear"] and not br[("ours-stack", "90/2+2")]["met"]
    assert not br[("ours-metainit", "30/2+2")]["met"]                     # one seed does not make the bar
    table = rr.bar_table(rows, "regime")
    assert "| 12 | 0.1 | ours-stack | 90/2+2 | 2 | 90.00 ± 0.71 | 40.00 | >= 80.00 ± 0.71 (30) | <= +10.00 |" in table
    assert table.count("**yes**") == 2
    assert "| 12 | 0.1 | ours-metainit | 30/2+2 | 1 | 90.00 ± 0.00 |" in table and "| yes, 1 seed (E2E best" in table
    # a bits-per-byte study has no bar in points
    assert rr.bar_table([dict(r, bpb=r.pop("top1")) for r in rows], "regime") == ""


def test_variant_picks_one_of_e2e_named_variants_and_leaves_other_methods(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(avc, "train_point", None)
    monkeypatch.setattr(avc, "publish", None)
    common = ["--study", "map_small_d64", "--seeds", "0", "--budgets", "30,30/B", "--methods", "e2e,grow", "--plan",
              "--results", str(tmp_path / "none.json")]
    avc.main(common)
    assert capsys.readouterr().out.splitlines() == [
        "map_small_d64 e2e 30 seed 0 (lr0.064)", "map_small_d64 e2e 30 seed 0 (lr0.032)", "map_small_d64 e2e 30 seed 0 (lr0.016)", "map_small_d64 e2e 30 seed 0 (lr0.008)", "map_small_d64 e2e 30 seed 0 (lr0.004)",
        "map_small_d64 e2e 30 seed 0 (lr0.002)", "map_small_d64 e2e 30 seed 0 (lr0.001)", "map_small_d64 e2e 30 seed 0 (lr0.0005)", "map_small_d64 grow 30/B seed 0",
        "map_small_d64 grow 30/B seed 0 (lr0.001)", "map_small_d64 grow 30/B seed 0 (lr0.004)"]
    avc.main(common + ["--variant", "lr0.0005"])      # the better lr of the sweep, alone at the larger budget
    assert capsys.readouterr().out.splitlines() == ["map_small_d64 e2e 30 seed 0 (lr0.0005)", "map_small_d64 grow 30/B seed 0",
                                                    "map_small_d64 grow 30/B seed 0 (lr0.001)",
                                                    "map_small_d64 grow 30/B seed 0 (lr0.004)"]
    avc.main(common + ["--variant", "paper"])      # growth's better lr was the recipe's: alone at the larger budget
    assert capsys.readouterr().out.splitlines() == [f"map_small_d64 e2e 30 seed 0 (lr{lr:g})" for lr in (6.4e-2, 3.2e-2, 1.6e-2, 8e-3, 4e-3, 2e-3, 1e-3, 5e-4)] + [
        "map_small_d64 grow 30/B seed 0"]
