"""Results table (mean ± std over seeds), results.json, report.md and plots/*.png of a run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
from omegaconf import OmegaConf

from dap_ray.data import distilled_records, read_bytes


def summarize(rows: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """(method, arch) -> {mean, std, n, failed, accs}; accuracy in %, std over seeds (ddof=0 as the papers)."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        cell = out.setdefault((r["method"], r["arch"]), {"accs": [], "failed": 0})
        if r.get("status") == "ok" and r.get("acc") is not None:
            cell["accs"].append(100.0 * float(r["acc"]))
        else:
            cell["failed"] += 1
    for cell in out.values():
        a = np.array(cell["accs"])
        cell["n"] = len(a)
        cell["mean"] = float(a.mean()) if len(a) else math.nan
        cell["std"] = float(a.std()) if len(a) else math.nan
    return out


def format_table(rows: Sequence[dict], methods: Sequence[str], archs: Sequence[str], title: str = "") -> str:
    """A markdown table: one row per method, one column per architecture, mean ± std (n seeds)."""
    s = summarize(rows)
    head = "| method | " + " | ".join(archs) + " |"
    lines = ([f"{title}", ""] if title else []) + [head, "|" + "---|" * (len(archs) + 1)]
    for m in methods:
        cells = []
        for a in archs:
            c = s.get((m, a))
            if c is None:
                cells.append("—")
            elif c["n"] == 0:
                cells.append(f"failed ({c['failed']})")
            else:
                txt = f"{c['mean']:.1f} ± {c['std']:.1f}"
                if c["failed"]:
                    txt += f" ({c['failed']} failed)"
                cells.append(txt)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(fig, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(p, buf.getvalue())


def plot_accuracy(rows: Sequence[dict], methods: Sequence[str], archs: Sequence[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(methods) * max(1, len(archs)) / 2, 3.6))
    w = 0.8 / max(1, len(archs))
    x = np.arange(len(methods))
    for j, a in enumerate(archs):
        means = [s.get((m, a), {}).get("mean", np.nan) for m in methods]
        stds = [s.get((m, a), {}).get("std", np.nan) for m in methods]
        bars = ax.bar(x + (j - (len(archs) - 1) / 2) * w, means, w, yerr=stds, capsize=3, label=a)
        for b, v in zip(bars, means):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, methods)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_grid(folder: str, method: str, classes: Sequence[Any], path: str, per_class: int = 10) -> None:
    """One row per class, the first `per_class` images of `folder` (<folder>/<class>/*.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = distilled_records(folder, classes, per_class)
    if not recs:
        return
    rows = min(len(classes), 20)
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * 0.7, rows * 0.72), squeeze=False)
    by_class: dict[int, list] = {}
    for r in recs:
        by_class.setdefault(r.label, []).append(r)
    from PIL import Image

    for i, c in enumerate(classes[:rows]):
        for j in range(per_class):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            items = by_class.get(c.index, [])
            if j < len(items):
                import io

                ax.imshow(np.asarray(Image.open(io.BytesIO(read_bytes(items[j].path))).convert("RGB")), interpolation="nearest")
        axes[i, 0].set_ylabel(c.name[:12], rotation=0, ha="right", fontsize=7)
    fig.suptitle(f"{method}: first {per_class} images per class", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def plot_tsne(tsne: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [p["set"] for p in tsne]
    fig, axes = plt.subplots(1, len(sets) - 1, figsize=(3.3 * (len(sets) - 1), 3.4), squeeze=False)
    real = tsne[0]
    rxy = np.array(real["xy"])
    for k, p in enumerate(tsne[1:]):
        ax = axes[0, k]
        ax.scatter(rxy[:, 0], rxy[:, 1], c=real["label"], cmap="tab10", s=6, alpha=0.25, label="real")
        xy = np.array(p["xy"])
        ax.scatter(xy[:, 0], xy[:, 1], c=p["label"], cmap="tab10", s=28, marker="*", edgecolors="k", linewidths=0.4, label=p["set"])
        ax.set_title(f"{p['set']} (stars) vs real (dots)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("t-SNE of backbone features, colour = class", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def protocol_line(cfg: Any) -> str:
    """Which protocol produced the table, its source, and whether the numbers compare with the papers'."""
    e = cfg.eval
    text = f"Protocol: `{e.name}`" + (f" ({e.source})" if e.source else "") + "."
    teacher_here = e.protocol == "soft_label" and not getattr(getattr(e, "teacher", None), "path", None)
    if not e.comparable or teacher_here:
        why = "its teacher was trained here, not the papers' pretrained one" if teacher_here and e.comparable else "it is not a paper's protocol"
        text += f" **Not comparable to the papers' tables**: {why}."
    return text


