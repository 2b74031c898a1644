"""Stable Diffusion backbone: a tiny SD pipeline (U-Net, VAE, CLIP text encoder, tokenizer from a
hand-written vocabulary) saved in diffusers format and loaded through `load_backbone`, then bank +
DAP sampling through the real CLI. Also: the mean-embedding form's cost does not depend on N."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dap_ray.backbones import load_backbone
from dap_ray.data.types import ClassInfo
from dap_ray.errors import ConfigError, UnsafeWeightsError, UserError
from tests.conftest import check_shared_prefix, diffusers_warnings, small_overrides

pytestmark = pytest.mark.unit

# Two ImageNette classes: folders named by wnid, prompts from their ImageNet names.
CLASSES = [ClassInfo(0, "n01440764", "tench"), ClassInfo(1, "n02102040", "English springer")]
WORDS = ["a", "photo", "of", "tench", "english", "springer", "picture", "the"]
MAX_LEN = 12  # tokenizer model_max_length = text encoder max_position_embeddings

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
)
# scaling_factor 0.5 (not SD's 0.18215) so a test can tell "the VAE's own factor" from the default.
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
    norm_num_groups=4, sample_size=16, scaling_factor=0.5,
)
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LEN)
# Stable Diffusion 1.5's own scheduler (PNDM); the backbone samples with DDIM from the same betas.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)


def write_clip_tokenizer(path: Path, words: list[str], max_length: int) -> Path:
    """A CLIP BPE tokenizer directory (vocab.json, merges.txt, configs) whose merges spell out `words`.

    Every word becomes one token (as in CLIP's real vocabulary) through left-to-right merges of its
    characters, the last one carrying CLIP's end-of-word marker `</w>`."""
    path.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    add("<|startoftext|>")
    add("<|endoftext|>")
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        for p in parts:
            add(p)
        cur = parts[0]
        for p in parts[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            add(cur)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    (path / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": max_length, "do_lower_case": True,
                                                            "tokenizer_class": "CLIPTokenizer"}))
    return path


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module if dtype == torch.float32 else module.to(dtype)


def save_sd_pipeline(path: Path, unet: dict, vae: dict, text: dict, *, words: list[str] = WORDS, max_length: int = MAX_LEN,
                     scheduler: dict = SD15_SCHEDULER, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight SD pipeline directory in the layout of runwayml/stable-diffusion-v1-5."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    _cast(UNet2DConditionModel(**unet), dtype).save_pretrained(path / "unet", safe_serialization=True)
    _cast(AutoencoderKL(**vae), dtype).save_pretrained(path / "vae", safe_serialization=True)
    tok = write_clip_tokenizer(path / "tokenizer", words, max_length)
    n_vocab = len(json.loads((tok / "vocab.json").read_text()))
    text = {"vocab_size": max(n_vocab, text.pop("vocab_size", 0)), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
            "hidden_act": "quick_gelu", **text}
    _cast(CLIPTextModel(CLIPTextConfig(**text)), dtype).save_pretrained(path / "text_encoder", safe_serialization=True)
    PNDMScheduler(**scheduler).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
    }))
    return path


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return save_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"), dict(TINY_UNET), dict(TINY_VAE), dict(TINY_TEXT))


@pytest.fixture(scope="module")
def sd(sd_dir):
    bb = load_backbone({"type": "sd", "path": str(sd_dir)})
    bb.bind_classes(CLASSES)
    return bb


def _latents(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))  # (B,4,8,8)


# ---------------------------------------------------------------------------------------------- layout


def test_layout_prompts_and_schedule(sd, sd_dir):
    assert sd.layer_names == ["down_0", "down_1", "mid", "up_0", "up_1"]
    assert sd.latent_shape == (4, 8, 8)
    assert sd.resolution == 16  # U-Net sample_size 8 x VAE factor 2
    assert sd.latent_scale == 0.5  # the VAE's own scaling_factor (config latent_scale is null)
    assert sd.prompts == ["a photo of a tench", "a photo of a English springer"]
    # The hand-made vocabulary spells whole words, so prompts are real tokens, not unknowns.
    assert sd.tokenizer.tokenize(sd.prompts[1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "english</w>", "springer</w>"]
    assert sd._cond.shape == (2, MAX_LEN, 16) and sd._uncond.shape == (1, MAX_LEN, 16)
    assert not torch.allclose(sd._cond[0], sd._cond[1])
    # DDIM over SD 1.5's scaled-linear betas, with its steps_offset / set_alpha_to_one
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sd.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)
    assert sd.num_train_timesteps == 1000
    assert sd.scheduler_config["steps_offset"] == 1 and sd.scheduler_config["set_alpha_to_one"] is False


