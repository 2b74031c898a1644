"""Representativeness (the paper's 1/d, Fig. 11), diversity, and t-SNE of real vs distilled features.

Features are the backbone's own (the guidance layer, mean-pooled, at the last — least noisy — DDIM
timestep, fixed noise), the space DAP guides in. d is the mean distance of a distilled image's
feature to its class's real mean, per feature dimension (so values are comparable across layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dap_ray import ddim
from dap_ray.data import load_images
from dap_ray.data.types import DatasetSplits, ImageRecord


def backbone_features(backbone, records: Sequence[ImageRecord], layer: str, t: int, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from dap_ray.bank import BankSpec, featurize

    spec = BankSpec(model={}, model_fingerprint="", layers=(layer,), timesteps=(t,), pooling="mean", seed=0, resolution=backbone.resolution)
    feats, labels = [], []
    for s in range(0, len(records), batch):
        chunk = list(records[s : s + batch])
        imgs, ok = load_images([r.path for r in chunk], backbone.resolution)
        if not ok:
            continue
        lab = np.array([chunk[i].label for i in ok])
        f = featurize(backbone, spec, imgs, lab, [chunk[i].id for i in ok])[layer][:, 0]  # (B, D)
        feats.append(f)
        labels.append(lab)
    if not feats:
        return np.zeros((0, 1), np.float32), np.zeros(0, int)
    return np.concatenate(feats), np.concatenate(labels)


def inverse_distance(feats: np.ndarray, labels: np.ndarray, class_means: dict[int, np.ndarray]) -> float:
    """1/d with d = mean_i ||f_i − μ_{c_i}|| / √D."""
    d = np.mean([np.linalg.norm(f - class_means[int(c)]) / np.sqrt(f.shape[-1]) for f, c in zip(feats, labels)])
    return float(1.0 / d) if d > 0 else float("inf")


def diversity(feats: np.ndarray, labels: np.ndarray) -> float:
    """Mean within-class pairwise feature distance per √D (higher = more diverse)."""
    vals = []
    for c in np.unique(labels):
        f = feats[labels == c]
        if len(f) > 1:
            d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1)) / np.sqrt(f.shape[-1])
            vals.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(vals)) if vals else 0.0


@torch.no_grad()
def representativeness(cfg: Any, dataset: DatasetSplits, sets: dict[str, list[ImageRecord]], backbone, run_dir: str,
                       real_per_class: int = 100, tsne: bool = True) -> dict:
    from dap_ray.config import guidance_layer

    layer = guidance_layer(cfg)
    t = ddim.schedule(backbone, int(cfg.sampler.steps))[-1]
    rng = np.random.default_rng(0)
    real_recs = []
    for c in dataset.classes:
        recs = [r for r in dataset.train if r.label == c.index]
        pick = rng.choice(len(recs), min(real_per_class, len(recs)), replace=False) if recs else []
        real_recs += [recs[i] for i in sorted(pick)]
    real_f, real_y = backbone_features(backbone, real_recs, layer, t)
    means = {int(c): real_f[real_y == c].mean(0) for c in np.unique(real_y)}
    out: dict[str, Any] = {"feature_space": f"backbone layer {layer}, mean-pooled, t={t}", "methods": {}}
    set_feats = {}
    for name, recs in sets.items():
        f, y = backbone_features(backbone, recs, layer, t)
        if len(f) == 0:
            continue
        set_feats[name] = (f, y)
        out["methods"][name] = {"inv_d": inverse_distance(f, y, means), "diversity": diversity(f, y)}
    out["real"] = {"inv_d": inverse_distance(real_f, real_y, means), "diversity": diversity(real_f, real_y)}
    if tsne and cfg.eval.tsne and len(real_f) > 10:
        from sklearn.manifold import TSNE

        keep = rng.choice(len(real_f), min(len(real_f), 30 * len(dataset.classes)), replace=False)
        parts = [("real", real_f[keep], real_y[keep])] + [(n, f, y) for n, (f, y) in set_feats.items()]
        allf = np.concatenate([p[1] for p in parts])
        emb = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30, max(5, len(allf) // 10))).fit_transform(allf)
        pts, s = [], 0
        for name, f, y in parts:
            pts.append({"set": name, "xy": emb[s : s + len(f)].tolist(), "label": y.tolist()})
            s += len(f)
        out["tsne"] = pts
    return out
