"""Full-size DiT-XL/2-256 and Stable Diffusion 1.5 architectures (random weights, bf16) on a GPU:
save in diffusers format, load through `load_backbone`, build a small feature bank, run a few DAP
sampling steps, and measure peak GPU memory of vanilla vs DAP sampling for two bank sizes.

Skipped without CUDA. Random weights make the images meaningless; what is checked is that the real
architectures go through the whole path (shapes, finite values) and that DAP's per-step memory does
not depend on the number of real images (the mean-embedding form). Run with `-s` to see the report.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.guidance_scaling import ExactGuidance
from dap_ray.data import get_class_list
from dap_ray.data.types import ClassInfo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

EXACT_N = (100, 1000)  # real features resident in the control (the exact energy), small and large
CLASSES = [ClassInfo(i, wnid, name) for i, (wnid, name) in enumerate(get_class_list("imagenette")[:2])]

# The published configurations (DiT-XL-2-256, runwayml/stable-diffusion-v1-5), not shrunk.
DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
               patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              scaling_factor=0.18215)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
                 norm_num_groups=32)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768)


def run_dap(model_cfg: dict, device: str, dtype: torch.dtype, *, n_small: int = 2, n_large: int = 8, steps: int = 4,
            batch: int = 2) -> dict:
    """Load, bank (two sizes), sample vanilla + DAP; returns shapes and peak memory (bytes; None on CPU).

    Plain torch, no Ray: the same functions the Ray bank actors and sampler actors call."""
    from dap_ray.backbones import load_backbone
    from dap_ray.bank import Bank, BankSpec, StatsAccumulator, featurize
    from dap_ray.methods.dap import DAPGuidance
    from dap_ray.sampling import initial_noise, sample_latents, schedule

    cuda = str(device).startswith("cuda")

    def peak_reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak() -> int | None:
        if not cuda:
            return None
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    bb = load_backbone(model_cfg, device, dtype)
    bb.bind_classes(CLASSES)
    layer = str(model_cfg["default_layer"])
    ts = schedule(bb, steps)
    spec = BankSpec(model=model_cfg, model_fingerprint="gpu-test", layers=(layer,), timesteps=tuple(ts), pooling="tokens",
                    seed=0, resolution=bb.resolution)
    out: dict = {"resolution": bb.resolution, "latent_shape": bb.latent_shape, "layer": layer}
    banks = {}
    for n in (n_small, n_large):
        rng = np.random.default_rng(n)
        images = rng.integers(0, 256, (2 * n, bb.resolution, bb.resolution, 3), dtype=np.uint8)
        labels = np.repeat([0, 1], n)
        acc = StatsAccumulator(2, spec)
        for s in range(0, len(labels), batch):  # the bank actor's batches
            feats = featurize(bb, spec, images[s : s + batch], labels[s : s + batch], [f"{n}-{i}" for i in range(s, min(s + batch, len(labels)))])
            assert all(np.isfinite(f).all() for f in feats.values())
            acc.add(labels[s : s + batch], feats)
        banks[n] = Bank("mem://", spec, list(CLASSES), acc, [], {})
        out["feature_dim"] = int(acc.sum[layer].shape[-1])

    noise = torch.stack([initial_noise(bb.latent_shape, 0, "gpu", i) for i in range(batch)])  # (B,C,h,w)
    y = torch.zeros(batch, dtype=torch.long)
    peak_reset()
    base = peak()
    lat = sample_latents(bb, noise, y, steps, cfg_scale=2.0)
    out["peak_vanilla"] = peak()
    images = bb.tensor_to_images(bb.decode(lat))
    assert torch.isfinite(lat).all() and images.shape == (batch, bb.resolution, bb.resolution, 3)
    for n, bank in banks.items():
        g = DAPGuidance(bank, layer, "linear", gamma=5.0, t_stop=0, pooling="tokens")
        trace: list = []
        peak_reset()
        lat_dap = sample_latents(bb, noise, y, steps, cfg_scale=2.0, guidance=g, trace=trace)
        out[f"peak_dap_n{n}"] = peak()
        assert torch.isfinite(lat_dap).all() and lat_dap.shape == lat.shape
        guided = [s for s in trace if g.applies(s.t)]  # every step with t > t_stop = 0
        assert len(guided) >= steps - 1 and all(s.energy is not None and torch.isfinite(s.energy).all() for s in guided)
        assert not torch.equal(lat_dap, lat)
        out[f"stats_shape_n{n}"] = tuple(bank.class_stats(layer, 0, ts[0])["mean"].shape)
    # The control: the exact energy over N resident real features of the sampled class (N = 100, 1,000),
    # whose memory does grow with N. It shows the probe would see growth of that size.
    dim = out["feature_dim"]
    for n in EXACT_N:
        real = torch.randn((n, dim), generator=torch.Generator(device=bb.device).manual_seed(n), device=bb.device)  # (N, D)
        ge = ExactGuidance({0: real}, layer, 5.0, 0, "tokens")
        peak_reset()
        lat_exact = sample_latents(bb, noise, y, steps, cfg_scale=2.0, guidance=ge)
        out[f"peak_exact_n{n}"] = peak()
        assert torch.isfinite(lat_exact).all()
        del ge, real
    out["weights_resident"] = base
    return out


def _report(name: str, res: dict) -> str:
    gib = 2**30
    lines = [f"{name}: resolution {res['resolution']}, latent {res['latent_shape']}, layer {res['layer']}, D={res['feature_dim']}"]
    if res.get("peak_vanilla") is not None:
        lines.append(f"  weights resident {res['weights_resident'] / gib:.2f} GiB; peak vanilla {res['peak_vanilla'] / gib:.2f} GiB; "
                     + "; ".join(f"peak DAP with {k[10:]} real/class {v / gib:.2f} GiB" for k, v in res.items() if k.startswith("peak_dap_"))
                     + "; " + "; ".join(f"peak exact form with {k[12:]} real {v / gib:.2f} GiB" for k, v in res.items()
                                        if k.startswith("peak_exact_")))
    return "\n".join(lines)


def _check_and_report(name: str, res: dict, n_small: int = 2, n_large: int = 8) -> None:
    assert res[f"stats_shape_n{n_small}"] == res[f"stats_shape_n{n_large}"] == (res["feature_dim"],)
    small, large = res[f"peak_dap_n{n_small}"], res[f"peak_dap_n{n_large}"]
    exact_small, exact_large = res[f"peak_exact_n{EXACT_N[0]}"], res[f"peak_exact_n{EXACT_N[1]}"]
    resident_growth = (EXACT_N[1] - EXACT_N[0]) * res["feature_dim"] * 4  # float32 features held by the exact form
    # The probe sees N: the exact form's peak grows by at least half of what it holds for the extra features ...
    assert exact_large - exact_small >= 0.5 * resident_growth, (exact_small, exact_large, resident_growth)
    # ... and DAP's does not: its peak moves by less than a tenth of that, and by at most 1 %.
    assert abs(large - small) <= min(0.01 * small, 0.1 * resident_growth), (small, large, resident_growth)
    print(_report(name, res))
    if os.environ.get("DAP_RAY_GPU_REPORT"):
        with open(os.environ["DAP_RAY_GPU_REPORT"], "a") as f:
            f.write(json.dumps({"model": name, "device": torch.cuda.get_device_name(), **res}, default=str) + "\n")


def test_dit_xl2_256_full_size(tmp_path_factory):
    from dap_ray.cli import compose
    from tests.test_dit_xl import save_dit_pipeline

    d = tmp_path_factory.mktemp("dit_xl2_full")
    with torch.device("cuda"):  # initialising 675M parameters is much faster on the GPU
        save_dit_pipeline(d, DIT_XL2, {**SD_VAE, "sample_size": 256}, dtype=torch.bfloat16)
    model = OmegaConf.to_container(compose("distill", ["model=dit_xl2_256", f"model.path={d}"]).model, resolve=True)
    res = run_dap(model, "cuda", torch.bfloat16)
    assert res["latent_shape"] == (4, 32, 32) and res["feature_dim"] == 256 * 1152
    _check_and_report("DiT-XL/2-256", res)


def test_sd15_full_size(tmp_path_factory):
    from dap_ray.cli import compose
    from tests.test_sd_backbone import WORDS, save_sd_pipeline

    d = tmp_path_factory.mktemp("sd15_full")
    with torch.device("cuda"):
        save_sd_pipeline(d, dict(SD15_UNET), {**SD_VAE, "sample_size": 512}, dict(SD15_TEXT), words=WORDS, max_length=77, dtype=torch.bfloat16)
    model = OmegaConf.to_container(compose("distill", ["model=sd15", f"model.path={d}"]).model, resolve=True)
    res = run_dap(model, "cuda", torch.bfloat16)
    assert res["latent_shape"] == (4, 64, 64) and res["resolution"] == 512 and res["feature_dim"] == 8 * 8 * 1280
    _check_and_report("SD 1.5", res)

