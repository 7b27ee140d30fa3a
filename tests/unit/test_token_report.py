"""The token study's report: first FLOPs at which a curve reaches E2E's final bits per byte, and the bar."""
import pytest

from benchmarks import token_report as t


def _rows():
    rows = []
    for method, budget, variant, bpb, evals in (
            ("e2e", "60", "paper", 2.20, [[20, 2.6], [40, 2.3], [60, 2.2]]),
            ("ours", "60/A", "meta", 2.10, [[32, 2.40], [34, 2.19], [60, 2.10]]),
            ("grow", "60/A", "paper", 2.15, [[31, 2.5], [50, 2.2], [60, 2.15]])):
        for seed in (0, 1):
            rows.append(dict(study="lm_tokens", method=method, budget=budget, variant=variant, seed=seed, flops=60e12,
                             bpb=bpb + 0.01 * seed, tokens=9e6, evals=[[f, b + 0.01 * seed] for f, b in evals]))
    return rows


def test_first_reach_is_the_first_evaluation_at_or_below_the_target():
    assert t.first_reach([(1, 3.0), (2, 2.5), (3, 2.4)], 2.5) == 2 and t.first_reach([(1, 3.0)], 2.0) is None
    ours = next(r for r in t.reach_rows(_rows(), "lm_tokens") if r["method"] == "ours-metainit")
    assert ours["target"] == 2.205 and ours["tflops"] == 34 and ours["reached"] == 2      # both seeds at 34


def test_the_bar_needs_the_share_and_a_margin_beyond_both_spreads():
    bar = t.bar_table(_rows(), "lm_tokens")
    assert "| ours-metainit | 60/A | 34.00 | 0.57x | yes |" in bar                   # 34 / 60 <= 0.6
    assert "| grow (G_stack) | 60/A | 55.00 | 0.92x | no |" in bar     # seed 0 at 50, seed 1 at 60: the mean
    assert "| ours-metainit | 60/A | 2.1050 | 2.1550 | +0.0500 | 0.0141 | 2 | yes |" in bar
    one_seed = [r for r in _rows() if r["seed"] == 0]
    assert "| 1 | no |" in t.bar_table(one_seed, "lm_tokens")                     # one seed never clears


def test_a_stage_warm_up_in_the_study_sets_leaves_its_tokens_as_they_were(tmp_path):
    # a stage's warmup_tokens alone is refused until its tokens are set: the FLOPs of a token must not need them
    from benchmarks import token_study as ts
    key = tuple(ts.sets(tmp_path))
    plain = ts.budget_sets(key, "meta", 0.5, None)
    assert ts.budget_sets(key + ("meta.warmup_tokens=1000",), "meta", 0.5, None) == plain


def test_the_figure_has_the_whole_run_and_a_panel_of_its_end_with_a_legend_line_a_method_and_split():
    rows = _rows() + [dict(r, budget="60/B", bpb=r["bpb"] + 0.05) for r in _rows() if r["method"] == "ours"]
    fig = t.figure(rows, "lm_tokens", "title")
    whole, end = fig.axes
    assert whole.get_xlim()[0] == 0 and end.get_xlim() == pytest.approx((18.0, 61.2))        # from 30% of 60 TFLOPs on
    assert end.get_ylim() == pytest.approx((2.08, 2.55))                      # the best final point, 2.10, - 0.02
    assert [text.get_text() for text in end.get_legend().get_texts()] == [
        "e2e", "grow (G_stack), split A", "ours-metainit, split A", "ours-metainit, split B"]
    styles = {line.get_label(): line.get_linestyle() for line in end.get_lines()}
    assert styles["ours-metainit, split A"] == "-" and styles["ours-metainit, split B"] == "--"
    assert t.SPLIT_STYLES["C"] not in ("-", "--", ":")          # dotted is the meta models' curves
    assert whole.get_legend() is None and t.figure([], "lm_tokens", "title") is None
