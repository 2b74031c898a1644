"""One interface for every diffusion backbone (DiT, SD U-Net): encode, eps, layer features.

The bank, the samplers and every method talk to a `Backbone` only, so a new model family is one new
file here. Layer features come from forward hooks; when only features are needed the forward is cut
right after the deepest requested layer (a hook raises `_StopForward`), which is what makes DAP's
guidance gradient cheap: backward runs through blocks 0..ℓ only.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dap_ray.data.types import ClassInfo
from dap_ray.errors import ConfigError, UnsafeWeightsError, UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer to truncate the forward."""


def as_tokens(output: object) -> torch.Tensor:
    """A layer's output as (B, tokens, dim): DiT blocks already are; U-Net maps (B,C,H,W) -> (B,HW,C)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "sample"):
        output = output.sample
    if output.ndim == 4:  # (B, C, H, W)
        return output.flatten(2).transpose(1, 2)  # (B, HW, C)
    if output.ndim != 3:
        raise ValueError(f"unexpected layer output of shape {tuple(output.shape)}")
    return output


def pool_features(feat: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, tokens, dim) -> (B, D): `tokens` keeps the full map, `mean` averages over tokens."""
    if pooling == "tokens":
        return feat.flatten(1)  # (B, tokens*dim)
    if pooling == "mean":
        return feat.mean(dim=1)  # (B, dim)
    raise ConfigError("method.pooling", pooling, "one of tokens, mean")


def resolve_model_dir(path: str | None, default: Path | None = None) -> Path:
    """A local diffusers directory, or a Hugging Face cache repo dir (models--org--name) -> snapshot dir."""
    if path is None:
        if default is None:
            raise UserError("model.path is required: a local diffusers directory")
        return default
    p = Path(path).expanduser()
    if not p.exists() and HUB_ID.fullmatch(str(path)):
        return hub_snapshot(str(path))
    if not p.exists():
        raise UserError(f"model.path={path!r} does not exist (a local diffusers directory, a HF cache dir "
                        "models--org--name, or a Hub id org/name that is in the local Hugging Face cache)")
    if (p / "snapshots").is_dir():  # HF cache layout: models--org--name/{refs,snapshots}/<hash>
        ref = p / "refs" / "main"
        snap = p / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        if snap is None or not snap.is_dir():
            snaps = sorted((p / "snapshots").iterdir())
            if not snaps:
                raise UserError(f"model.path={path!r}: HF cache dir without snapshots")
            snap = snaps[-1]
        p = snap
    return p


def read_json(path: Path) -> dict:
    """A model directory's JSON file; a broken one is a user error naming the file, not a traceback."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a valid JSON file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_scheduler(root: Path) -> Any:
    """The DDIMScheduler of a diffusers model directory (DiT and SD alike)."""
    from diffusers import DDIMScheduler  # deferred: importing diffusers costs seconds

    sched_dir = root / "scheduler"
    if not (sched_dir / "scheduler_config.json").is_file():
        raise UserError(f"{root}: missing scheduler/scheduler_config.json")
    # Any DDPM-family scheduler config gives the same betas; DDIM is what we sample with.
    return DDIMScheduler.from_config(read_json(sched_dir / "scheduler_config.json"))


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, as the Hub spells repo ids


def hub_snapshot(repo_id: str) -> Path:
    """A Hub model id (`facebook/DiT-XL-2-256`) -> its snapshot in the local Hugging Face cache
    (HF_HOME / HF_HUB_CACHE), found without the network; when it is not there, say how to get it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        from huggingface_hub import constants

        raise UserError(f"model.path={repo_id}: not a local folder, and the Hub model {repo_id} is not in the Hugging Face "
                        f"cache ({constants.HF_HUB_CACHE}); download it once with `hf download {repo_id}` (set HF_HOME to "
                        "use another cache), or give a local diffusers directory") from None


def check_safetensors(component_dir: Path, what: str) -> None:
    """Weights load only from safetensors: refuse a directory that has only pickle checkpoints."""
    if not component_dir.is_dir():
        raise UserError(f"model directory is missing {what}/ ({component_dir})")
    if not (component_dir / "config.json").is_file():
        raise UserError(f"{component_dir}: missing config.json for {what}")
    files = [f.name for f in component_dir.iterdir()]
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UnsafeWeightsError(
            f"{component_dir}: only pickle checkpoints ({', '.join(pickles)}); dap_ray loads safetensors only, "
            "because unpickling a file can run arbitrary code. Convert it once with "
            "`model.save_pretrained(dir, safe_serialization=True)` from a trusted environment."
        )
    raise UserError(f"{component_dir}: no weights for {what} (expected *.safetensors)")


