"""The map (benchmarks/map_report.py) and the fair baselines of its studies (accuracy_vs_cost.fair_sets)."""
from benchmarks import map_report
from benchmarks.accuracy_vs_cost import fair_sets
from benchmarks.studies import MAP_FLAT_META, STUDIES, meta_variant, tok_run_dir, tok_variants


def row(study, method, budget, seed, bpb, variant="paper", evals=()):
    return {"study": study, "method": method, "budget": budget, "seed": seed, "bpb": bpb, "variant": variant,
            "evals": [list(e) for e in evals], "tokens": 1000, "trained_params": 100, "corpus_tokens": 250,
            "flops": float(budget.split("/")[0]) * 1e12}


def test_e2e_is_its_better_lr_and_the_meta_model_alone_comes_from_the_16_layer_cell():
    rows = [row("map_small_d64", "e2e", "15", s, b, "lr0.001") for s, b in ((0, 3.0), (1, 3.2))]
    rows += [row("map_small_d64", "e2e", "15", s, b, "lr0.0005") for s, b in ((0, 2.5), (1, 2.7))]
    rows += [row("map_small_d16", "meta", "15", s, b) for s, b in ((0, 2.1), (1, 2.2))]
    rows += [row("map_small_d64", "ours", "15/B", s, b) for s, b in ((0, 2.0), (1, 2.02))]
    c = map_report.cell(rows, "small", 64)
    assert [r["variant"] for r in c[("e2e", 15.0)]] == ["lr0.0005"] * 2
    assert [r["bpb"] for r in c[("meta", 15.0)]] == [2.1, 2.2]
    verdict = map_report.verdict(c, 15.0, "final")
    assert verdict.startswith("**ours** by 0.140 over meta model alone") and "spread" not in verdict
    assert "4 passes" in map_report.regime_words(c) and "10 tokens a parameter" in map_report.regime_words(c)


def test_the_meta_model_alone_is_borrowed_only_at_the_budgets_its_cell_trains():
    rows = [row("map_rich_d16", "meta", b, 0, v) for b, v in (("15", 2.2), ("30", 2.1))]
    rows += [row("map_rich_d64", "ours", "15/B", 0, 2.7)]
    for depth, budgets in ((16, [15.0, 30.0]), (64, [15.0])):      # rich_d64 trains one budget
        assert sorted(t for m, t in map_report.cell(rows, "rich", depth) if m == "meta") == budgets
    assert "30:" not in map_report.map_table(rows).splitlines()[-1].split(" | ")[-1]
    assert map_report.advice(map_report.cell(rows, "rich", 64)).endswith("at 15 TFLOPs, 1 seed")


def test_best_is_the_lowest_evaluation_and_a_margin_inside_the_spread_is_said():
    r = row("map_mid_d16", "grow", "30/B", 0, 2.3, evals=[(10, 2.6), (20, 2.25), (30, 2.3)])
    assert map_report.score(r, "final") == 2.3 and map_report.score(r, "best") == 2.25
    rows = [row("map_mid_d16", "grow", "30/B", s, b) for s, b in ((0, 2.0), (1, 2.2))]
    rows += [row("map_mid_d16", "ours", "30/B", s, b) for s, b in ((0, 2.05), (1, 2.25))]
    assert "within the spread" in map_report.verdict(map_report.cell(rows, "mid", 16), 30.0, "final")


def test_e2e_gets_its_variant_lr_and_a_warm_up_and_growth_re_warms_while_ours_is_left_as_it_is():
    study = "map_small_d64"
    assert tok_variants(study, "e2e", 15) == ["lr0.064", "lr0.032", "lr0.016", "lr0.008", "lr0.004", "lr0.002", "lr0.001", "lr0.0005"]
    assert fair_sets(study, "e2e", "lr0.0005", ["e2e.tokens=1000"]) == [
        "e2e.tokens=1000", "e2e.lr=0.0005", f"e2e.warmup_tokens={int(STUDIES[study]['warmup'] * 1000)}"]
    assert fair_sets(study, "grow", "paper", ["grow.tokens=2000"]) == ["grow.tokens=2000", "grow.warmup_tokens=100"]
    assert fair_sets(study, "grow", "lr0.001", ["grow.tokens=2000"]) == [
        "grow.tokens=2000", "grow.lr=0.001", "grow.warmup_tokens=100"]
    assert fair_sets(study, "ours", "meta", ["incubate.tokens=5", "finetune.tokens=9"]) == [
        "incubate.tokens=5", "finetune.tokens=9"]
    assert fair_sets(study, "ours", "ft0.004", ["incubate.tokens=5", "finetune.tokens=900"]) == [
        "incubate.tokens=5", "finetune.tokens=900", "finetune.lr=0.004", "finetune.warmup_tokens=45"]
    assert fair_sets("lm_tokens", "e2e", "paper", ["e2e.tokens=7"]) == ["e2e.tokens=7"]     # earlier studies unchanged


