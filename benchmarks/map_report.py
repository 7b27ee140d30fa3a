"""The map of docs/results.md (issue 34): for each data regime and target depth, which of E2E, the
meta model alone, growth and ours is best at equal FLOPs, by how much, with seeds and spread.

Rows come from the map_<regime>_d<depth> studies of benchmarks/studies.py. A method's score is its
validation bits per byte at the end of training (final) or the lowest of its evaluations during
training (best: what early stopping gets); E2E, growth and ours' fine-tune each stand at the learning
rate of theirs that won the sweep at the cell's smaller budget, at both budgets. The meta model alone is the same 4-layer model for both depths
of a regime, trained in the 16-layer cell. Lower is better.
"""
from __future__ import annotations

import statistics
from functools import cache, reduce
from collections import defaultdict
from pathlib import Path

import yaml

from benchmarks.studies import PAPER, STUDIES
from benchmarks.token_study import RECIPE
from benchmarks.token_report import BAR_RATIO, first_reach

REGIMES = (("small", "221 kB (the tutorial)"), ("mid", "1.38 MB (tutorial, reference, HOWTOs)"),
           ("rich", "36 MB (Python and kernel docs)"))
DEPTHS = (16, 64)
NAMES = {"e2e": "E2E", "meta": "meta model alone", "grow": "growth", "ours": "ours"}
SWEPT = ("e2e", "grow", "ours")     # methods trained at several learning rates, named by theirs in the tables


def score(r: dict, kind: str) -> float:
    """final: the last evaluation; best: the lowest one during training (final included)."""
    return min([r["bpb"]] + [p[1] for p in r.get("evals", [])]) if kind == "best" else r["bpb"]


def other_meta(r: dict) -> bool:
    """A row of ours or growth started from one of its study's other meta models (the check of G_stack's base)."""
    return r.get("variant") in STUDIES.get(r["study"], {}).get("meta_variants", {})


def cell(rows, regime: str, depth: int) -> dict:
    """{(method, total TFLOPs): [rows]} of one cell, each swept method at the lr chosen at its smallest
    budget (the sweep's), at every budget; the better of those there only where that lr was not run."""
    g = defaultdict(lambda: defaultdict(list))
    budgets = {float(b) for b in STUDIES[f"map_{regime}_d{depth}"]["e2e"]}    # the cell's own (rich_d64: one)
    for r in rows:
        if other_meta(r):
            continue
        own = r["study"] == f"map_{regime}_d{depth}"
        shared = r["study"] == f"map_{regime}_d16" and r["method"] == "meta" and float(r["budget"]) in budgets
        if own or shared:
            g[(r["method"], float(r["budget"].split("/")[0]))][r.get("variant", "paper")].append(r)
    chosen = {}
    for method, total in sorted(g, key=lambda k: k[1]):
        chosen.setdefault(method, reduce(better, g[(method, total)].values())[0].get("variant", "paper"))
    return {(m, t): v.get(chosen[m]) or reduce(better, v.values()) for (m, t), v in g.items()}


def better(a: list, b: list) -> list:
    """Of two learning rates' rows, the lower mean final over the seeds both ran (the sweep's seed 0:
    the larger budget and seed 1 train only the chosen rate); the first on a tie."""
    both = {r["seed"] for r in a} & {r["seed"] for r in b}
    mean = lambda rs: statistics.mean(r["bpb"] for r in rs if r["seed"] in both or not both)
    return a if mean(a) <= mean(b) else b


def stat(rs, kind: str) -> tuple[float, float, int]:
    vals = [score(r, kind) for r in rs]
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def ranking(c: dict, total: float, kind: str) -> list[tuple]:
    """[(mean, sd, seeds, method)] at one budget, best first."""
    return sorted((*stat(rs, kind), m) for (m, t), rs in c.items() if t == total)


