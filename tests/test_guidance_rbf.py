"""DAP's RBF kernel guides: exact gradient at DiT-XL/2's width through a real bank, a step of the
linear kernel's order at equal γ, the median-heuristic bandwidth (issue 19)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dap_ray.backbones import load_backbone, model_fingerprint, pool_features
from dap_ray.bank import BankSpec, build_bank
from dap_ray.data import resolve_dataset
from dap_ray.data.types import DatasetSplits
from dap_ray.guidance import energy_exact, energy_gradient, median_bandwidth
from dap_ray.methods.dap import DAPGuidance
from dap_ray.sampling import schedule
from tests.conftest import save_tiny_dit

F64 = torch.float64


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.unit
def test_median_bandwidth_is_the_median_pairwise_distance():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(9, 5, generator=g, dtype=F64) * 3
    ref = np.median([float((f[i] - f[j]).norm()) for i in range(9) for j in range(i + 1, 9)])  # 36 pairs: even
    lower = sorted(float((f[i] - f[j]).norm()) for i in range(9) for j in range(i + 1, 9))[17]  # torch's lower median
    assert median_bandwidth(f) == pytest.approx(lower, rel=1e-12) and abs(lower - ref) < 0.5
    one = torch.tensor([[3.0, 4.0]])
    assert median_bandwidth(one) == pytest.approx(5.0)  # no pair: the row norm stands in
    assert median_bandwidth(torch.zeros(3, 4)) == 1.0


@pytest.mark.unit
def test_rbf_energy_tends_to_linear_and_steps_alike_at_the_median_bandwidth():
    """σ²-scaled RBF: its φ-gradient is the linear one with each real feature weighted by k_j, so it
    equals the linear gradient as σ → ∞ and is of the same order at the median heuristic."""
    g = torch.Generator().manual_seed(1)
    D = 1152
    real = torch.randn(40, D, generator=g, dtype=F64) + 2.0
    phi = real[:4] + 0.7 * torch.randn(4, D, generator=g, dtype=F64)  # near the class, as a guided sample is

    def grad(kernel: str, sigma: float = 1.0) -> torch.Tensor:
        x = phi.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(energy_exact(x, real, kernel, sigma).sum(), x)
        return gx

    lin = grad("linear")
    far = grad("rbf", 1e4 * median_bandwidth(real))
    assert _cos(far, lin) > 0.9999 and float(far.norm() / lin.norm()) == pytest.approx(1.0, rel=1e-3)
    med = grad("rbf", median_bandwidth(real))
    ratio = float(med.norm() / lin.norm())
    assert 0.2 < ratio < 1.0, ratio  # weights k_j = exp(-r²/2σ²) ~ exp(-1/2) for typical r ~ σ
    assert _cos(med, lin) > 0.5


@pytest.fixture(scope="module")
def wide_bank(ray_session, tmp_path_factory):
    """A bank (30 images of each of two digit classes, 24 kept) for a 1-block DiT of DiT-XL/2's width
    (16 heads x 72 = 1152) on a 4x4 pixel latent (patch 2: 4 tokens), `tokens` pooling: D = 4608."""
    root = tmp_path_factory.mktemp("wide")
    model_dir = save_tiny_dit(root / "dit", num_classes=10, sample_size=4, layers=1, heads=16, head_dim=72,
                              class_names=[str(i) for i in range(10)])
    ds = resolve_dataset("digits", None, ["3", "8"], cache_dir=str(root / "cache"))
    per_class = {c.index: [r for r in sorted(ds.train, key=lambda r: r.id) if r.label == c.index][:30] for c in ds.classes}
    ds = DatasetSplits(ds.name, ds.root, list(ds.classes), [r for rs in per_class.values() for r in rs], [])
    model = {"type": "dit", "path": str(model_dir), "name": "wide"}
    bb = load_backbone(model)
    bb.bind_classes(ds.classes)
    spec = BankSpec(model=model, model_fingerprint=model_fingerprint(model), layers=("0",), timesteps=tuple(schedule(bb, 4)),
                    pooling="tokens", seed=0, resolution=bb.resolution, keep_per_class=24, batch_size=128)
    return build_bank(spec, ds, str(root / "cache"), progress=False), bb


def _exact_grad(bb, x_t: torch.Tensor, t: int, y: torch.Tensor, pooling: str, real: torch.Tensor, sigma: float) -> torch.Tensor:
    """J^T (2 / (N D)) sum_j k_j (phi - phi_j): the σ²-scaled RBF energy's x_t-gradient, the kernel sum
    in float64 on direct differences (no Gram expansion), chained through the backbone by autograd."""
    with torch.enable_grad():
        z = x_t.clone().requires_grad_(True)
        phi = pool_features(bb.features(z, t, y, ["0"])["0"], pooling).float()  # (B, D)
        diff = phi.detach().double()[:, None, :] - real.double()[None]  # (B, N, D)
        k = torch.exp(-(diff * diff).sum(-1) / (2 * sigma**2))  # (B, N)
        g_phi = 2.0 / (real.shape[0] * real.shape[1]) * (k[..., None] * diff).sum(1)  # (B, D)
        (g,) = torch.autograd.grad(phi, z, grad_outputs=g_phi.float())
    return g


def _lower_median_distance(rows: torch.Tensor) -> float:
    d = sorted(float((rows[i] - rows[j]).double().norm()) for i in range(len(rows)) for j in range(i + 1, len(rows)))
    return d[(len(d) - 1) // 2]  # torch.median's lower median


def _near_class_latents(bb, t: int) -> torch.Tensor:
    """Noisy latents at t as a trajectory holds them: a [-1, 1] signal noised to t (3 samples)."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand((3, *bb.latent_shape), generator=g) * 2 - 1
    a_t = float(bb.alphas_cumprod[t])
    return math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * torch.randn(x0.shape, generator=g)