def test_the_map_and_its_tables_name_every_cell(tmp_path):
    rows = [row("map_rich_d16", m, b, 0, v, evals=[(1, v + 0.5), (2, v)]) for m, b, v in
            (("e2e", "15", 2.4), ("meta", "15", 2.2), ("ours", "15/B", 2.3), ("grow", "15/B", 2.25))]
    rows[0]["variant"] = "lr0.002"
    md = map_report.section(rows, tmp_path)
    assert (tmp_path / "map.png").stat().st_size > 10_000
    assert "**meta model alone** by 0.050 over growth (1 seed)" in md
    assert md.count("not run yet") == 2 * 4 and "only meta model alone so far" in md and "| rich | 16 | 15 | E2E (lr 0.002) | 1 |" in md
    assert tok_run_dir(tmp_path, "map_rich_d16", "e2e", 15, 0, "lr0.002").name == "e2e-lr0.002_15"
    assert tok_run_dir(tmp_path, "lm_tokens", "e2e", 30, 0, "paper").name == "e2e_30"


def test_every_e2e_learning_rate_tried_is_listed_best_first():
    rows = [row("map_mid_d64", "e2e", "15", s, b, lr) for s, b, lr in
            ((0, 4.8, "lr0.001"), (1, 4.6, "lr0.001"), (0, 4.9, "lr0.0005"), (0, 4.5, "lr0.004"))]
    rows.append(row("lm_tokens", "e2e", "30", 0, 2.2))       # another study's E2E stays out
    rows += [row("map_mid_d64", "grow", "15/B", 0, b, lr) for b, lr in ((2.2, "paper"), (2.1, "lr0.001"))]
    rows += [row("map_mid_d64", "ours", "15/B", 0, b, v) for b, v in ((2.3, "meta"), (2.25, "ft0.002"))]
    table = map_report.sweep_table(rows).splitlines()
    assert table[2:] == ["| mid_d64 | E2E | 15 | **0.004: 4.5000 (1)**, 0.001: 4.7000 (2), 0.0005: 4.9000 (1) |",
                         "| mid_d64 | growth | 15 | **0.001: 2.1000 (1)**, 0.002: 2.2000 (1) |",
                         "| mid_d64 | ours | 15 | **0.002: 2.2500 (1)**, 0.001, no warm-up: 2.3000 (1) |"]
    c = map_report.cell(rows, "mid", 64)
    assert [r["variant"] for r in c[("grow", 15.0)]] == ["lr0.001"] and [r["variant"] for r in c[("ours", 15.0)]] == ["ft0.002"]


def test_a_panel_names_the_methods_whose_every_point_is_above_its_axis():
    rows = [row("map_mid_d64", "e2e", "15", 0, 4.78, "lr0.001", evals=[(5, 6.4), (15, 4.78)]),
            row("map_mid_d64", "ours", "15/B", 0, 2.34, evals=[(12, 2.5), (15, 2.34)])]
    c = map_report.cell(rows, "mid", 64)
    assert map_report.off_axis(c, 2.34 + 0.6) == "E2E at 15 TFLOPs, best 4.78"
    assert map_report.off_axis(c, 5.0) == ""


