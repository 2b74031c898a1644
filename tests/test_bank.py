"""The Ray Data feature bank against a plain torch loop; determinism; bad files; Parquet; cache; an
object store smaller than the chunks in flight."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray._private.internal_api import memory_summary

from dap_ray.backbones import load_backbone, model_fingerprint
from dap_ray.bank import BankSpec, build_bank, featurize, load_bank
from dap_ray.data import DatasetSplits, resolve_dataset
from dap_ray.ddim import schedule
from tests.conftest import save_tiny_dit, small_overrides

pytestmark = pytest.mark.integration


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes named like digits (the tiny DiT's class keys) x 7 good images, plus bad files."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("1", "4", "7"):
        d = root / c
        d.mkdir()
        for i in range(7):
            (d / f"img{i}.png").write_bytes(_png(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)))
    bad = root / "4"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image")
    good_jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(good_jpeg, format="JPEG")
    (bad / "trunc.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8), mode="L").save(root / "7" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (9, 9, 4), dtype=np.uint8), mode="RGBA").save(root / "7" / "rgba.png")
    Image.fromarray((rng.integers(0, 65535, (9, 9))).astype(np.uint16)).save(root / "1" / "deep16.png")
    return root


@pytest.fixture(scope="module")
def setup(folder, tiny_dit_dir):
    ds = resolve_dataset("imagefolder", str(folder), None, test_fraction=0.2, seed=0)
    model = {"type": "dit", "path": str(tiny_dit_dir), "name": "tiny"}
    bb = load_backbone(model)
    bb.bind_classes(ds.classes)
    spec = BankSpec(model=model, model_fingerprint=model_fingerprint(model), layers=("0", "2"),
                    timesteps=tuple(schedule(bb, 4)), pooling="tokens", seed=3, resolution=8, batch_size=4)
    return ds, bb, spec


def _plain_loop_stats(ds, bb, spec):
    """The reference: a single-process loop over the same images, no Ray."""
    from dap_ray.data import BadImageError, load_image

    sums = {layer: np.zeros((len(ds.classes), len(spec.timesteps), 256)) for layer in spec.layers}
    count = np.zeros(len(ds.classes), int)
    for r in ds.train:
        try:
            img = load_image(r.path, spec.resolution)
        except BadImageError:
            continue
        f = featurize(bb, spec, img[None], np.array([r.label]), [r.id])
        count[r.label] += 1
        for layer in spec.layers:
            sums[layer][r.label] += f[layer][0]
    return count, sums


def test_bank_equals_plain_loop(setup, ray_session, tmp_path):
    ds, bb, spec = setup
    bank = build_bank(spec, ds, str(tmp_path), num_actors=1, progress=False)
    count, sums = _plain_loop_stats(ds, bb, spec)
    np.testing.assert_array_equal(bank.count, count)
    for layer in spec.layers:
        # float32 features, float64 sums: per-image features agree to float32 rounding across batch sizes
        np.testing.assert_allclose(_sums(bank, layer), sums[layer], rtol=1e-5, atol=1e-5)
    st = bank.class_stats("0", 1, spec.timesteps[0])
    assert st["mean"].shape == (256,) and int(st["count"]) == count[1]


def _sums(bank, layer: str) -> np.ndarray:
    """(C, T, D) Σφ of every class, read back from the bank's per-class files."""
    return np.stack([bank.class_sums(layer, c.index)["sum"] for c in bank.classes])


def _stats_bytes(bank) -> dict[str, bytes]:
    """Every statistics and kept-feature file of a bank, relative path -> bytes."""
    from pathlib import Path

    root = Path(bank.path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.parts[-2] != "classes"
            and p.name not in ("meta.json", "spec.json")}


def test_one_and_two_actors_give_the_same_bytes_and_dap_images(setup, ray_session, tmp_path):
    """Ray Data does not keep batch order with several actors: the fixed chunks and the fold in chunk
    order make the statistics, and so the DAP images, the same bytes for 1 and 2 bank actors."""
    import torch

    from dap_ray.methods.dap import DAPGuidance
    from dap_ray.sampling import initial_noise, sample_latents

    ds, bb, spec = setup
    one = build_bank(spec, ds, str(tmp_path / "one"), num_actors=1, progress=False)
    two = build_bank(spec, ds, str(tmp_path / "two"), num_actors=2, progress=False)
    assert one.meta["num_actors"] == 1 and two.meta["num_actors"] == 2
    files = _stats_bytes(one)
    assert sum(k.startswith("stats/") for k in files) == len(spec.layers) * len(ds.classes)
    assert files == _stats_bytes(two)
    noise = torch.stack([initial_noise(bb.latent_shape, 0, "dap", i) for i in range(2)])
    y = torch.tensor([1, 2])
    lat = [sample_latents(bb, noise, y, 4, cfg_scale=2.0, guidance=DAPGuidance(b, "2", "linear", 5.0, 0, "tokens")) for b in (one, two)]
    images = [bb.tensor_to_images(bb.decode(x)) for x in lat]
    assert np.array_equal(images[0], images[1])
    vanilla = bb.tensor_to_images(bb.decode(sample_latents(bb, noise, y, 4, cfg_scale=2.0)))
    assert not np.array_equal(images[0], vanilla)  # the guidance acted: the equality above means something


