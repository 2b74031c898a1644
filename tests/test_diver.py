"""DIVER: semantic inheritance / guidance / fusion, the VAE round trip at t=0, sources, and the CLI run
of random_real -> d3hr -> diver through the sampler actor pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dap_ray.backbones import load_backbone
from dap_ray.data.types import ClassInfo
from dap_ray.errors import UserError
from dap_ray.methods.diver import (
    DiverGuidanceRecipe,
    DiverStart,
    SemanticGuidance,
    inherit,
    list_sources,
    start_timestep,
)
from dap_ray.sampling import SamplerJob, SamplerWorker, WorkItem, image_path, sample_latents, seed_for
from tests.conftest import save_tiny_dit, small_overrides

CLASSES = [ClassInfo(i, str(i), str(i)) for i in range(10)]


def _source_set(root, keys=("3", "7"), n=3, size=8, seed=0):
    """A 'distilled set' ImageFolder of random RGB images (not grey: the pixel DiT averages channels)."""
    rng = np.random.default_rng(seed)
    for k in keys:
        (root / k).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / k / f"img_{i}.png")
    return root


def _job(model_dir, out, sources, start_t, guidance=None, steps=5, res=8):
    classes = tuple(CLASSES)
    return SamplerJob(model={"type": "dit", "path": str(model_dir)}, classes=classes, out_dir=str(out), seed=0, steps=steps,
                      cfg_scale=1.0, eta=0.0, dtype="fp32", guidance=guidance, start=DiverStart(sources, start_t, res))


def _sources_tuple(root, ipc=3):
    """DiverStart's per-label source lists (labels without a folder get none)."""
    return tuple(tuple(str(p) for p in sorted((root / c.key).glob("*.png"))[:ipc]) if (root / c.key).is_dir() else () for c in CLASSES)


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# DIVER at start t = 0 is the VAE round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("vae", [False, True], ids=["pixel", "vae"])
def test_zero_start_and_zero_guidance_is_the_vae_reconstruction(tiny_dit_dir, tmp_path, vae):
    model_dir = tiny_dit_dir if not vae else save_tiny_dit(tmp_path / "vae_dit", vae=True, in_channels=4, class_names=[c.key for c in CLASSES])
    res = 8 if not vae else 16
    root = _source_set(tmp_path / "src", size=res)
    sources = _sources_tuple(root)
    worker = SamplerWorker(_job(model_dir, tmp_path / "out", sources, start_timestep(None, 5, 0), res=res), device="cpu")
    item = WorkItem.of_class("diver", 3, 0, 3)
    rows = worker.render(item)
    assert [r["index"] for r in rows] == [0, 1, 2]
    bb = worker.backbone
    src = np.stack([_read(p) for p in sources[3]])
    with torch.no_grad():
        want = bb.tensor_to_images(bb.decode(bb.encode(bb.images_to_tensor(src))))
    got = np.stack([_read(image_path(str(tmp_path / "out"), "3", i)) for i in range(3)])
    # exact up to PNG rounding (PNG is lossless for uint8, so here: exact)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - src.astype(int)).max() > 10  # a reconstruction, not a copy of the input


@pytest.mark.unit
def test_start_timestep_resolution(tiny_dit_dir):
    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    assert start_timestep(bb, 50, 0) == -1  # no diffusion at all
    assert start_timestep(bb, 50, 600) == 600  # a schedule step: itself
    assert start_timestep(bb, 50, 610) == 600  # else the next step below
    assert start_timestep(bb, 5, 100) == 0  # leading spacing for 5 steps: 800, 600, 400, 200, 0