def test_the_bars_are_said_cell_by_cell_from_the_curves_and_the_finals():
    rows = [row("map_small_d64", "e2e", "30", s, 4.0, "lr0.004", evals=[(15, 4.5), (30, 4.0)]) for s in (0, 1)]
    rows += [row("map_small_d64", "ours", "15/B", s, 2.3, evals=[(9, 3.9, None), (12, 2.5, 9), (15, 2.3, 18)])
             for s in (0, 1)]
    rows += [row("map_small_d64", "ours", "30/B", 0, 2.1, evals=[(20, 4.2), (25, 3.95), (30, 2.1)])]
    rows += [row("map_small_d64", "grow", "15/B", s, b) for s, b in ((0, 2.4), (1, 2.42))]
    rows += [row("map_small_d64", "grow", "30/B", 0, 2.05)]
    c = map_report.cell(rows, "small", 64)
    assert map_report.reach_e2e(c) == ("E2E-30 ends at 4.0000; ours-15 at 9.0 (0.30x, 2 seeds, already the assembled model): "
                                       "**met**; ours-30 at 25.0 (0.83x, 1 seed): **not met**")
    assert map_report.versus_growth(c) == ("15: +0.110 ± 0.014 (2 seeds), **met** beyond the spread; "
                                           "30: -0.050 ± 0.000 (1 seed), **not met**")
    table = map_report.bars_table(rows).splitlines()
    assert len(table) == 3 and table[2].startswith("| small, 64 layers | E2E-30 ends at 4.0000")
    assert map_report.reach_e2e(map_report.cell(rows[2:], "small", 64)) == "not run yet"
    rows.append(row("map_small_d64", "e2e", "15", 0, 3.95, "lr0.004", evals=[(15, 3.95)]))     # E2E-30 overfits
    assert map_report.reach_e2e(map_report.cell(rows, "small", 64)) == (
        "E2E-15 ends at 3.9500; ours-15 at 9.0 (0.60x, 2 seeds, already the assembled model): **met**; "
        "ours-30 at 25.0 (1.67x, 1 seed): **not met**")


def test_points_from_the_meta_model_not_annealed_stay_out_of_the_map_and_are_set_beside_their_pairs(tmp_path):
    assert tok_variants("map_rich_d16", "grow", (15, "B")) == ["paper", "lr0.001", "lr0.004", "lr0.008", "lr0.016",
                                                                 "flatmeta"]
    assert tok_variants("map_rich_d16", "ours", (15, "B")) == ["meta", "ft0.002", "ft0.004", "ft0.008", "flatmeta"]
    assert tok_variants("map_rich_d64", "ours", (15, "B")) == ["meta", "ft0.00025", "ft0.0005", "ft0.002",
                                                                 "ft0.004"]
    assert tok_variants("map_mid_d64", "grow", (15, "B")) == ["paper", "lr0.001", "lr0.004"]
    assert meta_variant("map_rich_d16", "flatmeta") == ("flatmeta", MAP_FLAT_META["flatmeta"][0])
    assert meta_variant("map_rich_d16", "meta") == ("paper", [])
    assert tok_run_dir(tmp_path, "map_rich_d16", "grow", (15, "B"), 0, "flatmeta").name == "grow-flatmeta_15B"
    assert tok_run_dir(tmp_path, "map_rich_d16", "grow", (15, "B"), 0, "paper").name == "grow_15B"
    assert tok_run_dir(tmp_path, "map_rich_d16", "meta", 3.75, 0, "flatmeta").name == "meta-flatmeta_3.75"
    rows = []
    for variant, g, o, m in (("paper", 2.30, 2.25, 2.40), ("flatmeta", 2.20, 2.28, 2.55)):
        rows.append(dict(row("map_rich_d16", "grow", "15/B", 0, g, variant, evals=[(10, g - 0.01, 5), (15, g, 9)]), meta_bpb=m))
        rows.append(dict(row("map_rich_d16", "ours", "15/B", 0, o, "meta" if variant == "paper" else variant,
                             evals=[(10, o, None), (15, o, 9)]), meta_bpb=m))
    c = map_report.cell(rows, "rich", 16)
    assert [r["bpb"] for r in c[("grow", 15.0)]] == [2.30] and [r["bpb"] for r in c[("ours", 15.0)]] == [2.25]
    table = map_report.meta_check_table(rows).splitlines()
    assert table[2:] == ["| rich_d16 | growth | 15/B | 1 | 2.4000 / 2.5500 (+0.1500) | 2.3000 / 2.2000 (-0.1000) | "
                         "2.2900 / 2.1900 (-0.1000) |",
                         "| rich_d16 | ours | 15/B | 1 | 2.4000 / 2.5500 (+0.1500) | 2.2500 / 2.2800 (+0.0300) | "
                         "2.2500 / 2.2800 (+0.0300) |"]
    assert map_report.meta_check_table(rows[1:]).splitlines()[2:] == table[3:]      # growth's annealed pair missing
    assert map_report.meta_check_table(rows[2:]) == ""
    assert "constant lr" in map_report.section(rows, tmp_path)


