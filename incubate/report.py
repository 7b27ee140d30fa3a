"""The table of every stage and the plot of the task's headline metric against cost of a run
directory; the task (incubate/tasks) names its metric columns, headline and which way is better.

Costs are training FLOPs (FlopCounterMode's count of one step x steps, every process) and
process-seconds (each process's training seconds, summed over processes), as in RUN/summary.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import UserError
from .families import task_name
from .store.safe_read import read_json_lines
from .tasks import get_task
from .store.rundir import StageDir, finished_manifests, run_recipe, write_summary
from .stage_registry import ASSEMBLED, E2E, FINETUNE, GROW, META, lineage
from .stage_registry import stage as registered

OURS, GROWTH = lineage(FINETUNE), lineage(GROW)     # the stages each method's score and cost come from


def _fmt_flops(f: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f}{unit}"
    return f"{f:.0f}"


def _tick(v: float, _=None) -> str:
    """A short axis label: 50M, 1.5G (no fixed decimals, so neighbouring ticks never collide)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def _modules(summary: dict) -> list[str]:
    return sorted((k for k in summary if k.startswith("module_")), key=lambda k: int(k.split("_")[1]))


def _keys(summary: dict, stages) -> list[str]:
    """The summary keys of `stages` that it holds, in run order (a per-module stage: each module's)."""
    keys = []
    for name in stages:
        keys += _modules(summary) if registered(name).per_module else [name] if name in summary else []
    return keys


def ours_parts(summary: dict) -> list[str]:
    """The summary keys whose training cost is ours: the stages of OURS that train (meta, every
    module and fine-tune; assembling trains nothing: its seconds are one evaluation)."""
    return _keys(summary, [name for name in OURS if registered(name).trains])


def ours_total(summary: dict, metric: str) -> dict | None:
    if FINETUNE not in summary:
        return None
    parts = [summary[k] for k in ours_parts(summary)]
    return {metric: summary[FINETUNE][metric], "seconds": sum(p["seconds"] for p in parts),
            "flops": sum(p["flops"] for p in parts)}


def metric_rows(stage: StageDir, kind: str = "epoch") -> list[dict]:
    """A stage's metrics.jsonl rows: those of its epochs, or (kind "eval") its evaluations during
    training (train.eval_every)."""
    need = ("update", "flops", "seconds") if kind == "eval" else ("epoch", "seconds")
    # a line being written, or damaged, is left out: the curve shows the rest
    return [row for row in read_json_lines(stage.metrics) if (row.get("kind", "epoch") == "eval") == (kind == "eval")
            and all(isinstance(row.get(k), (int, float)) for k in need)]


def grow_total(summary: dict, metric: str) -> dict | None:
    """Growth's score at its whole cost: the meta model it grew from, then its own training."""
    if any(name not in summary for name in GROWTH):
        return None
    return {metric: summary[GROW][metric], **{u: sum(summary[k][u] for k in GROWTH) for u in ("seconds", "flops")}}


def shares(summary: dict) -> dict:
    """Each stage's FLOPs and seconds as a percentage of ours' total (meta + modules + fine-tune: their
    shares add up to 100); assemble's and E2E's against the same total, for comparison. Before
    fine-tune has finished, the total is what ours has spent so far."""
    keys = ours_parts(summary)
    total = {u: sum(summary[k][u] for k in keys) for u in ("flops", "seconds")}
    out = {}
    for k in [k for k in summary if k in keys or k in (ASSEMBLED, E2E)]:
        out[k] = {u: 100.0 * summary[k][u] / total[u] if total[u] else float("nan") for u in ("flops", "seconds")}
    return out


def _cells(task, e: dict) -> str:
    """The task's metric columns of a row; "-" where the stage has none (a module saved by a script without metrics)."""
    return " | ".join(fmt.format(e[key]) if key in e else "-" for key, _, fmt in task.columns)


def _ours_cells(task, value: float) -> str:
    """The headline in its column, the task's other metric columns blank (they do not add up)."""
    return " | ".join(fmt.format(value) if key == task.headline else "" for key, _, fmt in task.columns)


