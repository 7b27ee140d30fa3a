"""benchmarks/step_cost.py runs end to end on CPU and its FLOP and memory accounting holds together."""
import json

import torch

from benchmarks import step_cost


def test_step_cost_smoke_flops_and_memory(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = step_cost.main(["--batch", "2", "--steps", "2", "--warmup", "1", "--jobs", "e2e,meta,hybrid,official",
                              "--no-data", "--threads", "1", "--out", str(tmp_path / "sc")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "sc.json").read_text())["bars"].keys() == res["bars"].keys()
    assert (tmp_path / "sc.md").read_text().count("| hybrid") >= 4
    rows = {r["job"]: r for r in res["rows"]}
    e2e = rows["e2e"]["flops"]
    # FLOP floor in block passes (E2E = 36): ours 15, 14, 13, 12; official 18, 16, 14, 12 (+ stem/head)
    for i, (ours, official) in enumerate([(15, 18), (14, 16), (13, 14), (12, 12)]):
        assert abs(rows[f"hybrid{i}"]["flops"] / e2e - ours / 36) < 0.02
        assert abs(rows[f"official{i}"]["flops"] / e2e - official / 36) < 0.02
        mem, off = rows[f"hybrid{i}"]["memory"], rows[f"official{i}"]["memory"]
        assert mem["grads"] == 4 * mem["trainable_params"] and mem["optimizer"] == 2 * mem["grads"]
        assert (off["grads"] > mem["grads"]) == (i < 3)      # official: wasted suffix gradients
        assert res["bars"][f"hybrid{i} model state / (E2E/K + meta params)"]["pass"]
    assert abs(res["bars"]["sum hybrid / sum official"]["flop_ratio"] - 54 / 60) < 0.01
    assert rows["e2e"]["memory"]["saved_activations"] > rows["hybrid0"]["memory"]["saved_activations"] > 0