# ---------------------------------------------------------------------------------------------
# semantic guidance (SG) and fusion (SF)
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_semantic_guidance_energy_gate_and_direction(tiny_dit_dir, tmp_path):
    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    bb.bind_classes(CLASSES)
    sources = _sources_tuple(_source_set(tmp_path / "src"))
    seeds = [seed_for(0, "sample", "3", i) for i in range(3)]
    z0, noise = inherit(bb, sources[3], seeds, 8)
    y = torch.full((3,), 3)
    g = SemanticGuidance(z0, noise, "1", "tokens", gamma=5.0, fusion_t=400)
    # SF: guidance only in the concrete phase t <= fusion_t
    assert [g.applies(t) for t in (800, 600, 401, 400, 200, 0)] == [False, False, False, True, True, True]
    # E = 0 on the inherited latent noised to t with the same noise, > 0 elsewhere
    t = 400
    z_t = torch.sqrt(bb.alphas_cumprod[t]).float() * z0 + torch.sqrt(1 - bb.alphas_cumprod[t]).float() * noise
    assert torch.allclose(g.energy(bb, z_t, t, y), torch.zeros(3), atol=1e-10)
    x = z_t + 0.5 * torch.randn(z_t.shape, generator=torch.Generator().manual_seed(1))
    from dap_ray.guidance import energy_gradient

    grad, e = energy_gradient(lambda v: g.energy(bb, v, t, y), x)
    assert torch.all(e > 0)
    e_after = g.energy(bb, x - 0.05 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1), t, y).detach()
    assert torch.all(e_after < e)  # -∇E moves toward the inherited semantics
    # in the sampler: energies are traced exactly on the concrete-phase steps
    trace = []
    x_s = DiverStart(sources, 800, 8).latents(bb, WorkItem.of_class("diver", 3, 0, 3), seeds)[0]
    guided = sample_latents(bb, x_s, y, 5, 1.0, guidance=g, start_t=800, trace=trace)
    assert [(s.t, s.energy is not None) for s in trace] == [(800, False), (600, False), (400, True), (200, True), (0, True)]
    plain = sample_latents(bb, x_s, y, 5, 1.0, guidance=None, start_t=800)
    assert not torch.equal(guided, plain)
    # "full-phase fusion" (the paper's ablation without SF) guides every step and ends elsewhere
    full_trace = []
    full = sample_latents(bb, x_s, y, 5, 1.0, guidance=SemanticGuidance(z0, noise, "1", "tokens", 5.0, 1000),
                          start_t=800, trace=full_trace)
    assert all(s.energy is not None for s in full_trace) and not torch.equal(full, guided)


@pytest.mark.unit
def test_per_item_guidance_through_the_sampler_worker_is_order_independent(tiny_dit_dir, tmp_path):
    """The worker binds each item's own inherited latents (`for_item`); results do not depend on what
    the actor rendered before (=> same bytes for any pool size)."""
    sources = _sources_tuple(_source_set(tmp_path / "src", keys=("3",), n=4), ipc=4)
    recipe = DiverGuidanceRecipe(sources, 8, "1", "tokens", 50.0, 400)
    items = [WorkItem.of_class("diver", 3, 0, 2), WorkItem.of_class("diver", 3, 2, 4)]
    outs = {}
    for name, order in (("a", items), ("b", items[::-1])):
        w = SamplerWorker(_job(tiny_dit_dir, tmp_path / name, sources, 800, guidance=recipe), device="cpu")
        for it in order:
            w.render(it)
        outs[name] = [(tmp_path / name / "images" / "3" / f"{i:05d}.png").read_bytes() for i in range(4)]
    assert outs["a"] == outs["b"]
    w0 = SamplerWorker(_job(tiny_dit_dir, tmp_path / "g0", sources, 800, guidance=None), device="cpu")
    for it in items:
        w0.render(it)
    unguided = [(tmp_path / "g0" / "images" / "3" / f"{i:05d}.png").read_bytes() for i in range(4)]
    assert unguided != outs["a"]  # the guidance did something


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_list_sources_skips_bad_files_caps_ipc_and_names_missing(tmp_path):
    root = _source_set(tmp_path / "src", keys=("3", "7"), n=4)
    (root / "3" / "a_broken.png").write_bytes(b"not an image")
    srcs = list_sources(str(root), [ClassInfo(0, "3", "3"), ClassInfo(1, "7", "7")], 3, 8)
    assert [p.rsplit("/", 1)[-1] for p in srcs[0]] == ["img_0.png", "img_1.png", "img_2.png"]  # broken passed over
    assert len(srcs[1]) == 3
    with pytest.raises(UserError, match="no usable image for class"):
        list_sources(str(root), [ClassInfo(0, "3", "3"), ClassInfo(1, "9", "9")], 3, 8)
    with pytest.raises(UserError, match="does not exist"):
        list_sources(str(tmp_path / "nowhere"), [ClassInfo(0, "3", "3")], 3, 8)


