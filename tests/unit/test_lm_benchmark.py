"""benchmarks/accuracy_vs_cost.py --study lm: its recipe, points and run folders."""
from benchmarks import studies


def test_lm_study_builds_a_16_layer_causal_lm_on_the_pinned_corpus(tmp_path):
    recipe = studies.make_recipe(16, 1.0, 1, ["e2e.epochs=4"], "lm")
    assert recipe.model.family == "causal_lm" and recipe.model.division == [4, 4, 4, 4] and recipe.seed == 1
    assert recipe.data.source == f"text:{studies.PYDOC}" and recipe.stage("e2e").epochs == 4
    assert recipe.stage("incubate").module_init == "random"          # the paper's; meta/stack are variants
    assert studies.base_dir(tmp_path, "lm", 16, 1.0, 0).name == "lm_d16_f1.0_s0"
    methods = {p[0] for p in studies.points("lm")}
    assert methods == {"e2e", "meta", "ours"} and {p[4] for p in studies.points("lm")} == {0, 1}


def test_the_plain_loop_probe_reads_windows_and_counts_bits_per_byte():
    import numpy as np
    import torch

    from benchmarks import lm_plain_loop as plain
    tokens = np.arange(2000, dtype=np.uint8)
    x, y = plain.windows(tokens, [0, 10])
    assert x.shape == (2, plain.CONTEXT) and torch.equal(y[:, :-1], x[:, 1:]) and int(y[1, 0]) == 11
    torch.manual_seed(0)
    bpb = plain.bits_per_byte(plain.model(1), np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8))
    assert abs(bpb - 8.0) < 0.2      # an untrained model over 256 bytes: about 8 bits each


def test_the_token_cache_table_gives_each_start_against_the_small_corpus():
    from benchmarks import token_cache_cost as cost
    point = lambda wall, anon, file: {"wall_s": wall, "anon_mib": anon, "file_mib": file}
    r = {"copies": 3, "text_bytes": 105.7e6, "token_file_bytes": 100.8 * 2**20, "repeats": 3,
         "median": {"small corpus": point(4.79, 639.3, 484.0), "cold": point(7.48, 658.7, 484.1),
                    "warm": point(5.88, 637.6, 484.2)}}
    md = cost.markdown(r)
    assert "at 105.7 MB of text (3 copies of data/lm_corpus; token files 100.8 MiB); medians of 3" in md
    assert "| cold | 7.48 | +2.69 s | 658.7 | +19.4 | 484.1 | +0.1 |" in md
    assert "| warm | 5.88 | +1.09 s | 637.6 | -1.7 | 484.2 | +0.2 |" in md


def test_resident_memory_is_read_from_proc_and_zero_for_a_process_that_is_gone():
    import os
    from benchmarks import token_cache_cost as cost
    assert cost.resident_kib(os.getpid(), "RssAnon") > 0 and cost.resident_kib(2**22 + 1, "RssAnon") == 0


def test_split_c_puts_ours_first_deep_model_at_half_the_budget_with_meta_init_only():
    from benchmarks import token_study as ts
    meta, modules = ts.SPLITS["C"]
    assert ts.meta_budget("ours", 60, "C") == 24 and (meta + modules) * 60 == 30      # the assembly at 30 of 60
    assert studies.tok_variants("lm_tokens", "ours", (60, "C")) == ["meta"]
    assert studies.tok_variants("lm_tokens", "ours", (60, "B")) == ["meta", "stack"]
