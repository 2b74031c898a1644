"""DAP guidance math: Mercer kernels, representativeness energies, gradients, random Fourier features.

Pure functions on torch tensors: no Ray, no I/O, no global state. The sampler (``sampling.py``) and
the feature bank (``bank.py``) are written against this module.

Method (DESIGN.md section 1, seeds 000-002)
--------------------------------------------
For a synthetic noisy latent x_t of class c with backbone features phi = phi_l(x_t, t, c) and the
class's real features phi_1..phi_N (the real images noised to the same t and passed through the same
layer), the representativeness energy is the mean squared kernel-induced distance

    E_c(x_t) = (1/N) sum_j d_k(phi, phi_j)^2 / D,
    d_k(a, b)^2 = k(a, a) - 2 k(a, b) + k(b, b) = ||psi(a) - psi(b)||_H^2,

and the guided noise prediction (energy guidance p(R | x) ~ exp(-gamma E), paper A.3.2) is

    eps_hat = eps_theta(x_t, t, c) + gamma * sqrt(1 - alpha_bar_t) * grad_{x_t} E_c(x_t),

with the gradient taken on the noisy latent x_t directly (no x0 decode).

Conventions
-----------
* Features arrive flattened to (B, D) (tokens x hidden, or pooled: the caller decides); N real
  features are (N, D).
* **Energies are reported per feature dimension**: the squared distance is divided by D. A layer's
  squared feature distance grows linearly with its width and with the number of tokens kept, so
  without this normalisation the useful range of gamma would depend on the layer and the pooling
  even more than it does. It does not make gamma mean the same everywhere: the gradient still
  depends on how far phi sits from the real features at that layer and pooling (measured on the
  digits DiT, layer 2, gamma 10: |delta eps| / |eps| about 0.1 with ``tokens`` and 0.02-0.03 with
  ``mean``). The sampler therefore records that ratio per step (``guidance_strength`` in
  results.json), which is what to compare across settings.
* **The RBF energy is scaled by sigma^2** (``E_rbf = sigma^2 (1/N) sum_j d_k^2 / D``, see
  :func:`energy_exact`). With d_k^2 = 2 - 2 exp(-r^2 / (2 sigma^2)) (r = ||phi - phi_j||),
  sigma^2 d_k^2 -> r^2 as sigma -> infinity, so the scaled RBF energy tends to the linear one, and
  its gradient (2 / (N D)) sum_j k_j (phi - phi_j) is the linear gradient with each real feature
  weighted by its kernel value k_j in (0, 1]. At equal gamma the two kernels therefore take steps of
  the same order (equal as sigma grows; smaller by the mean weight k_j otherwise, about exp(-1/2)
  at the median-heuristic bandwidth). Without sigma^2 the RBF gradient is 1/sigma^2 of that: with
  sigma ~ sqrt(D) feature scales it was 1e-4 to 1e-2 of the linear step, i.e. no guidance.
* **Conversion to the paper's gamma** (seed 001, eq. 6-8: p(R | x) ~ exp(-gamma E) with E the mean
  squared kernel distance, no per-dimension factor): gamma_paper = gamma_ours / D for the linear
  kernel, gamma_paper = gamma_ours * sigma^2 / D for the RBF kernel. D is the flattened feature size
  (DiT-XL/2 block, ``tokens``: 256 x 1152 = 294,912; ``mean``: 1152).
* Every energy returns shape (B,): one value per sample. Samples do not interact, so
  ``grad(E.sum(), x_t)`` is the stack of per-sample gradients (see :func:`energy_gradient`).

Why the mean-embedding forms scale
----------------------------------
* Linear kernel k(a, b) = <a, b>:  (1/N) sum_j ||phi - phi_j||^2 = ||phi - mu||^2 + (m2 - ||mu||^2),
  with mu = (1/N) sum_j phi_j and m2 = (1/N) sum_j ||phi_j||^2. Exact, and only (N, sum phi_j,
  sum ||phi_j||^2) are needed: the cost of a guided step does not depend on N.
* RBF kernel k(a, b) = exp(-||a - b||^2 / (2 sigma^2)): DAP guidance uses the exact energy over the
  bank's kept per-class features (``bank.keep_per_class``), O(B N D) per step, with the bandwidth from
  :func:`median_bandwidth`. Random Fourier features z (Rahimi & Recht), k(a, b) ~= <z(a), z(b)>, give
  an N-independent mean-embedding form (:func:`energy_mean_rff`), but their gradient's accuracy depends
  on sigma and M (measured cosine with the exact gradient at D = 1152, M = 2048: 0.64 with a
  sigma = sqrt(D) bandwidth, 0.998 with the median one), so guidance uses the exact form and RFF is
  kept for the bank's statistics and its tests.
* The linear kernel reduces the bank to additive sufficient statistics (:func:`class_statistics`),
  which merge across shards and streams (:func:`merge_statistics`).

Autograd note: the sampler must build the graph under ``torch.no_grad()`` at most, not under
``torch.inference_mode()`` (inference tensors cannot enter autograd); :func:`energy_gradient`
re-enables grad locally.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "KERNELS",
    "RandomFourierFeatures",
    "class_energy",
    "class_statistics",
    "energy_exact",
    "energy_gradient",
    "energy_mean_linear",
    "energy_mean_rff",
    "finalize_statistics",
    "guided_eps",
    "linear_kernel",
    "median_bandwidth",
    "merge_statistics",
    "rbf_kernel",
]

KERNELS: tuple[str, ...] = ("linear", "rbf")

_STAT_KEYS = ("count", "sum", "sum_sq_norm")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_features(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be flattened to (batch, dim); got shape {tuple(x.shape)}")


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not valid: expected one of {', '.join(KERNELS)}")


def _check_sigma(sigma: float) -> None:
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma={sigma!r} is not valid: the RBF bandwidth must be a finite number > 0")


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distance ||a_i - b_j||^2 via the Gram expansion, clamped at 0.

    a: (B, D), b: (N, D) -> (B, N). Avoids the (B, N, D) intermediate; unlike ``torch.cdist`` its
    gradient is finite at a_i == b_j.
    """
    a_sq = (a * a).sum(-1)  # (B,)
    b_sq = (b * b).sum(-1)  # (N,)
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)  # (B, N)
    return d2.clamp_min(0.0)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def linear_kernel(a: Tensor, b: Tensor) -> Tensor:
    """Linear kernel k(a, b) = <a, b>.  a: (B, D), b: (N, D) -> (B, N)."""
    _check_features("a", a)
    _check_features("b", b)
    return a @ b.T  # (B, N)