def test_prompt_template_is_configurable_and_checked(sd_dir):
    bb = load_backbone({"type": "sd", "path": str(sd_dir), "prompt_template": "the picture of {name} ({key})"})
    bb.bind_classes(CLASSES)
    assert bb.prompts[0] == "the picture of tench (n01440764)"
    for bad in ("a photo", "a photo of a {nme}"):
        with pytest.raises(ConfigError, match="model.prompt_template"):
            load_backbone({"type": "sd", "path": str(sd_dir), "prompt_template": bad})


# ---------------------------------------------------------------------------------------------- features


def test_feature_shapes_and_truncation_match_full_forward(sd):
    x, y = _latents(3), torch.tensor([0, 1, 0])
    expected = {"down_0": (3, 16, 8), "down_1": (3, 16, 16), "mid": (3, 16, 16), "up_0": (3, 64, 16), "up_1": (3, 64, 8)}
    full = sd.features_full(x, 500, y, sd.layer_names)
    for layer, shape in expected.items():
        assert full[layer].shape == shape, layer
        # each layer alone (forward cut right after it) equals the full forward's value
        torch.testing.assert_close(sd.features(x, 500, y, [layer])[layer], full[layer], rtol=0, atol=0)
    together = sd.features(x, 500, y, ["up_0", "down_1"])  # cut after up_0: skips from down blocks intact
    torch.testing.assert_close(together["up_0"], full["up_0"], rtol=0, atol=0)
    torch.testing.assert_close(together["down_1"], full["down_1"], rtol=0, atol=0)


def test_truncation_stops_after_the_deepest_layer(sd):
    calls: list[str] = []
    handles = [sd.unet.up_blocks[0].register_forward_hook(lambda *_: calls.append("up_0")),
               sd.unet.conv_out.register_forward_hook(lambda *_: calls.append("conv_out"))]
    try:
        sd.features(_latents(2), 300, torch.tensor([0, 1]), ["mid"])
        assert calls == []  # nothing after `mid` ran: DAP's backward goes through down + mid only
        sd.features(_latents(2), 300, torch.tensor([0, 1]), ["up_0"])
        assert calls == ["up_0"]
    finally:
        for h in handles:
            h.remove()


