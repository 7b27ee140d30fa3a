"""Part 3 of benchmarks/gpu_run.sh: the accuracy-vs-cost study of each model family, sized to the time left.

PART3 holds one entry a family: its study in benchmarks/accuracy_vs_cost.py (STUDIES), the variants of
ours it trains, and its smoke sizes. An entry runs only if its family is registered in
incubate.families.FAMILIES and its study exists; otherwise the output says why it was skipped.
Points run in levels (the first budget of every method, then the second, ...), so that the
cheapest complete comparison comes first, and each point runs only if its estimate fits in the time
left. The estimate counts block passes (E2E epoch = 3 x depth; meta epoch = 3 x K; module i epoch =
3 x its blocks + the meta blocks before it + 2 x those after it; fine-tune epoch = E2E epoch) and
prices them at the slowest seconds a block pass of the same method took so far (pass_seconds). Results go to OUT.json and OUT.md after every point.

  python -m benchmarks.gpu_accuracy --out OUTDIR/3_accuracy --root /tmp/runs --time-limit 250
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from benchmarks import accuracy_vs_cost as acc, studies
from benchmarks import token_study as tok
from benchmarks.results_report import VARIANTS
from incubate.families import FAMILIES


@dataclass
class Entry:
    family: str
    study: str
    variants: list = field(default_factory=lambda: ["paper"])   # of ours, named as in results_report.VARIANTS
    smoke: dict = field(default_factory=dict)     # study keys replaced by --smoke (no entry: not smoked)


# The families' engineers add an entry here and its study in accuracy_vs_cost.STUDIES.
PART3 = [
    Entry("vit", "gpu",
          # meta init (the recipe's), the paper's random init (studies.PAPER), depthwise stacking
          variants=["metainit-ftlr3e-4", "paper", "stack-ftlr3e-4"],
          smoke={"depth": 8, "e2e": [1, 2], "meta": [2], "ours": [(1, 1, 1)],
                 "sets": ["model.kwargs.embed_dim=16", "model.kwargs.num_heads=2", "model.kwargs.patch_size=7",
                          "train.amp=bf16", "train.batch_size=32", "train.warmup_epochs=0",
                          "incubate.warmup_epochs=0", "data.eval_batch_size=100"]}),
    Entry("resnet", "gpu_resnet"),
]
# The LM comparison in tokens (issue 20) answers where depth pays: it comes first in part 3.
PART3.insert(0, Entry("causal_lm", "gpu_lm", smoke={
    "depth": 8, "e2e": [0.002], "meta": [0.002], "ours": [(0.002, "A")], "grow": [(0.002, "A")],
    "sets": ["data.source=text:/usr/share/common-licenses", "model.kwargs.hidden_size=16",
             "model.kwargs.intermediate_size=32", "data.context=32", "data.eval_tokens=2048", "train.batch_size=8",
             "train.lr_base_batch=8", "train.amp=bf16", "train.fused=false", "train.eval_every=10"]}))


def variant_sets(name: str) -> list[str]:
    """The recipe overrides that make a variant of ours (none for the paper's recipe)."""
    if name == "paper":
        return []
    return [x.strip() for x in VARIANTS[name].split("--set ") if x.strip()]


def why_skipped(entry: Entry, smoke: bool) -> str | None:
    if entry.family not in FAMILIES:
        return f"family '{entry.family}' is not registered in incubate.families.FAMILIES"
    if entry.study not in studies.STUDIES:
        return f"no study '{entry.study}' in benchmarks/accuracy_vs_cost.py STUDIES"
    if smoke and not entry.smoke:
        return "the entry has no smoke sizes"
    return None


def plan(entry: Entry) -> list[tuple]:
    """(method, depth, fraction, budget, seed, variant) in levels: budget i of every method, then i+1.
    A study in TFLOPs runs ours and growth first (their meta model is the shared cheaper part), then
    E2E, then the meta model alone."""
    s = studies.STUDIES[entry.study]
    flops = s.get("budget") == "flops"
    by_level: dict = {}
    for method, depth, fraction, budget, seed in studies.points(entry.study):
        level = s[method].index(budget)
        names = (studies.tok_variants(entry.study, method, budget) if flops else
                 entry.variants if method == "ours" else ["paper"])
        for name in names:
            by_level.setdefault((seed, level), []).append((method, depth, fraction, budget, seed, name))
    order = {"ours": 0, "grow": 1, "e2e": 2, "meta": 3} if flops else {"e2e": 0, "meta": 1, "ours": 2}
    return [p for key in sorted(by_level) for p in sorted(by_level[key], key=lambda p: order[p[0]])]


def point_cost(study: str, method: str, budget, depth: int, k: int, meta_done: bool) -> float:
    """A point's cost: TFLOPs in a study of TFLOPs budgets (a meta model already trained not counted),
    else block passes."""
    if studies.STUDIES[study].get("budget") != "flops":
        return block_passes(method, budget, depth, k, meta_done)
    if method in ("e2e", "meta"):
        return budget
    return budget[0] * (1 - (tok.meta_budget(method, *budget) / budget[0] if meta_done else 0))


def block_passes(method: str, budget, depth: int, k: int, meta_done: bool) -> float:
    """A point's cost in block passes of one epoch's images (forward 1, backward 2)."""
    if method == "e2e":
        return 3 * depth * budget
    if method == "meta":
        return 3 * k * budget
    meta_epochs, m, n = budget
    per = depth // k
    modules = sum(3 * per + i + 2 * (k - 1 - i) for i in range(k))
    return (0 if meta_done else 3 * k * meta_epochs) + m * modules + n * 3 * depth


def pass_seconds(rates: dict, method: str) -> float:
    """Seconds a block pass of this method: measured, else 1.5x the slowest measured (a shallow model's
    pass costs more: its steps are bound by kernel launches), else 0 (the first point runs unpriced)."""
    return rates.get(method, 1.5 * max(rates.values(), default=0.0))


def _meta_done(root: Path, study: str, method: str, budget, depth: int, fraction: float, seed: int,
               variant: str) -> bool:
    """Whether the meta model a point of ours (or growth) starts from is already trained."""
    if method not in ("ours", "grow"):
        return False
    if studies.STUDIES[study].get("budget") == "flops":
        meta_tf = tok.meta_budget(method, *budget)
        run = studies.tok_run_dir(root, study, "meta", meta_tf, seed, studies.meta_variant(study, variant)[0])
    else:
        run = studies.base_dir(root, study, depth, fraction, seed) / f"meta_{budget[0]}"
    return (run / "meta" / "manifest.json").exists()


def run_entry(entry: Entry, root: Path, deadline: float, report: dict, save) -> None:
    s = studies.STUDIES[entry.study]
    k = 4
    folders = [x.split("idx:", 1)[1] for x in s.get("sets", []) + report["extra_sets"]
               if x.startswith("data.source=idx:")]
    if s.get("budget") == "flops":
        studies.ensure_data(study=entry.study)
    else:
        studies.ensure_data(Path(folders[-1]) if folders else studies.FMNIST)     # the last one set wins, as in the recipe
    rates: dict = {}      # method -> the slowest seconds a block pass took so far
    rows = report["rows"]
    for method, depth, fraction, budget, seed, variant in plan(entry):
        label = f"{method} {studies.budget_label(method, budget)}" + (f" ({variant})" if method == "ours" else "")
        passes = point_cost(entry.study, method, budget, depth, k, _meta_done(root, entry.study, method, budget,
                                                                              depth, fraction, seed, variant))
        left = deadline - time.time()
        estimate = passes * pass_seconds(rates, method)
        if estimate > left:
            report["skipped"].append({"family": entry.family, "point": label,
                                      "why": f"needs ~{estimate:.0f}s, {left:.0f}s left"})
            print(f"== skipped {label}: needs ~{estimate:.0f}s, {left:.0f}s left", flush=True)
            continue
        report["running"] = f"{entry.family}: {label} (estimate {estimate:.0f}s, {left:.0f}s left)"
        save(report)
        t0 = time.time()
        flops = s.get("budget") == "flops"
        sets = variant_sets(variant) if method == "ours" and not flops else []
        # --data names Fashion-MNIST: the image studies' data, not a text study's corpus
        extra = [x for x in report["extra_sets"] if not (flops and x.startswith("data.source="))]
        args = SimpleNamespace(set=sets + extra, variant=variant)
        try:
            row = acc.train_point(root, entry.study, method, depth, fraction, budget, seed, args, variant)
        except Exception as e:        # one failed point is reported; the study goes on
            report["errors"].append({"family": entry.family, "point": label, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-2000:]})
            report["running"] = None
            save(report)
            continue
        wall = time.time() - t0
        full = point_cost(entry.study, method, budget, depth, k, False)    # a shared meta model counted in full
        row.update(family=entry.family, wall_s=wall, e2e_epochs=full / (3 * depth), estimate_s=estimate)
        if flops:       # E2E epochs mean nothing here: the cost is the point's TFLOPs
            row.pop("e2e_epochs")
        rows.append(row)
        rates[method] = max(rates.get(method, 0.0), wall / max(passes, 1))
        report["running"] = None
        save(report)


