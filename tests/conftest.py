"""Shared fixtures: tiny real diffusers models saved with save_pretrained, a private cache dir, Ray.

No test downloads anything. Tiny models are built here, saved in diffusers format and loaded back
through the same code path as real ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# One thread per test process: the CI machine has 2 cores and Ray workers run beside pytest.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def save_tiny_dit(path: Path, *, num_classes: int = 10, sample_size: int = 8, in_channels: int = 1, layers: int = 3,
                  heads: int = 2, head_dim: int = 8, vae: bool = False, seed: int = 0, learned_sigma: bool = False,
                  class_names: list[str] | None = None) -> Path:
    """A random DiT (optionally with a tiny VAE) saved as a diffusers pipeline directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=layers, sample_size=sample_size,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=num_classes,
    )
    # diffusers leaves adaLN-Zero at zero only in the original; randomise so outputs depend on inputs
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model.save_pretrained(path / "transformer", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False).save_pretrained(path / "scheduler")
    if vae:
        v = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                          up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                          latent_channels=in_channels, norm_num_groups=4, sample_size=sample_size * 2)
        v.save_pretrained(path / "vae", safe_serialization=True)
    if class_names is not None:
        (path / "classes.json").write_text(json.dumps({"classes": class_names}))
    return path


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """Pixel-space 8x8 single-channel DiT with classes '0'..'9' (the digits layout), random weights."""
    return save_tiny_dit(tmp_path_factory.mktemp("tiny_dit"), class_names=[str(i) for i in range(10)])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A private dap_ray cache (datasets, banks, teachers) for the test session."""
    d = tmp_path_factory.mktemp("cache")
    return d


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def small_overrides(model_dir: Path, out_dir: Path, cache: Path, **extra: str) -> list[str]:
    """Overrides for a reduced distill run on digits (tiny model, few steps, short evaluation)."""
    ov = {
        "model.path": str(model_dir), "out_dir": str(out_dir), "cache_dir": str(cache), "ipc": "2",
        "sampler.steps": "5", "sampler.batch_size": "2",
        "eval": "digits",  # the CPU preset also for dataset=imagefolder (whose default is the 224-px IGD protocol)
        "eval.epochs": "2", "eval.seeds": "[0]", "eval.archs": "[convnet]",
        "eval.tsne": "false", "eval.metrics": "false", "eval.max_test": "100",
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]
