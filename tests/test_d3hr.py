"""D3HR: DDIM inversion round trip, class statistics, group selection, the Ray Data inversion stage."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dap_ray.backbones import load_backbone, model_fingerprint
from dap_ray.backbones.dit import DIGITS_DIT_DIR
from dap_ray.data import resolve_dataset
from dap_ray.data.types import ClassInfo
from dap_ray.methods import d3hr
from dap_ray.methods.d3hr import (
    InversionSpec,
    candidate_group,
    ddim_invert,
    distribution_stats,
    group_distances,
    invert_dataset,
    load_class_stats,
    select_group,
    select_noises,
    skewness_batch,
)
from dap_ray.sampling import sample_latents

DIGIT_CLASSES = [ClassInfo(i, str(i), str(i)) for i in range(10)]


def _digits(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """n real 8x8 digits (scikit-learn's bundled copy) as pixel-space latents (n,1,8,8) in [-1,1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32) / 16.0 * 2.0 - 1.0
    return x[:, None], torch.tensor(d.target[:n], dtype=torch.long)


def _round_trip_error(bb, z0, y, steps: int, invert_t: int | None) -> torch.Tensor:
    x_t, t = ddim_invert(bb, z0, y, steps, cfg_scale=1.0, invert_t=invert_t)
    assert t >= 0
    with torch.no_grad():
        rec = sample_latents(bb, x_t, y, steps, cfg_scale=1.0, start_t=t)
    return (rec - z0).abs()


# ---------------------------------------------------------------------------------------------
# DDIM inversion -> DDIM generation reconstructs the latent
#
# Tolerance, and why: DDIM inversion evaluates ε_θ on the latent one level below the one the
# sampler will see, so the round trip is exact only in the limit of small steps; the error is first
# order in the step size (about halves when the steps double — asserted). Each step's ε mismatch
# reaches x₀ multiplied by ~1/√ᾱ_t, so the last steps of the cosine schedule (ᾱ_980 ≈ 1e-3)
# dominate: a full inversion is approximate, a partial one (to t = 600, the depth of the D3HR
# authors' code) is close. Stated bounds, on the [-1, 1] pixel scale at CFG 1:
#   * invert to t=600 with 200 steps: max |ẑ₀ − z₀| < 0.04 (5 grey levels of 255), mean < 0.005
#     (measured on the packaged model: max 0.022, mean 0.002; the random tiny DiT: max 0.017);
#   * full inversion (to t=990) with 100 steps: max < 0.15, mean < 0.02 (measured 0.075 / 0.009).
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_inversion_round_trip_tiny_dit(tiny_dit_dir):
    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    bb.bind_classes(DIGIT_CLASSES)
    z0, y = _digits(4)
    err200 = _round_trip_error(bb, z0, y, 200, invert_t=600)
    err50 = _round_trip_error(bb, z0, y, 50, invert_t=600)
    assert err200.max() < 0.04 and err200.mean() < 0.005
    assert err200.max() < 0.5 * err50.max()  # first order: 4x the steps, well under half the error
    # and the inverted latent is not the input: the test would pass vacuously if inversion were a no-op
    x_t, _ = ddim_invert(bb, z0, y, 50, invert_t=600)
    assert (x_t - z0).abs().max() > 0.5


@pytest.mark.unit
@pytest.mark.skipif(not (DIGITS_DIT_DIR / "transformer" / "diffusion_pytorch_model.safetensors").is_file(),
                    reason="the packaged digits DiT is not built")
def test_inversion_round_trip_packaged_digits_dit():
    bb = load_backbone({"type": "dit", "path": None})
    bb.bind_classes(DIGIT_CLASSES)
    z0, y = _digits(6)
    err = _round_trip_error(bb, z0, y, 200, invert_t=600)
    assert err.max() < 0.04 and err.mean() < 0.005
    # full inversion to the top of the schedule: approximate (see above), far from a broken inverse (~1)
    full = _round_trip_error(bb, z0, y, 100, invert_t=None)
    assert full.max() < 0.15 and full.mean() < 0.02


@pytest.mark.unit
def test_inversion_mirrors_sampler_clipping(tiny_dit_dir):
    """With a clip_sample scheduler the inversion clips x̂₀ like the sampler does (and stays invertible)."""
    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    bb.bind_classes(DIGIT_CLASSES)
    z0, y = _digits(3)
    bb.scheduler_config["clip_sample"] = True
    clipped, _ = ddim_invert(bb, z0, y, 20, invert_t=600)
    assert _round_trip_error(bb, z0, y, 200, invert_t=600).max() < 0.04
    bb.scheduler_config["clip_sample"] = False
    plain, _ = ddim_invert(bb, z0, y, 20, invert_t=600)
    assert not torch.equal(clipped, plain)  # the random tiny DiT's x̂₀ leaves [-1, 1], so clipping is active


# ---------------------------------------------------------------------------------------------
# statistics and group selection
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_distribution_stats_match_scipy():
    from scipy import stats as sps

    x = torch.from_numpy(np.random.default_rng(0).gamma(2.0, size=(500, 7)))  # skewed, heavy-ish tails
    s = distribution_stats(x, dim=0)
    assert torch.allclose(s["mean"], x.mean(0))
    assert torch.allclose(s["std"], x.std(0, unbiased=False))
    np.testing.assert_allclose(s["skew"].numpy(), sps.skew(x.numpy(), axis=0, bias=True), rtol=1e-10)
    np.testing.assert_allclose(s["kurtosis"].numpy(), sps.kurtosis(x.numpy(), axis=0, fisher=True, bias=True), rtol=1e-10)
    # groups (G, n, D) along dim 1 give the per-group statistics
    g = distribution_stats(x.reshape(5, 100, 7), dim=1)
    np.testing.assert_allclose(g["skew"][3].numpy(), sps.skew(x[300:400].numpy(), axis=0, bias=True), rtol=1e-10)
    # a zero-variance dimension has skew = kurtosis = 0, not NaN
    one = distribution_stats(torch.ones(1, 3, 4), dim=1)
    assert torch.all(one["skew"] == 0) and torch.all(one["kurtosis"] == 0)


def _released_score(samples: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A transcription of the released D3HR evaluate_distribution_batch / skewness_batch
    (lin-zhao-resoLve/D3HR generation/group_sampling.py), float64."""
    m = torch.mean(samples, dim=1, keepdim=True)
    s = torch.std(samples, dim=1, keepdim=True)
    n = samples.size(2)
    skew = torch.sum(((samples - m) / s) ** 3, dim=2) * (n / ((n - 1) * (n - 2)))
    return (torch.norm(torch.mean(samples, dim=1) - mean, dim=1) + torch.norm(torch.std(samples, dim=1) - std, dim=1)
            + 0.1 * torch.norm(skew, dim=1))


@pytest.mark.unit
def test_group_distance_is_the_released_score():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 24, generator=g, dtype=torch.float64) * 0.8 + 0.3  # a class's inverted latents
    target = {"count": torch.tensor([400]), **distribution_stats(real, 0)}  # population moments, as cached
    cands = target["mean"] + target["std"] * torch.randn(50, 6, 24, generator=g, dtype=torch.float64)
    ours = group_distances(cands, target, ["mean", "std", "skew"])
    ref = _released_score(cands, real.mean(0), real.std(0)) / math.sqrt(24)  # released: unbiased std of the class
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert select_group(cands, target, ["mean", "std", "skew"]) == int(torch.argmin(ref))
    # the skewness term (per noise, summed over dimensions): 0 when each noise's cubed standardised
    # values cancel across dimensions, not when every dimension leans the same way
    cancel = torch.tensor([[-1.0, 1.0, -1.0, 1.0], [1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    lean = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    t3 = {"mean": torch.zeros(4), "std": torch.ones(4), "skew": torch.zeros(4), "kurtosis": torch.zeros(4)}
    two = torch.stack([lean, cancel])
    assert float(skewness_batch(cancel[None]).abs().max()) == 0.0 and float(skewness_batch(lean[None]).abs().max()) > 0.1
    assert select_group(two, t3, ["skew"]) == 1
    assert select_group(torch.stack([cancel + 0.5, cancel]), t3, ["mean"]) == 1
    assert select_group(torch.ones(2, 1, 4) * torch.tensor([[[1.0]], [[0.0]]]), t3, ["mean", "std", "skew"]) == 1  # IPC 1: std/skew 0
    with pytest.raises(Exception, match="d3hr_stats"):
        select_group(two, t3, ["median"])


@pytest.mark.unit
def test_select_noises_deterministic_vectorised_and_monotone(monkeypatch):
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((300, 16)) * 0.7 + 0.2)
    target = {"count": torch.tensor([300]), **distribution_stats(x, 0)}
    monkeypatch.setattr(d3hr, "BLOCK_ELEMENTS", 5 * 16 * 7)  # 7 groups per block: 10 and 40 groups span blocks
    n10, i10, d10 = select_noises(target, 5, 10, ["mean", "std", "skew"], 7, "3")
    again = select_noises(target, 5, 10, ["mean", "std", "skew"], 7, "3")
    assert torch.equal(n10, again[0]) and i10 == again[1]
    # the chosen noises are group i of class "3", whatever the number drawn
    assert torch.equal(n10, candidate_group(target["mean"], target["std"], 5, 7, "3", i10))
    # more groups keep the first ones: the best distance can only go down
    _, i40, d40 = select_noises(target, 5, 40, ["mean", "std", "skew"], 7, "3")
    assert d40 <= d10 and (i40 == i10 or i40 >= 10)
    # another class (or run seed) draws other groups
    assert not torch.equal(n10, select_noises(target, 5, 10, ["mean", "std", "skew"], 7, "4")[0])
    cands = torch.stack([candidate_group(target["mean"], target["std"], 5, 7, "3", g) for g in range(40)])
    assert d40 == pytest.approx(float(group_distances(cands, target, ["mean", "std", "skew"]).min()))
    assert d40 < float(group_distances(cands, target, ["mean", "std", "skew"]).median())


@pytest.mark.unit
def test_released_group_count_is_vectorised():
    """100,000 groups (the released count) in a few generator blocks: the last group is drawn, and
    the pick is at least as good as the best of the first 1,000."""
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((200, 16)))
    target = {"count": torch.tensor([200]), **distribution_stats(x, 0)}
    assert (100_000 + d3hr.block_size(2, 16) - 1) // d3hr.block_size(2, 16) <= 2
    noises, i, d = select_noises(target, 2, 100_000, ["mean", "std", "skew"], 0, "7")
    assert 0 <= i < 100_000 and noises.shape == (2, 16)
    _, _, d1k = select_noises(target, 2, 1000, ["mean", "std", "skew"], 0, "7")
    assert d <= d1k


# ---------------------------------------------------------------------------------------------
# the Ray Data inversion stage
# ---------------------------------------------------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.integration
def test_ray_data_inversion_equals_plain_loop_and_is_cached(tiny_dit_dir, ray_session, tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("2", "5"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            (root / c / f"img{i}.png").write_bytes(_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))
    (root / "5" / "broken.png").write_bytes(b"not a png")
    ds = resolve_dataset("imagefolder", str(root), None, test_fraction=0.2, seed=0)
    model = {"type": "dit", "path": str(tiny_dit_dir)}
    spec = InversionSpec(model=model, model_fingerprint=model_fingerprint(model), steps=4, invert_t=None, cfg_scale=1.0,
                         resolution=8, batch_size=3)
    res = invert_dataset(spec, ds, str(tmp_path / "cache"), num_actors=2, cpus_per_actor=0.5, progress=False)  # + 1 CPU for decoding
    assert sorted(res.computed) == ["2", "5"] and res.reused == []
    assert [(p, why.split(":")[0]) for p, why in res.skipped] == [(str(root / "5" / "broken.png"), "not an image")]

    # the reference: a plain loop over the same images, no Ray
    from dap_ray.data import BadImageError, load_image

    bb = load_backbone(model)
    bb.bind_classes(ds.classes)
    for c in ds.classes:
        recs = sorted((r for r in ds.train if r.label == c.index), key=lambda r: r.id)
        imgs, ok_recs = [], []
        for r in recs:
            try:
                imgs.append(load_image(r.path, 8))
                ok_recs.append(r)
            except BadImageError:
                pass
        z0 = bb.encode(bb.images_to_tensor(np.stack(imgs)))
        xt, _ = ddim_invert(bb, z0, torch.full((len(imgs),), c.index), 4)
        want = distribution_stats(xt.reshape(len(imgs), -1).double(), 0)
        got = load_class_stats(d3hr.class_stats_path(res.path, c.key))
        assert int(got["count"][0]) == len(ok_recs)
        for k in ("mean", "std", "skew", "kurtosis"):
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)

    # a second call reuses every class; another inversion setting is another cache entry
    again = invert_dataset(spec, ds, str(tmp_path / "cache"), num_actors=1, progress=False)
    assert again.path == res.path and sorted(again.reused) == ["2", "5"] and again.computed == []
    assert again.skipped == res.skipped  # kept with the cached statistics: a reusing run still reports the file
    other = InversionSpec(**{**spec.__dict__, "invert_t": 500})
    assert other.key("x") != spec.key("x")


@pytest.mark.unit
def test_selected_noises_file_and_start_recipe(tiny_dit_dir, tmp_path):
    """The per-class noise file is reproducible, and each work item gets its own rows of it at the
    inversion's level — whatever way the class is cut into items (=> same bytes for any pool)."""
    from safetensors.torch import save as st_save

    from dap_ray.sampling import WorkItem

    x = torch.from_numpy(np.random.default_rng(2).standard_normal((50, 64)))
    stats_file = tmp_path / "class-3.safetensors"
    stats_file.write_bytes(st_save({"count": torch.tensor([50]), **distribution_stats(x, 0)}))
    info = d3hr.select_class_to_file(str(stats_file), str(tmp_path / "n" / "3.safetensors"), 4, 12, ["mean", "std"], 0, "3")
    first = (tmp_path / "n" / "3.safetensors").read_bytes()
    again = d3hr.select_class_to_file(str(stats_file), str(tmp_path / "m" / "3.safetensors"), 4, 12, ["mean", "std"], 0, "3")
    assert again == info and (tmp_path / "m" / "3.safetensors").read_bytes() == first
    assert not list((tmp_path / "n").glob("*.tmp-*"))  # written through a temp name, nothing left behind

    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    bb.bind_classes(DIGIT_CLASSES)
    start = d3hr.D3HRStart(str(tmp_path / "n"), 600)
    whole, t = start.latents(bb, WorkItem.of_class("d3hr", 3, 0, 4), seeds=[0] * 4)
    parts = [start.latents(bb, WorkItem.of_class("d3hr", 3, a, b), seeds=[0] * (b - a))[0] for a, b in ((0, 1), (1, 4))]
    assert t == 600 and whole.shape == (4, 1, 8, 8)
    assert torch.equal(torch.cat(parts), whole)
    want = candidate_group(torch.from_numpy(x.mean(0).numpy()), x.std(0, unbiased=False), 4, 0, "3", info["group"])
    assert torch.equal(whole.reshape(4, 64), want)
    with pytest.raises(RuntimeError, match="holds 4 noises"):
        start.latents(bb, WorkItem.of_class("d3hr", 3, 2, 6), seeds=[0] * 4)
