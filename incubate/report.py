"""Tables of every stage and the accuracy-vs-cost plot of a run directory."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import UserError
from .families import get_family
from .tasks import task_of
from .stages.common import StageDir, write_summary


def _fmt_flops(f: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f}{unit}"
    return f"{f:.0f}"


def table(summary: dict) -> str:
    rows = ["| stage | top-1 (%) | seconds | FLOPs | trainable params |", "|---|---:|---:|---:|---:|"]
    def add(name, e):
        rows.append(f"| {name} | {e['top1']:.2f} | {e['seconds']:.1f} | {_fmt_flops(e['flops'])} | "
                    f"{e['trainable_params']:,} |")
    modules = sorted((k for k in summary if k.startswith("module_")), key=lambda k: int(k.split("_")[1]))
    for key in ["meta"] + modules + ["assembled", "finetune"]:
        if key in summary:
            add(key.replace("_", " ") if key.startswith("module") else key, summary[key])
    ours = ours_total(summary)
    if ours:
        rows.append(f"| **ours (meta+modules+finetune)** | {ours['top1']:.2f} | {ours['seconds']:.1f} | "
                    f"{_fmt_flops(ours['flops'])} | |")
    if "e2e" in summary:
        add("**e2e**", summary["e2e"])
    return "\n".join(rows)


def ours_total(summary: dict, metric: str = "top1") -> dict | None:
    if "finetune" not in summary:
        return None
    parts = [v for k, v in summary.items() if k in ("meta", "finetune") or k.startswith("module_")]
    return {metric: summary["finetune"][metric], "seconds": sum(p["seconds"] for p in parts),
            "flops": sum(p["flops"] for p in parts)}


def _curve(stage: StageDir, base_flops: float, base_seconds: float, total_flops: float, key: str = "test_top1"):
    lines = [json.loads(l) for l in stage.metrics.read_text().splitlines() if l.strip()] if stage.metrics.exists() else []
    n = max(len(lines), 1)
    return ([base_flops + total_flops * (i + 1) / n for i in range(len(lines))],
            [base_seconds + l["seconds"] for l in lines], [l[key] for l in lines])


def plot(run: Path, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(yaml.safe_load((run / "recipe.yaml").read_text())["model"]["division"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, unit in zip(axes, ("flops", "seconds")):
        if "e2e" in summary:
            fl, sec, acc = _curve(StageDir(run, "e2e"), 0, 0, summary["e2e"]["flops"])
            ax.plot(fl if unit == "flops" else sec, acc, "o-", color="tab:gray", label="E2E")
        if "meta" in summary:
            pre = [summary["meta"]] + [summary[f"module_{i}"] for i in range(k) if f"module_{i}" in summary]
            pre_f, pre_s = sum(p["flops"] for p in pre), sum(p["seconds"] for p in pre)
            if "assembled" in summary:
                ax.plot(pre_f if unit == "flops" else pre_s, summary["assembled"]["top1"], "*", ms=14,
                        color="tab:red", label="assembled (before fine-tune)")
            if "finetune" in summary:
                fl, sec, acc = _curve(StageDir(run, "finetune"), pre_f, pre_s, summary["finetune"]["flops"])
                ax.plot(fl if unit == "flops" else sec, acc, "o-", color="tab:red", label="ours (fine-tune)")
        ax.set_xlabel("training FLOPs" if unit == "flops" else "training seconds (all processes)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{run.name}: accuracy vs training cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lm_table(summary: dict) -> str:
    """The table of a language-model run: bits per byte (lower is better), loss and accuracy."""
    rows = ["| stage | val bits/byte | val loss | next-token acc (%) | seconds | FLOPs | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    def add(name, e):
        rows.append(f"| {name} | {e['bpb']:.4f} | {e['loss']:.4f} | {e['acc']:.2f} | {e['seconds']:.1f} | "
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
