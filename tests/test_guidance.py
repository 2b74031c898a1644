"""Unit tests for dap_ray.guidance: closed forms, brute force and autograd (CPU, float64, seconds)."""

from __future__ import annotations

import functools
import math
import pickle

import pytest
import torch

from dap_ray.guidance import (
    RandomFourierFeatures,
    class_energy,
    class_statistics,
    energy_exact,
    energy_gradient,
    energy_mean_linear,
    energy_mean_rff,
    finalize_statistics,
    guided_eps,
    linear_kernel,
    merge_statistics,
    rbf_kernel,
)

pytestmark = pytest.mark.unit

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TinyBackbone:
    """A random two-layer tanh MLP on a (B, C, H, W) latent: stands in for "backbone up to layer l"."""

    def __init__(self, latent_shape: tuple[int, ...], hidden: int = 24, dim: int = 12, seed: int = 0):
        g = _gen(seed)
        d_in = math.prod(latent_shape)
        self.w1 = torch.randn(d_in, hidden, generator=g, dtype=F64) / math.sqrt(d_in)  # (Din, H)
        self.b1 = torch.randn(hidden, generator=g, dtype=F64) * 0.1  # (H,)
        self.w2 = torch.randn(hidden, dim, generator=g, dtype=F64) / math.sqrt(hidden)  # (H, D)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x.flatten(1) @ self.w1 + self.b1)  # (B, H)
        return torch.tanh(h) @ self.w2 * 3.0  # (B, D)


LATENT = (2, 3, 3)  # (C, H, W)


@pytest.fixture(scope="module")
def case():
    net = TinyBackbone(LATENT)
    x_t = torch.randn(5, *LATENT, generator=_gen(1), dtype=F64)  # (B, C, H, W) synthetic latents
    z_real = torch.randn(40, *LATENT, generator=_gen(2), dtype=F64) * 1.3 + 0.4  # (N, C, H, W)
    real = net(z_real)  # (N, D)
    return net, x_t, real


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def test_kernels_closed_form():
    a = torch.tensor([[1.0, 2.0]], dtype=F64)  # (1, 2)
    b = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 2.0]], dtype=F64)  # (3, 2)
    # <a, b_j> = 11, 2, 5
    torch.testing.assert_close(
        linear_kernel(a, b), torch.tensor([[11.0, 2.0, 5.0]], dtype=F64), rtol=0, atol=0
    )
    # ||a - b_j||^2 = 8, 2, 0 ; sigma = 2 -> exp(-d2 / 8)
    expected = torch.tensor([[math.exp(-1.0), math.exp(-0.25), 1.0]], dtype=F64)
    torch.testing.assert_close(rbf_kernel(a, b, sigma=2.0), expected, rtol=1e-15, atol=1e-15)
    # RBF gradient is finite where a == b (no sqrt like cdist)
    a_req = a.clone().requires_grad_(True)
    rbf_kernel(a_req, b, sigma=2.0).sum().backward()
    assert torch.isfinite(a_req.grad).all()


def test_energy_exact_closed_form():
    phi = torch.tensor([[1.0, 2.0]], dtype=F64)
    real = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=F64)
    # linear: mean_j ||phi - r_j||^2 / D = (8 + 2) / 2 / 2
    torch.testing.assert_close(
        energy_exact(phi, real, "linear"), torch.tensor([2.5], dtype=F64), rtol=1e-15, atol=0
    )
    # rbf: d^2 = 2 - 2k ; mean over j, x sigma^2 (= 4), / D
    k = torch.tensor([math.exp(-1.0), math.exp(-0.25)], dtype=F64)
    expected = (4 * (2 - 2 * k).mean() / 2).reshape(1)
    torch.testing.assert_close(energy_exact(phi, real, "rbf", sigma=2.0), expected, rtol=1e-15, atol=1e-15)


def test_energy_exact_linear_matches_pairwise_differences(case):
    net, x_t, real = case
    phi = net(x_t)  # (B, D)
    brute = ((phi[:, None, :] - real[None, :, :]) ** 2).sum(-1).mean(1) / phi.shape[1]  # (B,)
    torch.testing.assert_close(energy_exact(phi, real, "linear"), brute, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
    phi = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="kernel"):
        energy_exact(phi, phi, kernel="poly")
    with pytest.raises(ValueError, match="sigma"):
        rbf_kernel(phi, phi, sigma=0.0)
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        energy_exact(phi[None], phi)
    stats = finalize_statistics(class_statistics(phi))
    with pytest.raises(ValueError, match="RandomFourierFeatures"):
        class_energy(phi, stats, "rbf", None)
    with pytest.raises(ValueError, match="count 0"):
        finalize_statistics(class_statistics(phi[:0]))


