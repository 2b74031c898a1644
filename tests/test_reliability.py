"""Reliability and safety (issue 12): worker and driver faults, bad input, safety checks.

Every row of docs/reliability.md points at a test here or in the files it names. Faults are real:
actor processes are killed (`ray.kill` or SIGKILL of the worker process), a training raises inside
its Ray task, the distill driver is SIGKILLed mid-run and re-run. Outputs are compared byte for byte
with an undisturbed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from dap_ray.data.types import ClassInfo
from dap_ray.sampling import SamplerJob, run_pool, work_items

CLASSES = tuple(ClassInfo(i, str(i), str(i)) for i in range(10))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every PNG under root (the bytes a user would get)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def _ray_worker_pids(class_name: str) -> list[int]:
    """Live worker processes of this test session's Ray whose title names `class_name`.

    The Ray of the ray_session fixture runs without a dashboard, so the state API
    (ray.util.state.list_actors) is not served; a worker's process title is `ray::<Class>[.method]`
    and every Ray process of this session descends from this pytest process.
    """
    pids = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
            if title.startswith("ray::") and class_name in title and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _wait_for(pred, timeout: float, every: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return None


def _sampler_job(model_dir: Path, out: Path, steps: int = 12) -> SamplerJob:
    return SamplerJob(model={"type": "dit", "path": str(model_dir)}, classes=CLASSES[:4], out_dir=str(out), seed=11,
                      steps=steps, cfg_scale=2.0, eta=0.0, dtype="fp32")


# ---------------------------------------------------------------------------------------------
# worker faults
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def undisturbed_samples(tiny_dit_dir, ray_session, tmp_path_factory):
    """4 classes x IPC 4 in items of 2, rendered by one actor that nobody disturbs."""
    out = tmp_path_factory.mktemp("undisturbed")
    items = work_items("vanilla", 4, 4, 2)
    rows = run_pool(_sampler_job(tiny_dit_dir, out), items, num_actors=1, progress=False)
    return out, items, rows


@pytest.mark.integration
@pytest.mark.parametrize("how", ["ray_kill", "sigkill"])
def test_sampler_actor_killed_mid_run(how, tiny_dit_dir, ray_session, undisturbed_samples, tmp_path, monkeypatch):
    """A sampler actor dies while the pool runs: the run completes with IPC images per class, no
    duplicates, and the same bytes as the undisturbed run (its item is redone with the same seeds)."""
    import ray
    import ray.util

    ref_dir, items, ref_rows = undisturbed_samples
    handles: list = []

    class RecordingPool(ray.util.ActorPool):  # keeps the actor handles run_pool creates (for ray.kill)
        def __init__(self, actors):
            handles.extend(actors)
            super().__init__(actors)

    monkeypatch.setattr(ray.util, "ActorPool", RecordingPool)
    out = tmp_path / "killed"
    killed: dict = {}

    def killer():
        first = _wait_for(lambda: list(out.rglob("*.png")), timeout=240)
        if not first:
            return
        killed["images_before"] = len(list(out.rglob("*.png")))
        if how == "ray_kill":
            ray.kill(handles[0], no_restart=False)  # restartable: max_restarts=-1 on the pool's actors
            killed["done"] = True
        else:  # the worker process dies as under the OOM killer
            pids = _ray_worker_pids("SamplerWorker")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed["pid"] = pids[0]
                killed["done"] = True

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    rows = run_pool(_sampler_job(tiny_dit_dir, out), items, num_actors=2, progress=False)
    th.join(timeout=30)
    assert killed.get("done"), "the actor was not killed during the run"
    assert killed["images_before"] < 16, "the kill came after the run had finished: nothing was tested"
    if "pid" in killed:
        assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    for c in CLASSES[:4]:
        names = sorted(p.name for p in (out / "images" / c.key).iterdir() if p.suffix == ".png")
        assert names == [f"{i:05d}.png" for i in range(4)], names
    keys = [(r["class"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 16
    assert sorted(keys) == sorted((r["class"], r["index"]) for r in ref_rows)
    assert _digest(out) == _digest(ref_dir)


@pytest.fixture(scope="module")
def bank_setup(tiny_dit_dir, cache_dir):
    from dap_ray.backbones import load_backbone, model_fingerprint
    from dap_ray.bank import BankSpec
    from dap_ray.data import resolve_dataset
    from dap_ray.sampling import schedule

    ds = resolve_dataset("digits", None, ["1", "4", "7"], cache_dir=str(cache_dir))  # ~430 real images
    model = {"type": "dit", "path": str(tiny_dit_dir), "name": "tiny"}
    bb = load_backbone(model)
    spec = BankSpec(model=model, model_fingerprint=model_fingerprint(model), layers=("1",), timesteps=tuple(schedule(bb, 8)),
                    pooling="tokens", seed=5, resolution=8, batch_size=8)
    return ds, spec


@pytest.mark.integration
def test_bank_actor_killed_mid_build(bank_setup, ray_session, tmp_path, monkeypatch):
    """A BankFeaturizer actor (Ray Data actor pool) is SIGKILLed mid-build: Ray restarts it, its
    batches are redone, and the bank equals an undisturbed build (statistics and Parquet rows)."""
    import dap_ray.bank as bank_mod
    from dap_ray.bank import build_bank

    monkeypatch.setattr(bank_mod, "SHARD_IMAGES", 32)  # commit often, so progress is visible on disk
    ds, spec = bank_setup
    clean = build_bank(spec, ds, str(tmp_path / "clean"), num_actors=1, progress=False)
    killed: dict = {}

    def killer():
        # wait until the build has streamed some features (a committed shard), then kill the actor
        if not _wait_for(lambda: list((tmp_path / "killed").rglob("part-*.done.json")), timeout=240):
            return
        pids = _ray_worker_pids("BankFeaturizer")
        if not pids:
            return
        killed["ids_before"] = sum(len(json.loads(m.read_text())["ids"]) for m in (tmp_path / "killed").rglob("part-*.done.json"))
        os.kill(pids[0], signal.SIGKILL)
        killed["pid"] = pids[0]

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    bank = build_bank(spec, ds, str(tmp_path / "killed"), num_actors=1, progress=False)
    th.join(timeout=30)
    assert "pid" in killed, "no BankFeaturizer actor was killed"
    assert killed["ids_before"] < len(ds.train), "the kill came after the build had finished: nothing was tested"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    np.testing.assert_array_equal(bank.stats.count, clean.stats.count)
    assert int(bank.stats.count.sum()) == len(ds.train)
    np.testing.assert_allclose(bank.stats.sum["1"], clean.stats.sum["1"], rtol=1e-9, atol=1e-9)
    a, b = clean.read_features("1"), bank.read_features("1")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()  # each (image, timestep) once, none lost
    np.testing.assert_array_equal(a.column("feature").combine_chunks().flatten().to_numpy(),
                                  b.column("feature").combine_chunks().flatten().to_numpy())