def test_features_are_differentiable_wrt_latents(sd):
    x = _latents(2).requires_grad_(True)
    f = sd.features(x, 700, torch.tensor([0, 1]), ["mid"])["mid"]  # (2, 16, 16)
    (g,) = torch.autograd.grad(f.square().sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0


def test_eps_with_features_shares_the_conditional_prefix(sd):
    """The guidance layer taken from the CFG forward (down, mid and up blocks: skips from taped blocks
    into untaped ones) equals the separate guidance pass, gradient included."""
    for layer in ("down_1", "mid", "up_0"):
        check_shared_prefix(sd, _latents(2, seed=1), torch.tensor([0, 1]), layer, 500)


def test_unknown_layer_lists_the_valid_ones(sd):
    with pytest.raises(ConfigError) as e:
        sd.features(_latents(1), 10, torch.tensor([0]), ["mid_block"])
    msg = str(e.value)
    assert "method.layer" in msg and "mid_block" in msg
    for name in sd.layer_names:
        assert name in msg


# ---------------------------------------------------------------------------------------------- eps, CFG, VAE


def test_eps_batched_equals_single_and_cfg(sd):
    x, y, t = _latents(3, seed=1), torch.tensor([1, 0, 1]), 400
    batched = sd.eps(x, t, y)
    single = torch.cat([sd.eps(x[i : i + 1], t, y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    cond = sd._forward(x, sd._t(t, 3), y, uncond=False)
    uncond = sd._forward(x, sd._t(t, 3), y, uncond=True)
    assert not torch.allclose(cond, uncond)  # the class prompt matters
    assert not torch.allclose(sd.eps(x, t, torch.tensor([0, 0, 0])), sd.eps(x, t, torch.tensor([1, 1, 1])))
    torch.testing.assert_close(sd.eps(x, t, y, cfg_scale=3.0), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    # the pair is one U-Net call on a doubled batch, same result as two calls
    torch.testing.assert_close(sd._forward_pair(x, sd._t(t, 3), y), torch.cat([cond, uncond]), rtol=1e-4, atol=1e-5)


def test_v_prediction_is_converted_to_eps(sd_dir, tmp_path):
    d = tmp_path / "sd_v"
    shutil.copytree(sd_dir, d)
    cfg_file = d / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "v_prediction"}))
    bb = load_backbone({"type": "sd", "path": str(d)})
    bb.bind_classes(CLASSES)
    x, y, t = _latents(2), torch.tensor([0, 1]), 250
    v = bb.unet(x, torch.tensor([t, t]), encoder_hidden_states=bb._cond[y], return_dict=False)[0]
    ab = float(bb.alphas_cumprod[t])
    torch.testing.assert_close(bb.eps(x, t, y), ab**0.5 * v + (1 - ab) ** 0.5 * x, rtol=1e-5, atol=1e-6)


def test_vae_scale_and_override(sd, sd_dir):
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (2,3,16,16)
    z = sd.encode(img)
    assert z.shape == (2, 4, 8, 8)
    mean = sd.vae.encode(img).latent_dist.mean
    torch.testing.assert_close(z, mean * 0.5)
    assert sd.decode(z).shape == (2, 3, 16, 16)
    torch.testing.assert_close(sd.decode(z), sd.vae.decode(mean).sample)
    other = load_backbone({"type": "sd", "path": str(sd_dir), "latent_scale": 0.18215})
    assert other.latent_scale == 0.18215
    torch.testing.assert_close(other.encode(img), mean * 0.18215)


# ---------------------------------------------------------------------------------------------- loading


def test_hf_cache_layout_loads(sd_dir, tmp_path):
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(sd_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    bb = load_backbone({"type": "sd", "path": str(repo)})
    assert bb.layer_names[2] == "mid"


def test_pickle_only_unet_is_refused(sd_dir, tmp_path):
    d = tmp_path / "sd_pickle"
    shutil.copytree(sd_dir, d)
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save({"conv_in.weight": torch.zeros(1)}, d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="safetensors"):
        load_backbone({"type": "sd", "path": str(d)})


def test_incomplete_pipeline_dir_is_a_user_error(sd_dir, tmp_path):
    d = tmp_path / "sd_partial"
    shutil.copytree(sd_dir, d)
    shutil.rmtree(d / "text_encoder")
    shutil.rmtree(d / "tokenizer")
    with pytest.raises(UserError, match="missing text_encoder/, tokenizer/"):
        load_backbone({"type": "sd", "path": str(d)})
    with pytest.raises(UserError, match="does not exist"):
        load_backbone({"type": "sd", "path": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_weights_missing_a_tensor_are_refused(sd_dir, tmp_path, component):
    """A safetensors file lacking one tensor of its config.json is a one-line UserError naming the
    component directory: the loaders would leave that layer random (or on the meta device)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / f"sd_no_tensor_{component}"
    shutil.copytree(sd_dir, d)
    (weights,) = (d / component).glob("*.safetensors")
    tensors = load_file(weights)
    dropped = sorted(tensors)[len(tensors) // 2]
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    for device in ("cpu", "meta"):  # meta: the driver's copy, checked from the safetensors headers alone
        with pytest.raises(UserError) as e:
            load_backbone({"type": "sd", "path": str(d)}, device)
        msg = str(e.value)
        assert "\n" not in msg, msg
        assert msg.startswith(f"{d / component}: the {component} weights do not match its config.json (1 tensors missing"), msg
        # transformers names the tensor without its model prefix ("text_model."), diffusers as stored
        assert dropped.endswith(msg.rsplit("e.g. ", 1)[1].rstrip(")")), msg


def test_meta_copy_has_the_layout_and_no_weights(sd, sd_dir, tmp_path):
    """The driver's SD copy: every module on the meta device, the real copy's layout and schedule, the
    prompts but no text-encoder forward; an fp16-variant-only directory builds too."""
    meta = load_backbone({"type": "sd", "path": str(sd_dir)}, "meta")
    meta.bind_classes(CLASSES)
    for m in (meta.unet, meta.vae, meta.text_encoder):
        assert all(p.device.type == "meta" for p in m.parameters())
    assert meta.layer_names == sd.layer_names and meta.latent_shape == sd.latent_shape and meta.resolution == sd.resolution
    assert torch.equal(meta.alphas_cumprod, sd.alphas_cumprod) and meta.prompts == sd.prompts and meta._cond is None
    d = tmp_path / "sd_fp16_meta"
    shutil.copytree(sd_dir, d)
    for comp in ("unet", "vae", "text_encoder"):
        for f in (d / comp).glob("*.safetensors"):
            f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    assert load_backbone({"type": "sd", "path": str(d)}, "meta").layer_names == sd.layer_names


def test_fp16_variant_only_dir_loads(sd_dir, tmp_path):
    """Hub snapshots may carry only `*.fp16.safetensors`; those load (as the variant), nothing pickled."""
    d = tmp_path / "sd_fp16"
    shutil.copytree(sd_dir, d)
    for comp in ("unet", "vae", "text_encoder"):
        for f in (d / comp).glob("*.safetensors"):
            f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    bb = load_backbone({"type": "sd", "path": str(d)})
    ref = load_backbone({"type": "sd", "path": str(sd_dir)})
    for b in (bb, ref):
        b.bind_classes(CLASSES)
    torch.testing.assert_close(bb.eps(_latents(1), 100, torch.tensor([1])), ref.eps(_latents(1), 100, torch.tensor([1])))


@pytest.mark.parametrize("dtype, force_upcast, vae_dtype", [(torch.bfloat16, True, torch.bfloat16), (torch.float16, True, torch.float32),
                                                           (torch.float16, False, torch.float16)])
def test_half_precision_weights_are_read_in_that_dtype(sd_dir, tmp_path, dtype, force_upcast, vae_dtype):
    """The U-Net and the VAE are read straight into the run's dtype, without diffusers' `.to(dtype)` cast
    warning; in fp16 the VAE stays fp32 if its config says force_upcast (SD's VAE overflows in fp16)."""
    from dap_ray.backbones.sd import SDBackbone

    d = tmp_path / "sd"
    shutil.copytree(sd_dir, d)
    cfg = json.loads((d / "vae" / "config.json").read_text())
    (d / "vae" / "config.json").write_text(json.dumps({**cfg, "force_upcast": force_upcast}))
    with diffusers_warnings() as said:
        bb = SDBackbone.from_pretrained(str(d), dtype=dtype)
    assert not [m for m in said if "float32" in m], said
    assert {p.dtype for p in bb.unet.parameters()} == {dtype} and {p.dtype for p in bb.text_encoder.parameters()} == {dtype}
    assert {p.dtype for p in bb.vae.parameters()} == {vae_dtype} == {bb.vae_dtype}


# ---------------------------------------------------------------------------------------------- memory: independent of N


def _bank(sd, n_per_class: int, layer: str = "mid"):
    """A Bank built in-process (featurize + StatsAccumulator, the same functions the Ray build runs)."""
    from dap_ray.bank import Bank, BankSpec, StatsAccumulator, featurize

    spec = BankSpec(model={"type": "sd"}, model_fingerprint="test", layers=(layer,), timesteps=(801, 601), pooling="tokens",
                    seed=0, resolution=16)
    rng = np.random.default_rng(n_per_class)
    images = rng.integers(0, 256, (2 * n_per_class, 16, 16, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], n_per_class)
    feats = featurize(sd, spec, images, labels, [f"img{i}" for i in range(len(labels))])  # {layer: (N, T, D)}
    acc = StatsAccumulator(2, spec)
    acc.add(labels, feats)
    return Bank("mem://", spec, list(CLASSES), acc, [], {}), feats[layer], labels


def _graph_size(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn() and the bytes autograd keeps for its backward pass (what a guided step holds in memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_guidance_cost_does_not_depend_on_the_number_of_real_images(sd):
    """The mean-embedding form: a class is (D,) statistics whatever N, so the energy's inputs and its
    autograd graph (hence DAP's GPU memory per step) are the same for 2 or 12 real images per class;
    and it still equals the brute-force energy over all N features."""
    from dap_ray.guidance import energy_exact
    from dap_ray.methods.dap import DAPGuidance

    x, y = _latents(2, seed=3), torch.tensor([0, 0])
    sizes, shapes, memory = [], [], []
    for n in (2, 12):
        bank, per_sample, labels = _bank(sd, n)
        stats = bank.class_stats("mid", 0, 801)
        shapes.append({k: tuple(v.shape) for k, v in stats.items()})
        assert stats["mean"].shape == (16 * 16,) and int(stats["count"]) == n
        g = DAPGuidance(bank, "mid", "linear", gamma=5.0, t_stop=0, pooling="tokens")
        real = torch.from_numpy(per_sample[labels == 0, 0]).double()  # (n, D)
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            e, saved = _saved_bytes(lambda g=g, xg=xg: g.energy(sd, xg, 801, y))  # (2,)
            sizes.append(_graph_size(e.sum()))
            xb = x.clone().requires_grad_(True)
            brute, brute_saved = _saved_bytes(
                lambda xb=xb, real=real: energy_exact(sd.features(xb, 801, y, ["mid"])["mid"].flatten(1).double(), real))
        memory.append((saved, brute_saved))
        torch.testing.assert_close(e.detach().double(), brute.detach(), rtol=1e-4, atol=1e-6)
    assert shapes[0] == shapes[1]
    assert sizes[0] == sizes[1]
    # what the guided step keeps for backward: the same bytes for 2 or 12 real images per class ...
    assert memory[0][0] == memory[1][0] > 0
    # ... while the brute-force energy over all N features keeps more with N (the measure can see growth)
    assert memory[1][1] - memory[0][1] >= (12 - 2) * 16 * 16 * 8


# ---------------------------------------------------------------------------------------------- end to end


def _image_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c.key).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c.key / f"img_{i}.png")
    return root


@pytest.mark.integration
def test_distill_cli_bank_and_dap_sampling_on_sd(sd_dir, tmp_path, cache_dir, ray_session):
    import pyarrow.parquet as pq

    from dap_ray.distill import main

    root = _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["model=sd15", "dataset=imagefolder", f"dataset.root={root}", "methods=[vanilla,dap]", "stages=[bank,sample]",
            "model.resolution=16", "method.gamma=200"] + small_overrides(sd_dir, out, cache_dir)
    assert main(argv) == 0
    for method in ("vanilla", "dap"):
        table = pq.read_table(out / method / "manifest.parquet").to_pylist()
        assert sorted((r["class"], r["index"]) for r in table) == [(c.key, i) for c in CLASSES for i in range(2)]
        for r in table:
            img = Image.open(out / method / r["path"])
            assert img.size == (16, 16) and img.mode == "RGB"
    # guidance toward the class's real features changed the images (same seeds, same model)
    diffs = [np.abs(np.asarray(Image.open(out / "dap" / r["path"]), np.int16) - np.asarray(Image.open(out / "vanilla" / r["path"]), np.int16)).max()
             for r in pq.read_table(out / "dap" / "manifest.parquet").to_pylist()]
    assert max(diffs) > 0
    banks = [p for p in (cache_dir / "banks").iterdir() if (p / "_COMMIT").exists()]
    metas = [json.loads((p / "meta.json").read_text()) for p in banks]
    assert any(m["layers"] == ["mid"] and m["images"] == 10 for m in metas)  # 5 train images per class (1 held out)


def test_distill_cli_unknown_sd_layer_is_exit_2(sd_dir, tmp_path, cache_dir, capsys):
    from dap_ray.distill import main

    root = _image_folder(tmp_path / "data", per_class=3)
    argv = ["model=sd15", "dataset=imagefolder", f"dataset.root={root}", "methods=[dap]", "method.layer=mid_block",
            "model.resolution=16"] + small_overrides(sd_dir, tmp_path / "run", cache_dir)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "method.layer" in err and "down_0, down_1, mid, up_0, up_1" in err


def test_distill_cli_sd15_without_path_is_exit_2(tmp_path, cache_dir, capsys):
    from dap_ray.distill import main

    root = _image_folder(tmp_path / "data", per_class=3)
    argv = ["model=sd15", "dataset=imagefolder", f"dataset.root={root}", f"out_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"]
    assert main(argv) == 2
    assert "model.path is required for model=sd15" in capsys.readouterr().err
