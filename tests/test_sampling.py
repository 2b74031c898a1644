"""Guided DDIM and the sampler actor pool: γ=0 ≡ vanilla, DAP lowers the energy, determinism, resume."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dap_ray import ddim
from dap_ray.backbones import load_backbone, model_fingerprint
from dap_ray.backbones.dit import DIGITS_DIT_DIR
from dap_ray.bank import BankSpec, build_bank, featurize
from dap_ray.data import resolve_dataset
from dap_ray.data.types import ClassInfo
from dap_ray.guidance import class_energy
from dap_ray.methods.dap import DAPGuidance, DAPGuidanceRecipe
from dap_ray.sampling import (
    ClassRange,
    SamplerJob,
    SamplerWorker,
    StepInfo,
    WorkItem,
    guidance_strength,
    initial_noise,
    pack_items,
    png_complete,
    run_pool,
    sample_latents,
    schedule,
    seed_for,
    split_finished,
    work_items,
)

CLASSES = tuple(ClassInfo(i, str(i), str(i)) for i in range(10))


def test_ddim_schedule_matches_diffusers():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(50)
    assert ddim.ddim_timesteps(1000, 50) == s.timesteps.tolist()


@pytest.mark.unit
def test_ddim_step_matches_diffusers():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t, prev = int(s.timesteps[3]), int(s.timesteps[4])
    ref = s.step(eps, t, x, eta=0.0).prev_sample
    ours = ddim.ddim_step(x, eps, float(s.alphas_cumprod[t]), float(s.alphas_cumprod[prev]))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_seeds_are_stable_and_distinct():
    assert seed_for(0, "sample", "3", 1) == seed_for(0, "sample", "3", 1)
    assert len({seed_for(0, "sample", c, i) for c in "0123" for i in range(10)}) == 40
    a = initial_noise((1, 8, 8), 0, "sample", "3", 1)
    assert torch.equal(a, initial_noise((1, 8, 8), 0, "sample", "3", 1))


@pytest.mark.unit
def test_pack_items_batches_span_classes_and_cover_each_image_once():
    counts = [3, 1, 0, 5]
    items = pack_items("dap", counts, 4)
    assert [it.parts for it in items] == [
        (ClassRange(0, 0, 3), ClassRange(1, 0, 1)),  # IPC-sized classes share a batch
        (ClassRange(3, 0, 4),),
        (ClassRange(3, 4, 5),),
    ]
    assert items[0].labels == [0, 0, 0, 1] and items[0].images() == [(0, 0), (0, 1), (0, 2), (1, 0)]
    flat = [im for it in items for im in it.images()]
    assert flat == [(c, i) for c, n in enumerate(counts) for i in range(n)]
    assert all(len(it.images()) <= 4 for it in items)
    # IPC 1 over 1,000 classes at batch 16: 63 batches, not 1,000 batches of one image
    assert len(work_items("dap", 1000, 1, 16)) == 63
    assert work_items("v", 2, 4, 4) == [WorkItem.of_class("v", 0, 0, 4), WorkItem.of_class("v", 1, 0, 4)]
    with pytest.raises(ValueError, match="batch_size"):
        pack_items("dap", counts, 0)


def _pixels(root: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p), np.int16) for p in sorted(root.rglob("*.png"))}


@pytest.mark.integration
def test_pipelined_writes_land_by_the_next_render_or_flush(tiny_dit_dir, tmp_path):
    """render(wait=False) returns before its PNGs are written; they are whole on disk once the next
    render or flush returns, and split_finished sees them; a write that fails is raised by flush."""
    w = SamplerWorker(_job(tiny_dit_dir, tmp_path / "p"), "cpu")
    a, b = pack_items("vanilla", [2, 2], 2)
    rows = w.render(a, wait=False)
    assert [(r["class"], r["index"]) for r in rows] == [("0", 0), ("0", 1)]
    w.render(b, wait=False)
    assert all(png_complete(_fs(), str(tmp_path / "p" / "images" / "0" / f"{i:05d}.png")) for i in (0, 1))
    assert w.flush() == 2 and w.flush() == 0
    assert split_finished(w.job, [a, b]) == ([], [a, b])
    assert w.render(a) == []  # everything on disk: nothing rendered

    (tmp_path / "blocked").write_text("a file where the images directory should go")
    w.job = SamplerJob(**{**w.job.__dict__, "out_dir": str(tmp_path / "blocked")})
    w.render(a, wait=False)
    with pytest.raises(OSError):
        w.flush()


def _fs():
    import fsspec

    return fsspec.filesystem("file")


@pytest.fixture(scope="module")
def digits_bank(ray_session, tmp_path_factory):
    """A bank of the real digits of classes 0 and 1 for the packaged digits DiT (10 DDIM steps)."""
    if not (DIGITS_DIT_DIR / "transformer").is_dir():
        pytest.skip("the packaged digits DiT is not built")
    cache = tmp_path_factory.mktemp("bankcache")
    ds = resolve_dataset("digits", None, ["0", "1"], cache_dir=str(cache))
    model = {"type": "dit", "path": None, "name": "digits_dit"}
    bb = load_backbone(model)
    bb.bind_classes(ds.classes)
    spec = BankSpec(model=model, model_fingerprint=model_fingerprint(model), layers=("2",), timesteps=tuple(schedule(bb, 10)),
                    pooling="tokens", seed=0, resolution=8, batch_size=128)
    return build_bank(spec, ds, str(cache), progress=False), bb, ds


@pytest.mark.integration
def test_gamma_zero_or_t_stop_T_is_exactly_vanilla(digits_bank):
    bank, bb, _ = digits_bank
    y = torch.tensor([0, 1, 1])
    x = torch.stack([initial_noise(bb.latent_shape, 0, "s", int(c), i) for i, c in enumerate(y)])
    vanilla = sample_latents(bb, x, y, steps=10, cfg_scale=2.0)
    zero = sample_latents(bb, x, y, steps=10, cfg_scale=2.0, guidance=DAPGuidance(bank, "2", "linear", 0.0, 0, "tokens"))
    late = sample_latents(bb, x, y, steps=10, cfg_scale=2.0, guidance=DAPGuidance(bank, "2", "linear", 10.0, 1000, "tokens"))
    assert torch.equal(vanilla, zero) and torch.equal(vanilla, late)


@pytest.mark.integration
def test_dap_lowers_energy_to_the_class_mean(digits_bank):
    bank, bb, _ = digits_bank
    n = 8
    y = torch.tensor([0] * n + [1] * n)
    x = torch.stack([initial_noise(bb.latent_shape, 0, "s", int(c), i) for i, c in enumerate(y)])
    guided = DAPGuidance(bank, "2", "linear", 20.0, 0, "tokens")
    van = sample_latents(bb, x, y, steps=10, cfg_scale=2.0)
    dap = sample_latents(bb, x, y, steps=10, cfg_scale=2.0, guidance=guided)

    def energy(lat):
        imgs = bb.tensor_to_images(bb.decode(lat))
        f = featurize(bb, bank.spec, imgs, y.numpy(), [f"e{i}" for i in range(len(y))])["2"]  # (B, T, D)
        e = np.zeros(len(y))
        for ti, t in enumerate(bank.spec.timesteps):
            for c in (0, 1):
                m = (y == c).numpy()
                e[m] += class_energy(torch.from_numpy(f[m, ti]).double(), bank.class_stats("2", c, t), "linear", None).numpy()
        return e / len(bank.spec.timesteps)

    ev, ed = energy(van), energy(dap)
    assert ed.mean() < ev.mean(), (ed.mean(), ev.mean())
    assert (ed < ev).mean() >= 0.75


@pytest.mark.integration
def test_a_batch_of_several_classes_renders_what_one_class_batches_render(digits_bank, tmp_path):
    """DAP guides each image of a mixed batch toward its own class (statistics staged per item): the
    images of one 8-image batch over classes 0 and 1 are those of two 4-image single-class batches."""
    bank, _, ds = digits_bank
    recipe = DAPGuidanceRecipe(bank.path, bank.spec, tuple(ds.classes), "2", "linear", 20.0, 0, "tokens")
    job = SamplerJob(model={"type": "dit", "path": None}, classes=tuple(ds.classes), out_dir=str(tmp_path / "mixed"), seed=0,
                     steps=10, cfg_scale=2.0, eta=0.0, dtype="fp32", guidance=recipe)
    w = SamplerWorker(job, "cpu")
    (mixed,) = pack_items("dap", [4, 4], 8)
    assert len(mixed.parts) == 2
    rows = w.render(mixed)
    assert len(w.guidance._staged) == 2 * sum(w.guidance.applies(t) for t in bank.spec.timesteps)  # both classes, each guided t
    w.job = SamplerJob(**{**job.__dict__, "out_dir": str(tmp_path / "single")})
    for it in pack_items("dap", [4, 4], 4):
        w.render(it)
    mixed_px, single_px = _pixels(tmp_path / "mixed"), _pixels(tmp_path / "single")
    assert len(mixed_px) == 8 and mixed_px.keys() == single_px.keys()
    assert max(int(np.abs(mixed_px[k] - single_px[k]).max()) for k in mixed_px) <= 1  # batch size may move a rounding
    assert [(r["class"], r["index"]) for r in rows] == [("0", i) for i in range(4)] + [("1", i) for i in range(4)]
    assert all(r["guidance_strength"] for r in rows)
    # and the guidance did act on the mixed batch: its images are not vanilla's
    vanilla = SamplerJob(**{**job.__dict__, "out_dir": str(tmp_path / "vanilla"), "guidance": None})
    SamplerWorker(vanilla, "cpu").render(mixed)
    assert _pixels(tmp_path / "vanilla").keys() == mixed_px.keys()
    assert any(int(np.abs(_pixels(tmp_path / "vanilla")[k] - mixed_px[k]).max()) > 1 for k in mixed_px)


@pytest.mark.integration
def test_guided_steps_share_the_cfg_forward_and_sample_the_same(digits_bank):
    """DAP's guided steps take the guidance layer from the CFG forward (share_prefix, the default): the
    latents equal those of a separate guidance pass, and each guided step runs the prefix blocks once."""
    bank, bb, _ = digits_bank
    y = torch.tensor([0, 1, 1, 0])
    x = torch.stack([initial_noise(bb.latent_shape, 0, "s", int(c), i) for i, c in enumerate(y)])
    guidance = DAPGuidance(bank, "2", "linear", 20.0, 0, "tokens")
    calls: list[int] = []
    h = bb.layer_module("0").register_forward_hook(lambda _m, _i, o: calls.append(1))
    try:
        shared = sample_latents(bb, x, y, steps=10, cfg_scale=2.0, guidance=guidance)
        n_shared, calls[:] = len(calls), []
        separate = sample_latents(bb, x, y, steps=10, cfg_scale=2.0, guidance=guidance, share_prefix=False)
        n_separate = len(calls)
    finally:
        h.remove()
    guided = sum(guidance.applies(t) for t in schedule(bb, 10))
    assert guided > 0 and n_shared == 10 and n_separate == 10 + guided
    torch.testing.assert_close(shared, separate, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(shared, sample_latents(bb, x, y, steps=10, cfg_scale=2.0), atol=1e-3)  # it did guide


@pytest.mark.integration
def test_rbf_moves_samples_as_far_from_vanilla_as_linear(digits_bank):
    """At equal γ the RBF kernel's samples differ from vanilla's by the same order as the linear kernel's
    (before the σ² scaling and the median bandwidth the RBF step was 1e-4..1e-2 of the linear one)."""
    bank, bb, _ = digits_bank
    y = torch.tensor([0] * 4 + [1] * 4)
    x = torch.stack([initial_noise(bb.latent_shape, 0, "s", int(c), i) for i, c in enumerate(y)])
    van = sample_latents(bb, x, y, steps=10, cfg_scale=2.0)
    moved = {}
    for kernel in ("linear", "rbf"):
        out = sample_latents(bb, x, y, steps=10, cfg_scale=2.0, guidance=DAPGuidance(bank, "2", kernel, 10.0, 0, "tokens"))
        moved[kernel] = float((out - van).flatten(1).norm(dim=1).mean())
    ratio = moved["rbf"] / moved["linear"]
    assert moved["linear"] > 0.05 * float(van.flatten(1).norm(dim=1).mean())  # the linear kernel does guide
    assert 0.2 < ratio < 5.0, moved


class _PullToZero:
    """A real guidance term: E(x_t) = mean of x_t², applied while t > 500."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    def applies(self, t: int) -> bool:
        return t > 500

    def energy(self, backbone, x_t: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        return (x_t * x_t).flatten(1).mean(1)


@pytest.mark.integration
def test_trace_records_guidance_strength_on_guided_steps_only(tiny_dit_dir):
    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    y = torch.tensor([0, 1])
    x = torch.stack([initial_noise(bb.latent_shape, 0, "g", i) for i in range(2)])
    traces = {}
    for gamma in (1.0, 2.0):
        traces[gamma] = []
        sample_latents(bb, x, y, steps=4, cfg_scale=2.0, guidance=_PullToZero(gamma), trace=traces[gamma])
    first = traces[1.0][0]
    with torch.no_grad():
        eps = bb.eps(x, first.t, y, 2.0)
    abar = float(bb.alphas_cumprod[first.t])
    grad = 2 * x / x[0].numel()  # ∇ mean(x²)
    expected = 1.0 * math.sqrt(1 - abar) * grad.flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1)
    torch.testing.assert_close(first.strength, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(traces[2.0][0].strength, 2 * expected, rtol=1e-4, atol=1e-7)  # same x at the first step
    assert [s.t > 500 for s in traces[1.0]] == [s.strength is not None for s in traces[1.0]]

    rows = [{"index": 0, "guidance_strength": {900: 0.2, 700: 0.1}}, {"index": 1, "guidance_strength": {900: 0.4, 700: 0.3}},
            {"index": 2}]
    g = guidance_strength(rows)
    assert g["per_step"] == pytest.approx({900: 0.3, 700: 0.2}) and g["mean"] == pytest.approx(0.25) and g["images"] == 2
    assert list(g["per_step"]) == [900, 700]  # in sampling order
    assert guidance_strength([{"index": 0}]) is None
    assert StepInfo(5, None).strength is None


def _job(tiny_dit_dir: Path, out: Path, guidance=None) -> SamplerJob:
    return SamplerJob(model={"type": "dit", "path": str(tiny_dit_dir)}, classes=CLASSES[:3], out_dir=str(out), seed=7,
                      steps=4, cfg_scale=2.0, eta=0.0, dtype="fp32", guidance=guidance)


def _digest(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.png"))}


@pytest.mark.integration
def test_pool_size_does_not_change_bytes_and_resume_redoes_only_missing(tiny_dit_dir, ray_session, tmp_path):
    items = work_items("vanilla", 3, 5, 2)  # 3 classes x IPC 5 in chunks of 2 -> 9 items
    run_pool(_job(tiny_dit_dir, tmp_path / "one"), items, num_actors=1, progress=False)
    rows = run_pool(_job(tiny_dit_dir, tmp_path / "two"), items, num_actors=2, progress=False)
    one, two = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert len(one) == 15 and one == two
    assert sorted((r["class"], r["index"]) for r in rows) == sorted((c, i) for c in "012" for i in range(5))

    files = sorted((tmp_path / "two").rglob("*.png"))
    deleted = files[::2]
    kept_mtimes = {p: p.stat().st_mtime_ns for p in files if p not in deleted}
    for p in deleted:
        p.unlink()
    run_pool(_job(tiny_dit_dir, tmp_path / "two"), items, num_actors=2, progress=False)
    assert _digest(tmp_path / "two") == one
    assert all(p.stat().st_mtime_ns == m for p, m in kept_mtimes.items())  # nothing else was rewritten


@pytest.mark.integration
def test_dap_through_the_pool_differs_from_vanilla_and_is_deterministic(digits_bank, ray_session, tmp_path):
    bank, _, ds = digits_bank
    recipe = DAPGuidanceRecipe(bank.path, bank.spec, tuple(ds.classes), "2", "linear", 20.0, 0, "tokens")
    job = SamplerJob(model={"type": "dit", "path": None}, classes=tuple(ds.classes), out_dir=str(tmp_path / "d1"), seed=0,
                     steps=10, cfg_scale=2.0, eta=0.0, dtype="fp32", guidance=recipe)
    items = work_items("dap", 2, 4, 4)
    run_pool(job, items, num_actors=1, progress=False)
    run_pool(SamplerJob(**{**job.__dict__, "out_dir": str(tmp_path / "d2")}), items, num_actors=2, progress=False)
    run_pool(SamplerJob(**{**job.__dict__, "out_dir": str(tmp_path / "v"), "guidance": None}), items, num_actors=1, progress=False)
    d1, d2, v = _digest(tmp_path / "d1"), _digest(tmp_path / "d2"), _digest(tmp_path / "v")
    assert d1 == d2 and len(d1) == 8
    assert d1 != v


@pytest.mark.integration
def test_one_pool_serves_several_jobs_with_the_same_bytes(digits_bank, ray_session, tmp_path):
    """A run's SamplerPool renders vanilla, then DAP, then vanilla again on the same actors (the model is
    loaded once); each job's images are byte-identical to a pool started for that job alone, also after
    an actor is killed between jobs (restarted from its first job, it switches to the current one)."""
    import ray

    from dap_ray.sampling import SamplerPool

    bank, _, ds = digits_bank
    recipe = DAPGuidanceRecipe(bank.path, bank.spec, tuple(ds.classes), "2", "linear", 20.0, 0, "tokens")
    base = SamplerJob(model={"type": "dit", "path": None}, classes=tuple(ds.classes), out_dir="", seed=0,
                      steps=10, cfg_scale=2.0, eta=0.0, dtype="fp32", guidance=None)

    def job(name: str, guidance=None) -> SamplerJob:
        return SamplerJob(**{**base.__dict__, "out_dir": str(tmp_path / name), "guidance": guidance})

    items = work_items("x", 2, 4, 2)
    run_pool(job("ref_v"), items, num_actors=1, progress=False)
    run_pool(job("ref_d", recipe), items, num_actors=1, progress=False)
    with SamplerPool(num_actors=1) as pool:
        rows = pool.run(job("v"), items, progress=False)
        actors = list(pool.actors)
        pool.run(job("d", recipe), items, progress=False)
        assert pool.actors == actors and len(actors) == 1  # the same actor rendered both jobs
        ray.kill(actors[0], no_restart=False)  # restarted with its first job (vanilla) as constructor argument
        pool.run(job("d_after_kill", recipe), items, progress=False)
        pool.run(job("v_after_kill"), items, progress=False)
    assert pool.actors == []
    ref_v, ref_d = _digest(tmp_path / "ref_v"), _digest(tmp_path / "ref_d")
    assert len(ref_v) == 8 and ref_v != ref_d
    assert _digest(tmp_path / "v") == _digest(tmp_path / "v_after_kill") == ref_v
    assert _digest(tmp_path / "d") == _digest(tmp_path / "d_after_kill") == ref_d
    assert sorted((r["class"], r["index"]) for r in rows) == sorted((c.key, i) for c in ds.classes[:2] for i in range(4))


@pytest.mark.integration
def test_pool_shrinks_to_what_fits_and_names_missing_resources(tiny_dit_dir, ray_session, tmp_path):
    """A pool never waits on actors the cluster cannot place: 5 one-CPU actors on a 2-CPU Ray become 2
    (same bytes as 1 actor), and one-GPU actors on a cluster without GPUs are a UserError naming GPU."""
    from dap_ray.errors import UserError
    from dap_ray.sampling import SamplerPool

    cpus = int(ray_session.cluster_resources()["CPU"])
    items = work_items("vanilla", 2, 4, 1)  # 8 items: enough to want 5 actors
    run_pool(_job(tiny_dit_dir, tmp_path / "one"), items, num_actors=1, progress=False)
    with SamplerPool(num_actors=5, cpus_per_actor=1.0) as pool:
        pool.run(_job(tiny_dit_dir, tmp_path / "five"), items, progress=False)
        assert len(pool.actors) == min(5, cpus)
    assert _digest(tmp_path / "five") == _digest(tmp_path / "one")
    if not ray_session.cluster_resources().get("GPU"):
        with pytest.raises(UserError, match="GPU=1"), SamplerPool(num_actors=1, gpus_per_actor=1.0) as pool:
            pool.run(_job(tiny_dit_dir, tmp_path / "gpu"), items, progress=False)
