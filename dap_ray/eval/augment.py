"""Batched, seeded training augmentation on tensors (runs on the training device).

All random draws come from a CPU ``torch.Generator`` (per-sample tensors) and a NumPy
``Generator`` (per-batch scalars: CutMix/mixup lambda and box), so a training run is
deterministic for a seed whatever the device. Images are (N, C, H, W) floats in [0, 1]; the
statistics normalisation lives in the net (``nets.Normalized``), so the pipeline stays in [0, 1]
space, as the peers' pipelines are before their ``Normalize`` step.

Ops and their sources:

* ``rrc``: RandomResizedCrop (torchvision's sampling: 10 tries of area in ``scale`` and log-uniform
  aspect ratio in (3/4, 4/3), fallback to the whole image), resized back to H x W with bilinear
  ``grid_sample`` (no antialias). IDC/MMX ``data.py`` scale (0.5, 1); RDED (1/factor, 1) = (0.5, 1);
  D3HR (0.08, 1).
* ``flip``: horizontal flip with p = 0.5 (all three).
* ``jitter``: MMX/IDC ``misc/utils.py`` ``ColorJitter(0.4, 0.4, 0.4)``: brightness, contrast,
  saturation as ``lerp`` towards black / the mean grey level / the per-pixel grey, each factor
  U(-0.4, 0.4), in a random order per image.
* ``lighting``: MMX/IDC ``Lighting`` (AlexNet PCA noise, alpha std 0.1, ImageNet eigvals/vecs).
* ``shuffle``: RDED ``validation/utils.py`` ``ShufflePatches(factor)``: the image's ``factor``
  column strips, then row strips, are put in a random order (applied before the crop).
* CutMix (IDC/MMX ``train.py``, RDED ``mix_aug``): one lambda ~ Beta(beta, beta) and one box per
  batch, partner = random permutation; mixup (D3HR hard label, RDED option) likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dap_ray.errors import ConfigError
from dap_ray.registry import AUGMENT_OPS, AUGMENT_PRESETS

#: ImageNet PCA lighting constants (MMX/IDC ``data.py``, from fb.resnet.torch).
_EIGVAL = (0.2175, 0.0188, 0.0045)
_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

#: Named augmentation pipelines (``TrainConfig.augment``); a custom one is ``"rrc+flip"`` etc.
#: Defined in dap_ray.registry so that config validates them without importing this module.
PRESETS = AUGMENT_PRESETS
OPS = AUGMENT_OPS
MIXES = ("cutmix", "mixup", "none")


def parse_pipeline(spec: str) -> tuple[str, ...]:
    """``"idc"`` -> its ops; ``"rrc+flip"`` -> ("rrc", "flip"). Raises ConfigError for unknown ops."""
    if spec in PRESETS:
        return PRESETS[spec]
    ops = tuple(s for s in spec.split("+") if s)
    bad = [o for o in ops if o not in OPS]
    if bad:
        allowed = f"a preset ({', '.join(PRESETS)}) or '+'-joined ops from {', '.join(OPS)}"
        raise ConfigError("augment", spec, allowed)
    return ops


@dataclass
class Augmenter:
    """Seeded batch augmentation: ``aug(x)`` -> augmented x (same shape)."""

    ops: tuple[str, ...]
    seed: int
    rrc_scale: tuple[float, float] = (0.5, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4
    lighting_std: float = 0.1
    shuffle_factor: int = 2

    def __post_init__(self) -> None:
        self.g = torch.Generator().manual_seed(self.seed)
        self.np_rng = np.random.default_rng(self.seed)

    # -- per-sample ops -------------------------------------------------------------------------

    def __call__(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H, W)
        if "shuffle" in self.ops and self.shuffle_factor > 1:
            x = self.shuffle_patches(x)
        if "rrc" in self.ops or "flip" in self.ops:
            x = self.crop_flip(x, crop="rrc" in self.ops, flip="flip" in self.ops)
        if "jitter" in self.ops and self.jitter > 0:
            x = self.color_jitter(x)
        if "lighting" in self.ops and self.lighting_std > 0:
            x = self.lighting(x)
        return x

    def _rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.g)

    def crop_flip(self, x: Tensor, crop: bool = True, flip: bool = True) -> Tensor:
        """RandomResizedCrop + horizontal flip as one affine ``grid_sample`` per image."""
        if not crop and not flip:
            return x
        n, _, h, w = x.shape
        if crop:
            cw, ch, cx, cy = self._rrc_boxes(n, h, w)  # (N,) each, pixels
        else:
            cw, ch = torch.full((n,), float(w)), torch.full((n,), float(h))
            cx, cy = cw / 2, ch / 2
        sx, sy = cw / w, ch / h  # crop size as a fraction of the image
        tx, ty = 2 * cx / w - 1, 2 * cy / h - 1  # crop centre in [-1, 1]
        if flip:
            sx = torch.where(self._rand(n) < 0.5, -sx, sx)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sx, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy, ty
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)  # (N, H, W, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _rrc_boxes(self, n: int, h: int, w: int, tries: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """torchvision ``RandomResizedCrop.get_params``, vectorised: (width, height, cx, cy) per image."""
        area = h * w
        lo, hi = self.rrc_scale
        target = area * (lo + (hi - lo) * self._rand(n, tries))  # (N, T)
        lr0, lr1 = math.log(self.rrc_ratio[0]), math.log(self.rrc_ratio[1])
        aspect = torch.exp(lr0 + (lr1 - lr0) * self._rand(n, tries))
        cw = torch.round(torch.sqrt(target * aspect))
        ch = torch.round(torch.sqrt(target / aspect))
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)  # (N, T)
        first = torch.argmax(ok.int(), dim=1)  # first valid try (0 if none)
        any_ok = ok.any(dim=1)
        idx = torch.arange(n)
        cw, ch = cw[idx, first], ch[idx, first]
        # fallback (no valid try): whole image, as torchvision does for in-range aspect ratios
        cw = torch.where(any_ok, cw, torch.full_like(cw, float(w)))
        ch = torch.where(any_ok, ch, torch.full_like(ch, float(h)))
        # top-left uniform over integer positions, as torch.randint(0, H - h + 1)
        i = torch.floor(self._rand(n) * (h - ch + 1))
        j = torch.floor(self._rand(n) * (w - cw + 1))
        return cw, ch, j + cw / 2, i + ch / 2

    def color_jitter(self, x: Tensor) -> Tensor:
        """MMX/IDC ``ColorJitter``: brightness, contrast, saturation in random order per image."""
        n = x.shape[0]
        alpha = ((self._rand(n, 3) * 2 - 1) * self.jitter).to(x)  # (N, 3) factors b, c, s
        order = torch.argsort(self._rand(n, 3), dim=1).to(x.device)  # (N, 3) random order per image
        for pos in range(3):
            op = order[:, pos].view(n, 1, 1, 1)
            a = alpha.gather(1, order[:, pos : pos + 1].to(alpha.device)).view(n, 1, 1, 1)
            grey = _grey(x)  # (N, 1, H, W)
            targets = (
                torch.zeros_like(x),  # brightness: lerp to black
                grey.mean(dim=(1, 2, 3), keepdim=True).expand_as(x),  # contrast: to mean grey
                grey.expand_as(x),  # saturation: to per-pixel grey
            )
            target = torch.where(op == 0, targets[0], torch.where(op == 1, targets[1], targets[2]))
            x = torch.lerp(x, target, a)
        return x

    def lighting(self, x: Tensor) -> Tensor:
        """MMX/IDC ``Lighting``: add eigvec @ (alpha * eigval), alpha ~ N(0, std), per image."""
        if x.shape[1] != 3:
            return x
        n = x.shape[0]
        alpha = torch.randn(n, 3, generator=self.g) * self.lighting_std  # (N, 3)
        vec, val = torch.tensor(_EIGVEC), torch.tensor(_EIGVAL)
        rgb = (vec.unsqueeze(0) * (alpha * val).unsqueeze(1)).sum(2)  # (N, 3)
        return x + rgb.to(x).view(n, 3, 1, 1)

    def shuffle_patches(self, x: Tensor) -> Tensor:
        """RDED ``ShufflePatches``: permute the ``factor`` column strips, then the row strips.

        One permutation per batch (RDED draws one per image; the per-batch draw keeps this a pure
        indexing op). The last strip takes the remainder pixels.
        """
        f = self.shuffle_factor
        for dim in (3, 2):
            size = x.shape[dim]
            step = size // f
            bounds = [(k * step, size if k == f - 1 else (k + 1) * step) for k in range(f)]
            perm = torch.randperm(f, generator=self.g).tolist()
            index = torch.cat([torch.arange(*bounds[p]) for p in perm]).to(x.device)
            x = x.index_select(dim, index)
        return x

    # -- batch mixing ----------------------------------------------------------------------------

    def mix(
        self, x: Tensor, kind: str, beta: float = 1.0, p: float = 1.0
    ) -> tuple[Tensor, Tensor | None, float]:
        """CutMix / mixup of a batch with a random permutation of itself.

        Returns (mixed x, partner index or None, lam) where lam is the weight of the original
        labels: for CutMix the kept area fraction (IDC ``train.py`` ``ratio``), for mixup lambda.
        """
        if kind == "none" or x.shape[0] < 2 or self.np_rng.random() >= p:
            return x, None, 1.0
        lam = float(self.np_rng.beta(beta, beta))
        perm = torch.randperm(x.shape[0], generator=self.g).to(x.device)
        if kind == "mixup":
            return lam * x + (1 - lam) * x[perm], perm, lam
        if kind != "cutmix":
            raise ConfigError("mix", kind, ", ".join(MIXES))
        h, w = x.shape[2], x.shape[3]
        x1, y1, x2, y2 = _rand_bbox(h, w, lam, self.np_rng)
        x = x.clone()
        x[:, :, x1:x2, y1:y2] = x[perm, :, x1:x2, y1:y2]
        kept = 1.0 - (x2 - x1) * (y2 - y1) / (h * w)
        return x, perm, kept


def _grey(x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, 1, H, W)
    """Luma 0.299 R + 0.587 G + 0.114 B (MMX ``Grayscale``); other channel counts: channel mean."""
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).contiguous()
    return x.mean(dim=1, keepdim=True)


def _rand_bbox(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """IDC/MMX/RDED ``rand_bbox``: a box of area (1 - lam) around a uniform centre, clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cx, cy = int(rng.integers(h)), int(rng.integers(w))
    x1, x2 = int(np.clip(cx - cut_h // 2, 0, h)), int(np.clip(cx + cut_h // 2, 0, h))
    y1, y2 = int(np.clip(cy - cut_w // 2, 0, w)), int(np.clip(cy + cut_w // 2, 0, w))
    return x1, y1, x2, y2