def rbf_kernel(a: Tensor, b: Tensor, sigma: float) -> Tensor:
    """Gaussian RBF kernel k(a, b) = exp(-||a - b||^2 / (2 sigma^2)).  a: (B, D), b: (N, D) -> (B, N)."""
    _check_features("a", a)
    _check_features("b", b)
    _check_sigma(sigma)
    return torch.exp(-_sq_dist(a, b) / (2.0 * sigma**2))  # (B, N)


# ----------------------------------------------------------------------------------------------
# energies
# ----------------------------------------------------------------------------------------------


def energy_exact(phi: Tensor, real: Tensor, kernel: str = "linear", sigma: float = 1.0) -> Tensor:
    """Brute-force energy over all N real features.

        E(phi) = s (1/N) sum_j d_k(phi, phi_j)^2 / D
               = s [k(phi, phi) - (2/N) sum_j k(phi, phi_j) + (1/N) sum_j k(phi_j, phi_j)] / D,

    s = 1 for the linear kernel and s = sigma^2 for the RBF kernel, so that the RBF energy tends to
    the linear one as sigma grows and a given gamma takes steps of the same order with either kernel
    (module docstring). phi: (B, D) synthetic features, real: (N, D) real features -> (B,). Cost
    O(B N D): the reference for the linear mean form, and DAP's RBF guidance over the bank's kept
    per-class features. ``sigma`` is used by ``kernel="rbf"`` only.
    """
    _check_features("phi", phi)
    _check_features("real", real)
    _check_kernel(kernel)
    if phi.shape[1] != real.shape[1]:
        raise ValueError(f"feature dims differ: phi has D={phi.shape[1]}, real has D={real.shape[1]}")
    if real.shape[0] == 0:
        raise ValueError("real has no rows: the energy needs at least one real feature")
    dim = phi.shape[1]
    real = real.to(dtype=phi.dtype, device=phi.device)
    if kernel == "linear":
        k_aa = (phi * phi).sum(-1)  # (B,)
        k_ab = linear_kernel(phi, real)  # (B, N)
        k_bb = (real * real).sum(-1)  # (N,)
    else:
        _check_sigma(sigma)
        k_aa = phi.new_ones(phi.shape[0])  # (B,)   k(a, a) = 1
        k_ab = rbf_kernel(phi, real, sigma)  # (B, N)
        k_bb = real.new_ones(real.shape[0])  # (N,)
        return sigma**2 * (k_aa - 2.0 * k_ab.mean(1) + k_bb.mean()) / dim  # (B,)
    return (k_aa - 2.0 * k_ab.mean(1) + k_bb.mean()) / dim  # (B,)


