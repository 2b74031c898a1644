"""DAP (Diffusion As Priors): Mercer-kernel energy guidance toward the class's real features in the
backbone's own feature space (DESIGN.md §1), and `vanilla`, the same sampler with γ = 0."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dap_ray.backbones import pool_features
from dap_ray.config import cfg_scale, guidance_layer
from dap_ray.guidance import class_energy, energy_exact, median_bandwidth
from dap_ray.methods.base import Method, RunContext
from dap_ray.sampling import SamplerJob, WorkItem, work_items


class DAPGuidance:
    """E_c(x_t) against the class's real features at timestep t; applies while t > t_stop.

    kernel="linear": the class mean statistics (exact, independent of N). kernel="rbf": the exact
    energy over the bank's kept features of (class, t) (``bank.keep_per_class`` of them), bandwidth
    sigma_scale x the median pairwise distance of those features (guidance.median_bandwidth).

    The sampler calls `for_item` before each work item: the linear kernel's statistics of the item's
    classes at every guided timestep move to the backbone's device then, once per item instead of once
    per step and class. They are all an actor holds (a batch spans at most `sampler.batch_size` classes):
    at DiT-XL/2 token width one (class, t) mean is 2.4 MB in float64, so an item of 16 classes with 30
    guided steps stages 1.1 GB; 1,000 classes x 50 timesteps would be 118 GB. Outside an item (direct
    calls) both kinds of statistics go through LRUs of `cache_size` (class, t) entries."""

    def __init__(self, bank, layer: str, kernel: str, gamma: float, t_stop: int, pooling: str, sigma_scale: float = 1.0,
                 cache_size: int = 128):
        self.bank, self.layer, self.kernel, self.gamma, self.t_stop, self.pooling = bank, layer, kernel, gamma, t_stop, pooling
        self.sigma_scale = float(sigma_scale)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._real: OrderedDict[tuple[int, int], tuple[torch.Tensor, float]] = OrderedDict()
        self._staged: dict[tuple[int, int], dict] = {}  # (class, t) -> statistics on the device, of the current item

    def _bounded(self, cache: OrderedDict, key: tuple[int, int], make):
        """cache[key], made on a miss; the least recently used entry goes beyond cache_size."""
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        cache[key] = make()
        while len(cache) > max(1, self.cache_size):
            cache.popitem(last=False)
        return cache[key]

    def applies(self, t: int) -> bool:
        return t > self.t_stop and t in self.bank.spec.timesteps

    def for_item(self, backbone, item: WorkItem, seeds: Sequence[int]) -> DAPGuidance:
        """Stage the item's classes' statistics at every guided timestep on the backbone's device (label by
        label, so the bank reads each class's file once); entries of classes the last item shared stay."""
        if self.kernel != "linear":
            return self
        ts = [t for t in self.bank.spec.timesteps if self.applies(t)]
        staged = {}
        for label in sorted({p.label for p in item.parts}):
            for t in ts:
                old = self._staged.get((label, t))
                staged[(label, t)] = old if old is not None else {
                    k: v.to(backbone.device) for k, v in self.bank.class_stats(self.layer, label, t).items()}
        self._staged = staged
        return self

    def stats(self, label: int, t: int) -> dict:
        staged = self._staged.get((label, t))
        if staged is not None:
            return staged
        return self._bounded(self._cache, (label, t), lambda: self.bank.class_stats(self.layer, label, t))

    def real(self, label: int, t: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """The kept real features of (label, t) on `device` (N, D) and their RBF bandwidth sigma."""
        def make() -> tuple[torch.Tensor, float]:
            feats = self.bank.class_features(self.layer, label, t)  # (N, D) float32
            return feats.to(device), self.sigma_scale * median_bandwidth(feats)

        feats, sigma = self._bounded(self._real, (label, t), make)
        return feats.to(device), sigma

    def class_energy(self, phi: torch.Tensor, label: int, t: int) -> torch.Tensor:
        """(B,) energies of pooled features phi (B, D) against class `label` at timestep t."""
        if self.kernel == "rbf":
            real, sigma = self.real(label, t, phi.device)
            return energy_exact(phi, real, "rbf", sigma)
        return class_energy(phi, self.stats(label, t), "linear", None)

    def energy(self, backbone, x_t: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        feats = backbone.features(x_t, t, y, [self.layer])[self.layer]  # (B, tokens, dim)
        return self.energy_of_features(backbone, feats, t, y)

    def energy_of_features(self, backbone, feats: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        """(B,) energies of the guidance layer's outputs feats (B, tokens, dim), each against its own class."""
        phi = pool_features(feats, self.pooling).float()  # (B, D)
        energy = torch.zeros(len(y), device=phi.device)
        for label in y.unique().tolist():  # a batch spans one or more classes
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
