"""Class-conditional DiT (diffusers `DiTTransformer2DModel`) as a Backbone.

Two layouts load through this one file: the packaged digits DiT (pixel space, no VAE, `classes.json`
naming its 10 classes) and a diffusers DiTPipeline directory such as DiT-XL/2-256 (transformer/,
vae/, scheduler/; classes are ImageNet ids, so dataset wnids are mapped to ImageNet indices).
Layers are the transformer blocks, named "0".."depth-1"; a block outputs (B, tokens, hidden).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel
from torch import nn

from dap_ray.backbones.base import (
    Backbone,
    frozen_on,
    load_checked,
    load_scheduler,
    load_structure,
    read_json,
    resolve_model_dir,
)
from dap_ray.data.types import ClassInfo
from dap_ray.errors import UserError

DIGITS_DIT_DIR = Path(__file__).resolve().parent.parent / "zoo" / "digits_dit"


class DiTBackbone(Backbone):
    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        scheduler: DDIMScheduler,
        vae: AutoencoderKL | None = None,
        latent_scale: float | None = None,
        model_classes: list[str] | None = None,
        name: str = "dit",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = frozen_on(transformer, self.device, dtype)
        self.vae = frozen_on(vae, self.device, dtype) if vae is not None else None
        cfg = transformer.config
        self.num_model_classes = int(cfg.num_embeds_ada_norm)  # null class id = num_model_classes
        self.in_channels = int(cfg.in_channels)
        self.learned_sigma = int(cfg.out_channels or cfg.in_channels) == 2 * self.in_channels
        side = int(cfg.sample_size)
        self.latent_shape = (self.in_channels, side, side)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.resolution = side * self.vae_factor
        if vae is not None:
            self.latent_scale = float(latent_scale if latent_scale is not None else vae.config.scaling_factor)
        else:
            self.latent_scale = 1.0
        self.layer_names = [str(i) for i in range(len(transformer.transformer_blocks))]
        self.scheduler_config = dict(scheduler.config)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64).clone()
        self.model_classes = model_classes  # names of the model's own classes, if known
        self.classes: list[ClassInfo] = []
        self._label_map = torch.arange(self.num_model_classes)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        *,
        latent_scale: float | None = None,
        name: str = "dit",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DiTBackbone:
        root = resolve_model_dir(path, default=DIGITS_DIT_DIR)
        tdir = root / "transformer"
        if not tdir.is_dir() and (root / "config.json").is_file():
            tdir = root  # a bare transformer directory
        # meta: the driver's copy, configs only; otherwise the weights are read straight into the run's dtype
        load = load_structure if str(device) == "meta" else functools.partial(load_checked, torch_dtype=dtype)
        transformer = load(DiTTransformer2DModel, tdir, "DiT transformer")
        vae = None
        if (root / "vae").is_dir():
            vae = load(AutoencoderKL, root / "vae", "vae")
            if vae.config.latent_channels != transformer.config.in_channels:
                raise UserError(
                    f"{root}: vae has {vae.config.latent_channels} latent channels but the transformer expects "
                    f"{transformer.config.in_channels}"
                )
        model_classes = None
        if (root / "classes.json").is_file():
            spec = read_json(root / "classes.json")
            model_classes = spec.get("classes") if isinstance(spec, dict) else None
            if not isinstance(model_classes, list):
                raise UserError(f"{root / 'classes.json'}: expected {{\"classes\": [class names]}}")
        return cls(transformer, load_scheduler(root), vae, latent_scale, model_classes, name, device, dtype)

    def bind_classes(self, classes: Sequence[ClassInfo]) -> None:
        """Dataset label -> model class id: by key for a model that names its classes (the digits DiT),
        by ImageNet index of the wnid for a 1000-class ImageNet model, else the identity."""
        self.classes = list(classes)
        if self.model_classes is not None:
            missing = [c.key for c in classes if c.key not in self.model_classes]
            if missing:
                raise UserError(f"classes {missing} are not among the model's classes {self.model_classes}")
            ids = [self.model_classes.index(c.key) for c in classes]
        elif self.num_model_classes == 1000 and all(c.key.startswith("n") for c in classes):
            from dap_ray.data import get_imagenet_index

            ids = [get_imagenet_index(c.key) for c in classes]
        else:
            if len(classes) > self.num_model_classes:
                raise UserError(f"the dataset has {len(classes)} classes but the model knows {self.num_model_classes}")
            ids = [c.index for c in classes]
        self._label_map = torch.tensor(ids, dtype=torch.long)

    # -- Backbone ----------------------------------------------------------------------------
    def layer_module(self, name: str) -> nn.Module:
        return self.transformer.transformer_blocks[int(name)]

    def model_labels(self, y: torch.Tensor) -> torch.Tensor:
        return self._label_map.to(y.device)[y]

    def _run(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.transformer(x.to(self.dtype), timestep=t, class_labels=labels, return_dict=False)[0]
        if self.learned_sigma:  # DiT-XL/2 predicts (eps, variance); DDIM uses eps only
            out = out[:, : self.in_channels]
        return out.float()

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, uncond: bool) -> torch.Tensor:
        labels = self.model_labels(y)
        if uncond:
            labels = torch.full_like(labels, self.num_model_classes)
        return self._run(x, t, labels)

    def _forward_pair(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        labels = self.model_labels(y)
        null = torch.full_like(labels, self.num_model_classes)
        return self._run(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if self.vae is None:  # pixel space: the digits DiT is single-channel
            return images.mean(dim=1, keepdim=True) if self.in_channels == 1 else images
        # Deterministic bank: the posterior mean, not a sample.
        lat = self.vae.encode(images.to(self.dtype)).latent_dist.mean
        return lat.float() * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.expand(-1, 3, -1, -1) if latents.shape[1] == 1 else latents
        return self.vae.decode((latents / self.latent_scale).to(self.dtype)).sample.float()