def median_bandwidth(features: Tensor) -> float:
    """The median heuristic: the median pairwise Euclidean distance between the rows of features (N, D).

    The RBF bandwidth that keeps the kernel informative on the features at hand: with sigma equal to
    the typical distance r, k = exp(-r^2 / (2 sigma^2)) is about exp(-1/2), neither 0 (a gradient of
    exactly 0, as sigma = 1 gave on the digits DiT where r^2 ~ 1,259) nor 1 (the linear kernel).
    Distances are computed in float64 (the Gram expansion cancels badly in float32 for wide features).
    Fewer than two distinct rows have no pairwise distance: the root mean square row norm stands in
    (the same order as distances between features of that layer), and 1.0 if that is 0 too.
    """
    _check_features("features", features)
    f = features.detach().to(torch.float64)  # (N, D)
    n = f.shape[0]
    if n >= 2:
        iu = torch.triu_indices(n, n, offset=1, device=f.device)
        dist = _sq_dist(f, f)[iu[0], iu[1]].sqrt()  # (N (N - 1) / 2,)
        med = float(dist.median())
        if med > 0:
            return med
    rms = float((f * f).sum(-1).mean().sqrt()) if n else 0.0
    return rms if rms > 0 else 1.0


def energy_mean_linear(phi: Tensor, mean: Tensor, mean_sq_norm: Tensor | float | None = None) -> Tensor:
    """Linear-kernel energy from the class mean (exact, O(B D), independent of N).

        E(phi) = [ ||phi - mu||^2 + (m2 - ||mu||^2) ] / D,   mu = E_j phi_j,  m2 = E_j ||phi_j||^2

    equals ``energy_exact(phi, real, "linear")`` up to rounding. phi: (B, D), mean: (D,) -> (B,).
    If ``mean_sq_norm`` (m2) is None the constant m2 - ||mu||^2 (the trace of the real features'
    covariance) is dropped: the value is then ||phi - mu||^2 / D and the gradient is unchanged.
    The constant is formed in the statistics' own precision (float64 from the bank) before it is
    cast to phi's dtype, so float32 guidance does not suffer the m2 - ||mu||^2 cancellation.
    """
    _check_features("phi", phi)
    if mean.ndim != 1 or mean.shape[0] != phi.shape[1]:
        raise ValueError(f"mean must have shape ({phi.shape[1]},); got {tuple(mean.shape)}")
    dim = phi.shape[1]
    mu = mean.to(dtype=phi.dtype, device=phi.device)  # (D,)
    diff = phi - mu  # (B, D)
    energy = (diff * diff).sum(-1)  # (B,)
    if mean_sq_norm is not None:
        m2 = torch.as_tensor(mean_sq_norm, device=mean.device)
        m2 = m2.to(torch.promote_types(m2.dtype, mean.dtype))
        const = m2 - (mean.to(m2.dtype) ** 2).sum()  # ()   trace of the covariance, >= 0
        energy = energy + const.to(dtype=phi.dtype, device=phi.device)
    return energy / dim  # (B,)


