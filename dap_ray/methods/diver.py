"""DIVER (seed 003, arXiv 2605.12649): refine an existing distilled set with a pretrained diffusion model.

DIVER is a second stage: it takes a distilled set made by any method (``method.diver_source``: a
method of this run, ``dap`` by default, or ``vanilla``/``d3hr``/``random_real``; or an ImageFolder
``<class key>/<images>``, e.g. a set distilled by a classical method, as the paper refines) and re-renders every
image through the class-conditional diffusion model, keeping its semantics while filtering out
the patterns that over-fit the architecture it was distilled on. Output: the same class/index
layout under ``<run>/diver/images``.

Our reading of the paper (seed 003 is a summary page: section text and equations are not in it, and
no code has been released, so the three steps below are what its abstract, figure captions and
section fragments support):

* **Semantic inheritance (SI).** Encode each distilled image to a latent, z_inh = VAE(x) (identity
  for pixel-space models), and forward-diffuse it to t_s = the largest sampler timestep
  ≤ ``method.diver_start_t``: x_{t_s} = √ᾱ z_inh + √(1−ᾱ) ε, ε seeded by (run seed, class, index).
  The reverse process starts there ("applying different forward steps to the inherited latent",
  paper Fig. 4 middle). ``diver_start_t = 0`` means no forward step at all: the output is the VAE
  reconstruction decode(encode(x)) — the paper's "reconstructed images" (Fig. 6/7).
* **Semantic guidance (SG).** During reverse diffusion the trajectory is pulled toward the inherited
  semantics, to compensate for the label conditioning that "continuously injects" class information
  and erodes the inherited content (paper §3.3.2). Energy, in the backbone's own feature space (the
  same machinery as DAP, DESIGN.md §1), per feature dimension:
      E(x_t) = ‖pool φ_ℓ(x_t, t, y) − pool φ_ℓ(z_inh,t, t, y)‖² / D,
      z_inh,t = √ᾱ_t z_inh + √(1−ᾱ_t) ε   (the inherited latent noised to the same t, same ε),
  and ε̂ = ε_θ + γ √(1−ᾱ_t) ∇_{x_t} E with γ = ``method.diver_gamma`` (layer ``method.layer`` or
  the model's default, pooling ``method.pooling``). The paper's own Eqn. 8 is not available to us.
* **Semantic fusion (SF).** The paper: SF "provide[s] semantic guidance only during the concrete
  phase of the reverse process", fusing the conditional label with the inherited/guided semantics;
  its ablation compares fusion in that phase only with "full-phase fusion" (Fig. 5 right). We read
  this as a gate on *where* SG is fused with the label-conditional prediction: for t > τ_f
  (``method.diver_fusion_t``, the abstract/semantic phase) the step is the plain label-conditional
  (CFG) DDIM step; for t ≤ τ_f (the concrete phase) the guided ε̂ above. The seed describes no
  separate interpolation of the latent toward z_inh, so none is added: the pull toward the
  inherited latent in the concrete phase is the SG gradient itself.

Ray: one sampler actor pool (``sampling.run_pool``) as for every sampler method. The start latents
come from :class:`DiverStart` (``SamplerJob.start``), the guidance from :class:`DiverGuidanceRecipe`
(``SamplerJob.guidance``), whose ``for_item`` gives each work item its own inherited targets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dap_ray import ddim
from dap_ray.backbones import pool_features
from dap_ray.config import diver_run_source
from dap_ray.data import BadImageError, distilled_records, load_image
from dap_ray.data.types import ClassInfo
from dap_ray.ddim import schedule
from dap_ray.errors import UserError
from dap_ray.methods.base import Method, RunContext
from dap_ray.sampling import WorkItem, initial_noise, pack_items

log = logging.getLogger(__name__)


def start_timestep(backbone, steps: int, start_t: int) -> int:
    """The level SI noises to: the largest schedule timestep <= start_t; -1 (no diffusion) for start_t = 0
    or when no step is that low."""
    if start_t <= 0:
        return -1
    ts = [t for t in schedule(backbone, steps) if t <= start_t]  # descending
    return ts[0] if ts else -1


def _load(paths: Sequence[str], resolution: int) -> np.ndarray:
    return np.stack([load_image(p, resolution) for p in paths])  # (B,R,R,3) uint8


@torch.no_grad()
def inherit(backbone, paths: Sequence[str], seeds: Sequence[int], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic inheritance inputs: z_inh = encode(images) (B,C,h,w) and the seeded forward noise ε (B,C,h,w)."""
    z0 = backbone.encode(backbone.images_to_tensor(_load(paths, resolution))).float()
    noise = torch.stack([initial_noise(backbone.latent_shape, s) for s in seeds]).to(z0.device)
    return z0, noise