def markdown(report: dict) -> str:
    out = [f"Part 3, accuracy vs cost ({report['mode']}): `{report['command']}`; {report['time']}.", "",
           "Cost in E2E epochs counts block passes (forward 1, backward 2) of one epoch's images; "
           "seconds are the stages' training seconds, wall includes data loading and evaluation.", "",
           "| family | method | variant | budget | cost (E2E epochs) | top-1 % or bits/byte | meta | assembled "
           "| TFLOPs | seconds | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ours = r["method"] == "ours"
        metric = "bpb" if "bpb" in r else "top1"
        fmt = (lambda v: f"{v:.4f}") if metric == "bpb" else (lambda v: f"{v:.2f}")
        cost = f"{r['e2e_epochs']:.1f}" if "e2e_epochs" in r else "(TFLOPs)"
        cells = [r["family"], r["method"], r["variant"] if ours else "-", r["budget"], cost,
                 fmt(r[metric]) + (" bits/byte" if metric == "bpb" else ""),
                 fmt(r[f"meta_{metric}"]) if f"meta_{metric}" in r else "-",
                 fmt(r[f"assembled_{metric}"]) if f"assembled_{metric}" in r else "-", f"{r['flops'] / 1e12:.1f}", f"{r['seconds']:.0f}",
                 f"{r['wall_s']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    if report.get("running"):
        out += ["", f"Cut short while running: {report['running']}."]
    for sk in report["skipped"]:
        out += ["", f"Skipped {sk['family']}" + (f" {sk['point']}" if sk.get("point") else "") + f": {sk['why']}."]
    for err in report["errors"]:
        out += ["", f"FAILED {err['family']} {err['point']}: {err['error']}", "", "```", err["traceback"], "```"]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="basename of the .json and .md written after every point")
    ap.add_argument("--root", required=True, help="folder of the run directories")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds for the whole part (0: no limit)")
    ap.add_argument("--data", default="", help="Fashion-MNIST IDX folder (default: the study's)")
    ap.add_argument("--smoke", action="store_true", help="each entry's smoke sizes (seconds on a CPU)")
    args = ap.parse_args(argv)
    started = time.time()
    deadline = started + (args.time_limit or 1e9)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks.gpu_accuracy " + " ".join(argv if argv is not None else sys.argv[1:]),
              "mode": "smoke" if args.smoke else "full", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "rows": [], "skipped": [], "errors": [], "running": None,
              "extra_sets": [f"data.source=idx:{Path(args.data).resolve()}"] if args.data else []}

    def save(rep):
        out.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=str))
        out.with_suffix(".md").write_text(markdown(rep))

    for entry in PART3:
        why = why_skipped(entry, args.smoke)
        if why:
            report["skipped"].append({"family": entry.family, "why": why})
            print(f"== {entry.family}: skipped ({why})", flush=True)
            continue
        if args.smoke:      # this process only: the study at its smoke sizes
            smoke = dict(entry.smoke, sets=studies.STUDIES[entry.study].get("sets", []) + entry.smoke.get("sets", []))
            studies.STUDIES[entry.study] = dict(studies.STUDIES[entry.study], **smoke)
        try:
            run_entry(entry, Path(args.root), deadline, report, save)
        except Exception as e:
            report["errors"].append({"family": entry.family, "point": "(setup)", "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-2000:]})
        save(report)
    save(report)
    return report


if __name__ == "__main__":
    main()
