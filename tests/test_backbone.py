"""The DiT backbone: save/load round trip, layer hooks, truncated forward, batch == single sample."""

from __future__ import annotations

import pickle

import pytest
import torch

from dap_ray.backbones import load_backbone, model_fingerprint, pool_features
from dap_ray.backbones.dit import DIGITS_DIT_DIR, DiTBackbone
from dap_ray.data.types import ClassInfo
from dap_ray.errors import ConfigError, UnsafeWeightsError, UserError
from tests.conftest import check_shared_prefix, diffusers_warnings

pytestmark = pytest.mark.unit

CLASSES = [ClassInfo(i, str(i), str(i)) for i in range(10)]


@pytest.fixture(scope="module")
def bb(tiny_dit_dir):
    b = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    b.bind_classes(CLASSES)
    return b


def test_save_load_round_trip_same_outputs(tiny_dit_dir, bb):
    from diffusers import DiTTransformer2DModel

    raw = DiTTransformer2DModel.from_pretrained(tiny_dit_dir / "transformer")
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    y = torch.tensor([0, 3, 9])
    with torch.no_grad():
        ref = raw(x, timestep=t, class_labels=y, return_dict=False)[0]
        out = bb.eps(x, t, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_bf16_weights_are_read_as_bf16_without_a_cast_warning(tiny_dit_dir):
    """A bf16 actor reads the weights straight into bf16 (from_pretrained's torch_dtype): every tensor is
    the fp32 weight rounded to bf16, as a cast would give, and diffusers' warning about casting a loaded
    model with `.to(dtype)` is not raised."""
    with diffusers_warnings() as said:
        b16 = DiTBackbone.from_pretrained(str(tiny_dit_dir), dtype=torch.bfloat16)
    fp32 = DiTBackbone.from_pretrained(str(tiny_dit_dir))
    assert not [m for m in said if "float32" in m], said
    assert {p.dtype for p in b16.transformer.parameters()} == {torch.bfloat16} and b16.dtype == torch.bfloat16
    ref = fp32.transformer.state_dict()
    for k, v in b16.transformer.state_dict().items():
        assert torch.equal(v, ref[k].to(v.dtype)), k


def test_pinned_output_slice():
    """Pinned outputs of the packaged digits DiT (shipped weights, so the values do not depend on any
    random init): catches silent changes in loading, timestep or class conditioning, and CFG."""
    packaged = load_backbone({"type": "dit", "path": None})
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    with torch.no_grad():
        out = packaged.eps(x, 500, torch.tensor([3]))  # (1, 1, 8, 8)
        guided = packaged.eps(x, 500, torch.tensor([3]), cfg_scale=2.0)
        other_class = packaged.eps(x, 500, torch.tensor([4]))
    assert out.shape == (1, 1, 8, 8)
    pinned_row0 = [-0.472253, -0.495097, -1.187007, -1.798484, -1.686846, -0.545341, -0.173684, -0.125784]
    pinned_row7 = [2.032145, 1.942351, 1.168793, 0.555901, 0.419532, 0.674442, 1.133531, 1.769890]
    pinned_cfg2 = [-0.533022, -0.528793, -1.433621, -2.166256, -2.672170, -0.847460, -0.188027, -0.156223]
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(pinned_row0), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[0, 0, 7], torch.tensor(pinned_row7), rtol=0, atol=1e-4)
    torch.testing.assert_close(guided[0, 0, 0], torch.tensor(pinned_cfg2), rtol=0, atol=1e-4)
    assert (other_class - out).abs().max() > 0.5  # the class label reaches the output
    with torch.no_grad():
        again = packaged.eps(x, 500, torch.tensor([3]))
    assert torch.equal(out, again)  # deterministic CPU forward


def test_layer_shapes_documented(bb):
    x = torch.randn(2, 1, 8, 8)
    feats = bb.features(x, 100, torch.tensor([1, 2]), bb.layer_names)
    assert list(feats) == bb.layer_names == ["0", "1", "2"]
    for f in feats.values():
        assert f.shape == (2, 16, 16)  # (B, tokens = (8/2)^2, hidden = 2 heads x 8)
    assert pool_features(feats["1"], "tokens").shape == (2, 256)
    assert pool_features(feats["1"], "mean").shape == (2, 16)


def test_truncated_forward_equals_full(bb):
    x = torch.randn(2, 1, 8, 8)
    y = torch.tensor([4, 5])
    for layer in bb.layer_names:
        trunc = bb.features(x, 300, y, [layer])[layer]
        full = bb.features_full(x, 300, y, [layer])[layer]
        torch.testing.assert_close(trunc, full, rtol=0, atol=0)


def test_truncation_really_stops_early(bb):
    calls = []
    h = bb.transformer.transformer_blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        bb.features(torch.randn(1, 1, 8, 8), 10, torch.tensor([0]), ["0"])
    finally:
        h.remove()
    assert calls == []