def item_sources(sources: Sequence[Sequence[str]], item: WorkItem) -> list[str]:
    """The source image paths of an item's images, in batch order (sources: per label, in index order)."""
    return [sources[label][i] for label, i in item.images()]


@dataclass(frozen=True)
class DiverStart:
    """Picklable start recipe: each item's source images, encoded and forward-noised to start_t."""

    sources: tuple[tuple[str, ...], ...]  # per dataset label: the source image paths, in index order
    start_t: int  # resolved level (start_timestep); -1 = no diffusion
    resolution: int

    def latents(self, backbone, item: WorkItem, seeds: Sequence[int]) -> tuple[torch.Tensor, int]:
        z0, noise = inherit(backbone, item_sources(self.sources, item), seeds, self.resolution)
        if self.start_t < 0:
            return z0, -1  # sample_latents runs no step: decode(encode(x))
        return ddim.add_noise(z0, noise, float(backbone.alphas_cumprod[self.start_t])), self.start_t


class SemanticGuidance:
    """SG + SF for one batch: E(x_t) = ‖φ(x_t) − φ(z_inh,t)‖²/D, applied only for t <= fusion_t."""

    def __init__(self, z_inh: torch.Tensor, noise: torch.Tensor, layer: str, pooling: str, gamma: float, fusion_t: int):
        self.z_inh, self.noise = z_inh, noise  # (B,C,h,w) each
        self.layer, self.pooling, self.gamma, self.fusion_t = layer, pooling, gamma, fusion_t
        self._targets: dict[int, torch.Tensor] = {}

    def applies(self, t: int) -> bool:
        return t <= self.fusion_t  # the concrete phase

    @torch.no_grad()
    def target(self, backbone, t: int, y: torch.Tensor) -> torch.Tensor:
        """pool φ_ℓ(z_inh,t) (B, D): the inherited latent noised to t with the same ε as SI."""
        if t not in self._targets:
            z_t = ddim.add_noise(self.z_inh, self.noise, float(backbone.alphas_cumprod[t]))
            self._targets[t] = pool_features(backbone.features(z_t, t, y, [self.layer])[self.layer], self.pooling).float()
        return self._targets[t]

    def energy(self, backbone, x_t: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        return self.energy_of_features(backbone, backbone.features(x_t, t, y, [self.layer])[self.layer], t, y)

    def energy_of_features(self, backbone, feats: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        """(B,) energies of the guidance layer's outputs feats (B, tokens, dim) against the inherited targets."""
        if feats.shape[0] != self.z_inh.shape[0]:
            raise ValueError(f"guidance bound to {self.z_inh.shape[0]} images, got a batch of {feats.shape[0]}")
        phi = pool_features(feats, self.pooling).float()  # (B, D)
        diff = phi - self.target(backbone, t, y)
        return (diff * diff).sum(-1) / diff.shape[-1]  # (B,)


class DiverGuidance:
    """Actor-side guidance factory: the sampler asks it for each work item's own targets (`for_item`)."""

    def __init__(self, recipe: DiverGuidanceRecipe):
        self.recipe = recipe
        self.gamma = recipe.gamma

    def applies(self, t: int) -> bool:  # never used unbound: the sampler calls for_item first
        return False

    def energy(self, backbone, x_t, t, y):
        raise RuntimeError("DIVER guidance needs the work item's inherited latents: call for_item(backbone, item, seeds) first")

    def for_item(self, backbone, item: WorkItem, seeds: Sequence[int]) -> SemanticGuidance:
        r = self.recipe
        z0, noise = inherit(backbone, item_sources(r.sources, item), seeds, r.resolution)
        return SemanticGuidance(z0, noise, r.layer, r.pooling, r.gamma, r.fusion_t)


@dataclass(frozen=True)
class DiverGuidanceRecipe:
    """Picklable recipe of DIVER's semantic guidance (`build(backbone)` on the actor)."""

    sources: tuple[tuple[str, ...], ...]
    resolution: int
    layer: str
    pooling: str
    gamma: float
    fusion_t: int

    def build(self, backbone) -> DiverGuidance:
        backbone.check_layers([self.layer])
        return DiverGuidance(self)


def source_dir(ctx: RunContext) -> str:
    """The images DIVER refines: this run's set of the method method.diver_source names, or that folder."""
    run_method = diver_run_source(ctx.cfg)
    if run_method is not None:
        return f"{ctx.method_dir(run_method)}/images"
    return str(ctx.cfg.method.diver_source)


def list_sources(folder: str, classes: Sequence[ClassInfo], ipc: int, resolution: int, *, key: str = "method.diver_source") -> list[list[str]]:
    """Per class (in the order of `classes`): the first `ipc` decodable images of <folder>/<class key>/ in name order.

    Unreadable files are passed over (logged), like random_real does; a class with none is an error.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.exists(root) or not fs.isdir(root):
        raise UserError(f"{key}={folder!r} does not exist or is not a directory (an ImageFolder <class key>/<images> of a distilled set)")
    by_label: dict[int, list[str]] = {c.index: [] for c in classes}
    for r in distilled_records(folder, classes):
        if len(by_label[r.label]) >= ipc:
            continue
        try:
            load_image(r.path, resolution)
        except BadImageError as e:
            log.warning("diver: skipping unreadable source image %s (%s)", r.path, e.reason)
            continue
        by_label[r.label].append(r.path)
    empty = [c.key for c in classes if not by_label[c.index]]
    if empty:
        raise UserError(f"{key}={folder!r} has no usable image for class(es) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    short = [c.key for c in classes if len(by_label[c.index]) < ipc]
    if short:
        log.warning("diver: %d class(es) have fewer than ipc=%d source images (e.g. %s); refining what is there", len(short), ipc, short[0])
    return [by_label[c.index] for c in classes]


class Diver(Method):
    name = "diver"

    def run(self, ctx: RunContext) -> list[dict]:
        from dap_ray.config import guidance_layer
        from dap_ray.methods.dap import sampler_job

        cfg, backbone = ctx.cfg, ctx.backbone_info
        m = cfg.method
        folder = source_dir(ctx)
        run_method = diver_run_source(cfg)
        if run_method is not None and not _exists(folder):
            raise UserError(f"method.diver_source={run_method}, so diver refines this run's {run_method} set, but "
                            f"{folder} does not exist: put {run_method} before diver in methods, or set method.diver_source "
                            "to another method of the run or to an ImageFolder of distilled images")
        res = int(backbone.resolution)
        sources = list_sources(folder, ctx.dataset.classes, int(cfg.ipc), res)
        srcs = tuple(tuple(s) for s in sources)
        t_s = start_timestep(backbone, int(cfg.sampler.steps), int(m.diver_start_t))
        layer = guidance_layer(cfg)
        backbone.check_layers([layer])
        start = DiverStart(srcs, t_s, res)
        guidance = None
        if float(m.diver_gamma) > 0 and t_s >= 0:
            guidance = DiverGuidanceRecipe(srcs, res, layer, str(m.pooling), float(m.diver_gamma), int(m.diver_fusion_t))
        log.info("diver: refining %d images from %s (start t=%d, guidance γ=%s on layer %s while t <= %d)",
                 sum(map(len, sources)), folder, t_s, m.diver_gamma, layer, m.diver_fusion_t)
        job = sampler_job(ctx, self.name, guidance, start)
        items = pack_items(self.name, [len(s) for s in sources], int(cfg.sampler.batch_size))
        rows = ctx.render(job, items, desc=f"sampling {self.name}")
        for row in rows:  # provenance: which source image each refined image comes from
            row["source"] = sources[row["label"]][row["index"]]
        return rows


def _exists(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)