def table(summary: dict, task) -> str:
    """Every stage's metrics (the task's columns), costs and share of ours' cost, as a Markdown table."""
    rows = [f"| stage | {' | '.join(label for _, label, _ in task.columns)} | seconds | FLOPs | FLOPs, % of ours | "
            f"seconds, % of ours | trainable params |", "|---" + "|---:" * (len(task.columns) + 5) + "|"]
    share = shares(summary)

    def add(name, key):
        e, s = summary[key], share[key]
        rows.append(f"| {name} | {_cells(task, e)} | {e['seconds']:.1f} | {_fmt_flops(e['flops'])} | "
                    f"{s['flops']:.1f} | {s['seconds']:.1f} | {e['trainable_params']:,} |")
    for key in _keys(summary, OURS):
        add(key.replace("_", " ") if key.startswith("module") else key, key)
    if ours := ours_total(summary, task.headline):
        rows.append(f"| **ours (meta+modules+finetune)** | {_ours_cells(task, ours[task.headline])} | "
                    f"{ours['seconds']:.1f} | {_fmt_flops(ours['flops'])} | 100.0 | 100.0 | |")
    if E2E in summary:
        add("**e2e**", E2E)
    if grown := grow_total(summary, task.headline):
        rows.append(f"| **grow (G_stack)** (meta + grow) | {_cells(task, summary[GROW])} | {grown['seconds']:.1f} | "
                    f"{_fmt_flops(grown['flops'])} | | | {summary[GROW]['trainable_params']:,} |")
    return "\n".join(rows)


def stage_curve(run: Path, stage: str, metric: str, base_flops: float = 0.0, base_seconds: float = 0.0) -> dict | None:
    """A finished stage's test `metric` at the cumulative cost after each of its epochs: `base_*`
    (what was spent before it) plus its FLOPs (flops_per_step x steps, the manifest, spread evenly
    over its epochs) and its process-seconds (the epoch line's seconds x processes). Where the stage
    evaluated during training (train.eval_every), after each evaluation at its own FLOPs and seconds
    so far. None when the stage has not finished or trained no epoch."""
    sd = StageDir(run, stage)
    try:
        m = sd.manifest()
    except UserError:       # report names it (finished_manifests); the figure leaves it out
        return None
    if not (m and m.get("finished") and m.get("epochs")) or not sd.metrics.exists():
        return None
    scored = lambda rows: [r for r in rows if isinstance(r.get(f"test_{metric}"), (int, float))]
    if evals := scored(metric_rows(sd, "eval")):
        return {"update": [r["update"] for r in evals], "flops": [base_flops + r["flops"] for r in evals],
                "seconds": [base_seconds + r["seconds"] for r in evals], metric: [r[f"test_{metric}"] for r in evals]}
    rows = scored(metric_rows(sd))
    per_epoch = m["flops_per_step"] * m["steps"] / m["epochs"]
    world = m.get("world_size", 1)
    return {"epoch": [r["epoch"] for r in rows],
            "flops": [base_flops + per_epoch * r["epoch"] for r in rows],
            "seconds": [base_seconds + r["seconds"] * world for r in rows],
            metric: [r[f"test_{metric}"] for r in rows]}


def curves(run: Path, summary: dict, metric: str) -> dict:
    """What the figure plots: {meta, e2e, ours, grow: curves; assembled: one point}. Ours is the
    fine-tune's curve shifted by the cost of everything before it (meta and modules), growth's by the
    meta model's."""
    run = Path(run)
    out = {name: c for name in (META, E2E) if (c := stage_curve(run, name, metric)) is not None}
    before = [summary[k] for k in ours_parts(summary) if k != FINETUNE]     # meta and modules
    pre_f, pre_s = sum(p["flops"] for p in before), sum(p["seconds"] for p in before)
    if ASSEMBLED in summary:
        out[ASSEMBLED] = {"flops": [pre_f], "seconds": [pre_s], metric: [summary[ASSEMBLED][metric]]}
    if FINETUNE in summary and (c := stage_curve(run, FINETUNE, metric, pre_f, pre_s)) is not None:
        out["ours"] = c
    if all(name in summary for name in GROWTH):
        before = [summary[k] for k in GROWTH if k != GROW]       # the meta model
        base = (sum(p["flops"] for p in before), sum(p["seconds"] for p in before))
        if (c := stage_curve(run, GROW, metric, *base)) is not None:
            out[GROW] = c
    return out


