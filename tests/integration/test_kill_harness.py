"""The fault-tolerance harness in its short form: 5 SIGKILLs of `incubate run`, then the same weights."""
import importlib.util

from ..conftest import ROOT


def _harness():
    spec = importlib.util.spec_from_file_location("kill_harness", ROOT / "benchmarks/kill_harness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_five_kills_resume_to_the_uninterrupted_weights(tmp_path):
    counts = _harness().harness(kills=5, launcher="inline", work=tmp_path)
    print({k: v for k, v in counts.items() if k != "events"})
    assert counts["kills"] >= 5 and counts["resumes"] >= 2 and counts["kills_while_writing"] >= 1
    assert counts["final_weights_equal"] and counts["rounds_equal"] == counts["rounds"] >= 1
    assert counts["finished_stages_redone"] == 0
    assert counts["checkpoints_verified"] >= counts["resumes"] >= 2 and counts["weights_verified"] >= 5
    assert {"meta", "finetune"} <= set(counts["kills_by_stage"])
    assert any(s.startswith("modules/") for s in counts["kills_by_stage"])
