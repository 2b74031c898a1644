"""The results of a sweep: one table row per trial (CSV + Parquet), and the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np

from dap_ray.report import pyplot, save_figure
from dap_ray.tune.space import Dim, plain
from dap_ray.tune.trial import METRIC, TIME_ATTR, net_best_column, net_metric


def results_table(grid: Any, dims: Sequence[Dim], epochs: int, archs: Sequence[str]):
    """One row per trial: knobs, last and best val_acc (the mean over the nets), each net's best
    (val_acc_best/<arch>), epochs reached, reports (the epochs checked), status (completed / stopped
    by ASHA / error), sorted best first."""
    import pandas as pd

    rows = []
    for r in grid:
        m = r.metrics or {}
        hist = r.metrics_dataframe
        checked = None if hist is None or METRIC not in getattr(hist, "columns", []) else hist[hist[METRIC].notna()]
        # checks, counted by epoch: Tune's record of a trial rerun after a failure (its node lost) keeps
        # the lost attempt's reports, and the rerun reports those epochs again
        reports = 0 if checked is None else int(checked[TIME_ATTR].nunique() if TIME_ATTR in checked.columns else len(checked))
        best = float(hist[METRIC].max()) if reports else math.nan
        epoch = int(m.get(TIME_ATTR, 0) or 0)
        status = "error" if r.error is not None else ("completed" if epoch >= epochs else "stopped")
        row = {"trial_id": str(r.path).rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")}
        for d in dims:
            v = plain(r.config.get(d.key))
            row[d.key] = str(v) if d.key == "method.layer" else v
        row.update({METRIC: float(m.get(METRIC, math.nan)), "val_acc_best": best})
        for a in archs:  # each net's best check (the mean's best check may be another epoch)
            col = net_metric(a)
            row[net_best_column(a)] = float(hist[col].max()) if reports and col in hist.columns else math.nan
        row.update({"epochs": epoch, "reports": reports, "status": status,
                    "seconds": round(float(m.get("time_total_s", math.nan)), 1),
                    "error": "" if r.error is None else f"{type(r.error).__name__}: {str(r.error).splitlines()[0] if str(r.error) else ''}"[:300]})
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["val_acc_best", "trial_id"], ascending=[False, True], na_position="last").reset_index(drop=True)
    return df


def write_table(df: Any, out_dir: str) -> None:
    import io

    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.pipe_file(f"{root}/results.csv", df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    fs.pipe_file(f"{root}/results.parquet", buf.getvalue())


# -- plots ------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def axis_labels(values: Any, dim: Dim, bins: int = 5) -> tuple[list[str], list[str]]:
    """Labels of each trial's value on one heatmap axis, and the ordered axis labels. A continuous
    knob with many distinct values is binned (log-spaced bins for log distributions)."""
    vals = [plain(v) for v in values]
    uniq = sorted(set(vals), key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
    if dim.discrete or len(uniq) <= bins:
        return [_fmt(v) for v in vals], [_fmt(v) for v in uniq]
    lo, hi = float(dim.low), float(dim.high)
    edges = np.geomspace(lo, hi, bins + 1) if dim.log else np.linspace(lo, hi, bins + 1)
    labels = [f"{_fmt(float(edges[i]))}–{_fmt(float(edges[i + 1]))}" for i in range(bins)]
    idx = np.clip(np.searchsorted(edges, np.asarray(vals, float), side="right") - 1, 0, bins - 1)
    return [labels[i] for i in idx], labels


def plot_heatmap(df: Any, dx: Dim, dy: Dim, path: str) -> None:
    """Mean best validation accuracy (%) per (x, y) cell over the trials in it; n trials per cell."""
    plt = pyplot()
    ok = df[df["status"] != "error"]
    xs, xl = axis_labels(ok[dx.key], dx)
    ys, yl = axis_labels(ok[dy.key], dy)
    acc = np.full((len(yl), len(xl)), np.nan)
    n = np.zeros((len(yl), len(xl)), int)
    stopped = np.zeros((len(yl), len(xl)), int)
    cells: dict[tuple[int, int], list[float]] = {}
    for x, y, a, st in zip(xs, ys, ok["val_acc_best"], ok["status"]):
        cells.setdefault((yl.index(y), xl.index(x)), []).append(100.0 * float(a))
        stopped[yl.index(y), xl.index(x)] += st == "stopped"
    for (i, j), v in cells.items():
        acc[i, j], n[i, j] = float(np.mean(v)), len(v)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(xl), 1.0 + 0.8 * len(yl)))
    im = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", origin="lower", aspect="auto")
    for i in range(len(yl)):
        for j in range(len(xl)):
            if n[i, j]:
                mark = f"\n{stopped[i, j]} stopped" if stopped[i, j] else ""  # a line of its own: one line overflows the cell
                ax.text(j, i, f"{acc[i, j]:.1f}\nn={n[i, j]}{mark}", ha="center", va="center", fontsize=8,
                        color="white" if acc[i, j] < np.nanmean(acc) else "black")
    ax.set_xticks(range(len(xl)), xl, rotation=30 if len(xl) > 4 else 0)
    ax.set_yticks(range(len(yl)), yl)
    ax.set_xlabel(dx.key)
    ax.set_ylabel(dy.key)
    title = f"validation accuracy (%) over {dx.key.split('.')[-1]} × {dy.key.split('.')[-1]}"
    if stopped.any():
        title += "\n(stopped: ended early by ASHA, at fewer epochs)"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean best val acc (%)")
    save_figure(fig, path)


def plot_by_knob(df: Any, dim: Dim, path: str) -> None:
    """Best validation accuracy of every trial against one knob (points), with the mean per value."""
    plt = pyplot()
    ok = df[df["status"] != "error"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    acc = 100.0 * ok["val_acc_best"].astype(float).to_numpy()
    status = ok["status"].to_numpy()
    if dim.discrete:
        labels, order = axis_labels(ok[dim.key], dim)
        x = np.array([order.index(v) for v in labels], float)
        means = [float(np.mean(acc[x == i])) if (x == i).any() else np.nan for i in range(len(order))]
        ax.bar(range(len(order)), means, alpha=0.3, color="gray", label="mean")
        x = x + (np.random.default_rng(0).random(len(x)) - 0.5) * 0.2  # jitter
        ax.set_xticks(range(len(order)), order)
    else:
        x = ok[dim.key].astype(float).to_numpy()
        if dim.log:
            ax.set_xscale("log")
    nets = [c.split("/", 1)[1] for c in ok.columns if c.startswith("val_acc_best/")]
    what = "mean over nets" if len(nets) > 1 else "trial"
    for st, color, label in (("completed", "C0", f"{what} (all epochs)"), ("stopped", "C1", f"{what}, stopped early by ASHA")):
        m = status == st
        if m.any():
            ax.scatter(x[m], acc[m], alpha=0.8, color=color, label=label)
    if len(nets) > 1:  # each net's own best beside the mean: a knob that helps one net only shows here
        for i, net in enumerate(nets):
            ax.scatter(x, 100.0 * ok[f"val_acc_best/{net}"].astype(float).to_numpy(), marker="_", s=80, color=f"C{i + 2}", label=net)
    ax.set_xlabel(dim.key)
    ax.set_ylabel("best val acc (%)")
    ax.set_title(f"validation accuracy by {dim.key.split('.')[-1]}")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_plots(df: Any, dims: Sequence[Dim], out_dir: str) -> list[str]:
    by_key = {d.key: d for d in dims}
    paths = []
    if len(df[df["status"] != "error"]) == 0:
        return paths
    if "method.gamma" in by_key and "method.t_stop" in by_key:
        p = f"{out_dir}/plots/heatmap_gamma_t_stop.png"
        plot_heatmap(df, by_key["method.gamma"], by_key["method.t_stop"], p)
        paths.append(p)
    names = [d.key.rsplit(".", 1)[-1] for d in dims]
    for d, name in zip(dims, names):
        if names.count(name) > 1:
            name = d.key.replace(".", "_")
        p = f"{out_dir}/plots/acc_by_{name}.png"
        plot_by_knob(df, d, p)
        paths.append(p)
    return paths