STYLE = {META: ("s-", "tab:blue", "meta model alone"), E2E: ("o-", "tab:gray", "E2E"),
         ASSEMBLED: ("*", "tab:red", "assembled (before fine-tune)"),
         "ours": ("o-", "tab:red", "ours: meta + modules + fine-tune"),
         GROW: ("o-", "tab:green", "grow (G_stack), after the meta model")}


def _panel(ax, data: dict, unit: str, task) -> None:
    metric = task.headline
    for name, c in data.items():
        fmt, color, label = STYLE[name]
        ax.plot(c[unit], c[metric], fmt, color=color, label=label, ms=14 if name == ASSEMBLED else 4, lw=1.5,
                zorder=3 if name == ASSEMBLED else 2)
    if ASSEMBLED in data and "ours" in data:     # fine-tuning starts from the assembled model
        a, o = data[ASSEMBLED], data["ours"]
        ax.plot([a[unit][0], o[unit][0]], [a[metric][0], o[metric][0]], ":", color="tab:red", lw=1)
    ax.set_xlim(left=0)       # cost starts at zero for every method: lengths compare
    ax.set_xlabel("training FLOPs, cumulative" if unit == "flops"
                  else "training seconds, cumulative (summed over processes)")
    if unit == "flops":
        from matplotlib.ticker import FuncFormatter
        ax.xaxis.set_major_formatter(FuncFormatter(_tick))
    ax.set_ylabel(task.headline_label + ("" if task.higher_is_better else " (lower is better)"))
    ax.grid(alpha=0.3)


def plot(run: Path, summary: dict, path: Path, task) -> dict:
    """Draw report.png, the task's headline metric against cost (left: FLOPs, right: seconds), and
    return the curves it plotted."""
    data = curves(run, summary, task.headline)
    try:
        name = run_recipe(run).get("name", "?")
    except UserError:       # report names it
        name = "?"
    _draw(run, data, path, task, name)
    return data


def _draw(run: Path, data: dict, path: Path, task, name: str) -> None:
    """The figure of `data` (what curves() read), saved to `path`; reads nothing from the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, unit in zip(axes, ("flops", "seconds")):
        _panel(ax, data, unit, task)
    if data:      # one legend under both panels, where it hides no point
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"{Path(run).resolve().name} (recipe {name}): {task.headline_label} "
                 f"vs training cost")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_task(run: Path):
    """The task of run directory `run`, from its recipe.yaml's model family (the recipe damaged: from a
    finished stage's manifest; no family or an unknown one: classification)."""
    try:
        family = run_recipe(run)["model"].get("family")
    except UserError:
        family = next((m.get("family") for _, m in finished_manifests(run)[0] if m.get("family")), None)
    try:
        return get_task(task_name(family) if isinstance(family, str) else "classification")
    except (UserError, KeyError):
        return get_task("classification")


def damage(run: Path) -> list[str]:
    """One line for each file of the run that `status` and `report` could not read (they show the rest)."""
    try:
        run_recipe(run)
        lines = []
    except UserError as e:
        lines = [str(e)]
    return lines + finished_manifests(run)[1]


def report(run: Path) -> dict:
    run = Path(run)
    if not (run / "recipe.yaml").exists():
        raise UserError(f"{run} is not a run directory (no recipe.yaml); pass the --out of a run")
    summary = write_summary(run)
    task = run_task(run)
    print(table(summary, task))
    plot(run, summary, run / "report.png", task)
    print(f"wrote {run / 'summary.json'} and {run / 'report.png'}")
    for line in damage(run):
        print(f"incubate: warning: {line} (the report leaves it out)", file=sys.stderr)
    return summary
