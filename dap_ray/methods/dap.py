"""DAP (Diffusion As Priors): Mercer-kernel energy guidance toward the class's real features in the
backbone's own feature space (DESIGN.md §1), and `vanilla`, the same sampler with γ = 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dap_ray.backbones import pool_features
from dap_ray.config import cfg_scale, guidance_layer
from dap_ray.guidance import class_energy, energy_exact, median_bandwidth
from dap_ray.methods.base import Method, RunContext
from dap_ray.sampling import SamplerJob, work_items


class DAPGuidance:
    """E_c(x_t) against the class's real features at timestep t; applies while t > t_stop.

    kernel="linear": the class mean statistics (exact, independent of N). kernel="rbf": the exact
    energy over the bank's kept features of (class, t) (``bank.max_per_class`` of them), bandwidth
    sigma_scale x the median pairwise distance of those features (guidance.median_bandwidth)."""

    def __init__(self, bank, layer: str, kernel: str, gamma: float, t_stop: int, pooling: str, sigma_scale: float = 1.0):
        self.bank, self.layer, self.kernel, self.gamma, self.t_stop, self.pooling = bank, layer, kernel, gamma, t_stop, pooling
        self.sigma_scale = float(sigma_scale)
        self._cache: dict[tuple[int, int], dict] = {}
        self._real: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}

    def applies(self, t: int) -> bool:
        return t > self.t_stop and t in self.bank.spec.timesteps

    def stats(self, label: int, t: int) -> dict:
        if (label, t) not in self._cache:
            self._cache[(label, t)] = self.bank.class_stats(self.layer, label, t)
        return self._cache[(label, t)]

    def real(self, label: int, t: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """The kept real features of (label, t) on `device` (N, D) and their RBF bandwidth sigma."""
        if (label, t) not in self._real:
            feats = self.bank.class_features(self.layer, label, t)  # (N, D) float32
            self._real[(label, t)] = (feats.to(device), self.sigma_scale * median_bandwidth(feats))
        feats, sigma = self._real[(label, t)]
        return feats.to(device), sigma

    def class_energy(self, phi: torch.Tensor, label: int, t: int) -> torch.Tensor:
        """(B,) energies of pooled features phi (B, D) against class `label` at timestep t."""
        if self.kernel == "rbf":
            real, sigma = self.real(label, t, phi.device)
            return energy_exact(phi, real, "rbf", sigma)
        return class_energy(phi, self.stats(label, t), "linear", None)

    def energy(self, backbone, x_t: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        feats = backbone.features(x_t, t, y, [self.layer])[self.layer]  # (B, tokens, dim)
        phi = pool_features(feats, self.pooling).float()  # (B, D)
        energy = torch.zeros(len(y), device=phi.device)
        for label in y.unique().tolist():  # work items are single-class; this also handles mixed batches
            m = y == label
            energy = energy + torch.where(m, self.class_energy(phi, label, t), 0.0)
        return energy


@dataclass(frozen=True)
class DAPGuidanceRecipe:
    """Picklable recipe an actor turns into a DAPGuidance (it loads the bank's statistics itself)."""

    bank_path: str
    bank_spec: object
    classes: tuple
    layer: str
    kernel: str
    gamma: float
    t_stop: int
    pooling: str
    sigma_scale: float = 1.0  # RBF only: the bandwidth is this times the median pairwise feature distance

    def build(self, backbone) -> DAPGuidance:
        from dap_ray.bank import load_bank

        bank = load_bank(self.bank_path, self.bank_spec, list(self.classes))
        if bank is None:
            raise RuntimeError(f"bank at {self.bank_path} is not committed")
        return DAPGuidance(bank, self.layer, self.kernel, self.gamma, self.t_stop, self.pooling, self.sigma_scale)


def sampler_job(ctx: RunContext, name: str, guidance=None, start=None) -> SamplerJob:
    from omegaconf import OmegaConf

    cfg = ctx.cfg
    return SamplerJob(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        classes=tuple(ctx.dataset.classes),
        out_dir=ctx.method_dir(name),
        seed=int(cfg.seed),
        steps=int(cfg.sampler.steps),
        cfg_scale=cfg_scale(cfg),
        eta=float(cfg.sampler.eta),
        dtype=str(cfg.sampler.dtype),
        guidance=guidance,
        start=start,
    )


def run_sampler_method(ctx: RunContext, name: str, guidance=None, start=None) -> list[dict]:
    cfg = ctx.cfg
    job = sampler_job(ctx, name, guidance, start)
    items = work_items(name, len(ctx.dataset.classes), int(cfg.ipc), int(cfg.sampler.batch_size))
    return ctx.render(job, items, desc=f"sampling {name}")


class Vanilla(Method):
    name = "vanilla"

    def run(self, ctx: RunContext) -> list[dict]:
        return run_sampler_method(ctx, self.name)


class DAP(Method):
    name = "dap"
    uses_bank = True

    def recipe(self, ctx: RunContext) -> DAPGuidanceRecipe:
        m = ctx.cfg.method
        return DAPGuidanceRecipe(ctx.bank.path, ctx.bank.spec, tuple(ctx.dataset.classes), guidance_layer(ctx.cfg),
                                 str(m.kernel), float(m.gamma), int(m.t_stop), str(m.pooling), float(m.sigma))

    def run(self, ctx: RunContext) -> list[dict]:
        return run_sampler_method(ctx, self.name, self.recipe(ctx) if ctx.cfg.method.gamma > 0 else None)
