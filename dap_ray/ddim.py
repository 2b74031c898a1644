"""DDIM as pure functions on tensors (Song et al. 2021): schedule, one step, one inversion step.

No model code, no Ray, no I/O (`schedule`/`final_alpha` only read a backbone's scheduler config): the sampler, D3HR's inversion and DIVER's refinement all call these.
"""

from __future__ import annotations

from typing import Any

import torch


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0) -> list[int]:
    """Descending timesteps τ_1 > ... > τ_S, as diffusers' DDIMScheduler.set_timesteps spaces them."""
    if spacing == "trailing":
        ts = torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps).round().long() - 1
        return [int(t) for t in ts]
    if spacing == "linspace":
        ts = torch.linspace(0, num_train_timesteps - 1, steps).round().long().flip(0)
        return [int(t) for t in ts]
    ratio = num_train_timesteps // steps
    return [int(i * ratio + offset) for i in range(steps - 1, -1, -1)]


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """x_{t-1} = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε + σ z, with σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev).

    clip_x0: clamp x̂₀ to [−c, c] and re-derive ε from it (diffusers' `clip_sample`), which keeps
    pixel-space models stable at high t where 1/√ᾱ_t amplifies every error in ε."""
    x0 = predict_x0(x_t, eps, alpha_bar_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x_t - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)) ** 0.5 * (1 - alpha_bar_t / alpha_bar_prev) ** 0.5
    x_prev = alpha_bar_prev**0.5 * x0 + max(1 - alpha_bar_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_invert_step(x_prev: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: float, alpha_bar_t: float) -> torch.Tensor:
    """Deterministic DDIM inversion x_{t-1} -> x_t, using ε predicted at the lower noise level."""
    x0 = predict_x0(x_prev, eps, alpha_bar_prev)
    return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * eps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: float | torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): √ᾱ_t x₀ + √(1−ᾱ_t) ε (alpha_bar_t a float or a (B,) tensor)."""
    if torch.is_tensor(alpha_bar_t) and alpha_bar_t.ndim == 1:
        alpha_bar_t = alpha_bar_t.view(-1, *([1] * (x0.ndim - 1)))
    return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


def alpha_bar(alphas_cumprod: torch.Tensor, t: int, final_alpha: float = 1.0) -> float:
    """ᾱ_t, with ᾱ at t < 0 (after the last step) = final_alpha (diffusers' set_alpha_to_one)."""
    return float(alphas_cumprod[t]) if t >= 0 else final_alpha


def schedule(backbone: Any, steps: int) -> list[int]:
    """The sampler's descending timesteps for a backbone (anything with ``num_train_timesteps`` and a
    diffusers ``scheduler_config`` dict), spaced as its DDIMScheduler would space them."""
    cfg = backbone.scheduler_config
    return ddim_timesteps(backbone.num_train_timesteps, steps, cfg.get("timestep_spacing", "leading"), int(cfg.get("steps_offset", 0)))


def final_alpha(backbone: Any) -> float:
    """ᾱ after the last step: 1 when the scheduler sets alpha to one (diffusers' default), else ᾱ_0."""
    return 1.0 if backbone.scheduler_config.get("set_alpha_to_one", True) else float(backbone.alphas_cumprod[0])