def test_same_bank_for_actors_and_batch_sizes(setup, ray_session, tmp_path):
    ds, _, spec = setup
    a = build_bank(spec, ds, str(tmp_path / "a"), num_actors=1, progress=False)
    b = build_bank(BankSpec(**{**spec.__dict__, "batch_size": 3}), ds, str(tmp_path / "b"), num_actors=2, progress=False)
    assert a.path.rsplit("/", 1)[-1] == b.path.rsplit("/", 1)[-1]  # batch size is not part of the key
    np.testing.assert_array_equal(a.count, b.count)
    for layer in spec.layers:
        np.testing.assert_allclose(_sums(a, layer), _sums(b, layer), rtol=1e-6, atol=1e-6)
    fa = a.read_features("2")
    fb = b.read_features("2")
    assert fa.column("id").to_pylist() == fb.column("id").to_pylist()
    np.testing.assert_allclose(fa.column("feature").combine_chunks().flatten().to_numpy().astype(np.float32),
                               fb.column("feature").combine_chunks().flatten().to_numpy().astype(np.float32), rtol=2e-3, atol=2e-3)


def test_bad_files_are_skipped_and_listed(setup, ray_session, tmp_path):
    ds, _, spec = setup
    # every file in the training split, so each bad file really reaches the bank (a random split
    # could put one in the test split, where the bank never reads it)
    ds = DatasetSplits(ds.name, ds.root, list(ds.classes), sorted(ds.train + ds.test, key=lambda r: r.id), [])
    train_names = {r.path.rsplit("/", 1)[-1] for r in ds.train}
    assert {"zero.jpg", "text.jpg", "trunc.jpg"} <= train_names
    bank = build_bank(spec, ds, str(tmp_path), num_actors=1, progress=False)
    skipped = dict(bank.skipped)
    names = {p.rsplit("/", 1)[-1]: r for p, r in skipped.items()}
    for bad, reason in (("zero.jpg", "zero-byte"), ("text.jpg", "not an image"), ("trunc.jpg", "truncated")):
        assert names[bad].startswith(reason), names
    assert len(names) == 3
    for good in ("gray.png", "rgba.png", "deep16.png"):
        assert good not in names
    usable = sum(1 for r in ds.train if r.path.rsplit("/", 1)[-1] not in ("zero.jpg", "text.jpg", "trunc.jpg"))
    assert bank.count.sum() == usable == 21 + 3


def test_kept_features_are_parquet_and_bounded_per_class(setup, ray_session, tmp_path):
    """The first keep_per_class images of each class (by id) are kept, float16, as Parquet any pyarrow
    reads; class_features gives them as float32 at one timestep; no other per-image row is written."""
    ds, bb, spec = setup
    spec = BankSpec(**{**spec.__dict__, "keep_per_class": 2})
    bank = build_bank(spec, ds, str(tmp_path), num_actors=1, progress=False)
    files = sorted((tmp_path / "banks").rglob("layer=0/*.parquet"))
    assert len(files) == len(ds.classes)
    t = pq.read_table(files[0])
    assert set(t.column_names) >= {"id", "path", "label", "timestep", "layer", "feature"}
    arr = np.stack(t.column("feature").to_numpy(zero_copy_only=False))
    assert arr.shape == (t.num_rows, 256) and arr.dtype == np.float16
    assert set(t.column("timestep").to_pylist()) <= set(spec.timesteps)
    import pyarrow.compute as pc

    bad = {p for p, _ in bank.skipped}
    table = bank.read_features("0")
    for c in ds.classes:
        # the first 2 records by id; an unreadable one among them is not replaced by a later image
        first = [r.id for r in sorted((r for r in ds.train if r.label == c.index), key=lambda r: r.id)[:2] if r.path not in bad]
        rows = table.filter(pc.equal(table["label"], c.index))
        assert sorted(set(rows.column("id").to_pylist())) == first
        f = bank.class_features("0", c.index)  # the least noisy timestep
        assert f.shape == (len(first), 256) and str(f.dtype) == "torch.float32"
        recs = sorted((r for r in ds.train if r.id in first), key=lambda r: r.id)
        from dap_ray.data import load_image

        ref = featurize(bb, spec, np.stack([load_image(r.path, 8) for r in recs]), np.array([r.label for r in recs]), [r.id for r in recs])
        np.testing.assert_allclose(f.numpy(), ref["0"][:, spec.timesteps.index(min(spec.timesteps))], rtol=2e-3, atol=2e-3)
    assert bank.meta["images_per_second"] > 0
    assert 0 < bank.meta["first_batch_seconds"] <= bank.meta["build_seconds"]
    assert not list((tmp_path / "banks").rglob("chunks/*.safetensors"))  # partials are gone once folded


