"""Representativeness, Fréchet distance and spread of distilled sets, and their t-SNE, in a feature
space that no distillation method optimises.

Seed 001 (DAP, §3.3 and Fig. 1) scores representativeness as 1/d, d the kernel-induced distance
between synthetic and real samples, and diversity through FID. Measured in the guidance layer's own
features — the space DAP pushes samples in — the score would reward DAP by construction, so the
features here are the penultimate layer (the classifier's input) of the evaluation teacher: the
pretrained one of `eval.teacher.path`, else the `eval.teacher.arch` net trained here on the real
training split (cached, the same teacher soft-label evaluation uses). Definitions, per set:

- `inv_d`: 1 / mean_i d_i, d_i = ||φ(x_i) − μ_{c_i}|| / √D — the linear (Mercer) kernel's induced
  distance between a sample and its class's real mean embedding, per feature dimension so values
  compare across encoders. Higher = closer to the real data.
- `fd`: the Fréchet distance between Gaussians fitted to the set's and the real sample's features
  (FID's formula, with this encoder instead of Inception, so not comparable to published FIDs).
  Lower = the set covers the real distribution better; seed 001's diversity axis.
- `spread`: mean within-class pairwise distance per √D (higher = more varied within a class). It is
  not seed 001's diversity; named apart so it is not read as one.

Everything runs in one Ray task on a worker (`measure_sets`): the driver only plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import scipy.linalg
import torch

from dap_ray.data.types import DatasetSplits, ImageRecord
from dap_ray.eval.run import classifier_name, decode_files, get_pretrained_teacher, get_teacher, load_split


def inverse_distance(feats: np.ndarray, labels: np.ndarray, class_means: dict[int, np.ndarray]) -> float:
    """1/d with d = mean_i ||f_i − μ_{c_i}|| / √D (feats (N, D), labels (N,))."""
    d = np.mean([np.linalg.norm(f - class_means[int(c)]) / np.sqrt(f.shape[-1]) for f, c in zip(feats, labels)])
    return float(1.0 / d) if d > 0 else float("inf")


def spread(feats: np.ndarray, labels: np.ndarray) -> float:
    """Mean within-class pairwise feature distance per √D (0 when no class has two samples)."""
    vals = []
    for c in np.unique(labels):
        f = feats[labels == c].astype(np.float64)
        if len(f) > 1:
            d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1)) / np.sqrt(f.shape[-1])
            vals.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(vals)) if vals else 0.0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||μ_a − μ_b||² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) for features a (N, D), b (M, D), N, M >= 2.

    FID's formula; the matrix square root is scipy's, its (numerically) imaginary part dropped."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product (few samples): regularise both sides, as pytorch-fid does
        eps = np.eye(len(cov_a)) * 1e-6
        root = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root.real))


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, images: torch.Tensor, batch: int = 256, device: str = "cpu") -> np.ndarray:
    """The classifier's input for uint8 images (N, 3, R, R): (N, D) float32.

    Read with a forward hook on the last Linear layer, so it works for our nets and torchvision/timm."""
    head = model.get_submodule(classifier_name(model))
    got: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: got.append(inp[0].flatten(1).float().cpu()))
    try:
        for s in range(0, len(images), batch):
            model(images[s : s + batch].to(device).float().div(255.0))  # the nets normalise internally
    finally:
        hook.remove()
    return torch.cat(got).numpy() if got else np.zeros((0, head.in_features), np.float32)


def real_sample(dataset: DatasetSplits, per_class: int, seed: int = 0) -> list[ImageRecord]:
    """A fixed seeded sample of at most `per_class` training images per class (the real reference)."""
    rng = np.random.default_rng(seed)
    out: list[ImageRecord] = []
    for c in dataset.classes:
        recs = [r for r in dataset.train if r.label == c.index]
        pick = rng.choice(len(recs), min(per_class, len(recs)), replace=False) if recs else []
        out += [recs[i] for i in sorted(pick)]
    return out


def encoder(cfg: Any, dataset: DatasetSplits, cache_dir: str) -> tuple[torch.nn.Module, str]:
    """(the evaluation teacher, what it is): pretrained from eval.teacher.path, else trained here (cached)."""
    t = cfg.eval.teacher
    if t.path:
        return get_pretrained_teacher(cfg, dataset)(), f"pretrained {t.library} {t.arch} teacher ({t.path})"
    x_real, y_real = load_split(dataset.train, int(cfg.eval.resolution))
    ref = get_teacher(cfg, dataset, x_real, y_real, cache_dir)
    return ref(), f"{t.arch} teacher trained here on the real training split ({int(t.epochs)} epochs)"


def set_metrics(cfg: Any, dataset: DatasetSplits, sets: dict[str, list[ImageRecord]], cache_dir: str,
                real_per_class: int = 100, tsne: bool = True) -> dict:
    """Body of the metrics task: features of a real sample and of every set, then the scores."""
    torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_eval)))
    model, what = encoder(cfg, dataset, cache_dir)
    device = "cuda" if float(cfg.runtime.gpus_per_eval) > 0 and torch.cuda.is_available() else "cpu"
    model = model.to(device)
    res = int(cfg.eval.resolution)

    def features(recs: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
        dec = decode_files([r.path for r in recs], res)  # unusable files are already listed by the evaluation
        return penultimate_features(model, dec.images, device=device), np.array([recs[i].label for i in dec.ok], dtype=int)

    real_f, real_y = features(real_sample(dataset, real_per_class))
    means = {int(c): real_f[real_y == c].mean(0) for c in np.unique(real_y)}
    out: dict[str, Any] = {"feature_space": f"penultimate layer of the {what}, {res} px", "encoder": what, "methods": {},
                           "real": {"n": len(real_f), "inv_d": inverse_distance(real_f, real_y, means), "spread": spread(real_f, real_y)}}
    set_feats = {}
    for name, recs in sets.items():
        f, y = features(recs)
        if len(f) < 2:
            continue
        set_feats[name] = (f, y)
        out["methods"][name] = {"n": len(f), "inv_d": inverse_distance(f, y, means), "fd": frechet_distance(f, real_f), "spread": spread(f, y)}
    if tsne and len(real_f) > 10 and set_feats:
        from sklearn.manifold import TSNE

        rng = np.random.default_rng(0)
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


def measure_sets(cfg: Any, dataset: DatasetSplits, sets: dict[str, list[ImageRecord]], cache_dir: str, tsne: bool = True) -> dict:
    """`set_metrics` as one Ray task with the evaluation's resources (a worker, not the driver)."""
    task = ray.remote(set_metrics).options(num_cpus=float(cfg.runtime.cpus_per_eval), num_gpus=float(cfg.runtime.gpus_per_eval),
                                           max_retries=int(cfg.runtime.eval_retries))
    return ray.get(task.remote(cfg, dataset, sets, cache_dir, tsne=tsne))
