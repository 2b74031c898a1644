"""DiT-XL/2-256 layout: a DiT with the XL/2 configuration (2 blocks instead of 28, random weights) and
a tiny 8x-downsampling VAE, saved as a diffusers DiTPipeline directory, loaded through
`model=dit_xl2_256 model.path=...` exactly as a user's real download would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dap_ray.backbones import load_backbone
from dap_ray.cli import compose
from dap_ray.config import to_structured, validate_against_backbone
from dap_ray.data import get_class_list, get_imagenet_index
from dap_ray.data.classlists import _read
from dap_ray.data.types import ClassInfo
from dap_ray.errors import ConfigError, UserError

pytestmark = pytest.mark.unit

# DiT-XL/2: hidden 1152 = 16 heads x 72, patch 2 on a 32x32x4 latent, learned sigma (8 output channels),
# 1000 ImageNet classes. Only the depth is cut (28 -> 2 blocks) to keep the test small.
XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2, sample_size=32,
           patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
           attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-5)
# sd-vae-ft-ema's shape (4 latent channels, 4 levels = 8x downsampling) with few channels. Its
# scaling_factor is set to 1.0 on purpose: the config's latent_scale (0.18215) must be what is applied.
TINY_VAE8 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 8, 8), layers_per_block=1,
                 latent_channels=4, norm_num_groups=4, sample_size=256, scaling_factor=1.0)
# DiT-XL-2-256's scheduler: linear betas 1e-4 .. 0.02 over 1000 steps.
DIT_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)


def save_dit_pipeline(path: Path, transformer: dict, vae: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight DiTPipeline directory (transformer/, vae/, scheduler/, model_index.json with id2label)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**transformer)
    with torch.no_grad():  # diffusers zero-inits nothing here, but keep outputs input-dependent whatever it does
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model = model if dtype == torch.float32 else model.to(dtype)
    model.save_pretrained(path / "transformer", safe_serialization=True)
    v = AutoencoderKL(**vae)
    (v if dtype == torch.float32 else v.to(dtype)).save_pretrained(path / "vae", safe_serialization=True)
    DDIMScheduler(**DIT_SCHEDULER).save_pretrained(path / "scheduler")
    # The real pipeline's id2label: ImageNet-1K index -> WordNet lemmas (from the class list we ship).
    id2label = {str(i): row[2] for i, row in enumerate(_read("imagenet1k"))}
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.42.1", "id2label": id2label,
        "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return path


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> Path:
    return save_dit_pipeline(tmp_path_factory.mktemp("dit_xl2"), XL2, TINY_VAE8)


@pytest.fixture(scope="module")
def xl_cfg(xl_dir):
    return to_structured(compose("distill", ["model=dit_xl2_256", f"model.path={xl_dir}"]))


@pytest.fixture(scope="module")
def xl(xl_cfg):
    return load_backbone(OmegaConf.to_container(xl_cfg.model, resolve=True))


def imagenette() -> list[ClassInfo]:
    return [ClassInfo(i, wnid, name) for i, (wnid, name) in enumerate(get_class_list("imagenette"))]


def test_config_and_layout(xl, xl_cfg):
    assert xl_cfg.model.type == "dit" and xl_cfg.model.resolution == 256
    assert xl.resolution == 256 and xl.latent_shape == (4, 32, 32)
    assert xl.layer_names == ["0", "1"]
    assert xl.learned_sigma and xl.num_model_classes == 1000
    assert xl.latent_scale == pytest.approx(0.18215)  # from the config, not the VAE's (1.0 here)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(xl.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7)


def test_encode_scale_and_shapes(xl):
    img = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (2,3,256,256)
    z = xl.encode(img)
    assert z.shape == (2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(z, xl.vae.encode(img).latent_dist.mean * 0.18215)
        assert xl.decode(z).shape == (2, 3, 256, 256)


def test_features_and_eps_drop_learned_sigma(xl):
    xl.bind_classes(imagenette())
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))  # (2,4,32,32)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        feats = xl.features(x, 500, y, ["0", "1"])
        assert feats["0"].shape == (2, 256, 1152) and feats["1"].shape == (2, 256, 1152)  # 16x16 patches of 2x2
        eps = xl.eps(x, 500, y)
        assert eps.shape == (2, 4, 32, 32)
        raw = xl.transformer(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([0, 217]), return_dict=False)[0]
        assert raw.shape == (2, 8, 32, 32)  # eps and the learned variance
        torch.testing.assert_close(eps, raw[:, :4])


def test_wnids_map_to_imagenet_ids(xl, xl_dir):
    classes = imagenette()
    xl.bind_classes(classes)
    labels = xl.model_labels(torch.arange(len(classes)))
    assert labels[0] == 0 and labels[1] == 217  # tench, English springer
    assert labels.tolist() == [get_imagenet_index(c.key) for c in classes]
    # consistent with the pipeline's own id2label
    id2label = json.loads((xl_dir / "model_index.json").read_text())["id2label"]
    for c, i in zip(classes, labels.tolist()):
        assert id2label[str(i)].split(",")[0].lower() == c.name.lower()
    # the null (CFG) condition is class 1000
    cond = xl.eps(torch.zeros(1, 4, 32, 32), 900, torch.tensor([0]))
    with torch.no_grad():
        null = xl.transformer(torch.zeros(1, 4, 32, 32), timestep=torch.tensor([900]), class_labels=torch.tensor([1000]), return_dict=False)[0]
    torch.testing.assert_close(xl.eps(torch.zeros(1, 4, 32, 32), 900, torch.tensor([0]), cfg_scale=2.0),
                               2 * cond - null[:, :4])


def test_default_layer_beyond_the_depth_is_a_clear_error(xl, xl_cfg):
    # dit_xl2_256's default guidance layer is block 8 (paper: 4-12); a 2-block model must say so clearly.
    with pytest.raises(ConfigError) as e:
        validate_against_backbone(xl_cfg, xl)
    assert "method.layer='8'" in str(e.value) and "0, 1" in str(e.value)


def test_dit_xl2_without_path_is_a_user_error_not_the_digits_model():
    # `path: ???` in the YAML: without model.path the packaged digits DiT must not be loaded silently.
    cfg = to_structured(compose("distill", ["model=dit_xl2_256"]))
    with pytest.raises(UserError, match="model.path is required for model=dit_xl2_256"):
        load_backbone(OmegaConf.to_container(cfg.model, resolve=True))


def test_gpu_check_path_runs_on_cpu(xl_cfg):
    """tests/test_gpu.py's run_dap (bank of two sizes, vanilla and DAP sampling) on the DiT-XL/2-width
    model on the CPU: the GPU check only runs where a GPU is lent, so its code path is kept working here."""
    from tests.test_gpu import run_dap

    model = OmegaConf.to_container(xl_cfg.model, resolve=True) | {"default_layer": "1"}  # the 2-block cut's last block
    res = run_dap(model, "cpu", torch.float32, n_small=1, n_large=2, steps=2, batch=1)
    assert res["latent_shape"] == (4, 32, 32) and res["feature_dim"] == 256 * 1152
    assert res["stats_shape_n1"] == res["stats_shape_n2"] == (256 * 1152,)
    assert res["peak_vanilla"] is None  # no CUDA: no memory figures claimed
