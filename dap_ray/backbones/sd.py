"""Stable Diffusion (1.x layout: U-Net + VAE + CLIP text encoder) as a class-conditional Backbone.

A text-to-image model becomes class-conditional through one prompt per class, built from the class
name with `prompt_template` (default "a photo of a {name}", DAP's choice); the empty prompt is the
null condition for classifier-free guidance, as in the SD pipelines. Prompts are encoded once in
`bind_classes` and cached, so a sampling step costs one U-Net call (cond + uncond batched).

Layers are the U-Net's coarse blocks, named in forward order: `down_0..down_{n-1}` (output of each
down block, after its downsampler), `mid`, `up_0..up_{n-1}` (SD 1.5: n = 4). Each outputs a
(B, C, H, W) map, which the base class flattens to (B, HW, C) tokens.

Truncation after the deepest requested layer is exact for the U-Net: its skip connections only run
from down blocks to up blocks, i.e. from earlier to later layers in forward order, so everything up
to and including the deepest requested block is computed exactly as in the full forward (tested:
`features` == `features_full` for every layer). Guidance at `mid` therefore backpropagates through
the down path and the mid block only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
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
from dap_ray.errors import ConfigError, UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
_VARIANT_RE = re.compile(r"^(?:diffusion_pytorch_model|model)\.([A-Za-z0-9_]+)\.safetensors$")


def _variant(component_dir: Path) -> str | None:
    """The weight variant to load ('fp16', ...) when a component ships only variant files.

    Hub snapshots of SD 1.5 may hold just `diffusion_pytorch_model.fp16.safetensors`; diffusers
    loads those only when asked for the variant, so find it instead of failing on a valid dir."""
    names = [p.name for p in component_dir.iterdir()]
    if any(n in ("diffusion_pytorch_model.safetensors", "model.safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return None
    variants = sorted({m.group(1) for n in names if (m := _VARIANT_RE.match(n))})
    return variants[0] if variants else None


VAE_FORCE_UPCAST_DEFAULT = True  # AutoencoderKL's default, for a config that does not say


def vae_dtype_for(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """SD's VAE overflows in fp16 (its config says force_upcast): it stays fp32 then; bf16 is fine."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


