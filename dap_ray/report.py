"""Results table (mean ± std over seeds), results.json, report.md and plots/ of a run.

Every figure is written as PNG and PDF. Image figures (the per-method grids and the vanilla-vs-DAP
pairs) are assembled with PIL at the images' native resolution: one image pixel is one grid pixel
(an exact k×k block for images below MIN_TILE px, e.g. the 8-px digits), never a resampled
matplotlib tile. The report links only files it has written and checks every relative link before
it is saved; it names no absolute path of the run, so a copied run folder (docs/default_run) reads
the same. `rebuild_report` writes all of it again from what a run left on disk (stages=[report]).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from dap_ray.config import DistillConfig, EvaluateConfig, guidance_layer, to_structured
from dap_ray.data import distilled_records, read_bytes
from dap_ray.data.types import ClassInfo
from dap_ray.errors import ConfigError, UserError
from dap_ray.runtime import check_storage
from dap_ray.stats import mean_ci
from dap_ray.tracking import write_mlflow, write_tensorboard, write_wandb

log = logging.getLogger(__name__)

#: Images smaller than this (px) are enlarged by an integer factor with nearest-neighbour, so an 8-px
#: digit is visible while every source pixel stays one uniform block.
MIN_TILE = 64
#: An image grid keeps at most this many pixels (it drops class rows, and says so in its title):
#: 20 classes x 10 images at 512 px would otherwise be a 50-megapixel PNG.
MAX_GRID_PIXELS = 40_000_000
GRID_CLASSES = 20
GRID_PER_CLASS = 10
PAIR_COLUMNS = 10
CONFIDENCE = 0.95
LINK = re.compile(r"\]\(([^)\s]+)\)")


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


def method_ipcs(rows: Sequence[dict]) -> dict[str, int]:
    """Method -> the IPC its images were evaluated at (images per class actually trained on, from the
    rows; not the config's `ipc`, which `evaluate subsample=[...]` does not use)."""
    out: dict[str, int] = {}
    for r in rows:
        if r.get("ipc") is not None:
            out[r["method"]] = max(out.get(r["method"], 0), int(r["ipc"]))
    return out


def ipc_text(rows: Sequence[dict], fallback: int | None = None) -> str:
    """`IPC 10`, or `IPC 2 and 1` when the table's rows were evaluated at several IPCs."""
    ipcs = list(dict.fromkeys(method_ipcs(rows).values()))
    if not ipcs:
        return f"IPC {fallback}" if fallback is not None else "IPC ?"
    return "IPC " + (str(ipcs[0]) if len(ipcs) == 1 else ", ".join(map(str, ipcs[:-1])) + f" and {ipcs[-1]}")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def format_table(rows: Sequence[dict], methods: Sequence[str], archs: Sequence[str], title: str = "") -> str:
    """A markdown table: one row per method, one column per architecture, mean ± std (n seeds);
    an IPC column when the rows were evaluated at more than one IPC."""
    s = summarize(rows)
    ipcs = method_ipcs(rows)
    with_ipc = len(set(ipcs.values())) > 1
    head = "| method | " + ("IPC | " if with_ipc else "") + " | ".join(archs) + " |"
    lines = ([f"{title}", ""] if title else []) + [head, "|" + "---|" * (len(archs) + 1 + with_ipc)]
    for m in methods:
        cells = [str(ipcs.get(m, "—"))] if with_ipc else []
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


def slug(name: str) -> str:
    """A set name as a file name (`rr@ipc2` -> `rr_ipc2`): plots/ links stay plain markdown."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---------------------------------------------------------------- writing files


def _pipe(path: str, data: bytes) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(p, data)


def save_figure(fig: Any, png_path: str) -> str:
    """A matplotlib figure as PNG and, beside it, PDF (vector, for papers), then closed (pyplot keeps
    every open figure alive until then); returns the PNG path."""
    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
        _pipe(png_path[: -len(".png")] + f".{fmt}", buf.getvalue())
    pyplot().close(fig)
    return png_path


def save_image(img: Image.Image, png_path: str) -> str:
    """An assembled image as PNG (lossless, native pixels) and as a one-page PDF of the same pixels."""
    for fmt in ("PNG", "PDF"):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"resolution": 150.0} if fmt == "PDF" else {}))
        _pipe(png_path[: -len(".png")] + f".{fmt.lower()}", buf.getvalue())
    return png_path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window (and no display on a cluster node)
    import matplotlib.pyplot as plt

    return plt


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure of the report."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


# ---------------------------------------------------------------- accuracy and training curves


def plot_accuracy(rows: Sequence[dict], methods: Sequence[str], archs: Sequence[str], path: str, title: str) -> str | None:
    """Dot plot: per architecture a panel with its own y axis (the differences between methods are a
    few points, a 0–100 axis hides them); each seed a small dot, the mean a large one with its 95 %
    Student-t interval. The caption states n and what the bars are."""
    s = summarize(rows)
    cells = {(m, a): s[(m, a)]["accs"] for m in methods for a in archs if (m, a) in s and s[(m, a)]["accs"]}
    if not cells:
        return None
    plt = pyplot()
    colors = method_colors(methods)
    fig, axes = plt.subplots(1, len(archs), figsize=(max(3.0, 0.75 * len(methods) + 1.4) * len(archs), 3.6), squeeze=False)
    ns = []
    for j, a in enumerate(archs):
        ax = axes[0, j]
        for i, m in enumerate(methods):
            accs = cells.get((m, a))
            if not accs:
                continue
            ci = mean_ci(accs, CONFIDENCE)
            ns.append(ci.n)
            spread = (np.arange(ci.n) - (ci.n - 1) / 2) * min(0.05, 0.25 / max(ci.n, 1))  # seeds side by side, not on top
            ax.scatter(i - 0.18 + spread, accs, s=12, facecolors="none", edgecolors=colors[m], linewidths=0.8, zorder=2)
            if ci.n >= 2:
                ax.errorbar(i + 0.08, ci.mean, yerr=[[ci.mean - ci.low], [ci.high - ci.mean]], fmt="o", color=colors[m],
                            ms=6, capsize=4, lw=1.4, zorder=3)
            else:
                ax.plot(i + 0.08, ci.mean, "o", color=colors[m], ms=6, zorder=3)
            ax.annotate(f"{ci.mean:.1f}", (i + 0.16, ci.mean), fontsize=7, va="center")
        ax.set_xticks(range(len(methods)), methods, rotation=30 if len(methods) > 4 else 0, ha="right" if len(methods) > 4 else "center")
        ax.set_xlim(-0.6, len(methods) - 0.3)
        ax.set_title(a, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        if j == 0:
            ax.set_ylabel("test accuracy (%)")
    n_txt = str(ns[0]) if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}"
    caption = (f"n = {n_txt} seeds per cell. Open dots: one training each; filled dot: their mean; bars: "
               f"{int(CONFIDENCE * 100)}% confidence interval of the mean (Student t, n−1 df)"
               + ("; a cell with n = 1 has no interval" if min(ns) < 2 else "")
               + ". Each panel has its own y axis (not from 0).")
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, -0.03, caption, ha="center", va="top", fontsize=7, wrap=True)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def accuracy_caption(rows: Sequence[dict], methods: Sequence[str], archs: Sequence[str]) -> str:
    """The markdown line under the dot plot: what is drawn and n."""
    s = summarize(rows)
    ns = sorted({s[(m, a)]["n"] for m in methods for a in archs if (m, a) in s and s[(m, a)]["n"]})
    n_txt = "n = " + (str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}") + " seeds per cell" if ns else "no finished training"
    return (f"Each seed's accuracy (open dots), their mean (filled) and its {int(CONFIDENCE * 100)}% Student-t confidence "
            f"interval (bars); {n_txt}; one panel and y axis per architecture. The table above gives mean ± std "
            "(population std over seeds, as the papers report it).")


def plot_curves(rows: Sequence[dict], methods: Sequence[str], archs: Sequence[str], path: str) -> str | None:
    """Test accuracy during training, from each training's stored history ([epoch, acc] at every
    evaluation): per architecture a panel, per method the mean over seeds (thin lines: each seed)."""
    hist = [r for r in rows if r.get("status") == "ok" and r.get("history")]
    if not hist:
        return None
    plt = pyplot()
    colors = method_colors(methods)
    fig, axes = plt.subplots(1, len(archs), figsize=(4.0 * len(archs), 3.2), squeeze=False)
    for j, a in enumerate(archs):
        ax = axes[0, j]
        for m in methods:
            runs = [r["history"] for r in hist if r["method"] == m and r["arch"] == a]
            if not runs:
                continue
            for h in runs:
                e, acc = np.array(h, dtype=float).T  # (T,), (T,)
                ax.plot(e, 100 * acc, color=colors[m], lw=0.6, alpha=0.35)
            common = sorted(set.intersection(*(set(int(ep) for ep, _ in h) for h in runs)))
            if common:  # the seeds' mean where every seed was evaluated (the same epochs for one recipe)
                mean = [np.mean([100 * dict((int(ep), acc) for ep, acc in h)[ep] for h in runs]) for ep in common]
                ax.plot(common, mean, color=colors[m], lw=1.8, label=f"{m} (n={len(runs)})", marker="o" if len(common) < 12 else None, ms=3)
        ax.set_title(a, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Test accuracy during training: mean over seeds (thick), each seed (thin)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_tsne(tsne: Sequence[dict], path: str) -> str | None:
    if len(tsne) < 2:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tsne) - 1, figsize=(3.3 * (len(tsne) - 1), 3.4), squeeze=False)
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
    save_figure(fig, path)
    return path


# ---------------------------------------------------------------- image figures (native pixels)


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans, which matplotlib ships (Pillow's built-in font has no × or γ)."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _open(path: str) -> Image.Image | None:
    try:
        return Image.open(io.BytesIO(read_bytes(path))).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:  # an unreadable file leaves its cell empty, said in the log
        log.warning("report: cannot show %s (%s)", path, e)
        return None


def tile_scale(cells: Sequence[Sequence[Image.Image | None]]) -> tuple[int, int, int]:
    """(width, height, k) of a cell: the largest image's native size and the integer enlargement k."""
    sizes = [im.size for row in cells for im in row if im is not None]
    w, h = max(s[0] for s in sizes), max(s[1] for s in sizes)
    return w, h, max(1, math.ceil(MIN_TILE / max(w, h)))