def test_cache_reuse_new_key_and_half_written(setup, ray_session, tmp_path):
    ds, _, spec = setup
    first = build_bank(spec, ds, str(tmp_path), num_actors=1, progress=False)
    again = build_bank(spec, ds, str(tmp_path), num_actors=1, progress=False)
    assert again.path == first.path and again.meta.get("reused") is True
    other = build_bank(BankSpec(**{**spec.__dict__, "seed": 4}), ds, str(tmp_path), num_actors=1, progress=False)
    assert other.path != first.path
    # a bank without its commit marker is never used: it is resumed/rebuilt instead
    import os

    os.remove(os.path.join(first.path, "_COMMIT"))
    assert load_bank(first.path, spec, ds.classes) is None
    rebuilt = build_bank(spec, ds, str(tmp_path), num_actors=1, progress=False)
    np.testing.assert_array_equal(rebuilt.count, first.count)
    assert _stats_bytes(rebuilt) == _stats_bytes(first)


def test_resume_after_partial_build(setup, ray_session, tmp_path, monkeypatch):
    """Classes committed before a crash are reused, and so are the chunk partials of the others; only
    the rest is featurised; the result equals a clean build byte for byte."""
    import dap_ray.bank as bank_mod

    ds, _, spec = setup
    spec = BankSpec(**{**spec.__dict__, "batch_size": 2})  # several chunks per class
    clean = build_bank(spec, ds, str(tmp_path / "clean"), num_actors=1, progress=False)
    crash_dir = tmp_path / "crash"
    calls = {"n": 0}
    real_write = bank_mod.write_bytes

    def crashing_write(fs, path, data):
        if "/classes/" in path:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated driver kill")
        return real_write(fs, path, data)

    monkeypatch.setattr(bank_mod, "write_bytes", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        build_bank(spec, ds, str(crash_dir), num_actors=1, progress=False)
    monkeypatch.setattr(bank_mod, "write_bytes", real_write)
    assert len(list(crash_dir.rglob("classes/*.json"))) == 1
    partials = list(crash_dir.rglob("chunks/*.safetensors"))
    assert partials  # the second class's chunks were done when the driver died
    resumed = build_bank(spec, ds, str(crash_dir), num_actors=1, progress=False)
    np.testing.assert_array_equal(resumed.count, clean.count)
    assert _stats_bytes(resumed) == _stats_bytes(clean)
    assert resumed.meta["images_featurised"] < clean.meta["images_featurised"] == len(ds.train)
    first = json.loads(next(crash_dir.rglob("classes/*.json")).read_text())
    done = {r.id for r in ds.train if r.label == 0}
    assert first["count"] == clean.count[0] and resumed.meta["images_featurised"] <= len(ds.train) - len(done)
    ids = resumed.read_features("0").column("id").to_pylist()
    per_image = {}
    for i in ids:
        per_image[i] = per_image.get(i, 0) + 1
    assert set(per_image.values()) == {len(spec.timesteps)}  # no duplicated rows


def test_model_pipeline_restarts_a_killed_actor_and_redoes_its_batch(folder, ray_session, tmp_path):
    """The actor pool's process dies in its first batch: Ray restarts the actor and redoes that batch
    (every image comes back exactly once, none from the dead process). And model_pipeline passes no
    `ray_remote_args` (Ray 2.60 warns that they are deprecated; 2.64 removes them)."""
    import os
    import warnings

    import dap_ray.bank as bank_mod
    from dap_ray.bank import model_pipeline

    class DieOnce:
        """Kills its own process on the first batch any actor of the pool gets (a marker file says so)."""

        def __init__(self, marker: str):
            self.marker = marker

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if not os.path.exists(self.marker):
                with open(self.marker, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)  # as under the OOM killer: no exception, the worker process is gone
            return {"id": batch["id"], "pid": np.full(len(batch["id"]), os.getpid())}

    ds = resolve_dataset("imagefolder", str(folder), None, test_fraction=0.2, seed=0)
    marker = tmp_path / "died"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = model_pipeline(ds.train, DieOnce, {"marker": str(marker)}, resolution=8, batch_size=4, num_actors=1,
                              gpus_per_actor=0.0, cpus_per_actor=1.0)
    ours = [f"{w.category.__name__}: {w.message}" for w in caught if w.filename == bank_mod.__file__]
    assert not ours, ours
    rows = pipe.dataset.take_all()
    assert marker.exists(), "no actor died: nothing was tested"
    assert sorted(str(r["id"]) for r in rows) == sorted(r.id for r in ds.train)
    assert int(marker.read_text()) not in {int(r["pid"]) for r in rows}


# ---------------------------------------------------------------------------------------------
# object-store pressure: the chunks in flight exceed a small object store
# ---------------------------------------------------------------------------------------------

STORE_BYTES = 80 * 2**20  # just above Ray's minimum object store (75 MiB)
PRESSURE_RES = 512  # 7 VAE blocks over an 8x8 latent: a decoded chunk of 64 images is 48 MiB of uint8


@pytest.fixture
def small_store_cluster():
    """A single-node Ray (2 CPUs) with an 80 MiB object store, started for a driver to attach to (a
    `ray.cluster_utils.Cluster` head, as `ray start --head --object-store-memory` would be)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, "object_store_memory": STORE_BYTES})
    yield c
    c.shutdown()


@pytest.mark.timeout(600)
def test_bank_larger_than_the_object_store_spills_and_equals_a_normal_build(small_store_cluster, ray_session, tmp_path):
    """Three chunks of 64 images at 512 px (48 MiB each decoded, 144 MiB in all) go through an 80 MiB
    object store: Ray spills what does not fit and restores it when the actor takes the chunk. The
    distill CLI's bank stage, attached to that Ray, completes and its statistics and kept features are
    the bytes of the same bank built on the session's Ray with a normal object store."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("0", "1"):  # decoded (upscaled) to 512 px: small files, large chunks in the object store
        (root / c).mkdir(parents=True)
        for i in range(100):
            (root / c / f"{i:03d}.png").write_bytes(_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    model_dir = save_tiny_dit(tmp_path / "dit512", vae=True, vae_channels=(1,) * 7, class_names=[str(i) for i in range(10)])
    cache = tmp_path / "cache"
    ov = small_overrides(model_dir, tmp_path / "run", cache, **{
        "stages": "[bank]", "dataset": "imagefolder", "dataset.root": str(root), "dataset.test_fraction": "0.04",
        "bank.batch_size": "64", "sampler.steps": "2", "runtime.bank_actors": "1"})
    env = {**os.environ, "RAY_ADDRESS": small_store_cluster.address, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "dap_ray.distill", *ov], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    stats = memory_summary(small_store_cluster.address, stats_only=True)  # what `ray memory --stats-only` prints: spill counters
    print(stats)

    (commit,) = cache.glob("banks/*/_COMMIT")
    path = commit.parent
    spec_doc = json.loads((path / "spec.json").read_text())
    spec = BankSpec(**{**spec_doc, "layers": tuple(spec_doc["layers"]), "timesteps": tuple(spec_doc["timesteps"])})
    assert spec.resolution == PRESSURE_RES
    ds = resolve_dataset("imagefolder", str(root), None, test_fraction=0.04, seed=0)
    produced = len(ds.train) * PRESSURE_RES**2 * 3  # decoded uint8 images that passed through the object store
    assert produced > 1.5 * STORE_BYTES, produced
    spilled = re.search(r"Spilled (\d+) MiB, (\d+) objects", stats)
    assert spilled and int(spilled.group(1)) > 0, stats  # Ray had to write chunks to disk, and did
    pressured = load_bank(str(path), spec, ds.classes)
    assert pressured is not None and int(pressured.count.sum()) == len(ds.train) == 192

    normal = build_bank(spec, ds, str(tmp_path / "normal"), num_actors=1, progress=False)
    assert normal.path.rsplit("/", 1)[-1] == path.name  # the same key: same spec, same dataset files
    np.testing.assert_array_equal(normal.count, pressured.count)
    files = _stats_bytes(normal)
    assert sum(k.startswith("stats/") for k in files) == len(spec.layers) * 2
    assert files == _stats_bytes(pressured)
