"""Guided DDIM sampling: the loop (pure torch) and the Ray actor pool that runs it per class.

The loop is DDIM with classifier-free guidance; a `Guidance` (DAP's energy, DIVER's semantic term)
may add γ·√(1−ᾱ_t)·∇_{x_t}E to the predicted noise on the steps it applies to. Initial noise for
image (class c, index i) comes from a generator seeded by (run seed, c, i), so images do not depend
on batch composition, the number of actors or the order they finish in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dap_ray import ddim
from dap_ray.guidance import energy_gradient, guided_eps


class Guidance(Protocol):
    """A training-free guidance term: an energy to descend on the steps where it applies."""

    gamma: float

    def applies(self, t: int) -> bool: ...

    def energy(self, backbone, x_t: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        """(B,) energies of the noisy latents x_t (differentiable w.r.t. x_t)."""
        ...


def seed_for(*parts: object) -> int:
    """A 63-bit seed from a tuple such as (run seed, stage, class key, index): stable across runs."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def initial_noise(shape: Sequence[int], *seed_parts: object) -> torch.Tensor:
    """One image's starting noise (C,h,w), from its own generator (CPU, so identical on any device)."""
    g = torch.Generator().manual_seed(seed_for(*seed_parts))
    return torch.randn(tuple(shape), generator=g)


def schedule(backbone, steps: int) -> list[int]:
    cfg = backbone.scheduler_config
    return ddim.ddim_timesteps(backbone.num_train_timesteps, steps, cfg.get("timestep_spacing", "leading"), int(cfg.get("steps_offset", 0)))


def final_alpha(backbone) -> float:
    return 1.0 if backbone.scheduler_config.get("set_alpha_to_one", True) else float(backbone.alphas_cumprod[0])


@dataclass
class StepInfo:
    t: int
    energy: torch.Tensor | None  # (B,) energy before the guided update, when guided


def sample_latents(
    backbone,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    guidance: Guidance | None = None,
    eta_generator: torch.Generator | None = None,
    start_t: int | None = None,
    trace: list[StepInfo] | None = None,
) -> torch.Tensor:
    """DDIM from x_T = noise (B,C,h,w) for dataset labels y (B,) -> x_0 latents (B,C,h,w).

    start_t: begin at the first schedule step <= start_t (DIVER/img2img start from a noised latent).
    """
    x = noise.to(backbone.device, torch.float32)
    y = y.to(backbone.device)
    ts = schedule(backbone, steps)
    if start_t is not None:
        ts = [t for t in ts if t <= start_t]
    ab = backbone.alphas_cumprod
    fa = final_alpha(backbone)
    for i, t in enumerate(ts):
        a_t = ddim.alpha_bar(ab, t)
        a_prev = ddim.alpha_bar(ab, ts[i + 1] if i + 1 < len(ts) else -1, fa)
        with torch.no_grad():
            eps = backbone.eps(x, t, y, cfg_scale)
        energy = None
        if guidance is not None and guidance.gamma > 0 and guidance.applies(t):
            # ∇E through the backbone's forward cut at the guidance layer, conditional branch only.
            grad, energy = energy_gradient(lambda z, t=t: guidance.energy(backbone, z, t, y), x)
            eps = guided_eps(eps, grad, guidance.gamma, a_t)
        if trace is not None:
            trace.append(StepInfo(t, energy))
        z = None
        if eta > 0:
            z = torch.randn(x.shape, generator=eta_generator).to(x.device)
        x = ddim.ddim_step(x, eps, a_t, a_prev, eta, z)
    return x