# ----------------------------------------------------------------------------------------------
# mean-embedding linear energy == brute force, value and gradient through a nonlinear map
# ----------------------------------------------------------------------------------------------


def test_linear_mean_energy_and_gradient_equal_bruteforce(case):
    net, x_t, real = case
    stats = finalize_statistics(class_statistics(real))

    grad_mean, e_mean = energy_gradient(lambda x: class_energy(net(x), stats, "linear", None), x_t)
    grad_exact, e_exact = energy_gradient(lambda x: energy_exact(net(x), real, "linear"), x_t)

    assert e_mean.shape == (x_t.shape[0],) and grad_mean.shape == x_t.shape
    assert not e_mean.requires_grad and not x_t.requires_grad
    torch.testing.assert_close(e_mean, e_exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_mean, grad_exact, rtol=0, atol=1e-10)
    assert grad_exact.abs().max() > 1e-3  # the comparison is not between two zeros

    # Dropping the constant changes the value by tr(Cov)/D, never the gradient.
    grad_noconst, e_noconst = energy_gradient(lambda x: energy_mean_linear(net(x), stats["mean"]), x_t)
    torch.testing.assert_close(grad_noconst, grad_exact, rtol=0, atol=1e-10)
    trace_cov = real.var(0, unbiased=False).sum() / real.shape[1]
    torch.testing.assert_close(e_exact - e_noconst, trace_cov.expand(x_t.shape[0]), rtol=0, atol=1e-10)


def test_linear_mean_energy_float32_phi_close_to_float64(case):
    net, x_t, real = case
    stats = finalize_statistics(class_statistics(real))  # float64 statistics
    phi32 = net(x_t).float()
    e32 = class_energy(phi32, stats, "linear", None)
    assert e32.dtype == torch.float32
    torch.testing.assert_close(e32.double(), energy_exact(net(x_t), real), rtol=1e-5, atol=1e-6)


def test_energy_gradient_under_no_grad_and_detached_error(case):
    net, x_t, real = case
    with torch.no_grad():
        grad, energy = energy_gradient(lambda x: energy_exact(net(x), real), x_t)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not depend"):
        energy_gradient(lambda x: energy_exact(net(x).detach(), real), x_t)


# ----------------------------------------------------------------------------------------------
# random Fourier features
# ----------------------------------------------------------------------------------------------


def test_rff_deterministic_and_seed_dependent():
    x = torch.randn(4, 6, generator=_gen(3), dtype=F64)
    a = RandomFourierFeatures(dim=6, num_features=32, sigma=1.5, seed=7)
    b = RandomFourierFeatures(dim=6, num_features=32, sigma=1.5, seed=7)
    c = RandomFourierFeatures(dim=6, num_features=32, sigma=1.5, seed=8)
    assert a == b and a != c
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    # survives pickling (Ray ships it to actors) with identical features
    assert torch.equal(pickle.loads(pickle.dumps(a))(x), a(x))
    # float32 input: float32 output, same features up to float32 rounding
    z32 = a(x.float())
    assert z32.dtype == torch.float32 and z32.shape == (4, 32)
    torch.testing.assert_close(z32.double(), a(x), rtol=0, atol=1e-5)
    assert a(x.bfloat16()).dtype == torch.bfloat16
    # W ~ N(0, 1/sigma^2): a large draw has the right scale
    big = RandomFourierFeatures(dim=8, num_features=4096, sigma=2.0, seed=0)
    assert abs(big.weight.std().item() - 0.5) < 0.01
    assert 0.0 <= big.bias.min() and big.bias.max() < 2 * math.pi


def test_rff_energy_approaches_exact_rbf():
    """Mean |E_rff - E_exact| over 3 seeds must fall as M grows and be < 2% of E at M = 16384.

    Expected RFF error ~ 1/sqrt(M): 16x smaller at M = 16384 than at M = 64; we ask for >= 4x.
    """
    dim, sigma = 8, math.sqrt(8.0)  # ||a - b||^2 ~ 2D = 16 -> k ~ exp(-1): neither 0 nor 1
    phi = torch.randn(16, dim, generator=_gen(10), dtype=F64)  # (B, D)
    real = torch.randn(64, dim, generator=_gen(11), dtype=F64) + 0.5  # (N, D)
    exact = energy_exact(phi, real, "rbf", sigma)  # (B,)

    def mean_abs_err(m: int) -> float:
        errs = []
        for seed in range(3):
            rff = RandomFourierFeatures(dim, m, sigma, seed)
            stats = finalize_statistics(class_statistics(real, rff))
            approx = class_energy(phi, stats, "rbf", rff)
            errs.append((approx - exact).abs().mean().item())
        return sum(errs) / len(errs)

    err_small, err_large = mean_abs_err(64), mean_abs_err(16384)
    assert err_large < err_small / 4, (err_small, err_large)
    assert err_large < 0.02 * exact.mean().item(), (err_large, exact.mean().item())


