"""Representativeness (1/d), Fréchet distance and spread (dap_ray/metrics.py): each score against an
independent computation at realistic feature sizes, features read from the classifier's input, and the
whole task on a Ray worker in the teacher's feature space, where real digits must score as closer to
the real data than noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dap_ray.data.types import ImageRecord
from dap_ray.metrics import frechet_distance, inverse_distance, penultimate_features, spread


@pytest.mark.unit
def test_frechet_distance_against_eigenvalues_at_d_512():
    """tr((Σa Σb)^½) from the eigenvalues of Σa Σb (real, non-negative for two covariances), float64."""
    rng = np.random.default_rng(0)
    d = 512
    a = rng.normal(size=(2000, d)) @ (rng.normal(size=(d, d)) / np.sqrt(d))
    b = rng.normal(size=(1500, d)) * 1.3 + 0.2
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_root = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(ca))
    # a shifted copy is exactly the squared shift away
    assert frechet_distance(a, a + 0.5) == pytest.approx(0.25 * d, rel=1e-6)


@pytest.mark.unit
def test_inverse_distance_and_spread_against_loops():
    rng = np.random.default_rng(1)
    d = 1152
    feats = rng.normal(size=(12, d)).astype(np.float32)
    labels = np.array([0] * 5 + [1] * 7)
    means = {0: rng.normal(size=d), 1: rng.normal(size=d)}
    dist = [np.sqrt(sum((float(feats[i, k]) - means[labels[i]][k]) ** 2 for k in range(d))) / np.sqrt(d) for i in range(12)]
    assert inverse_distance(feats, labels, means) == pytest.approx(1.0 / np.mean(dist), rel=1e-5)
    per_class = []
    for c in (0, 1):
        f = feats[labels == c].astype(np.float64)
        pairs = [np.linalg.norm(f[i] - f[j]) / np.sqrt(d) for i in range(len(f)) for j in range(i + 1, len(f))]
        per_class.append(np.mean(pairs))
    assert spread(feats, labels) == pytest.approx(np.mean(per_class), rel=1e-6)
    assert spread(feats[:1], labels[:1]) == 0.0


@pytest.mark.unit
def test_penultimate_features_are_the_classifier_input():
    """logits == head(features): the hook reads exactly what the classifier sees, for our nets and torchvision's."""
    import torchvision

    from dap_ray.eval.nets import create

    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    for model in (create("convnet", 7, 32).eval(), torchvision.models.resnet18(num_classes=7).eval()):
        f = penultimate_features(model, x, batch=2)
        head = model.classifier if hasattr(model, "classifier") else model.fc
        with torch.no_grad():
            logits = model(x.float() / 255)
        assert f.shape == (5, head.in_features)
        torch.testing.assert_close(head(torch.from_numpy(f)), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_real_digits_score_closer_than_noise_in_the_teacher_space(ray_session, cache_dir, tmp_path):
    """On a worker, with a teacher trained here: held-out real digits have higher 1/d and lower FD
    than uniform noise images; the feature space is named and is not the backbone's."""
    from dap_ray.cli import compose
    from dap_ray.config import to_structured, validate
    from dap_ray.data import resolve_dataset
    from dap_ray.metrics import measure_sets

    cfg = to_structured(compose("distill", [f"cache_dir={cache_dir}", "eval.resolution=16", "eval.teacher.arch=convnet",
                                            "eval.teacher.epochs=3", "dataset.classes=[0,1,2]"]))
    validate(cfg)
    ds = resolve_dataset("digits", None, ["0", "1", "2"], cache_dir=str(cache_dir))
    real = {c.index: [r for r in ds.test if r.label == c.index][:6] for c in ds.classes}
    rng = np.random.default_rng(0)
    noise = []
    for c in ds.classes:
        (tmp_path / c.key).mkdir()
        for i in range(6):
            p = tmp_path / c.key / f"{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(p)
            noise.append(ImageRecord(f"{c.key}/{i}", str(p), c.index))
    sets = {"real_test": [r for c in ds.classes for r in real[c.index]], "noise": noise}
    out = measure_sets(cfg, ds, sets, str(cache_dir), tsne=True)
    m = out["methods"]
    assert m["real_test"]["n"] == m["noise"]["n"] == 18
    assert m["real_test"]["inv_d"] > m["noise"]["inv_d"]
    assert 0 <= m["real_test"]["fd"] < m["noise"]["fd"]
    assert m["real_test"]["spread"] > 0 and out["real"]["n"] > 100
    assert "teacher" in out["feature_space"] and "convnet" in out["encoder"]
    assert [p["set"] for p in out["tsne"]] == ["real", "real_test", "noise"]