class SDBackbone(Backbone):
    """Stable Diffusion U-Net conditioned on per-class prompt embeddings."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        tokenizer,
        scheduler: DDIMScheduler,
        latent_scale: float | None = None,
        prompt_template: str = "a photo of a {name}",
        name: str = "sd",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.prompt_template = _check_template(prompt_template)
        self.unet = frozen_on(unet, self.device, dtype)
        self.vae_dtype = vae_dtype_for(dtype, bool(getattr(vae.config, "force_upcast", VAE_FORCE_UPCAST_DEFAULT)))
        self.vae = frozen_on(vae, self.device, self.vae_dtype)
        self.text_encoder = frozen_on(text_encoder, self.device, dtype)
        self.tokenizer = tokenizer

        cfg = unet.config
        side = cfg.sample_size
        if isinstance(side, (list, tuple)):
            if len(set(side)) != 1:
                raise UserError(f"only square U-Nets are supported (sample_size={list(side)})")
            side = side[0]
        self.in_channels = int(cfg.in_channels)
        if vae.config.latent_channels != self.in_channels:
            raise UserError(f"vae has {vae.config.latent_channels} latent channels but the U-Net expects {self.in_channels}")
        if int(cfg.out_channels) != self.in_channels:
            raise UserError(f"U-Net out_channels={cfg.out_channels} != in_channels={self.in_channels}: not a noise-prediction U-Net")
        self.latent_shape = (self.in_channels, int(side), int(side))
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(side) * self.vae_factor
        self.latent_scale = float(latent_scale if latent_scale is not None else vae.config.scaling_factor)
        self.latent_shift = float(getattr(vae.config, "shift_factor", None) or 0.0)  # SD 1.x: none

        n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
        self.layer_names = [f"down_{i}" for i in range(n_down)]
        if unet.mid_block is not None:
            self.layer_names.append("mid")
        self.layer_names += [f"up_{i}" for i in range(n_up)]

        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = str(self.scheduler_config.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"scheduler prediction_type={self.prediction_type!r} is not supported (one of {', '.join(PREDICTION_TYPES)})")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64).clone()
        self.classes: list[ClassInfo] = []
        self.prompts: list[str] = []
        self._cond: torch.Tensor | None = None  # (C, L, D) prompt embeddings per dataset class
        self._uncond: torch.Tensor | None = None  # (1, L, D) the empty prompt

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | None,
        *,
        latent_scale: float | None = None,
        prompt_template: str = "a photo of a {name}",
        name: str = "sd",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SDBackbone:
        """Load from a diffusers SD pipeline directory (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
        or a Hugging Face cache dir (models--org--name). Safetensors only; never touches the network."""
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise UserError("model.type=sd needs the `transformers` package (CLIP text encoder): pip install transformers") from None

        if path is None:
            raise UserError(f"model.path is required for model={name}: a local diffusers Stable Diffusion pipeline directory "
                            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a Hugging Face cache dir (models--org--name)")
        root = resolve_model_dir(path)
        missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / c).is_dir()]
        if missing:
            raise UserError(
                f"model.path={str(root)!r} is not a Stable Diffusion pipeline directory: missing {', '.join(m + '/' for m in missing)} "
                "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        # load_checked refuses weight files that miss tensors of their config.json (the loaders would
        # otherwise leave those layers random or on the meta device)
        if str(device) == "meta":  # the driver's copy: configs only, weights checked from their headers
            unet = load_structure(UNet2DConditionModel, root / "unet", "unet", _variant(root / "unet"))
            vae = load_structure(AutoencoderKL, root / "vae", "vae", _variant(root / "vae"))
            text_encoder = load_structure(CLIPTextModel, root / "text_encoder", "text_encoder", _variant(root / "text_encoder"))
        else:
            # the weights read straight into the run's dtype (the VAE's as __init__ will keep it); the text
            # encoder loads in fp32 and is cast in __init__ (transformers renamed torch_dtype between the
            # versions we support, and it runs once per class list)
            upcast = bool(read_json(root / "vae" / "config.json").get("force_upcast", VAE_FORCE_UPCAST_DEFAULT))
            unet = load_checked(UNet2DConditionModel, root / "unet", "unet", variant=_variant(root / "unet"), torch_dtype=dtype)
            vae = load_checked(AutoencoderKL, root / "vae", "vae", variant=_variant(root / "vae"), torch_dtype=vae_dtype_for(dtype, upcast))
            text_encoder = load_checked(CLIPTextModel, root / "text_encoder", "text_encoder", variant=_variant(root / "text_encoder"),
                                        local_files_only=True)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{root / 'tokenizer'}: could not load the CLIP tokenizer: {str(e).splitlines()[0]}") from None
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise UserError(
                f"{root}: U-Net cross_attention_dim={unet.config.cross_attention_dim} but the text encoder's hidden size is "
                f"{text_encoder.config.hidden_size}"
            )
        return cls(unet, vae, text_encoder, tokenizer, load_scheduler(root), latent_scale, prompt_template, name, device, dtype)

    # -- prompts -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> CLIP last hidden states (P, L, D), padded/truncated to the tokenizer's length like SD."""
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        mask = tok.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        out = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]  # (P, L, D), as the SD pipelines do
        return out.to(self.dtype)

    def bind_classes(self, classes: Sequence[ClassInfo]) -> None:
        """One prompt per class from its human name; the empty prompt is the CFG null condition."""
        self.classes = list(classes)
        self.prompts = [self.prompt_template.format(name=c.name, key=c.key) for c in self.classes]
        if self.device.type == "meta":  # the driver's copy plans only: no text-encoder forward there
            return
        self._cond = self.encode_prompts(self.prompts) if self.prompts else None  # (C, L, D)
        self._uncond = self.encode_prompts([""])  # (1, L, D)

    def _embeddings(self, y: torch.Tensor, uncond: bool) -> torch.Tensor:
        if self._uncond is None:
            raise RuntimeError("SDBackbone.bind_classes must be called before sampling or features")
        if uncond:
            return self._uncond.expand(len(y), -1, -1)  # (B, L, D)
        return self._cond[y.to(self._cond.device)]  # (B, L, D)

    # -- Backbone ----------------------------------------------------------------------------
    def layer_module(self, name: str) -> nn.Module:
        self.check_layers([name])
        if name == "mid":
            return self.unet.mid_block
        kind, i = name.split("_")
        return (self.unet.down_blocks if kind == "down" else self.unet.up_blocks)[int(i)]

    def _run(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=emb, return_dict=False)[0].float()  # (B,C,h,w)
        if self.prediction_type == "v_prediction":  # SD 2.x style: v = √ᾱ ε − √(1−ᾱ) x₀  =>  ε = √ᾱ v + √(1−ᾱ) x_t
            ab = self.alphas_cumprod.to(out.device)[t.to(out.device)].float().view(-1, 1, 1, 1)
            out = ab.sqrt() * out + (1 - ab).sqrt() * x.float()
        return out

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, uncond: bool) -> torch.Tensor:
        return self._run(x, t, self._embeddings(y, uncond))

    def _forward_pair(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Conditional and unconditional noise predictions (2B, C, h, w) from one U-Net call."""
        emb = torch.cat([self._embeddings(y, False), self._embeddings(y, True)])  # (2B, L, D)
        return self._run(torch.cat([x, x]), torch.cat([t, t]), emb)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> (posterior mean − shift) × scale (B,4,h,w): a deterministic bank."""
        lat = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist.mean
        return (lat.float() - self.latent_shift) * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        lat = latents / self.latent_scale + self.latent_shift
        return self.vae.decode(lat.to(self.device, self.vae_dtype)).sample.float()


def _check_template(template: str) -> str:
    """The prompt template must name the class, else every class would get the same prompt."""
    try:
        probe = template.format(name="\x00n", key="\x00k")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError("model.prompt_template", template, f"a string with {{name}} (the class name) or {{key}}; got a bad field: {e}") from None
    if "\x00" not in probe:
        raise ConfigError("model.prompt_template", template, "a string with {name} (the class name) or {key}, e.g. 'a photo of a {name}'")
    return template