@dataclass
class RandomFourierFeatures:
    """Random Fourier features for the RBF kernel (Rahimi & Recht 2007).

        z(x) = sqrt(2 / M) cos(x W + b),  W ~ N(0, 1/sigma^2)^{D x M},  b ~ U(0, 2 pi)^M,
        E_W,b[<z(x), z(y)>] = exp(-||x - y||^2 / (2 sigma^2)).

    W and b are drawn once, on the CPU in float64, from a ``torch.Generator`` seeded with ``seed``,
    so every actor (any device, any dtype) gets identical features; they are cast to the input's
    device and dtype on use (cached per (device, dtype), the cache is not pickled). Two instances
    with equal fields are equal and produce the same features.

    Memory: W holds D * M float64 values (8 D M bytes, plus one copy per (device, dtype) used). For
    full token maps of a large backbone (DiT-XL/2 at 256 px: D = 256 tokens x 1152 = 294,912) that is
    about 2.4 GB per 1,000 features, so RBF guidance there wants ``mean`` pooling or a small M.
    """

    dim: int
    num_features: int
    sigma: float
    seed: int
    weight: Tensor = field(init=False, repr=False, compare=False)  # (D, M) float64, CPU
    bias: Tensor = field(init=False, repr=False, compare=False)  # (M,)   float64, CPU
    _cache: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.dim < 1 or self.num_features < 1:
            raise ValueError(
                f"dim={self.dim} and num_features={self.num_features} must both be >= 1 for random Fourier features"
            )
        _check_sigma(self.sigma)
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        self.weight = (
            torch.randn(self.dim, self.num_features, generator=gen, dtype=torch.float64) / self.sigma
        )  # (D, M)
        self.bias = torch.rand(self.num_features, generator=gen, dtype=torch.float64) * (
            2.0 * math.pi
        )  # (M,)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # device copies are rebuilt where the object lands
        return state

    def _params(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.weight.to(device=device, dtype=dtype),
                self.bias.to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def __call__(self, x: Tensor) -> Tensor:
        """Map x: (B, D) -> z(x): (B, M) on x's device and dtype.

        Half-precision inputs are projected in float32 (a bf16 phase x W + b would be off by whole
        radians for large arguments) and the result is cast back.
        """
        _check_features("x", x)
        if x.shape[1] != self.dim:
            raise ValueError(
                f"x has D={x.shape[1]} but these random Fourier features were drawn for D={self.dim}"
            )
        compute = torch.promote_types(x.dtype, torch.float32)
        weight, bias = self._params(x.device, compute)
        z = math.sqrt(2.0 / self.num_features) * torch.cos(x.to(compute) @ weight + bias)  # (B, M)
        return z.to(x.dtype)


def energy_mean_rff(phi: Tensor, rff: RandomFourierFeatures, rff_mean: Tensor) -> Tensor:
    """RBF energy via the RFF mean embedding (approximate, O(B D M), independent of N).

        E(phi) = sigma^2 [ k(phi, phi) - 2 <z(phi), m_z> + (1/N) sum_j k(phi_j, phi_j) ] / D
               = sigma^2 [ 2 - 2 <z(phi), m_z> ] / D,        m_z = (1/N) sum_j z(phi_j),

    using k(a, a) = 1 exactly for the RBF kernel (so neither constant adds RFF noise). Only the
    cross term is approximated, by an unbiased estimate, so this approximates
    ``energy_exact(phi, real, "rbf", rff.sigma)`` itself, value and gradient, with an error
    O(1/sqrt(M)). phi: (B, D), rff_mean: (M,) -> (B,).
    """
    _check_features("phi", phi)
    if rff_mean.ndim != 1 or rff_mean.shape[0] != rff.num_features:
        raise ValueError(f"rff_mean must have shape ({rff.num_features},); got {tuple(rff_mean.shape)}")
    dim = phi.shape[1]
    z = rff(phi)  # (B, M)
    cross = z @ rff_mean.to(dtype=phi.dtype, device=phi.device)  # (B,)   ~ (1/N) sum_j k(phi, phi_j)
    return rff.sigma**2 * (2.0 - 2.0 * cross) / dim  # (B,)


# ----------------------------------------------------------------------------------------------
# sufficient statistics of the real features
# ----------------------------------------------------------------------------------------------


def class_statistics(features: Tensor, rff: RandomFourierFeatures | None = None) -> dict[str, Tensor]:
    """Additive sufficient statistics of N real features of one (class, layer, timestep).

    features: (N, D) ->
        {"count": () int64 N, "sum": (D,) sum_j phi_j, "sum_sq_norm": () sum_j ||phi_j||^2,
         "rff_sum": (M,) sum_j z(phi_j)   (only if rff is given)}
    Accumulated in float64 (tensors on the features' device; the bank moves them where it likes).
    """
    _check_features("features", features)
    f = features.detach().to(torch.float64)  # (N, D)
    stats = {
        "count": torch.tensor(f.shape[0], dtype=torch.int64, device=f.device),
        "sum": f.sum(0),  # (D,)
        "sum_sq_norm": (f * f).sum(),  # ()
    }
    if rff is not None:
        stats["rff_sum"] = rff(f).sum(0)  # (M,)
    return stats


def merge_statistics(a: dict, b: dict) -> dict:
    """Merge two statistics dicts of the same (class, layer, timestep): every entry adds.

    For sharded or streaming bank builds: ``merge(stats(X1), stats(X2)) == stats(cat(X1, X2))``.
    An empty dict is the identity, so ``functools.reduce(merge_statistics, parts, {})`` works.
    """
    if not a:
        return dict(b)
    if not b:
        return dict(a)
    if set(a) != set(b):
        raise ValueError(f"cannot merge statistics with different keys: {sorted(a)} vs {sorted(b)}")
    out = {}
    for key in a:
        va, vb = torch.as_tensor(a[key]), torch.as_tensor(b[key])
        if va.shape != vb.shape:
            raise ValueError(
                f"cannot merge statistics: {key!r} has shapes {tuple(va.shape)} and {tuple(vb.shape)}"
            )
        out[key] = va + vb.to(va.device)
    return out


def finalize_statistics(stats: dict) -> dict:
    """Turn summed statistics into the means the energies use.

        {"count": N, "mean": (D,) sum/N, "mean_sq_norm": () sum_sq_norm/N, "rff_mean": (M,) rff_sum/N}
    ("rff_mean" only if "rff_sum" is present). float64.
    """
    missing = [k for k in _STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"statistics are missing {missing}; expected the output of class_statistics")
    count = torch.as_tensor(stats["count"])
    n = int(count)
    if n <= 0:
        raise ValueError("statistics have count 0: a class needs at least one real feature")
    out = {
        "count": count,
        "mean": torch.as_tensor(stats["sum"], dtype=torch.float64) / n,  # (D,)
        "mean_sq_norm": torch.as_tensor(stats["sum_sq_norm"], dtype=torch.float64) / n,  # ()
    }
    if "rff_sum" in stats:
        out["rff_mean"] = torch.as_tensor(stats["rff_sum"], dtype=torch.float64) / n  # (M,)
    return out


def class_energy(phi: Tensor, stats: dict, kernel: str, rff: RandomFourierFeatures | None) -> Tensor:
    """Energy of phi: (B, D) against one class's finalized statistics -> (B,).

    ``kernel="linear"``: :func:`energy_mean_linear` with stats["mean"], stats["mean_sq_norm"] (exact).
    ``kernel="rbf"``: :func:`energy_mean_rff` with ``rff`` and stats["rff_mean"] (approximate); the
    ``rff`` must be the one the statistics were built with (same dim, num_features, sigma, seed).
    """
    _check_kernel(kernel)
    if kernel == "linear":
        return energy_mean_linear(phi, stats["mean"], stats.get("mean_sq_norm"))
    if rff is None:
        raise ValueError("kernel='rbf' needs the RandomFourierFeatures the class statistics were built with")
    if "rff_mean" not in stats:
        raise ValueError(
            "kernel='rbf' needs stats['rff_mean']: build the statistics with class_statistics(..., rff=rff)"
        )
    return energy_mean_rff(phi, rff, stats["rff_mean"])


# ----------------------------------------------------------------------------------------------
# guidance
# ----------------------------------------------------------------------------------------------


def guided_eps(eps: Tensor, grad_energy: Tensor, gamma: float, alpha_bar_t: Tensor | float) -> Tensor:
    """DAP-guided noise prediction (paper A.3.2, on the noisy latent x_t directly).

        eps_hat = eps + gamma * sqrt(1 - alpha_bar_t) * grad_{x_t} E(x_t)

    eps, grad_energy: (B, *latent) of the same shape; alpha_bar_t a float, a 0-d tensor or a (B,)
    tensor (per-sample timesteps). The result has eps's dtype and device. ``gamma == 0`` returns
    ``eps`` itself, untouched (the vanilla sampler, bit for bit, whatever ``grad_energy`` holds).
    """
    if gamma == 0:
        return eps
    if grad_energy.shape != eps.shape:
        raise ValueError(
            f"grad_energy shape {tuple(grad_energy.shape)} differs from eps shape {tuple(eps.shape)}"
        )
    # The scale is formed in float64 and the product in at least float32, so a bf16/fp16 eps
    # loses nothing beyond the final cast.
    if torch.is_tensor(alpha_bar_t):
        abar = alpha_bar_t.to(device=eps.device, dtype=torch.float64)
    else:  # a Python float: keep all its digits (torch.as_tensor would round it to float32)
        abar = torch.tensor(float(alpha_bar_t), dtype=torch.float64, device=eps.device)
    if abar.ndim == 1:
        if abar.shape[0] != eps.shape[0]:
            raise ValueError(f"alpha_bar_t has {abar.shape[0]} entries for a batch of {eps.shape[0]}")
        abar = abar.view(-1, *([1] * (eps.ndim - 1)))  # (B, 1, ..., 1)
    elif abar.ndim != 0:
        raise ValueError(f"alpha_bar_t must be a scalar or shape (B,); got {tuple(abar.shape)}")
    compute = torch.promote_types(grad_energy.dtype, torch.float32)
    scale = (gamma * torch.sqrt(1.0 - abar)).to(compute)  # () or (B, 1, ..., 1)
    return (eps.to(compute) + scale * grad_energy.to(compute)).to(eps.dtype)  # (B, *latent)


def energy_gradient(energy_fn: Callable[[Tensor], Tensor], x_t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradient of an energy with respect to the noisy latent.

    x_t: (B, *latent); energy_fn maps a (B, *latent) tensor to energies (B,) (for example
    ``lambda x: class_energy(flatten(backbone_to_layer(x)), stats, kernel, rff)``). Returns
    (d/dx sum_b energy_fn(x)_b: (B, *latent), energy: (B,) detached). Because samples do not interact,
    the gradient of the sum is the stack of per-sample gradients. ``x_t`` is cloned (its own
    ``requires_grad`` is left alone) and grad is enabled locally, so it works under ``torch.no_grad()``.
    """
    with torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)  # (B, *latent)
        energy = energy_fn(x)  # (B,)
        if not energy.requires_grad:
            raise ValueError(
                "energy_fn output does not depend on x_t through autograd (features detached, or built "
                "under torch.inference_mode?)"
            )
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return grad, energy.detach()
