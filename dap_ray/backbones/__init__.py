"""Backbone registry: `load_backbone(model_cfg)` for every model type, and content fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dap_ray.backbones.base import Backbone, pool_features, resolve_model_dir
from dap_ray.errors import ConfigError, UserError

__all__ = ["Backbone", "load_backbone", "model_fingerprint", "pool_features", "BACKBONES", "torch_dtype", "enable_tf32"]


def _load_dit(cfg: Mapping[str, Any], device: str, dtype: torch.dtype) -> Backbone:
    from dap_ray.backbones.dit import DiTBackbone

    name = cfg.get("name")
    if cfg.get("path") is None and name not in (None, "digits_dit"):  # only the digits DiT ships with dap_ray
        raise UserError(f"model.path is required for model={name}: a local diffusers DiT pipeline directory "
                        "(transformer/, vae/, scheduler/) or a Hugging Face cache dir (models--org--name)")
    return DiTBackbone.from_pretrained(cfg.get("path"), latent_scale=cfg.get("latent_scale"), name=cfg.get("name", "dit"), device=device, dtype=dtype)


def _load_sd(cfg: Mapping[str, Any], device: str, dtype: torch.dtype) -> Backbone:
    from dap_ray.backbones.sd import SDBackbone

    return SDBackbone.from_pretrained(
        cfg.get("path"), latent_scale=cfg.get("latent_scale"), prompt_template=cfg.get("prompt_template", "a photo of a {name}"),
        name=cfg.get("name", "sd"), device=device, dtype=dtype,
    )


BACKBONES: dict[str, Callable[[Mapping[str, Any], str, torch.dtype], Backbone]] = {"dit": _load_dit, "sd": _load_sd}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str, device: str) -> torch.dtype:
    """sampler.dtype -> the torch dtype on `device`: auto = bf16 on CUDA, fp32 on CPU; half precisions
    only on GPU (CPU bf16 matmuls are slow and fp16 ones unsupported)."""
    cuda = str(device).startswith("cuda")
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    if name not in DTYPES:
        raise ConfigError("sampler.dtype", name, f"one of auto, {', '.join(DTYPES)}")
    return DTYPES[name] if cuda else torch.float32


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on tensor cores (TF32, 10-bit mantissa products, fp32 accumulation):
    what fp32 diffusion sampling uses on Ampere and later; without it fp32 runs ~10x below bf16 peak."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def load_backbone(cfg: Mapping[str, Any], device: str = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    kind = cfg.get("type", "dit")
    if kind not in BACKBONES:
        raise ConfigError("model.type", kind, f"one of {', '.join(BACKBONES)}")
    if str(device).startswith("cuda"):
        enable_tf32()
    return BACKBONES[kind](cfg, device, dtype)


def model_fingerprint(cfg: Mapping[str, Any]) -> str:
    """Content hash of a model directory: every config file, and the weights (bytes when small,
    else name + size + mtime), plus the settings that change features (latent scale, prompts)."""
    from dap_ray.backbones.dit import DIGITS_DIT_DIR

    root = resolve_model_dir(cfg.get("path"), default=DIGITS_DIT_DIR)
    h = hashlib.sha256()
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith("."))
    total = sum(p.stat().st_size for p in files)
    for p in files:
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".png" or rel == "training.json":
            continue  # documentation beside the weights
        h.update(rel.encode())
        if p.suffix in (".json", ".txt") or total < 64 * 2**20:
            h.update(p.read_bytes())
        else:
            st = p.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps({k: cfg.get(k) for k in ("type", "latent_scale", "prompt_template")}, sort_keys=True).encode())
    return h.hexdigest()[:16]