def test_set_line(rows: Sequence[dict]) -> str:
    """What the accuracies were measured on: the test-set size, per class (from the rows)."""
    per_class = next((r["test_per_class"] for r in rows if r.get("test_per_class")), None)
    if not per_class:
        return ""
    counts = list(per_class.values())
    text = f"Test set: {sum(counts)} real images, {min(counts)}–{max(counts)} per class"
    if len(counts) <= 20:
        text += " (" + ", ".join(f"{k}: {v}" for k, v in per_class.items()) + ")"
    return text + "; unusable test files are listed in skipped.csv (split `test`)."


def write_report(cfg: Any, run_dir: str, results: dict, extra: dict | None = None, image_root: str | None = None) -> str:
    """results.json, report.md and plots/; returns the markdown table (printed by the CLI)."""
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    archs = list(cfg.eval.archs)
    res_label = f"{cfg.dataset.name}, IPC {cfg.ipc}, protocol {cfg.eval.name}: {cfg.eval.protocol} ({cfg.eval.recipe}), eval at {cfg.eval.resolution}px"
    table = format_table(results["rows"], methods, archs, f"Test accuracy (%) mean ± std over seeds {list(cfg.eval.seeds)} — {res_label}")
    s = summarize(results["rows"])
    payload = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "summary": {f"{m}/{a}": {k: v for k, v in c.items()} for (m, a), c in s.items()},
        "rows": results["rows"],
        "metrics": results.get("metrics"),
        **(extra or {}),
    }
    fs, rp = fsspec.core.url_to_fs(run_dir)
    fs.pipe_file(f"{rp}/results.json", json.dumps(payload, indent=1, default=str).encode())
    plots = f"{run_dir}/plots"
    plot_accuracy(results["rows"], methods, archs, f"{plots}/accuracy.png", res_label)
    for m in methods:
        folder = f"{run_dir}/{m}/images" if image_root is None else image_root
        plot_grid(folder, m, results.get("classes") or [], f"{plots}/grid_{m}.png")
    metrics = results.get("metrics") or {}
    if metrics.get("tsne"):
        plot_tsne(metrics["tsne"], f"{plots}/tsne.png")
    md = ["# dap_ray run report\n", f"Run directory: `{run_dir}`\n", table, "", protocol_line(cfg), "", test_set_line(results["rows"]), ""]
    if metrics.get("methods"):
        md += ["## Representativeness (1/d, higher = closer to the real class means) and diversity", "",
               f"Feature space: {metrics['feature_space']}.", "", "| set | 1/d | diversity |", "|---|---|---|",
               f"| real (reference) | {metrics['real']['inv_d']:.3f} | {metrics['real']['diversity']:.3f} |"]
        md += [f"| {m} | {v['inv_d']:.3f} | {v['diversity']:.3f} |" for m, v in metrics["methods"].items()]
        md.append("")
    md += ["## Plots", "", "![accuracy](plots/accuracy.png)", ""]
    md += [f"![{m}](plots/grid_{m}.png)" for m in methods]
    if metrics.get("tsne"):
        md += ["", "![t-SNE](plots/tsne.png)"]
    failed = [r for r in results["rows"] if r.get("status") != "ok"]
    if failed:
        md += ["", "## Failed trainings", ""] + [f"- {r['method']}/{r['arch']}/seed {r['seed']}: {r.get('error')}" for r in failed]
    if extra:
        md += ["", "## Run facts", "", "```json", json.dumps(extra, indent=1, default=str), "```"]
    md += ["", "Notes: images of every method (and the real test images) are decoded by the same code and resized alike "
           f"to {cfg.eval.resolution}px before training; accuracy is the recipe's metric (the peers report the best test "
           "accuracy over periodic evaluations; `acc_last` in results.json is the final one)."]
    fs.pipe_file(f"{rp}/report.md", "\n".join(md).encode())
    return table