def verdict(c: dict, total: float, kind: str) -> str:
    rank = ranking(c, total, kind)
    if not rank:
        return "not run yet"
    (m0, s0, n0, w), rest = rank[0], rank[1:]
    if not rest:
        return f"only {NAMES[w]} so far"
    m1, s1, _, runner = rest[0]
    sure = "" if n0 >= 2 and m1 - m0 > s0 + s1 else " (within the spread)" if n0 >= 2 else " (1 seed)"
    return f"**{NAMES[w]}** by {m1 - m0:.3f} over {NAMES[runner]}{sure}"


def regime_words(c: dict) -> str:
    """Tokens a parameter and passes over the text of the largest E2E run of a cell."""
    e2e = [rs for (m, t), rs in sorted(c.items(), key=lambda kv: kv[0][1]) if m == "e2e"]
    if not e2e or not e2e[-1][0].get("trained_params") or not e2e[-1][0].get("corpus_tokens"):
        return ""
    r = e2e[-1][0]
    return (f"{r['tokens'] / r['trained_params']:.2g} tokens a parameter, {r['tokens'] / r['corpus_tokens']:.2g} "
            f"passes at {r['budget']} TFLOPs")


def map_table(rows, kind: str = "final") -> str:
    out = [f"| regime (text) | depth 16: best at 15 / 30 TFLOPs | depth 64: best at 15 / 30 TFLOPs |", "|---|---|---|"]
    for regime, words in REGIMES:
        cells = []
        for depth in DEPTHS:
            c = cell(rows, regime, depth)
            totals = sorted({t for _, t in c})
            cells.append("<br>".join(f"{t:g}: {verdict(c, t, kind)}" for t in totals) or "not run yet")
            cells[-1] += f"<br>({regime_words(c)})" if regime_words(c) else ""
        out.append(f"| {regime}: {words} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def advice(c: dict) -> str:
    """A cell's answer for README: the methods best first at the largest budget that has two of them."""
    totals = [t for t in sorted({t for _, t in c}, reverse=True) if len(ranking(c, t, "final")) > 1]
    if not totals:
        return "not measured yet"
    rank = ranking(c, totals[0], "final")
    (best, _, n, w), rest = rank[0], rank[1:]
    others = ", ".join(f"{NAMES[m]} (+{mean - best:.2f})" for mean, _, _, m in rest)
    stopped = ranking(c, totals[0], "best")[0][3]
    e2e = [rs[0] for (m, t), rs in c.items() if (m, t) == ("e2e", totals[0])]
    return (f"**{NAMES[w]}**, then {others} at {totals[0]:g} TFLOPs, {seeds(min(r[2] for r in rank))}"
            + (f"; with early stopping **{NAMES[stopped]}**" if stopped != w else "")
            + (f"; E2E there reads {e2e[0]['tokens'] / e2e[0]['trained_params']:.2g} tokens a parameter, the text "
               f"{e2e[0]['tokens'] / e2e[0]['corpus_tokens']:.2g} times" if e2e and e2e[0].get("corpus_tokens") else ""))


def advice_table(rows) -> str:
    """README's table: for each amount of text and depth, the methods in the order the map ranks them."""
    out = ["| your text (width-64 Llama, 4-layer meta model; bits per byte, lower is better) | 16-layer target "
           "(growth factor 4) | 64-layer target (factor 16) |", "|---|---|---|"]
    for regime, words in REGIMES:
        out.append(f"| {words} | " + " | ".join(advice(cell(rows, regime, d)) for d in DEPTHS) + " |")
    return "\n".join(out)


README_BEGIN = "<!-- the map's table: python -m benchmarks.accuracy_vs_cost --collect writes it -->"
README_END = "<!-- end of the map's table -->"


def write_readme(rows, readme: Path) -> None:
    """Put advice_table between README's markers, where README has them."""
    text = readme.read_text() if readme.exists() else ""
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        readme.write_text(f"{head}{README_BEGIN}\n{advice_table(rows)}\n{README_END}{rest.split(README_END, 1)[1]}")


def detail_table(rows) -> str:
    out = ["| regime | depth | TFLOPs | method | seeds | final bits/byte | best bits/byte | train loss |",
           "|---|---:|---:|---|---:|---:|---:|---:|"]
    for regime, _ in REGIMES:
        for depth in DEPTHS:
            c = cell(rows, regime, depth)
            for (method, total), rs in sorted(c.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                (f, fs, n), (b, bs, _) = stat(rs, "final"), stat(rs, "best")
                lr = f" ({'fine-tune ' * (method == 'ours')}lr {rate(method, rs[0]['variant'])})" if method in SWEPT else ""
                loss = [r["train_loss"] for r in rs if "train_loss" in r]
                out.append(f"| {regime} | {depth} | {total:g} | {NAMES[method]}{lr} | {n} | {f:.4f} ± {fs:.4f} | "
                           f"{b:.4f} ± {bs:.4f} | {statistics.mean(loss):.3f} |" if loss else
                           f"| {regime} | {depth} | {total:g} | {NAMES[method]}{lr} | {n} | {f:.4f} ± {fs:.4f} | "
                           f"{b:.4f} ± {bs:.4f} | |")
    return "\n".join(out)


def rate(method: str, variant: str) -> str:
    """A learning-rate variant's lr (ours': its fine-tune's); any other variant runs the recipe's."""
    if variant.startswith(("lr", "ft")):
        return variant[2:]
    if method == "ours":
        return f"{float(dict(x.split('=') for x in PAPER)['finetune.lr']):g}, no warm-up"
    return recipe_lr()


@cache
def recipe_lr() -> str:
    return f"{yaml.safe_load(RECIPE.read_text())['train']['lr']:g}"


def sweep_table(rows) -> str:
    """Every learning rate E2E, growth and ours' fine-tune tried in a cell: mean final bits per byte and
    seeds, by budget, the one that stands for its method (cell's choice) in bold."""
    g = defaultdict(list)
    for r in rows:
        if r["method"] in SWEPT and r["study"].startswith("map_") and not other_meta(r):
            g[(r["study"], r["method"], float(r["budget"].split("/")[0]), r.get("variant", "paper"))].append(r["bpb"])
    out = ["| cell | method | TFLOPs | learning rates: mean final bits/byte (seeds); the chosen one in bold |",
           "|---|---|---:|---|"]
    cells = {}
    for study, *_ in g:
        regime, depth = study.removeprefix("map_").rsplit("_d", 1)
        cells[study] = cell(rows, regime, int(depth))
    for study, method, total in sorted({k[:3] for k in g}):
        chosen = cells[study][(method, total)][0].get("variant", "paper")
        tried = sorted((statistics.mean(v), lr, len(v)) for (st, m, t, lr), v in g.items()
                       if (st, m, t) == (study, method, total))
        out.append(f"| {study.removeprefix('map_')} | {NAMES[method]} | {total:g} | " + ", ".join(
            ("**{}**" if lr == chosen else "{}").format(f"{rate(method, lr)}: {m:.4f} ({n})") for m, lr, n in tried) + " |")
    return "\n".join(out)


def seeds(n: int) -> str:
    return f"{n} seed{'s' * (n > 1)}"


def reach_e2e(c: dict) -> str:
    """Bar (1) of a cell: the first TFLOPs at which each seed of ours (each budget) reaches the final
    bits per byte of the cell's best E2E (the budget whose mean final is lowest: a longer E2E that
    overfits does not lower the bar), as a share of that E2E's FLOPs."""
    e2e = [(t, rs) for (m, t), rs in c.items() if m == "e2e"]
    ours = sorted((t, rs) for (m, t), rs in c.items() if m == "ours")
    if not e2e or not ours:
        return "not run yet"
    total, rs = min(e2e, key=lambda x: (statistics.mean(r["bpb"] for r in x[1]), -x[0]))    # E2E's best budget
    target, e2e_tf = statistics.mean(r["bpb"] for r in rs), statistics.mean(r["flops"] for r in rs) / 1e12
    out = []
    for t, os in ours:
        hits = [first_reach([(p[0], p[1]) for p in r.get("evals", [])], target) for r in os]
        if None in hits:
            out.append(f"ours-{t:g}: {sum(h is not None for h in hits)}/{len(hits)} seeds reach it, **not met**")
            continue
        share = statistics.mean(hits) / e2e_tf
        first = all(r["evals"][0][0] == h and r["evals"][0][2:] == [None] for h, r in zip(hits, os))
        out.append(f"ours-{t:g} at {statistics.mean(hits):.1f} ({share:.2f}x, {seeds(len(hits))}"
                   f"{', already the assembled model' if first else ''}): **{'met' if share <= BAR_RATIO else 'not met'}**")
    return f"E2E-{total:g} ends at {target:.4f}; " + "; ".join(out)


def versus_growth(c: dict) -> str:
    """Bar (2) of a cell: growth's mean final minus ours' at each budget both have, with the spread."""
    out = []
    for total in sorted({t for m, t in c if m == "ours" and ("grow", t) in c}):
        (o, so, n), (g, sg, k) = stat(c[("ours", total)], "final"), stat(c[("grow", total)], "final")
        met = ("**not met**" if g < o else "**met**" if min(n, k) < 2 else
               "**met** beyond the spread" if g - o > so + sg else "**met** within the spread")
        out.append(f"{total:g}: {g - o:+.3f} ± {so + sg:.3f} ({seeds(min(n, k))}), {met}")
    return "; ".join(out) or "not run yet"


def bars_table(rows) -> str:
    """The issue's two bars, cell by cell: (1) ours reaches the fair E2E's final with at most BAR_RATIO
    of its FLOPs; (2) ours at least as good as growth at equal FLOPs (growth minus ours, final)."""
    out = [f"| cell | bar (1): ours reaches the best fair E2E's final with at most {BAR_RATIO}x its FLOPs | "
           "bar (2): growth minus ours at equal FLOPs, ± added sd |", "|---|---|---|"]
    for regime, _ in REGIMES:
        for depth in DEPTHS:
            c = cell(rows, regime, depth)
            if any(m != "meta" for m, _ in c):      # the meta model alone is shared with the 16-layer cell
                out.append(f"| {regime}, {depth} layers | {reach_e2e(c)} | {versus_growth(c)} |")
    return "\n".join(out)


def meta_check_table(rows) -> str:
    """Ours and growth from a meta model not annealed against the same points from the annealed one
    (same study, budget and seeds): both meta models' scores and the deep models' final and best."""
    groups = defaultdict(list)
    for r in rows:
        if other_meta(r):
            groups[(r["study"], r["method"], r["budget"], r["variant"])].append(r)
    out = ["| cell | method | TFLOPs | seeds | its meta model: annealed / not | final: annealed / not | "
           "best: annealed / not |", "|---|---|---|---:|---|---|---|"]
    for (study, method, budget, variant), rs in sorted(groups.items()):
        ran = {r["seed"] for r in rs}
        base = [r for r in rows if (r["study"], r["method"], r["budget"]) == (study, method, budget)
                and not other_meta(r) and r["seed"] in ran and r.get("variant") in ("paper", "meta")]
        if len(base) != len(rs):
            continue        # the annealed points of the same seeds are not all in yet
        pair = [(statistics.mean(f(r) for r in base), statistics.mean(f(r) for r in rs))
                for f in (lambda r: r["meta_bpb"], lambda r: score(r, "final"), lambda r: score(r, "best"))]
        out.append(f"| {study.removeprefix('map_')} | {NAMES[method]} | {budget} | {len(rs)} | " + " | ".join(
            f"{a:.4f} / {b:.4f} ({b - a:+.4f})" for a, b in pair) + " |")
    return "\n".join(out) if len(out) > 2 else ""


def off_axis(c: dict, top: float) -> str:
    """The methods of a cell whose every point is above `top` (the plot's axis), with their best scores,
    so that a panel says where a line it cannot show went."""
    out = []
    for (method, total), rs in sorted(c.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if all(min(p[1] for p in r.get("evals", [[0, r["bpb"]]])) > top and r["bpb"] > top for r in rs):
            out.append(f"{NAMES[method]} at {total:g} TFLOPs, best {min(score(r, 'best') for r in rs):.2f}")
    return "; ".join(out)


def plot(rows, path: Path) -> None:
    """A panel a cell: every seed's curve of evaluations against cumulative TFLOPs."""
    from benchmarks.token_report import COLORS
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"e2e": COLORS["e2e"], "meta": COLORS["meta-alone"], "grow": COLORS["grow (G_stack)"],
               "ours": COLORS["ours-metainit"]}
    fig, axes = plt.subplots(len(REGIMES), len(DEPTHS), figsize=(12, 12), squeeze=False)
    for i, (regime, words) in enumerate(REGIMES):
        for j, depth in enumerate(DEPTHS):
            ax, c = axes[i][j], cell(rows, regime, depth)
            named = set()
            for (method, total), rs in sorted(c.items()):
                for r in rs:
                    pts = r.get("evals", [])
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if total > 15 else "--", lw=1,
                            color=colours[method], label=None if method in named else NAMES[method])
                    named.add(method)
            if c:
                best = min(score(r, "best") for rs in c.values() for r in rs)
                ax.set_ylim(best - 0.03, best + 0.6)
                ax.legend(fontsize=7)
                above = off_axis(c, best + 0.6)
                if above:
                    ax.text(0.02, 0.97, "above the axis: " + above, transform=ax.transAxes, fontsize=7, va="top")
            else:
                ax.text(0.5, 0.5, "not run yet", transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_title(f"{regime}: {words}; {depth} layers", fontsize=9)
            ax.set_xlabel("training TFLOPs (cumulative)")
            ax.set_ylabel("validation bits per byte")
            ax.grid(alpha=0.3)
    fig.suptitle("The map: every seed's held-out curve (solid: 30 TFLOPs budgets, dashed: 15)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(rows, docs: Path) -> str:
    if not any(r["study"].startswith("map_") for r in rows):
        return ""
    plot(rows, docs / "map.png")
    return ("### The map: which method pays in which data regime and at which depth\n\n"
            "`python -m benchmarks.accuracy_vs_cost --study map_<regime>_d<depth> --missing` for regime small, "
            "mid, rich and depth 16, 64 (figure: docs/map.png). Best method at equal FLOPs by the final "
            "bits per byte (mean over seeds), the margin to the next, and whether it clears the added "
            "standard deviations:\n\n" + map_table(rows, "final") + "\n\nThe same by the best point of each "
            "run (early stopping):\n\n" + map_table(rows, "best") + "\n\nEvery point (E2E, growth and ours "
            "at their chosen learning rate, named):\n\n" + detail_table(rows) + "\n\nThe issue's bars, cell by cell (TFLOPs; final "
            "bits per byte, mean over seeds):\n\n" + bars_table(rows) + "\n\nEvery learning rate E2E, growth and ours' "
            "fine-tune tried (5% of their tokens a warm-up, but for ours' fine-tune at the recipe's 1e-3). The "
            "rate with the lower final at 15 TFLOPs, on the seeds both rates ran, stands for its method at both "
            "budgets (in bold):\n\n" + sweep_table(rows) + "\n"
            + check_section(rows))


def check_section(rows) -> str:
    table = meta_check_table(rows)
    return ("\nG_stack takes its base early in a long schedule; ours and growth above start from a meta model "
            "annealed by cosine to 1e-6. The check: the same points from a meta model trained at a constant "
            "lr (`meta.sched=multistep` that never steps: the checkpoint before a warm-up-stable-decay "
            "schedule's decay), lower is better:\n\n" + table + "\n") if table else ""