def test_rff_gradient_approaches_exact_rbf(case):
    net, x_t, real = case
    sigma = 4.0
    rff = RandomFourierFeatures(real.shape[1], 16384, sigma, seed=0)
    stats = finalize_statistics(class_statistics(real, rff))
    grad_rff, _ = energy_gradient(lambda x: class_energy(net(x), stats, "rbf", rff), x_t)
    grad_exact, _ = energy_gradient(lambda x: energy_exact(net(x), real, "rbf", sigma), x_t)
    rel = (grad_rff - grad_exact).norm() / grad_exact.norm()
    assert rel < 0.1, rel.item()


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def test_merge_halves_equals_whole_and_finalize_gives_mean(case):
    _, _, real = case
    rff = RandomFourierFeatures(real.shape[1], 64, 2.0, seed=3)
    whole = class_statistics(real, rff)
    halves = merge_statistics(class_statistics(real[:17], rff), class_statistics(real[17:], rff))
    assert set(halves) == {"count", "sum", "sum_sq_norm", "rff_sum"} == set(whole)
    assert int(halves["count"]) == real.shape[0]
    for key in ("sum", "sum_sq_norm", "rff_sum"):
        assert halves[key].dtype == F64
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-13, atol=1e-12)
    # streaming reduction from an empty start
    chunks = [class_statistics(c, rff) for c in real.split(7)]
    streamed = functools.reduce(merge_statistics, chunks, {})
    torch.testing.assert_close(streamed["sum"], whole["sum"], rtol=1e-13, atol=1e-12)

    fin = finalize_statistics(halves)
    assert int(fin["count"]) == real.shape[0]
    torch.testing.assert_close(fin["mean"], real.mean(0), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(fin["mean_sq_norm"], (real**2).sum(1).mean(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(fin["rff_mean"], rff(real).mean(0), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="different keys"):
        merge_statistics(whole, class_statistics(real))


# ----------------------------------------------------------------------------------------------
# batch == one sample at a time
# ----------------------------------------------------------------------------------------------


def test_batch_equals_single_sample(case):
    net, x_t, real = case
    rff = RandomFourierFeatures(real.shape[1], 256, 3.0, seed=1)
    stats = finalize_statistics(class_statistics(real, rff))
    fns = {
        "exact_linear": lambda x: energy_exact(net(x), real, "linear"),
        "exact_rbf": lambda x: energy_exact(net(x), real, "rbf", 3.0),
        "mean_linear": lambda x: class_energy(net(x), stats, "linear", None),
        "mean_rff": lambda x: energy_mean_rff(net(x), rff, stats["rff_mean"]),
    }
    for name, fn in fns.items():
        grad_b, e_b = energy_gradient(fn, x_t)
        singles = [energy_gradient(fn, x_t[i : i + 1]) for i in range(x_t.shape[0])]
        grad_s = torch.cat([g for g, _ in singles])
        e_s = torch.cat([e for _, e in singles])
        torch.testing.assert_close(e_b, e_s, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(grad_b, grad_s, rtol=1e-12, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------------------------
# guided noise prediction
# ----------------------------------------------------------------------------------------------


def test_guided_eps_gamma_zero_is_exact_identity():
    eps = torch.randn(2, 4, 3, 3, generator=_gen(5))
    grad = torch.full_like(eps, float("nan"))  # even garbage gradients do not leak in
    out = guided_eps(eps, grad, gamma=0.0, alpha_bar_t=0.3)
    assert torch.equal(out, eps)


def test_guided_eps_formula():
    eps = torch.full((2, 1, 2, 2), 0.5, dtype=F64)
    grad = torch.full_like(eps, 2.0)
    # 0.5 + 3 * sqrt(1 - 0.84) * 2 = 0.5 + 3 * 0.4 * 2 = 2.9
    out = guided_eps(eps, grad, gamma=3.0, alpha_bar_t=0.84)
    torch.testing.assert_close(out, torch.full_like(eps, 2.9), rtol=0, atol=1e-14)
    # tensor alpha_bar per sample: sample 0 at 0.84 (-> 2.9), sample 1 at 0.36 (sqrt .64 = .8 -> 5.3)
    out = guided_eps(eps, grad, gamma=3.0, alpha_bar_t=torch.tensor([0.84, 0.36], dtype=F64))
    torch.testing.assert_close(out[0], torch.full_like(eps[0], 2.9), rtol=0, atol=1e-14)
    torch.testing.assert_close(out[1], torch.full_like(eps[1], 5.3), rtol=0, atol=1e-14)
    # dtype of eps is kept (bf16 sampler)
    assert guided_eps(eps.bfloat16(), grad.float(), 1.0, torch.tensor(0.5)).dtype == torch.bfloat16