def assemble(cells: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str], col_labels: Sequence[str] | None,
             title: Sequence[str]) -> Image.Image:
    """Images in a grid at native resolution (k×k nearest-neighbour blocks below MIN_TILE px), row
    labels on the left, optional column labels, title lines on top; an absent image is a blank cell."""
    w, h, k = tile_scale(cells)
    tw, th, pad = w * k, h * k, 2
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max((int(probe.textlength(t, font=small)) for t in row_labels), default=0)
    title_h = 6 + 18 * len(title)
    head_h = 16 if col_labels else 0
    ncols = max(len(r) for r in cells)
    width = max(label_w + ncols * (tw + pad) + pad, 8 + max(int(probe.textlength(t, font=font)) for t in title))
    img = Image.new("RGB", (width, title_h + head_h + len(cells) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for i, t in enumerate(title):
        draw.text((4, 4 + 18 * i), t, fill="black", font=font)
    for j, t in enumerate(col_labels or []):
        draw.text((label_w + pad + j * (tw + pad), title_h), t[: max(1, tw // 7)], fill="black", font=small)
    for i, row in enumerate(cells):
        y = title_h + head_h + pad + i * (th + pad)
        draw.text((4, y + th // 2 - 6), row_labels[i], fill="black", font=small)
        for j, im in enumerate(row):
            if im is None:
                continue
            x = label_w + pad + j * (tw + pad)
            big = im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im
            img.paste(big, (x + (tw - big.width) // 2, y + (th - big.height) // 2))
    return img


def scale_text(w: int, h: int, k: int) -> str:
    return f"{w}×{h} px" + (f", shown {k}× (nearest neighbour: one pixel = one {k}×{k} block)" if k > 1 else ", one pixel per pixel")


def plot_grid(folder: str, method: str, classes: Sequence[ClassInfo], path: str, per_class: int = GRID_PER_CLASS,
              ipc: int | None = None) -> str | None:
    """The first `per_class` images (by file name) of each class of `folder` (<folder>/<class>/*),
    one row per class, as many columns as the fullest class has images (no empty frames at IPC 2)."""
    recs = distilled_records(folder, classes, per_class)
    if not recs:
        return None
    by_class: dict[int, list] = {}
    for r in recs:
        by_class.setdefault(r.label, []).append(r)
    shown = [c for c in classes if c.index in by_class]
    ncols = max(len(v) for v in by_class.values())
    first = _open(by_class[shown[0].index][0].path)
    side = max(first.size) if first is not None else MIN_TILE
    tile = side * max(1, math.ceil(MIN_TILE / side))
    rows = min(len(shown), GRID_CLASSES, max(1, MAX_GRID_PIXELS // (ncols * tile * tile)))
    cells = [[_open(r.path) for r in by_class[c.index]] for c in shown[:rows]]
    if not any(im is not None for row in cells for im in row):
        return None
    w, h, k = tile_scale(cells)
    counts = sorted({len(by_class[c.index]) for c in shown[:rows]})
    n_txt = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    title = [f"{method}" + (f" (IPC {ipc})" if ipc else "") + f": the first {n_txt} image(s) of each class, by file name",
             f"{rows} of {len(classes)} classes" + (f" ({len(classes) - len(shown)} without images)" if len(shown) < len(classes) else "")
             + f"; {scale_text(w, h, k)}"]
    img = assemble(cells, [c.name[:16] for c in shown[:rows]], None, title)
    return save_image(img, path)


def plot_pairs(run_dir: str, classes: Sequence[ClassInfo], path: str, knobs: str, a: str = "vanilla", b: str = "dap") -> str | None:
    """`a` above `b` for the same files: an image's initial noise is seeded by (run seed, class,
    index), so `<a>/images/<class>/<index>.png` and `<b>/images/<class>/<index>.png` start from the
    same noise and differ only by the guidance. Up to PAIR_COLUMNS pairs, spread over the classes."""
    ra = {r.id: r for r in distilled_records(f"{run_dir}/{a}/images", classes)}
    rb = {r.id: r for r in distilled_records(f"{run_dir}/{b}/images", classes)}
    common = [i for i in ra if i in rb]
    if not common:
        return None
    by_class: dict[str, list[str]] = {}
    for i in common:
        by_class.setdefault(i.split("/", 1)[0], []).append(i)
    per = max(1, PAIR_COLUMNS // len(by_class))
    picked = [i for ids in by_class.values() for i in ids[:per]][:PAIR_COLUMNS]
    cells = [[_open(ra[i].path) for i in picked], [_open(rb[i].path) for i in picked]]
    if not any(im is not None for row in cells for im in row):
        return None
    names = {c.key: c.name for c in classes}
    w, h, k = tile_scale(cells)
    title = [f"{a} (top) and {b} (bottom) from the same initial noise, pair by pair (same class/index file)",
             f"{b}: {knobs}; {scale_text(w, h, k)}"]
    cols = [f"{names.get(i.split('/', 1)[0], i.split('/', 1)[0])}/{i.rsplit('/', 1)[-1].rsplit('.', 1)[0].lstrip('0') or '0'}" for i in picked]
    img = assemble(cells, [a, b], cols, title)
    return save_image(img, path)


# ---------------------------------------------------------------- report.md


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


def missing_links(md: str, run_dir: str) -> list[str]:
    """Relative links of `md` (images, PDFs, files) that do not exist under run_dir."""
    fs, rp = fsspec.core.url_to_fs(run_dir)
    return [t for t in LINK.findall(md) if "://" not in t and not t.startswith("#") and not fs.exists(f"{rp.rstrip('/')}/{t}")]


def _figure(md: list[str], alt: str, png: str | None, caption: str = "") -> None:
    """A figure's markdown, only for a file that was written: its PNG inline, its PDF linked."""
    if png is None:
        return
    rel = "plots/" + png.rsplit("/plots/", 1)[1]
    md += [f"![{alt}]({rel})", "", (caption + " " if caption else "") + f"[PDF]({rel[: -len('.png')]}.pdf)", ""]


def metrics_table(metrics: dict) -> list[str]:
    """The metrics section of report.md (dap_ray/metrics.py defines the scores)."""
    def num(v: dict, k: str) -> str:
        return f"{v[k]:.3f}" if isinstance(v.get(k), (int, float)) else "–"

    real = metrics.get("real") or {}
    md = ["## Representativeness, Fréchet distance and spread", "",
          f"Feature space: {metrics['feature_space']} — not the guidance layer, so no method is scored in the space it optimises. "
          "1/d: inverse mean distance to the class's real mean embedding per √D (higher = more representative, seed 001's 1/d "
          "with the linear kernel); FD: Fréchet distance to the real sample's features (FID's formula with this encoder; lower = "
          "closer to the real distribution); spread: mean within-class pairwise distance per √D (higher = more varied).", "",
          "| set | n | 1/d | FD | spread |", "|---|---|---|---|---|",
          f"| real sample (reference) | {real.get('n', '')} | {num(real, 'inv_d')} | 0 | {num(real, 'spread')} |"]
    md += [f"| {m} | {v.get('n', '')} | {num(v, 'inv_d')} | {num(v, 'fd')} | {num(v, 'spread')} |" for m, v in metrics["methods"].items()]
    return md + [""]


def write_report(cfg: Any, run_dir: str, results: dict, extra: dict | None = None, image_root: str | None = None) -> str:
    """results.json, report.md and plots/; returns the markdown table (printed by the CLI).

    `image_root` is the evaluated folder of `python -m dap_ray.evaluate` (each set the first `ipc`
    images per class of it); None: a distill run, each method's images in <run_dir>/<method>/images."""
    rows = results["rows"]
    classes = list(results.get("classes") or [])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    archs = list(cfg.eval.archs)
    res_label = (f"{cfg.dataset.name}, {ipc_text(rows, cfg.ipc)}, protocol {cfg.eval.name}: {cfg.eval.protocol} ({cfg.eval.recipe}), "
                 f"eval at {cfg.eval.resolution}px")
    table = format_table(rows, methods, archs, f"Test accuracy (%) mean ± std over seeds {list(cfg.eval.seeds)} — {res_label}")
    s = summarize(rows)
    payload = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "summary": {f"{m}/{a}": dict(c) for (m, a), c in s.items()},
        "rows": rows,
        "metrics": results.get("metrics"),
        "classes": [dataclasses.asdict(c) for c in classes],  # the report can be rebuilt without the dataset
        **(extra or {}),
    }
    fs, rp = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(rp, exist_ok=True)
    fs.pipe_file(f"{rp}/results.json", json.dumps(payload, indent=1, default=str).encode())
    plots = f"{run_dir}/plots"
    metrics = results.get("metrics") or {}
    ipcs = method_ipcs(rows)

    md = ["# dap_ray run report\n", table, "", protocol_line(cfg), "", test_set_line(rows), ""]
    files = [f"[{n}]({n})" for n in ("config.yaml", "results.json", "skipped.csv") if fs.exists(f"{rp}/{n}")]
    md += ["Files of this run (beside this report): " + ", ".join(files) + "; one JSON per training in `eval/`.", ""]
    if metrics.get("methods"):
        md += metrics_table(metrics)
    md += ["## Plots", "", "### Accuracy", ""]
    _figure(md, "accuracy", plot_accuracy(rows, methods, archs, f"{plots}/accuracy.png", res_label), accuracy_caption(rows, methods, archs))
    curves = plot_curves(rows, methods, archs, f"{plots}/curves.png")
    if curves:
        every = sorted({int(h[1][0]) - int(h[0][0]) for h in (r.get("history") or [] for r in rows) if len(h) > 1})
        md += ["### Training curves", ""]
        _figure(md, "training curves", curves, "Test accuracy at every evaluation of each training"
                + (f" (every {every[0]} epochs)" if len(every) == 1 else "") + "; thick: mean over seeds, thin: each seed.")
    if image_root is None and {"vanilla", "dap"} <= set(methods):
        m = cfg.method
        knobs = f"γ={m.gamma}, layer {guidance_layer(cfg)}, t_stop={m.t_stop}, {m.kernel} kernel"
        pairs = plot_pairs(run_dir, classes, f"{plots}/pairs_vanilla_dap.png", knobs)
        if pairs:
            md += ["### Vanilla and DAP from the same noise", ""]
            _figure(md, "vanilla vs DAP", pairs, "Each column: one class/index, so one initial noise (seeded by run seed, class, "
                    "index); top vanilla (γ = 0), bottom DAP.")
    grids = []
    for m in methods:
        folder = f"{run_dir}/{m}/images" if image_root is None else image_root
        k = ipcs.get(m)
        grids.append((m, plot_grid(folder, m, classes, f"{plots}/grid_{slug(m)}.png", min(GRID_PER_CLASS, k or GRID_PER_CLASS), k)))
    if any(g for _, g in grids):
        md += ["### Distilled images", ""]
        for m, g in grids:
            _figure(md, m, g)
    if metrics.get("tsne"):
        md += ["### t-SNE", ""]
        _figure(md, "t-SNE", plot_tsne(metrics["tsne"], f"{plots}/tsne.png"))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        md += ["## Failed trainings", ""] + [f"- {r['method']}/{r['arch']}/seed {r['seed']}: {r.get('error')}" for r in failed] + [""]
    if extra:
        md += ["## Run facts", "", "```json", json.dumps(extra, indent=1, default=str), "```", ""]
    md += ["Notes: images of every method (and the real test images) are decoded by the same code and resized alike "
           f"to {cfg.eval.resolution}px before training; accuracy is the recipe's metric (the peers report the best test "
           "accuracy over periodic evaluations; `acc_last` in results.json is the final one)."]
    text = "\n".join(md)
    broken = missing_links(text, run_dir)
    if broken:  # a bug of this module, not of the user's run: say exactly what is missing
        raise RuntimeError(f"report.md would link files that do not exist in {run_dir}: {broken}")
    fs.pipe_file(f"{rp}/report.md", text.encode())
    if cfg.tracking.tensorboard:
        tb = write_tensorboard(run_dir, payload, {m: f"{plots}/grid_{slug(m)}.png" for m in methods}, OmegaConf.to_yaml(cfg, resolve=True))
        log.info("TensorBoard events in %s: tensorboard --logdir %s", tb, tb)
    t = cfg.tracking
    if t.mlflow is not None or t.wandb is not None:
        # the same payload as TensorBoard's, plus the files a reader of the run opens first
        files = [f"{run_dir}/results.json", f"{run_dir}/report.md"]
        files += [f"{plots}/{p.rsplit('/', 1)[-1]}" for p in sorted(fs.glob(f"{rp}/plots/*.png"))]
        if t.mlflow is not None:
            run_id = write_mlflow(str(t.mlflow), str(t.mlflow_experiment), run_dir, payload, files)
            log.info("MLflow: run %s in experiment %s at %s", run_id, t.mlflow_experiment, t.mlflow)
        if t.wandb is not None:
            log.info("W&B: %s", write_wandb(str(t.wandb), run_dir, payload, files))
    return table


def stored_classes(payload: dict) -> list[ClassInfo]:
    """The classes of a results.json: stored since reports can be rebuilt; an older file gives them
    by the order of its rows' per-class test counts (keys only; the name is the key)."""
    if payload.get("classes"):
        return [ClassInfo(**c) for c in payload["classes"]]
    per_class = next((r["test_per_class"] for r in payload.get("rows", []) if r.get("test_per_class")), {})
    return [ClassInfo(i, str(k), str(k)) for i, k in enumerate(per_class)]


def known_keys(stored: Any, node: Any, where: str = "") -> Any:
    """`stored` without the keys the schema `node` no longer has (a results.json of an older dap_ray,
    e.g. a removed knob): they label nothing in the report, and the rest still reads. Each dropped
    key is logged."""
    if not isinstance(stored, dict) or not OmegaConf.is_dict(node):
        return stored
    out = {}
    for k, v in stored.items():
        if k in node:
            out[k] = known_keys(v, node.get(k), f"{where}{k}.")
        else:
            log.info("results.json: config key %s%s is not in this dap_ray's schema; left out of the report", where, k)
    return out


def rebuild_report(run_dir: str) -> str:
    """stages=[report]: report.md, plots/ and results.json written again from what the run left in
    run_dir (results.json, each method's images); no Ray, no dataset, no model. The run's own stored
    config labels the tables. Returns the markdown table."""
    check_storage(run_dir, "out_dir")  # one line for S3 without credentials or a file as out_dir, not a traceback
    fs, rp = fsspec.core.url_to_fs(run_dir)
    path = f"{rp.rstrip('/')}/results.json"
    if not fs.exists(path):
        raise UserError(f"{run_dir} has no results.json to rebuild the report from; run the evaluation first "
                        "(stages=[evaluate,report], or the full run)")
    try:
        payload = json.loads(fs.cat_file(path))
    except ValueError as e:
        raise UserError(f"{run_dir}/results.json is not readable JSON ({e}); run the evaluation again") from None
    stored = payload.get("config") or {}
    schema = EvaluateConfig if "data" in stored else DistillConfig
    try:
        cfg = to_structured(OmegaConf.create(known_keys(stored, OmegaConf.structured(schema))), schema)
    except ConfigError as e:
        raise UserError(f"{run_dir}/results.json holds a config this dap_ray cannot read ({e}); run the evaluation again") from None
    known = ("config", "summary", "rows", "metrics", "classes")
    extra = {k: v for k, v in payload.items() if k not in known}
    results = {"rows": payload.get("rows") or [], "metrics": payload.get("metrics"), "classes": stored_classes(payload)}
    return write_report(cfg, run_dir, results, extra, image_root=stored.get("data"))