def test_features_are_differentiable(bb):
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    f = bb.features(x, 300, torch.tensor([1, 1]), ["1"])["1"]
    (g,) = torch.autograd.grad(f.pow(2).sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0


def test_batch_equals_single_sample(bb):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        batch = bb.eps(x, 250, y, cfg_scale=2.0)
        single = torch.cat([bb.eps(x[i : i + 1], 250, y[i : i + 1], cfg_scale=2.0) for i in range(4)])
        fb = bb.features(x, 250, y, ["2"])["2"]
        fs = torch.cat([bb.features(x[i : i + 1], 250, y[i : i + 1], ["2"])["2"] for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fb, fs, rtol=1e-5, atol=1e-6)


def test_cfg_combines_conditional_and_unconditional(bb):
    x = torch.randn(2, 1, 8, 8)
    y = torch.tensor([1, 7])
    with torch.no_grad():
        c = bb._forward(x, bb._t(100, 2), y, uncond=False)
        u = bb._forward(x, bb._t(100, 2), y, uncond=True)
        g = bb.eps(x, 100, y, cfg_scale=3.0)
    torch.testing.assert_close(g, u + 3.0 * (c - u), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(c, u)


def test_unknown_layer_lists_valid_names(bb):
    with pytest.raises(ConfigError) as e:
        bb.features(torch.randn(1, 1, 8, 8), 10, torch.tensor([0]), ["12"])
    assert "0, 1, 2" in str(e.value)


def test_pixel_space_encode_decode(bb):
    imgs = torch.rand(2, 3, 8, 8) * 2 - 1
    gray = imgs.mean(1, keepdim=True)
    torch.testing.assert_close(bb.encode(imgs), gray)
    assert bb.decode(gray).shape == (2, 3, 8, 8)


def test_class_binding_by_key(tiny_dit_dir):
    b = DiTBackbone.from_pretrained(str(tiny_dit_dir))
    b.bind_classes([ClassInfo(0, "7", "seven"), ClassInfo(1, "3", "three")])
    assert b.model_labels(torch.tensor([0, 1])).tolist() == [7, 3]
    with pytest.raises(UserError):
        b.bind_classes([ClassInfo(0, "cat", "cat")])


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_dit_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dit_dir, bad)
    for f in (bad / "transformer").glob("*.safetensors"):
        f.unlink()
    (bad / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(UnsafeWeightsError) as e:
        DiTBackbone.from_pretrained(str(bad))
    assert "safetensors" in str(e.value) and "arbitrary code" in str(e.value)


def test_missing_or_mismatched_model_dir(tmp_path, tiny_dit_dir):
    import shutil

    with pytest.raises(UserError, match="does not exist"):
        DiTBackbone.from_pretrained(str(tmp_path / "nope"))
    broken = tmp_path / "noscheduler"
    shutil.copytree(tiny_dit_dir, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(UserError, match="scheduler"):
        DiTBackbone.from_pretrained(str(broken))


def test_hf_cache_layout(tmp_path, tiny_dit_dir):
    import shutil

    repo = tmp_path / "models--org--tiny-dit"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_dit_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    b = DiTBackbone.from_pretrained(str(repo))
    assert b.layer_names == ["0", "1", "2"]


def test_fingerprint_changes_with_weights(tmp_path, tiny_dit_dir):
    import shutil

    from tests.conftest import save_tiny_dit

    a = model_fingerprint({"type": "dit", "path": str(tiny_dit_dir)})
    assert a == model_fingerprint({"type": "dit", "path": str(tiny_dit_dir)})
    other = save_tiny_dit(tmp_path / "other", seed=1, class_names=[str(i) for i in range(10)])
    assert model_fingerprint({"type": "dit", "path": str(other)}) != a
    del shutil


def test_packaged_digits_dit_loads():
    if not (DIGITS_DIT_DIR / "transformer").is_dir():
        pytest.skip("the packaged digits DiT is not built")
    b = load_backbone({"type": "dit", "path": None})
    assert b.resolution == 8 and b.latent_shape == (1, 8, 8) and b.num_train_timesteps == 1000


def test_driver_builds_the_model_from_configs_without_reading_weights(tiny_dit_dir, cache_dir, tmp_path, monkeypatch):
    """distill's driver (`prepare`) validates and plans with a meta-device copy: no tensor data is read
    (every weights loader raises here), every parameter is on meta, and it still gives the schedule,
    shapes, layer names and class table the actors' real load gives."""
    import safetensors
    import safetensors.torch

    from dap_ray.cli import compose
    from dap_ray.distill import prepare

    real = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})

    def no_weights(*args, **kwargs):
        raise AssertionError("the driver read model weights")

    for mod, name in ((safetensors.torch, "load_file"), (safetensors.torch, "load"), (safetensors, "safe_open"),
                      (torch.nn.Module, "load_state_dict"), (torch, "load")):
        monkeypatch.setattr(mod, name, no_weights)
    cfg, dataset, bb = prepare(compose("distill", [f"model.path={tiny_dit_dir}", f"out_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"]))
    params = list(bb.transformer.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert bb.layer_names == real.layer_names and bb.latent_shape == real.latent_shape and bb.resolution == real.resolution
    assert torch.equal(bb.alphas_cumprod, real.alphas_cumprod)
    assert len(bb.classes) == len(dataset.classes)


def test_meta_copy_checks_weights_against_config_from_headers(tiny_dit_dir, tmp_path):
    """A config that asks for more blocks than the weights hold is refused by the meta copy too."""
    import json
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(tiny_dit_dir, bad)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    cfg["num_layers"] += 2
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not match its config.json"):
        load_backbone({"type": "dit", "path": str(bad)}, "meta")
    cfg["num_layers"] -= 2
    cfg["num_attention_heads"] *= 2  # same tensor names, other shapes
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="could not load the DiT transformer"):
        load_backbone({"type": "dit", "path": str(bad)}, "meta")


def test_eps_with_features_shares_the_conditional_prefix(bb):
    x = torch.randn(3, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    check_shared_prefix(bb, x, torch.tensor([0, 3, 3]), "1", 600)
    calls: list[int] = []
    h = bb.layer_module("0").register_forward_hook(lambda _m, _i, o: calls.append(o.shape[0]))
    try:
        with torch.enable_grad():
            bb.eps_with_features(x.clone().requires_grad_(True), 600, torch.tensor([0, 3, 3]), 2.0, "1")
    finally:
        h.remove()
    assert calls == [6]  # one doubled CFG forward: the guidance pass did not run the prefix again
