"""Tables of every stage and the accuracy-vs-cost plot of a run directory.

Costs are training FLOPs (FlopCounterMode's count of one step x steps, every process) and
process-seconds (each process's training seconds, summed over processes), as in RUN/summary.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import UserError
from .families import get_family
from .tasks import task_of
from .rundir import StageDir, write_summary


def _fmt_flops(f: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f}{unit}"
    return f"{f:.0f}"


def _cell(entry: dict, metric: str, fmt: str) -> str:
    """A metric of a table row; "-" where the stage has none (a module saved by a script without metrics)."""
    return format(entry[metric], fmt) if metric in entry else "-"


def _tick(v: float, _=None) -> str:
    """A short axis label: 50M, 1.5G (no fixed decimals, so neighbouring ticks never collide)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def _modules(summary: dict) -> list[str]:
    return sorted((k for k in summary if k.startswith("module_")), key=lambda k: int(k.split("_")[1]))


def ours_parts(summary: dict) -> list[str]:
    """The summary keys whose training cost is ours: meta, every module and fine-tune (assembling
    trains nothing: its seconds are one evaluation)."""
    return [k for k in ["meta"] + _modules(summary) + ["finetune"] if k in summary]


def ours_total(summary: dict, metric: str = "top1") -> dict | None:
    if "finetune" not in summary:
        return None
    parts = [summary[k] for k in ours_parts(summary)]
    return {metric: summary["finetune"][metric], "seconds": sum(p["seconds"] for p in parts),
            "flops": sum(p["flops"] for p in parts)}


def metric_rows(stage: StageDir, kind: str = "epoch") -> list[dict]:
    """A stage's metrics.jsonl rows: those of its epochs, or (kind "eval") its evaluations during
    training (train.eval_every)."""
    if not stage.metrics.exists():
        return []
    rows = []
    for line in stage.metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue        # a line being written
        if (row.get("kind", "epoch") == "eval") == (kind == "eval"):
            rows.append(row)
    return rows


def _curve(stage: StageDir, base_flops: float, base_seconds: float, total_flops: float, key: str = "test_top1"):
    """(FLOPs, seconds, metric) after each epoch, or after each evaluation during training where the
    stage made them (their own FLOPs so far)."""
    evals = metric_rows(stage, "eval")
    if evals:
        return ([base_flops + r["flops"] for r in evals], [base_seconds + r["seconds"] for r in evals],
                [r[key] for r in evals])
    lines = metric_rows(stage)
    n = max(len(lines), 1)
    return ([base_flops + total_flops * (i + 1) / n for i in range(len(lines))],
            [base_seconds + l["seconds"] for l in lines], [l[key] for l in lines])


def grow_total(summary: dict, metric: str) -> dict | None:
    """Growth's score at its whole cost: the meta model it grew from, then its own training."""
    if "grow" not in summary or "meta" not in summary:
        return None
    return {metric: summary["grow"][metric], **{u: summary["meta"][u] + summary["grow"][u] for u in ("seconds", "flops")}}


def shares(summary: dict) -> dict:
    """Each stage's FLOPs and seconds as a percentage of ours' total (meta + modules + fine-tune: their
    shares add up to 100); assemble's and E2E's against the same total, for comparison. Before
    fine-tune has finished, the total is what ours has spent so far."""
    keys = ours_parts(summary)
    total = {u: sum(summary[k][u] for k in keys) for u in ("flops", "seconds")}
    out = {}
    for k in [k for k in summary if k in keys or k in ("assembled", "e2e")]:
        out[k] = {u: 100.0 * summary[k][u] / total[u] if total[u] else float("nan") for u in ("flops", "seconds")}
    return out