@pytest.mark.integration
def test_rbf_gradient_through_the_bank_matches_the_exact_gradient_at_d4608(wide_bank):
    """DAPGuidance's ∇_{x_t}E (Bank.class_features, median σ, float32 Gram distances, autograd) against
    the exact float64 gradient from the Parquet rows read independently (Bank.read_features)."""
    bank, bb = wide_bank
    t, label = bank.spec.timesteps[1], 1
    real = bank.class_features("0", label, t)
    assert real.shape == (24, 4608) and real.dtype == torch.float32
    table = bank.read_features("0").to_pydict()
    rows = [f for f, lab, ts in zip(table["feature"], table["label"], table["timestep"]) if lab == label and ts == t]
    ref_real = torch.tensor(np.asarray(rows, np.float64))  # (24, D): the same kept images, in id order
    assert torch.equal(ref_real.float(), real)
    sigma = _lower_median_distance(ref_real)

    guide = DAPGuidance(bank, "0", "rbf", 10.0, 0, "tokens")
    y = torch.full((3,), label)
    x_t = _near_class_latents(bb, t)
    ours, _ = energy_gradient(lambda z: guide.energy(bb, z, t, y), x_t)
    assert guide.real(label, t, x_t.device)[1] == pytest.approx(sigma, rel=1e-5)
    exact = _exact_grad(bb, x_t, t, y, "tokens", ref_real, sigma)
    cos = [_cos(ours[i], exact[i]) for i in range(3)]
    assert min(cos) >= 0.95 and float(ours.norm()) > 0, cos


@pytest.mark.integration
def test_rbf_gradient_at_d1152_on_real_mean_pooled_features(wide_bank):
    """D = 1152 (DiT-XL/2's width, `mean` pooling): the bank's real token features of the same images,
    mean-pooled, through the same energy and bandwidth functions DAPGuidance uses."""
    bank, bb = wide_bank
    t, label = bank.spec.timesteps[2], 0
    real = bank.class_features("0", label, t).view(24, 4, 1152).mean(1)  # pool_features(..., "mean") of the kept images
    sigma = median_bandwidth(real)
    assert sigma == pytest.approx(_lower_median_distance(real), rel=1e-5)
    y = torch.full((3,), label)
    x_t = _near_class_latents(bb, t)
    ours, _ = energy_gradient(lambda z: energy_exact(pool_features(bb.features(z, t, y, ["0"])["0"], "mean").float(), real, "rbf", sigma), x_t)
    exact = _exact_grad(bb, x_t, t, y, "mean", real, sigma)
    cos = [_cos(ours[i], exact[i]) for i in range(3)]
    assert min(cos) >= 0.95 and float(ours.norm()) > 0, cos