@pytest.mark.unit
def test_method_hash_follows_the_diver_source_files(tmp_path):
    """method.diver_source's files (names, size + mtime) are part of DIVER's method hash: images
    refined from other source images are never reused; other methods' hashes do not depend on them."""
    import os

    from dap_ray.cli import compose
    from dap_ray.config import to_structured
    from dap_ray.distill import method_hash

    root = _source_set(tmp_path / "src")
    cfg = to_structured(compose("distill", [f"method.diver_source={root}"]))

    def hashes() -> tuple[str, str]:
        return method_hash(cfg, "diver", CLASSES), method_hash(cfg, "dap", CLASSES)

    first, dap = hashes()
    assert hashes() == (first, dap)  # nothing changed
    img = root / "3" / "img_1.png"
    st = os.stat(img)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)  # same name, other content (and size)
    changed = hashes()
    assert changed[0] != first and changed[1] == dap
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only: the mtime counts, like the bank's
    touched = hashes()
    assert touched[0] not in (first, changed[0])
    (root / "7" / "img_9.png").write_bytes(img.read_bytes())  # one more file in a class folder
    more = hashes()[0]
    assert more not in (first, changed[0], touched[0])
    (root / "5").mkdir()  # what DIVER never reads does not count: a non-image file
    (root / "5" / "notes.txt").write_text("not an image")
    assert hashes()[0] == more
    run_cfg = to_structured(compose("distill", []))  # default: this run's dap set, fixed by this config
    assert run_cfg.method.diver_source == "dap"
    assert method_hash(run_cfg, "diver", CLASSES) == method_hash(run_cfg, "diver", CLASSES[:2])


@pytest.mark.integration
def test_cli_changed_diver_source_is_refused_not_reused(tiny_dit_dir, tmp_path, cache_dir, ray_session, capsys):
    """A DIVER run re-run on the same out_dir after its source images changed under the same path:
    exit 2 naming the folder, instead of keeping images refined from the old sources."""
    from dap_ray.distill import main

    root = _source_set(tmp_path / "src", keys=("3", "7"), n=2)
    out = tmp_path / "run"
    argv = small_overrides(tiny_dit_dir, out, cache_dir) + [
        "methods=[diver]", "stages=[sample]", "dataset.classes=[3,7]", f"method.diver_source={root}", "method.diver_gamma=0",
    ]
    assert main(argv) == 0
    before = {p: p.read_bytes() for p in sorted((out / "diver" / "images").rglob("*.png"))}
    assert len(before) == 4
    assert main(argv) == 0  # unchanged sources: the finished images are kept
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "7" / "img_0.png")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out}/diver holds images made with a different config" in err, err
    assert {p: p.read_bytes() for p in sorted((out / "diver" / "images").rglob("*.png"))} == before


# ---------------------------------------------------------------------------------------------
# end to end through the CLI and the actor pools
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_random_real_d3hr_diver_end_to_end(tiny_dit_dir, tmp_path, cache_dir, ray_session):
    import pyarrow.parquet as pq

    from dap_ray.distill import main

    out = tmp_path / "run"
    argv = small_overrides(tiny_dit_dir, out, cache_dir) + [
        "methods=[random_real,d3hr,diver]", "stages=[sample]",
        "method.d3hr_inversion_steps=5", "method.d3hr_groups=16", "method.diver_start_t=600", "method.diver_gamma=20",
        "method.diver_source=random_real",
    ]
    assert main(argv) == 0
    for method in ("random_real", "d3hr", "diver"):
        table = pq.read_table(out / method / "manifest.parquet").to_pylist()
        assert sorted((r["class"], r["index"]) for r in table) == [(str(c), i) for c in range(10) for i in range(2)]
        for c in range(10):
            pngs = sorted((out / method / "images" / str(c)).glob("*.png"))
            assert [p.name for p in pngs] == ["00000.png", "00001.png"]  # IPC per class, nothing half-written
        for r in table:
            assert Image.open(out / method / r["path"]).size == (8, 8)
    # d3hr: one selected-noise file per class, its class statistics cached under cache_dir
    assert sorted(p.stem for p in (out / "d3hr" / "noises").glob("*.safetensors")) == [str(c) for c in range(10)]
    assert len(list((cache_dir / "d3hr").glob("*/class-*.safetensors"))) >= 10
    # diver refined random_real's images: new pixels, yet each refined image stays nearer its own source
    # than the class's other source image (a refinement from t = 600, not a fresh sample)
    def dist(a, b) -> float:
        return float(np.abs(_read(a).astype(int) - _read(b).astype(int)).mean())

    rows = pq.read_table(out / "diver" / "manifest.parquet").to_pylist()
    own = [dist(out / "diver" / r["path"], out / "random_real" / r["path"]) for r in rows]
    other = [dist(out / "diver" / r["path"], out / "random_real" / r["path"].replace(f"{r['index']:05d}.png", f"{1 - r['index']:05d}.png"))
             for r in rows]
    assert all(d > 0 for d in own)
    assert sum(o < t for o, t in zip(own, other)) >= 0.8 * len(rows), (own, other)


@pytest.mark.integration
def test_cli_diver_without_source_is_exit_2(tiny_dit_dir, tmp_path, cache_dir, ray_session, capsys):
    from dap_ray.distill import main

    argv = small_overrides(tiny_dit_dir, tmp_path / "run", cache_dir) + ["methods=[diver]", "stages=[sample]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "method.diver_source=dap" in err and "put dap before diver" in err
