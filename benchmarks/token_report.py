"""The token studies' part of docs/results.md (lm_tokens on the CPU, gpu_lm on a GPU): every method's
final bits per byte, the FLOPs at which each first reaches E2E's final bits per byte (from the
curves of evaluations during training), ours against growth at equal FLOPs, the issue's bar, and
the figure of bits per byte against cumulative FLOPs.

A method's curve is its deep model's: ours from its fine-tune on (at the FLOPs of the meta model
and the modules before it), growth from its growth stage on (after its meta model), E2E and the
meta model alone from their start. Lower bits per byte is better.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

BAR_RATIO = 0.6     # ours must reach E2E's final bits per byte with at most this share of E2E's FLOPs


def method_name(r) -> str:
    return {"e2e": "e2e", "meta": "meta-alone", "grow": "grow (G_stack)"}.get(r["method"], f"ours-{r['variant']}init")


def groups(rows, study) -> dict:
    g = defaultdict(list)
    for r in rows:
        if r["study"] == study:
            g[(method_name(r), r["budget"])].append(r)
    return g


def _stat(vals):
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def curve(r) -> list:
    """[(cumulative TFLOPs, bits per byte)] of the row's deep model."""
    return [(p[0], p[1]) for p in r.get("evals", [])]


def first_reach(points: list, target: float):
    """The first cumulative TFLOPs at which a curve is at or below `target`; None if it never is."""
    return next((f for f, b in points if b <= target), None)


