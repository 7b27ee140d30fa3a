"""The fault-tolerance harness in its short form: 3 SIGKILLs of `incubate run` (while writing, in a step, inside
an epoch: one of each mode), then the same weights; its full form (21 kills) is in docs/scaling.md."""
import importlib.util

from ..conftest import ROOT


def _harness():
    spec = importlib.util.spec_from_file_location("kill_harness", ROOT / "benchmarks/kill_harness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_three_kills_resume_to_the_uninterrupted_weights(tmp_path):
    counts = _harness().harness(kills=3, launcher="inline", work=tmp_path)
    print({k: v for k, v in counts.items() if k != "events"})
    # Where the kills land (during a write or a step, before or after a stage's first checkpoint)
    # depends on timing; the CI form asserts what must hold wherever they land. The full form's
    # coverage (kills while writing, resumes, every stage) is reported in docs/scaling.md.
    assert counts["kills"] >= 3 and counts["resumes"] + counts["kills_while_writing"] >= 1
    assert counts["final_weights_equal"] and counts["rounds_equal"] == counts["rounds"] >= 1
    assert counts["finished_stages_redone"] == 0
    assert counts["checkpoints_verified"] >= counts["resumes"] and counts["weights_verified"] >= 5
    assert len(counts["kills_by_stage"]) >= 2
    # the third kill waits for a mid-epoch checkpoint and lands within 30 ms of it: the rerun goes on
    # inside that epoch (train.checkpoint_every) and still ends at the uninterrupted weights
    assert counts["kills_mid_epoch"] >= 1 and counts["resumes_mid_epoch"] >= 1