@contextmanager
def _loader_errors_only(loader: Any) -> Iterator[None]:
    """Silence the loader library's warnings (diffusers, and transformers for its models) for a load."""
    from diffusers.utils import logging as diffusers_logging

    libs = [diffusers_logging]
    if str(getattr(loader, "__module__", "")).startswith("transformers"):
        from transformers.utils import logging as transformers_logging

        libs.append(transformers_logging)
    levels = [lib.get_verbosity() for lib in libs]
    for lib in libs:
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, level in zip(libs, levels):
            lib.set_verbosity(level)


def weight_shapes(directory: Path, variant: str | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a component's safetensors weights, from the files' headers only (the
    first 8 bytes give the header's length; no tensor data is read)."""
    import struct

    def ours(name: str) -> bool:  # the files diffusers would read: of this variant, or the plain ones
        return name.endswith(f".{variant}.safetensors") if variant else name.count(".") == 1

    names = sorted(p for p in directory.glob("*.safetensors") if ours(p.name))
    shapes: dict[str, tuple[int, ...]] = {}
    for path in names:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= path.stat().st_size - 8:
                raise ValueError(f"{path.name} is not a whole safetensors file (header length {size})")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(int(x) for x in info["shape"])
    return shapes


# diffusers' own renaming of pre-0.14 attention weights (it converts them when it loads)
_LEGACY_ATTENTION = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."))


def load_structure(loader: Any, directory: Path, what: str, variant: str | None = None) -> Any:
    """The component built from its config.json on the meta device: every module, shape and config
    value, no weights read (the driver validates and plans with it; only the actors load weights).

    The weights are still checked against the config, from the safetensors headers alone: a missing
    tensor or a shape mismatch is the same one-line UserError that `load_checked` gives."""
    check_safetensors(directory, what)
    with _loader_errors_only(loader):
        try:
            if hasattr(loader, "load_config"):  # diffusers
                config = loader.load_config(directory)
                with torch.device("meta"):
                    model = loader.from_config(config)
            else:  # transformers
                config = loader.config_class.from_json_file(Path(directory) / "config.json")  # JSON only, no weights
                with torch.device("meta"):
                    model = loader(config)
            stored = weight_shapes(directory, variant)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"{directory}: could not load the {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for old, new in _LEGACY_ATTENTION:
        stored.update({k.replace(old, new): v for k, v in list(stored.items()) if old in k and "attention" in k})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise UserError(f"{directory}: the {what} weights do not match its config.json ({len(missing)} tensors missing, e.g. {missing[0]})")
    wrong = [k for k in sorted(expected) if stored[k] != expected[k] and stored[k] + (1, 1) != expected[k] and expected[k] + (1, 1) != stored[k]]
    if wrong:
        raise UserError(f"{directory}: could not load the {what}: {wrong[0]} has shape {list(stored[wrong[0]])} in the weights "
                        f"but {list(expected[wrong[0]])} in config.json")
    return model.eval().requires_grad_(False)


def load_checked(loader: Any, directory: Path, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(directory)` from safetensors that refuses weights not matching the
    config: diffusers and transformers only warn about missing tensors and leave those layers random
    (or on the meta device), which would silently make a different model. `loader` is a diffusers
    model class or a transformers one (CLIPTextModel): both take `use_safetensors` and
    `output_loading_info`. Failures are one-line UserErrors naming the directory."""
    check_safetensors(directory, what)
    with _loader_errors_only(loader):  # their "weights newly initialized" warning becomes our error below
        try:
            model, info = loader.from_pretrained(directory, use_safetensors=True, output_loading_info=True, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"{directory}: could not load the {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{directory}: the {what} weights do not match its config.json ({len(missing)} tensors missing, "
                        f"e.g. {sorted(missing)[0]})")
    return model


def frozen_on(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The module frozen, in eval mode, on `device` and in `dtype`. It is cast only when its weights are
    in another dtype: `from_pretrained` reads them straight into the run's dtype (`torch_dtype`), the way
    diffusers asks for, and its `.to(dtype)` warns about keep-in-fp32 modules on every cast (once per
    actor and model part in a GPU run's log). The peak host memory of a load is the same either way
    (measured: the fp32 safetensors file is memory-mapped while the weights are read)."""
    current = next((p.dtype for p in module.parameters()), dtype)
    module = module.to(device) if current == dtype else module.to(device, dtype)
    return module.eval().requires_grad_(False)


class Backbone(ABC):
    """A class-conditional latent (or pixel) diffusion model behind one interface.

    Tensors: images (B,3,H,W) in [-1,1]; latents x (B,C,h,w), already multiplied by the latent scale;
    t LongTensor[B] (or an int); y LongTensor[B] of *dataset* labels (bind_classes maps them).
    """

    name: str
    resolution: int  # pixel resolution of generated images
    latent_shape: tuple[int, int, int]  # (C, h, w)
    layer_names: list[str]  # in forward order
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # (T,) float64, CPU
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    classes: list[ClassInfo]

    # -- model-specific ----------------------------------------------------------------------
    @abstractmethod
    def bind_classes(self, classes: Sequence[ClassInfo]) -> None:
        """Map dataset labels to the model's conditioning (class ids, prompts)."""

    @abstractmethod
    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, uncond: bool) -> torch.Tensor:
        """The raw noise prediction (B,C,h,w) for dataset labels y (or the null condition)."""

    @abstractmethod
    def layer_module(self, name: str) -> nn.Module:
        """The nn.Module whose output is the feature of layer `name`."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latents (B,C,h,w)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (B,C,h,w) -> (B,3,H,W) in [-1,1]."""

    # -- shared ------------------------------------------------------------------------------
    def _t(self, t: torch.Tensor | int, batch: int) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor([int(t)])
        t = t.to(self.device, torch.long).reshape(-1)
        return t.expand(batch) if t.numel() == 1 else t

    def check_layers(self, layers: Sequence[str]) -> list[str]:
        out = [str(x) for x in layers]
        for layer in out:
            if layer not in self.layer_names:
                raise ConfigError("method.layer", layer, f"one of the {self.name} layers: {', '.join(self.layer_names)}")
        return out

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor, cfg_scale: float = 1.0) -> torch.Tensor:
        """Noise prediction with classifier-free guidance: u + s (c - u), one doubled batch."""
        b = x.shape[0]
        t = self._t(t, b)
        y = y.to(self.device)
        if cfg_scale == 1.0:
            return self._forward(x, t, y, uncond=False)
        both = self._forward_pair(x, t, y)
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def eps_with_features(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor, cfg_scale: float,
                          layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`eps` and the conditional branch's `layer` output from the same forward: (eps (B,C,h,w) without
        grad, features (B, tokens, dim) differentiable w.r.t. x).

        The guidance pass needs the conditional forward up to `layer` with autograd; the CFG forward runs
        those very blocks on the same (x, t, y). Taping them once instead of running them twice is exact:
        the blocks up to `layer` run with grad, and grad is switched off inside `layer`'s forward hook so
        the blocks after it (and the unconditional branch, when it runs after) record nothing. Call it
        under torch.enable_grad() with x requiring grad. A doubled CFG batch tapes the unconditional half's
        prefix too (its activations are held until the backward, never differentiated): the activation
        memory of a second B-image prefix, traded for one prefix forward less per guided step."""
        layer = self.check_layers([layer])[0]
        b = x.shape[0]
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            if not captured:  # the conditional branch (first, or the first half of a doubled batch)
                captured.append(as_tokens(output))
                torch.set_grad_enabled(False)  # the rest of the forward(s): no tape

        handle = self.layer_module(layer).register_forward_hook(hook)
        grad_was = torch.is_grad_enabled()
        try:
            eps = self.eps(x, t, y, cfg_scale)
        finally:
            torch.set_grad_enabled(grad_was)
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {layer!r} did not run in the forward")
        return eps.detach(), captured[0][:b]  # a doubled CFG batch taped both halves; the first is conditional

    def _forward_pair(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Conditional and unconditional predictions stacked (2B, ...). Backbones may batch this."""
        return torch.cat([self._forward(x, t, y, uncond=False), self._forward(x, t, y, uncond=True)])

    def features(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Outputs of `layers` as (B, tokens, dim), from a forward cut after the deepest one.

        Differentiable w.r.t. x (the sampler takes DAP's gradient through it)."""
        layers = self.check_layers(layers)
        deepest = max(layers, key=self.layer_names.index)
        captured: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(name: str):
            def hook(_module, _inputs, output):
                captured[name] = as_tokens(output)
                if name == deepest:
                    raise _StopForward

            return hook

        for name in layers:
            handles.append(self.layer_module(name).register_forward_hook(make_hook(name)))
        try:
            self._forward(x, self._t(t, x.shape[0]), y.to(self.device), uncond=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {name: captured[name] for name in layers}

    def features_full(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Same as `features` but through the full forward (the reference the truncation is tested against)."""
        layers = self.check_layers(layers)
        captured: dict[str, torch.Tensor] = {}
        handles = [
            self.layer_module(n).register_forward_hook(lambda _m, _i, o, n=n: captured.__setitem__(n, as_tokens(o)))
            for n in layers
        ]
        try:
            self._forward(x, self._t(t, x.shape[0]), y.to(self.device), uncond=False)
        finally:
            for h in handles:
                h.remove()
        return {name: captured[name] for name in layers}

    def images_to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1,1] on the device."""
        x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(self.device)
        return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    @staticmethod
    def tensor_to_images(x: torch.Tensor) -> np.ndarray:
        """float (B,3,H,W) in [-1,1] -> uint8 (B,H,W,3)."""
        x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()