def final_table(rows, study) -> str:
    out = ["| method | budget (TFLOPs/split) | seeds | val bits/byte mean ± sd | TFLOPs | tokens (M) | meta model "
           "| assembled | hybrids |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (name, budget), rs in sorted(groups(rows, study).items(), key=lambda kv: (kv[0][0], kv[1][0]["flops"])):
        m, sd = _stat([r["bpb"] for r in rs])
        meta = f"{statistics.mean(r['meta_bpb'] for r in rs):.4f}" if "meta_bpb" in rs[0] else ""
        asm = f"{statistics.mean(r['assembled_bpb'] for r in rs):.4f}" if "assembled_bpb" in rs[0] else ""
        hyb = "/".join(f"{statistics.mean(r['hybrid_bpb'][i] for r in rs):.3f}"
                       for i in range(len(rs[0].get("hybrid_bpb", []))))
        out.append(f"| {name} | {budget} | {len(rs)} | {m:.4f} ± {sd:.4f} | "
                   f"{statistics.mean(r['flops'] for r in rs) / 1e12:.2f} | "
                   f"{statistics.mean(r['tokens'] for r in rs) / 1e6:.2f} | {meta} | {asm} | {hyb} |")
    return "\n".join(out)


def reach_rows(rows, study) -> list[dict]:
    """For each E2E budget: its final bits per byte (mean over seeds), and for every method the
    first FLOPs at which each seed's curve reaches it, as a share of that E2E's FLOPs."""
    g = groups(rows, study)
    out = []
    for (name, budget), e2e in sorted(((k, v) for k, v in g.items() if k[0] == "e2e"), key=lambda kv: kv[1][0]["flops"]):
        target, e2e_tf = statistics.mean(r["bpb"] for r in e2e), statistics.mean(r["flops"] for r in e2e) / 1e12
        for (other, b), rs in sorted(g.items()):
            hits = [first_reach(curve(r), target) for r in rs]
            reached = [h for h in hits if h is not None]
            out.append({"e2e": budget, "target": target, "e2e_tflops": e2e_tf, "method": other, "budget": b,
                        "seeds": len(rs), "reached": len(reached),
                        "tflops": statistics.mean(reached) if len(reached) == len(rs) else None})
    return out


def reach_table(rows, study) -> str:
    out = ["| E2E budget | its final bits/byte | method | budget | seeds reaching it | first TFLOPs (mean) | "
           "share of E2E's FLOPs |", "|---|---:|---|---|---:|---:|---:|"]
    for r in reach_rows(rows, study):
        tf = f"{r['tflops']:.2f}" if r["tflops"] is not None else "not reached"
        share = f"{r['tflops'] / r['e2e_tflops']:.2f}x" if r["tflops"] is not None else ""
        out.append(f"| {r['e2e']} | {r['target']:.4f} | {r['method']} | {r['budget']} | {r['reached']}/{r['seeds']} | "
                   f"{tf} | {share} |")
    return "\n".join(out)


def versus_growth(rows, study) -> list[dict]:
    """Ours (each init) against growth at the same total and split: both final bits per byte."""
    g = groups(rows, study)
    out = []
    for (name, budget), ours in sorted(g.items()):
        grow = g.get(("grow (G_stack)", budget))
        if not name.startswith("ours") or not grow:
            continue
        (o, so), (w, sw) = _stat([r["bpb"] for r in ours]), _stat([r["bpb"] for r in grow])
        seeds = min(len(ours), len(grow))
        out.append({"ours": name, "budget": budget, "ours_bpb": o, "grow_bpb": w, "margin": w - o,
                    "spread": so + sw, "seeds": seeds, "clears": seeds >= 2 and w - o > so + sw})
    return out


def bar_table(rows, study) -> str:
    """The issue's bar, checked from the rows: ours reaches the largest E2E's final bits per byte
    with at most BAR_RATIO of its FLOPs; at equal FLOPs ours beats growth beyond the added spreads."""
    reach = [r for r in reach_rows(rows, study) if r["method"].startswith(("ours", "grow", "meta"))]
    if not reach:
        return ""
    top = max(r["e2e_tflops"] for r in reach)
    out = [f"Bar (1): reach the final bits per byte of the largest E2E ({top:.2f} TFLOPs) with at most "
           f"{BAR_RATIO}x its FLOPs.", "", "| method | budget | first TFLOPs | share | meets (1) |", "|---|---|---:|---:|---|"]
    for r in (r for r in reach if r["e2e_tflops"] == top):
        share = r["tflops"] / top if r["tflops"] is not None else None
        tf = f"{r['tflops']:.2f}" if r["tflops"] is not None else "not reached"
        out.append(f"| {r['method']} | {r['budget']} | {tf} | "
                   f"{f'{share:.2f}x' if share else ''} | {'yes' if share and share <= BAR_RATIO else 'no'} |")
    out += ["", "Bar (2): at equal FLOPs ours is at least as good as growth (G_stack), beyond the seed spread "
            "(the margin above the added standard deviations; 2 seeds needed).", "",
            "| ours | budget | ours bits/byte | growth bits/byte | growth - ours | spread | seeds | meets (2) |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for v in versus_growth(rows, study):
        out.append(f"| {v['ours']} | {v['budget']} | {v['ours_bpb']:.4f} | {v['grow_bpb']:.4f} | {v['margin']:+.4f} | "
                   f"{v['spread']:.4f} | {v['seeds']} | {'yes' if v['clears'] else 'no'} |")
    return "\n".join(out)


COLORS = {"e2e": "black", "meta-alone": "tab:olive", "grow (G_stack)": "tab:green", "ours-metainit": "tab:red",
          "ours-stackinit": "tab:blue", "ours-randominit": "tab:purple"}


def plot(rows, study, path: Path, title: str) -> None:
    fig = figure(rows, study, title)
    if fig is not None:
        import matplotlib.pyplot as plt
        fig.savefig(path, dpi=110)
        plt.close(fig)


def figure(rows, study, title: str):
    """Two panels of the same curves: the whole run, and its end, where the trained models differ by
    hundredths of a bit per byte; None without rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = groups(rows, study)
    if not g:
        return None
    fig, (whole, end) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.2]})
    for ax in (whole, end):
        draw_curves(ax, g, legend=ax is end)
        ax.set_xlabel("training TFLOPs, cumulative (meta model and modules before ours' and growth's curves)")
        ax.grid(alpha=0.3)
    whole.set_ylabel("validation bits per byte (lower is better)")
    whole.set_xlim(left=0)
    whole.set_title(title, fontsize=10)
    top = max(r["flops"] for rs in g.values() for r in rs) / 1e12
    best = min(r["bpb"] for rs in g.values() for r in rs)
    end.set_xlim(top * 0.3, top * 1.02)
    end.set_ylim(best - 0.02, best + 0.45)
    end.set_title("the same, from 30% of the largest budget on (dotted: the meta models started from)", fontsize=10)
    end.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    return fig


SPLIT_STYLES = {"B": "--", "C": "-."}      # split A, and methods without a split: solid


def draw_curves(ax, g: dict, legend: bool) -> None:
    """Every row's curve, its final point and its meta model's curve (dotted); a colour a method, a
    line style a split (SPLIT_STYLES): a curve's end on the x axis tells its total budget."""
    labelled = set()
    for (name, budget), rs in sorted(g.items()):
        split = budget.partition("/")[2]
        key = f"{name}, split {split}" if split else name
        for r in rs:
            pts = curve(r)
            if not pts:
                continue
            colour = COLORS.get(name, "gray")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], SPLIT_STYLES.get(split, "-"), color=colour, lw=1.2,
                    label=key if legend and key not in labelled else None)
            labelled.add(key)
            ax.plot([r["flops"] / 1e12], [r["bpb"]], "o", color=colour, ms=4)
            meta = r.get("meta_evals", [])      # the meta model the method started from
            ax.plot([p[0] for p in meta], [p[1] for p in meta], ":", color=colour, lw=0.8)


def section(rows, study) -> str:
    """The markdown of one token study: final points, first-reach FLOPs, the bar."""
    return (f"{final_table(rows, study)}\n\nFLOPs at which each method first reaches an E2E's final bits per byte "
            f"(its curve of evaluations during training):\n\n{reach_table(rows, study)}\n\n{bar_table(rows, study)}\n")
