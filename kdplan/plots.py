"""Pictures of a what-if sweep (matplotlib, Agg backend; imported only when --plot is given).

One figure, six panels, each answering one question a person asks of a sweep:
throughput (is more hardware worth it?), efficiency (how much of it is wasted?), speedup over the
baselines (what does planning buy?), the step-time breakdown (where does the time go?), memory
per GPU against the device limit (how close to out-of-memory?), and bytes moved per step
against the baselines (what does it cost the network?).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .whatif import Axis

UNITS = {
    "gpus": "GPUs (total)",
    "seq_len": "sequence length (tokens)",
    "global_batch": "global batch (sequences per step)",
    "intra_bw_scale": "intra-node bandwidth (x profile)",
    "inter_bw_scale": "inter-node bandwidth (x profile)",
}
BASELINE_COLORS = {"single_gpu": "tab:gray", "naive_dp": "tab:red", "mirror": "tab:orange"}


def _num(v: Any) -> float:
    """None / missing -> NaN so matplotlib leaves a gap instead of failing."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def short(label: str) -> str:
    """Cluster and model paths are long; a tick label needs only the file's stem (and @N)."""
    name, at, n = str(label).partition("@")
    if "/" in name or name.endswith((".yaml", ".yml", ".json")):
        name = Path(name).stem if Path(name).stem != "config" else Path(name).parent.name
    return name + at + n


def _x_axis(rows: list[dict], axes: list[Axis]):
    """Pick the x axis: GPUs if swept, else the first numeric axis, else categories."""
    xa = next((a for a in axes if a.key == "gpus"), None) or next((a for a in axes if a.numeric), None)
    if xa is not None:
        key = "job.gpus" if xa.key == "gpus" else xa.key
        return xa, [_num(r[key]) for r in rows], UNITS.get(xa.key, xa.key), None
    xa = axes[0] if axes else None
    if xa is None:
        return None, [0.0 for _ in rows], "point", ["base"]
    idx = {lab: i for i, lab in enumerate(xa.labels)}
    return xa, [float(idx[r[xa.key]]) for r in rows], xa.key, [short(x) for x in xa.labels]


def _series(rows: list[dict], axes: list[Axis], xa: Axis | None) -> dict[str, list[int]]:
    """Rows grouped by every axis except x, in first-seen order."""
    out: dict[str, list[int]] = {}
    others = [a for a in axes if a is not xa]
    for i, r in enumerate(rows):
        out.setdefault(", ".join(f"{a.key}={short(r[a.key])}" for a in others), []).append(i)
    return out


def plot_sweep(rows: list[dict[str, Any]], axes: list[Axis], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    xa, xs, xlabel, categories = _x_axis(rows, axes)
    series = _series(rows, axes, xa)
    fig, ax = plt.subplots(2, 3, figsize=(18, 10), constrained_layout=True)
    log2x = xa is not None and xa.key == "gpus" and max((x for x in xs if x == x), default=1) > 4

    def line(a, idx, key, label, **kw):
        pts = sorted((xs[i], _num(rows[i].get(key))) for i in idx)
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=label, **kw)

    def finish(a, ylabel, title_):
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
        a.set_title(title_)
        if log2x:
            a.set_xscale("log", base=2)
            ticks = sorted({x for x in xs if x == x})
            a.set_xticks(ticks, [f"{x:g}" for x in ticks])
        if categories:
            a.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        a.grid(True, alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)

    # Throughput: one colour per series (named in its legend). Other panels: colour = metric,
    # line style = series, so their legends stay short.
    styles = ["-", "--", ":", "-."]
    for n, (name, idx) in enumerate(series.items()):
        ls = styles[n % len(styles)] if not categories else "none"  # no lines between categories
        tag = f" ({name})" if name else ""
        first = n == 0

        def lab(text):
            return text if first else None

        line(ax[0, 0], idx, "tokens_per_s", f"kdplan{tag}", ls=ls)
        bad = [i for i in idx if not rows[i]["feasible"]]
        if bad:
            ax[0, 0].plot([xs[i] for i in bad], [0] * len(bad), "x", color="red", ms=8,
                          label=lab("no plan fits"))
        if xa is not None and xa.key == "gpus":  # ideal = linear from the smallest feasible point
            ok = sorted((xs[i], _num(rows[i]["tokens_per_s"])) for i in idx if rows[i]["feasible"])
            if ok:
                g0, t0 = ok[0]
                ax[0, 0].plot([g for g, _ in ok], [t0 * g / g0 for g, _ in ok], color="gray", ls=ls, lw=0.8,
                              label=lab("linear scaling"))
        for key, text, color in (("scaling_efficiency", "scaling efficiency", "tab:blue"),
                                 ("utilization", "utilization", "tab:green"), ("mfu", "MFU", "tab:purple")):
            if any(rows[i].get(key) is not None for i in idx):
                pts = sorted((xs[i], 100 * _num(rows[i].get(key))) for i in idx)
                ax[0, 1].plot(*zip(*pts), marker="o", ms=4, ls=ls, color=color, label=lab(text))
        for key, base in (("speedup_vs_single_gpu", "single_gpu"), ("speedup_vs_naive_dp", "naive_dp"),
                          ("speedup_vs_mirror", "mirror")):
            line(ax[0, 2], idx, key, lab(f"vs {base.replace('_', ' ')}"), ls=ls, color=BASELINE_COLORS[base])
        line(ax[1, 1], idx, "memory_per_gpu_gib", lab("fullest GPU"), ls=ls, color="tab:blue")
        line(ax[1, 1], idx, "job.memory_limit_gib", lab("device memory"), ls=ls, color="red", alpha=0.6)
        line(ax[1, 2], idx, "comm_bytes_per_step", lab("kdplan"), ls=ls, color="tab:blue")
        for base in ("naive_dp", "mirror"):
            line(ax[1, 2], idx, f"baselines.{base}.comm_bytes_per_step", lab(base.replace("_", " ")),
                 ls=ls, color=BASELINE_COLORS[base])

    if log2x:  # on log-log axes linear scaling is a straight line of slope one
        ax[0, 0].set_yscale("log")
    finish(ax[0, 0], "throughput (training tokens/s)", "Throughput of the best plan")
    ax[0, 1].set_ylim(0, max([105.0] + [100 * _num(r.get("mfu")) + 5 for r in rows if r["feasible"]]))
    finish(ax[0, 1], "percent (%)", "Scaling efficiency, utilization, MFU")
    ax[0, 2].axhline(1.0, color="black", lw=0.8)
    ax[0, 2].set_yscale("log")
    finish(ax[0, 2], "speedup (x, baseline step time / plan step time)", "Speedup over the baselines")
    ax[1, 1].set_ylim(bottom=0)
    finish(ax[1, 1], "memory per GPU (GiB)", "Memory of the fullest GPU vs the device limit")
    ax[1, 2].set_yscale("log")
    finish(ax[1, 2], "bytes moved per step (B)", "Communication per step vs baselines")
    _breakdown(ax[1, 0], rows, axes)
    if len(series) > 1:
        title += "\n(line style = series, named in the throughput panel)"
    fig.suptitle(title, fontsize=13)
    fig.savefig(path, dpi=110)
    plt.close(fig)  # a long-lived process (sweeps in a notebook) must not pile up figures