def test_readme_holds_the_map_as_the_results_say_and_collect_rewrites_only_that_table(tmp_path):
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    rows = json.loads((root / "docs/results.json").read_text())
    assert map_report.advice_table(rows) in (root / "README.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{map_report.README_BEGIN}\nold table\n{map_report.README_END}\nafter\n")
    rows = [row("map_mid_d16", m, b, s, v + 0.01 * s, evals=[(5, v + 0.2, 9), (15, v + 0.01 * s, 9)]) for m, b, v in
            (("e2e", "15", 2.4), ("meta", "15", 2.2), ("ours", "15/B", 2.3), ("grow", "15/B", 2.1)) for s in (0, 1)]
    map_report.write_readme(rows, readme)
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{map_report.README_END}\nafter\n") and "old" not in text
    mid = [line for line in text.splitlines() if line.startswith("| 1.38 MB")][0]
    assert mid.split(" | ")[1] == ("**growth**, then meta model alone (+0.10), ours (+0.20), E2E (+0.30) at 15 TFLOPs, "
                                   "2 seeds; E2E there reads 10 tokens a parameter, the text 4 times")
    assert mid.endswith("| not measured yet |")      # the 64-layer cell has only the shared meta model


def test_a_point_of_ours_knows_its_meta_model_is_trained_from_the_meta_run_it_really_starts_from(tmp_path):
    from benchmarks.gpu_accuracy import _meta_done
    for variant, name in (("meta", "meta_3.75"), ("flatmeta", "meta-flatmeta_3.75")):
        assert not _meta_done(tmp_path, "map_rich_d16", "ours", (15, "B"), 16, 1.0, 0, variant)
        (tok_run_dir(tmp_path, "map_rich_d16", "meta", 3.75, 0, "paper").parent / name / "meta").mkdir(parents=True)
        (tmp_path / "map_rich_d16_f1.0_s0" / name / "meta" / "manifest.json").write_text("{}")
        assert _meta_done(tmp_path, "map_rich_d16", "ours", (15, "B"), 16, 1.0, 0, variant)


def test_the_better_lr_is_chosen_on_the_seeds_both_rates_ran():
    rows = [row("map_small_d64", "grow", "15/B", 0, 2.30), row("map_small_d64", "grow", "15/B", 1, 2.50),
            row("map_small_d64", "grow", "15/B", 0, 2.35, "lr0.001")]
    # by the means over their own seeds lr0.001 (2.35) would beat the recipe's (2.40); on seed 0 it does not
    assert [r["variant"] for r in map_report.cell(rows, "small", 64)[("grow", 15.0)]] == ["paper", "paper"]
    assert map_report.better(rows[2:], rows[:2]) == rows[:2]
    assert map_report.sweep_table(rows).splitlines()[2] == "| small_d64 | growth | 15 | 0.001: 2.3500 (1), **0.002: 2.4000 (2)** |"


def test_the_rate_that_won_the_sweep_at_the_smaller_budget_stands_at_both_budgets():
    rows = [row("map_small_d64", "ours", "15/B", s, b, "meta") for s, b in ((0, 2.24), (1, 2.23))]
    rows += [row("map_small_d64", "ours", "15/B", 0, 2.22, "ft0.0005")]
    rows += [row("map_small_d64", "ours", "30/B", s, b, "meta") for s, b in ((0, 2.08), (1, 2.05))]
    c = map_report.cell(rows, "small", 64)
    assert [r["variant"] for r in c[("ours", 15.0)]] == ["ft0.0005"]
    assert [r["variant"] for r in c[("ours", 30.0)]] == ["meta"] * 2      # the winner not run at 30 yet
    rows.append(row("map_small_d64", "ours", "30/B", 0, 2.11, "ft0.0005"))     # worse there, still the one
    c = map_report.cell(rows, "small", 64)
    assert [r["bpb"] for r in c[("ours", 30.0)]] == [2.11]
    assert "**0.0005: 2.1100 (1)**" in map_report.sweep_table(rows)
