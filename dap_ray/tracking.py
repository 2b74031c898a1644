"""Experiment tracking, opt-in: a run's results as TensorBoard events (`tracking.tensorboard=true`).

`tensorboard --logdir <out_dir>/tensorboard` then shows, per run: each method × net's test accuracy
(mean over seeds, and each seed), every training's test-accuracy curve over epochs, DAP's guidance
strength per DDIM step, the image grids and the resolved config. Sweeps need no switch: Ray Tune's
own TensorBoard logger writes every trial's reports (val_acc, each net's val_acc/<arch>) into its
trial folder under tune.storage_path.

Written with tensorboardX (a dependency of ray[tune]); on object stores the events are written to a
local temp folder and uploaded.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np

from dap_ray.storage import is_local

TENSORBOARD_DIR = "tensorboard"  # under the run directory


def _grid_image(url: str) -> np.ndarray | None:
    """A plot PNG as (H, W, 3) uint8, or None when the run has none."""
    from PIL import Image

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with Image.open(io.BytesIO(fs.cat_file(path))) as im:
        return np.asarray(im.convert("RGB"))


def write_tensorboard(run_dir: str, payload: Mapping[str, Any], grids: Mapping[str, str], config_yaml: str) -> str:
    """TensorBoard events of one run under <run_dir>/tensorboard; returns that folder.

    `payload` is what results.json holds (rows, summary, guidance_strength); scalars are accuracies in %.
    `grids` maps each method to its image-grid PNG (report.py's plots/grid_<method>.png).
    """
    from tensorboardX import SummaryWriter

    fs, rp = fsspec.core.url_to_fs(run_dir)
    remote = not is_local(fs)
    local = tempfile.mkdtemp(prefix="dap_ray_tb_") if remote else f"{rp}/{TENSORBOARD_DIR}"
    try:
        writer = SummaryWriter(logdir=local)
        try:
            writer.add_text("config", "```\n" + config_yaml + "\n```", 0)
            for cell, s in sorted((payload.get("summary") or {}).items()):
                if s.get("n"):
                    writer.add_scalar(f"accuracy/{cell}", float(s["mean"]), 0)  # cell = <method>/<arch>
            for r in payload.get("rows") or []:
                if r.get("status") != "ok" or r.get("acc") is None:
                    continue
                cell = f"{r['method']}/{r['arch']}"
                writer.add_scalar(f"accuracy_per_seed/{cell}", 100.0 * float(r["acc"]), int(r["seed"]))
                for epoch, acc in r.get("history") or []:
                    writer.add_scalar(f"curve/{cell}/seed{int(r['seed'])}", 100.0 * float(acc), int(epoch))
            for method, gs in sorted((payload.get("guidance_strength") or {}).items()):
                # one point per guided DDIM step, in sampling order (t falls), the step index as x
                for i, (_, v) in enumerate(sorted(((int(t), float(v)) for t, v in (gs.get("per_step") or {}).items()), reverse=True)):
                    writer.add_scalar(f"guidance_strength/{method}", v, i)
            for m, url in grids.items():
                img = _grid_image(url)
                if img is not None:
                    writer.add_image(f"images/{m}", img, 0, dataformats="HWC")
        finally:
            writer.close()
        if remote:
            fs.put(local, f"{rp}/{TENSORBOARD_DIR}", recursive=True)
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    return f"{run_dir.rstrip('/')}/{TENSORBOARD_DIR}"