def _breakdown(a, rows: list[dict], axes: list[Axis]) -> None:
    """Stacked bars of breakdown_s.* per feasible point, as a share of the predicted step time
    (absolute seconds span orders of magnitude across a GPU sweep); the step time is written on
    top of each bar."""
    ok = [r for r in rows if r["feasible"]]
    comps = list(dict.fromkeys(k for r in ok for k, v in r.items() if k.startswith("breakdown_s.") and v is not None))
    bottom = [0.0] * len(ok)
    for c in comps:
        vals = [100 * (_num(r.get(c)) if r.get(c) is not None else 0.0) / _num(r["step_time_s"]) for r in ok]
        a.bar(range(len(ok)), vals, bottom=bottom, label=c.split(".", 1)[1])
        bottom = [b + v for b, v in zip(bottom, vals)]
    if len(ok) <= 24:  # beyond that the labels overlap; the CSV has the numbers
        for i, r in enumerate(ok):
            a.text(i, bottom[i], f"{_num(r['step_time_s']):.3g}s", ha="center", va="bottom", fontsize=6)
    labels = ["/".join(short(r[ax.key]) for ax in axes) or "base" for r in ok]
    a.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=6)
    a.set_ylabel("share of the step time (%)")
    a.set_title("Step-time breakdown (" + ("/".join(ax.key for ax in axes) or "base") + "; step time on top)")
    a.grid(True, axis="y", alpha=0.3)
    if comps:
        a.legend(fontsize=7)

APPROACHES = (("single-GPU KD", "baselines.single_gpu.", "tab:gray"), ("naive DP KD", "baselines.naive_dp.", "tab:red"),
              ("mirror KD", "baselines.mirror.", "tab:orange"), ("kdplan", "", "tab:blue"))


def plot_baselines(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """The seed study's picture: the three baselines and kdplan's plan against GPU count —
    throughput, bytes moved per step and utilization, from the same cost model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r["feasible"]), key=lambda r: r["job.gpus"])
    xs = [r["job.gpus"] for r in ok]
    fig, ax = plt.subplots(1, 3, figsize=(18, 5.5), constrained_layout=True)
    for name, p, color in APPROACHES:
        tput = [r["job.tokens_per_step"] / _num(r.get(p + "step_time_s")) for r in ok]
        ax[0].plot(xs, tput, marker="o", ms=4, color=color, label=name)
        if p != "baselines.single_gpu.":  # one GPU moves nothing and its utilization is one point
            ax[1].plot(xs, [_num(r.get(p + "comm_bytes_per_step")) for r in ok], marker="o", ms=4, color=color, label=name)
            ax[2].plot(xs, [100 * _num(r.get(p + "utilization")) for r in ok], marker="o", ms=4, color=color, label=name)
    for a, ylabel, sub in ((ax[0], "throughput (training tokens/s)", "Throughput"),
                           (ax[1], "bytes moved per step (B, log)", "Communication per step"),
                           (ax[2], "utilization (% busy, mean over GPUs)", "Utilization")):
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        a.set_xlabel("GPUs (total)")
        a.set_ylabel(ylabel)
        a.set_title(sub)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    ax[1].set_yscale("log")
    fig.suptitle(title + "\n(a missing point: that approach cannot run there)", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