def table(summary: dict) -> str:
    rows = ["| stage | top-1 (%) | seconds | FLOPs | FLOPs, % of ours | seconds, % of ours | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    share = shares(summary)

    def add(name, key):
        e, s = summary[key], share[key]
        rows.append(f"| {name} | {_cell(e, 'top1', '.2f')} | {e['seconds']:.1f} | {_fmt_flops(e['flops'])} | "
                    f"{s['flops']:.1f} | {s['seconds']:.1f} | {e['trainable_params']:,} |")
    for key in ["meta"] + _modules(summary) + ["assembled", "finetune"]:
        if key in summary:
            add(key.replace("_", " ") if key.startswith("module") else key, key)
    ours = ours_total(summary)
    if ours:
        rows.append(f"| **ours (meta+modules+finetune)** | {ours['top1']:.2f} | {ours['seconds']:.1f} | "
                    f"{_fmt_flops(ours['flops'])} | 100.0 | 100.0 | |")
    if "e2e" in summary:
        add("**e2e**", "e2e")
    if grown := grow_total(summary, "top1"):
        rows.append(f"| **grow (G_stack)** (meta + grow) | {grown['top1']:.2f} | {grown['seconds']:.1f} | "
                    f"{_fmt_flops(grown['flops'])} | | | {summary['grow']['trainable_params']:,} |")
    return "\n".join(rows)


def stage_curve(run: Path, stage: str, base_flops: float = 0.0, base_seconds: float = 0.0) -> dict | None:
    """A finished stage's test top-1 after each of its epochs (its metrics.jsonl) at the cumulative
    cost: `base_*` (what was spent before it) plus its FLOPs (flops_per_step x steps, the manifest,
    spread evenly over its epochs) and its process-seconds (the epoch line's seconds x processes).
    None when the stage has not finished or trained no epoch."""
    sd = StageDir(run, stage)
    m = sd.manifest()
    if not (m and m.get("finished") and m.get("epochs")) or not sd.metrics.exists():
        return None
    rows = metric_rows(sd)
    per_epoch = m["flops_per_step"] * m["steps"] / m["epochs"]
    world = m.get("world_size", 1)
    return {"epoch": [r["epoch"] for r in rows],
            "flops": [base_flops + per_epoch * r["epoch"] for r in rows],
            "seconds": [base_seconds + r["seconds"] * world for r in rows],
            "top1": [r["test_top1"] for r in rows]}


def curves(run: Path, summary: dict) -> dict:
    """What the figure plots: {meta, e2e, ours: per-epoch curves; assembled: one point}. Ours is the
    fine-tune's curve shifted by the cost of everything before it (meta and modules)."""
    run = Path(run)
    out = {name: c for name in ("meta", "e2e") if (c := stage_curve(run, name)) is not None}
    before = [summary[k] for k in ours_parts(summary) if k != "finetune"]     # meta and modules
    pre_f, pre_s = sum(p["flops"] for p in before), sum(p["seconds"] for p in before)
    if "assembled" in summary:
        out["assembled"] = {"flops": [pre_f], "seconds": [pre_s], "top1": [summary["assembled"]["top1"]]}
    if "finetune" in summary and (c := stage_curve(run, "finetune", pre_f, pre_s)) is not None:
        out["ours"] = c
    return out


STYLE = {"meta": ("s-", "tab:blue", "meta model alone"), "e2e": ("o-", "tab:gray", "E2E"),
         "assembled": ("*", "tab:red", "assembled (before fine-tune)"),
         "ours": ("o-", "tab:red", "ours: meta + modules + fine-tune")}


def plot(run: Path, summary: dict, path: Path) -> dict:
    """Draw report.png (left: FLOPs, right: seconds) and return the curves it plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    data = curves(run, summary)
    recipe = yaml.safe_load((Path(run) / "recipe.yaml").read_text()) or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, unit in zip(axes, ("flops", "seconds")):
        for name, c in data.items():
            fmt, color, label = STYLE[name]
            ax.plot(c[unit], c["top1"], fmt, color=color, label=label, ms=14 if name == "assembled" else 4, lw=1.5,
                    zorder=3 if name == "assembled" else 2)
        if "assembled" in data and "ours" in data:     # fine-tuning starts from the assembled model
            a, o = data["assembled"], data["ours"]
            ax.plot([a[unit][0], o[unit][0]], [a["top1"][0], o["top1"][0]], ":", color="tab:red", lw=1)
        ax.set_xlim(left=0)       # cost starts at zero for every method: lengths compare
        ax.set_xlabel("training FLOPs, cumulative" if unit == "flops"
                      else "training seconds, cumulative (summed over processes)")
        if unit == "flops":
            ax.xaxis.set_major_formatter(FuncFormatter(_tick))
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    if data:      # one legend under both panels, where it hides no point
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"{Path(run).resolve().name} (recipe {recipe.get('name', '?')}): test accuracy vs training cost")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data


def lm_table(summary: dict) -> str:
    """The table of a language-model run: bits per byte (lower is better), loss and accuracy."""
    rows = ["| stage | val bits/byte | val loss | next-token acc (%) | seconds | FLOPs | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    def add(name, e):
        rows.append(f"| {name} | {_cell(e, 'bpb', '.4f')} | {_cell(e, 'loss', '.4f')} | {_cell(e, 'acc', '.2f')} | "
                    f"{e['seconds']:.1f} | "
                    f"{_fmt_flops(e['flops'])} | {e['trainable_params']:,} |")
    modules = sorted((k for k in summary if k.startswith("module_")), key=lambda k: int(k.split("_")[1]))
    for key in ["meta"] + modules + ["assembled", "finetune"]:
        if key in summary:
            add(key.replace("_", " ") if key.startswith("module") else key, summary[key])
    ours = ours_total(summary, "bpb")
    if ours:
        rows.append(f"| **ours (meta+modules+finetune)** | {ours['bpb']:.4f} | | | {ours['seconds']:.1f} | "
                    f"{_fmt_flops(ours['flops'])} | |")
    if "e2e" in summary:
        add("**e2e**", summary["e2e"])
    if grown := grow_total(summary, "bpb"):
        rows.append(f"| **grow (G_stack)** (meta + grow) | {grown['bpb']:.4f} | {summary['grow']['loss']:.4f} | "
                    f"{summary['grow']['acc']:.2f} | {grown['seconds']:.1f} | {_fmt_flops(grown['flops'])} | "
                    f"{summary['grow']['trainable_params']:,} |")
    return "\n".join(rows)


def lm_plot(run: Path, summary: dict, path: Path) -> None:
    """Validation bits per byte against training FLOPs and seconds: E2E and ours (meta and
    modules first, then the fine-tune curve)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(yaml.safe_load((run / "recipe.yaml").read_text())["model"]["division"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, unit in zip(axes, ("flops", "seconds")):
        pick = (lambda fl, sec: fl) if unit == "flops" else (lambda fl, sec: sec)
        if "e2e" in summary:
            fl, sec, bpb = _curve(StageDir(run, "e2e"), 0, 0, summary["e2e"]["flops"], "test_bpb")
            ax.plot(pick(fl, sec), bpb, "o-", color="tab:gray", label="E2E")
        if "meta" in summary:
            fl, sec, bpb = _curve(StageDir(run, "meta"), 0, 0, summary["meta"]["flops"], "test_bpb")
            ax.plot(pick(fl, sec), bpb, "o:", color="tab:blue", label="meta model alone")
            pre = [summary["meta"]] + [summary[f"module_{i}"] for i in range(k) if f"module_{i}" in summary]
            pre_f, pre_s = sum(p["flops"] for p in pre), sum(p["seconds"] for p in pre)
            if "assembled" in summary:
                ax.plot(pick(pre_f, pre_s), summary["assembled"]["bpb"], "*", ms=14, color="tab:red",
                        label="assembled (before fine-tune)")
            if "finetune" in summary:
                fl, sec, bpb = _curve(StageDir(run, "finetune"), pre_f, pre_s, summary["finetune"]["flops"], "test_bpb")
                ax.plot(pick(fl, sec), bpb, "o-", color="tab:red", label="ours (fine-tune)")
            if "grow" in summary:
                m = summary["meta"]
                fl, sec, bpb = _curve(StageDir(run, "grow"), m["flops"], m["seconds"], summary["grow"]["flops"], "test_bpb")
                ax.plot(pick(fl, sec), bpb, "o-", color="tab:green", label="grow (G_stack), after the meta model")
        ax.set_xlabel("training FLOPs" if unit == "flops" else "training seconds (all processes)")
        ax.set_ylabel("validation bits per byte (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{run.name}: bits per byte vs training cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(run: Path) -> dict:
    run = Path(run)
    if not (run / "recipe.yaml").exists():
        raise UserError(f"{run} is not a run directory (no recipe.yaml); pass the --out of a run")
    summary = write_summary(run)
    family = (yaml.safe_load((run / "recipe.yaml").read_text()).get("model") or {}).get("family", "vit")
    if task_of(get_family(family)).name == "causal_lm":
        print(lm_table(summary))
        lm_plot(run, summary, run / "report.png")
        print(f"wrote {run / 'summary.json'} and {run / 'report.png'}")
        return summary
    print(table(summary))
    plot(run, summary, run / "report.png")
    print(f"wrote {run / 'summary.json'} and {run / 'report.png'}")
    return summary
