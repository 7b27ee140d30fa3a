"""`incubate plan`'s plain-text tables, from the dict that `incubate.plan.estimate.plan` returns (--json prints
that dict itself)."""
from __future__ import annotations

GIB = 2 ** 30
UNIT = {"name": "GiB", "bytes": GIB}        # MiB for a plan whose largest figure is under 1 GiB


def _n(v) -> str:
    """1.2e9 -> 1.20B: counts."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def _g(v) -> str:
    return f"{v / UNIT['bytes']:.1f}"


def _h(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 1000 else f"{v:,.0f}")


def _rows(header: list, rows: list) -> list:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _run(job: dict) -> str:
    r = job["run"]
    if r["mode"] == "none":
        return "fits nowhere <= 64"
    return f"{r['mode']} x{r['fewest']}"


def cost_table(p: dict) -> list:
    header = ["job", "params", "trained", "frozen", f"FLOPs/{p['jobs'][0]['unit']}", "budget", "budget FLOPs",
              f"state {UNIT['name']}", "needs", "on", "GPU-h", "wall h"]
    rows = []
    for j in p["jobs"]:
        state = sum(j["state_bytes"].values())
        r = j["run"]
        rows.append([j["job"], _n(j["params"]), _n(j["trained"]), _n(j["frozen"]), _n(j["flops_per_unit"]),
                     "-" if j["budget_units"] is None else _n(j["budget_units"]),
                     "-" if j["flops"] is None else f"{j['flops']:.3g}", _g(state), _run(j),
                     r["devices"] or "-", _h(r["gpu_hours"]), _h(r["hours"])])
    return _rows(header, rows)


def memory_table(p: dict) -> list:
    worlds = list(p["jobs"][0]["fsdp_peak_bytes"])
    header = ["job", "ddp x1", "ddp x2+"] + [f"fsdp x{w}" for w in worlds]
    rows = [[j["job"], _g(j["ddp_peak_bytes"]["1"]), _g(j["ddp_peak_bytes"]["2"])]
            + [_g(j["fsdp_peak_bytes"][w]) for w in worlds] for j in p["jobs"]]
    return _rows(header, rows)


def methods_table(p: dict) -> list:
    rows = [[name, "-" if m["flops"] is None else f"{m['flops']:.3g}", _h(m["gpu_hours"]), _h(m["hours"])]
            for name, m in p["methods"].items()]
    return _rows(["method", "FLOPs", "GPU-h", "wall h"], rows)


def table(p: dict) -> str:
    o = p["options"]
    small = max(max(j["ddp_peak_bytes"].values()) for j in p["jobs"]) < GIB
    UNIT.update(name="MiB" if small else "GiB", bytes=2 ** 20 if small else GIB)
    head = [f"incubate plan: recipe {p['recipe']}; {o['device_memory'] / GIB:.0f} GiB a device, "
            f"{o['devices_per_node']} a node, {o['device_tflops']:g} TFLOP/s at MFU {o['mfu']:g}",
            "; ".join(p["notes"]), ""]
    legend = ["", "state: parameters + gradients + optimizer state, unsharded; needs: DDP where one device holds "
              "the step, else FSDP over the fewest devices; on: whole nodes; wall h: on those devices.",
              "ours = meta + every module job + fine-tune (wall: the K jobs in parallel); growth = meta + grow.",
              f"Traced in {p['seconds']:.0f} s (fake tensors: nothing allocated)."]
    return "\n".join(head + cost_table(p) + ["", f"Peak memory a device, {UNIT['name']} (FSDP: per rank)", ""]
                     + memory_table(p) + [""] + methods_table(p) + legend)
