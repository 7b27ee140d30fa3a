"""report and status are driven by the task's own fields: a task they have never seen needs no
branch in either."""
import json
from types import SimpleNamespace

from incubate.report import table
from incubate.status import _metric, stage_status
from incubate.store.rundir import StageDir
from incubate.tasks import get_task

WER = SimpleNamespace(name="speech", headline="wer", higher_is_better=False, headline_label="word error rate (%)",
                      headline_text="WER {:.1f}%", columns=(("wer", "WER (%)", "{:.1f}"), ("loss", "loss", "{:.3f}")))


def _stage(wer, flops, seconds=10.0, params=100):
    return {"wer": wer, "loss": wer / 100, "top1": 1.0, "flops": flops, "seconds": seconds, "trainable_params": params}


def test_a_new_tasks_table_has_its_columns_and_headline():
    summary = {"meta": _stage(40.0, 1e9), "module_0": _stage(35.0, 1e9), "assembled": _stage(50.0, 0, 0.0, 0),
               "finetune": _stage(30.0, 2e9), "e2e": _stage(31.0, 4e9), "grow": _stage(33.0, 1e9)}
    lines = table(summary, WER).splitlines()
    assert lines[0] == ("| stage | WER (%) | loss | seconds | FLOPs | FLOPs, % of ours | seconds, % of ours | "
                        "trainable params |")
    assert lines[2] == "| meta | 40.0 | 0.400 | 10.0 | 1.00G | 25.0 | 33.3 | 100 |"
    ours = next(line for line in lines if line.startswith("| **ours"))
    assert ours == "| **ours (meta+modules+finetune)** | 30.0 |  | 30.0 | 4.00G | 100.0 | 100.0 | |"
    grow = next(line for line in lines if line.startswith("| **grow"))
    assert grow == "| **grow (G_stack)** (meta + grow) | 33.0 | 0.330 | 20.0 | 2.00G | | | 100 |"
    assert "top-1" not in "\n".join(lines)


def test_todays_tasks_keep_their_tables():
    summary = {"meta": _stage(40.0, 1e9) | {"top1": 80.0, "bpb": 1.5, "acc": 40.0}}
    assert table(summary, get_task("classification")).splitlines()[2] == "| meta | 80.00 | 10.0 | 1.00G | 100.0 | 100.0 | 100 |"
    assert table(summary, get_task("causal_lm")).splitlines()[2].startswith("| meta | 1.5000 | 0.4000 | 40.00 | 10.0 |")


def test_status_writes_the_tasks_headline(tmp_path):
    assert _metric({"wer": 12.34}, WER) == "WER 12.3%" and _metric({"loss": 0.5}, WER) == "loss 0.5000"
    assert _metric({"top1": 50.0}, get_task("classification")) == "top-1 50.00%"
    assert _metric({"test_bpb": 1.25}, get_task("causal_lm"), "test_") == "bits/byte 1.2500"
    sd = StageDir(tmp_path, "meta")
    sd.path.mkdir(parents=True)
    sd.weights.write_bytes(b"x")
    sd.manifest_path.write_text(json.dumps({"finished": True, "metrics": {"wer": 9.5, "loss": 0.1}, "epochs": 2}))
    row = stage_status(sd, 2, 0.0, WER)
    assert row["wer"] == 9.5 and row["detail"].startswith("WER 9.5% after 2 epoch(s)")
