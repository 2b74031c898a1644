"""Reliability and safety (issue 12): worker and driver faults, bad input, safety checks.

Every row of docs/reliability.md points at a test here or in the files it names. Faults are real:
actor processes are killed (`ray.kill` or SIGKILL of the worker process), a training raises inside
its Ray task, the distill driver is SIGKILLed mid-run and re-run. Outputs are compared byte for byte
with an undisturbed run.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from dap_ray.data.types import ClassInfo
from dap_ray.sampling import SamplerJob, SamplerPool, existing_indices, run_pool, work_items
from tests.conftest import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    REFERENCE_IPC,
    REPO,
    clean_env,
    finish_run,
    reference_cmd,
    save_tiny_dit,
    start_logged,
)

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


def _sampler_job(model_dir: Path, out: Path, steps: int = 8) -> SamplerJob:
    return SamplerJob(model={"type": "dit", "path": str(model_dir)}, classes=CLASSES[:4], out_dir=str(out), seed=11,
                      steps=steps, cfg_scale=2.0, eta=0.0, dtype="fp32")


# ---------------------------------------------------------------------------------------------
# worker faults
# ---------------------------------------------------------------------------------------------


# Images per class of the sampler-fault tests: 24 items of 2 images. An item of the tiny DiT (8 steps)
# renders in ~15 ms on a quiet machine, so a run of 8 items could end before a killer polling every
# 50 ms saw its first image; 24 give the kill time to land mid-run.
FAULT_IPC = 12


@pytest.fixture(scope="module")
def undisturbed_samples(tiny_dit_dir, ray_session, tmp_path_factory):
    """4 classes x FAULT_IPC in items of 2, rendered by one actor that nobody disturbs."""
    out = tmp_path_factory.mktemp("undisturbed")
    items = work_items("vanilla", 4, FAULT_IPC, 2)
    rows = run_pool(_sampler_job(tiny_dit_dir, out), items, num_actors=1, progress=False)
    return out, items, rows


@pytest.mark.integration
@pytest.mark.parametrize("how", ["ray_kill", "sigkill"])
def test_sampler_actor_killed_mid_run(how, tiny_dit_dir, ray_session, undisturbed_samples, tmp_path):
    """A sampler actor dies while the pool runs: the run completes with IPC images per class, no
    duplicates, and the same bytes as the undisturbed run (its item is redone with the same seeds)."""
    import ray

    ref_dir, items, ref_rows = undisturbed_samples
    pool = SamplerPool(num_actors=2)  # its `actors` are the handles to kill
    out = tmp_path / "killed"
    killed: dict = {}

    def killer():
        first = _wait_for(lambda: list(out.rglob("*.png")), timeout=240)
        if not first:
            return
        killed["images_before"] = len(list(out.rglob("*.png")))
        if how == "ray_kill":
            ray.kill(pool.actors[0], no_restart=False)  # as Ray kills an actor; the pool redoes its item elsewhere
            killed["done"] = True
        else:  # the worker process dies as under the OOM killer
            pids = _ray_worker_pids("SamplerWorker")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed["pid"] = pids[0]
                killed["done"] = True

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    with pool:
        rows = pool.run(_sampler_job(tiny_dit_dir, out), items, progress=False)
    th.join(timeout=30)
    assert killed.get("done"), "the actor was not killed during the run"
    assert killed["images_before"] < 4 * FAULT_IPC, "the kill came after the run had finished: nothing was tested"
    assert pool.replaced >= 1, "the pool never saw an actor die: the kill came after its last item"
    if "pid" in killed:
        assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    for c in CLASSES[:4]:
        names = sorted(p.name for p in (out / "images" / c.key).iterdir() if p.suffix == ".png")
        assert names == [f"{i:05d}.png" for i in range(FAULT_IPC)], names
    keys = [(r["class"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * FAULT_IPC
    assert sorted(keys) == sorted((r["class"], r["index"]) for r in ref_rows)
    assert _digest(out) == _digest(ref_dir)


@pytest.fixture(scope="module")
def bank_setup(tiny_dit_dir, cache_dir):
    from dap_ray.backbones import load_backbone, model_fingerprint
    from dap_ray.bank import BankSpec
    from dap_ray.data import resolve_dataset
    from dap_ray.sampling import schedule

    ds = resolve_dataset("digits", None, ["1", "4"], cache_dir=str(cache_dir))  # ~290 real images
    model = {"type": "dit", "path": str(tiny_dit_dir), "name": "tiny"}
    bb = load_backbone(model)
    spec = BankSpec(model=model, model_fingerprint=model_fingerprint(model), layers=("1",), timesteps=tuple(schedule(bb, 4)),
                    pooling="tokens", seed=5, resolution=8, batch_size=8)
    return ds, spec


@pytest.mark.integration
def test_bank_actor_killed_mid_build(bank_setup, ray_session, tmp_path, monkeypatch):
    """A BankFeaturizer actor (Ray Data actor pool) is SIGKILLed mid-build: Ray restarts it, its
    chunks are redone, and the bank equals an undisturbed build byte for byte (statistics and kept rows)."""
    from dap_ray.bank import BankSpec, build_bank

    ds, spec = bank_setup
    spec = BankSpec(**{**spec.__dict__, "batch_size": 4})  # many chunks, so the kill lands mid-build
    clean = build_bank(spec, ds, str(tmp_path / "clean"), num_actors=1, progress=False)
    killed: dict = {}

    def killer():
        # wait until the actor has written some partial sums (a chunk file), then kill it
        if not _wait_for(lambda: list((tmp_path / "killed").rglob("chunks/*.safetensors")), timeout=240):
            return
        pids = _ray_worker_pids("BankFeaturizer")
        if not pids:
            return
        killed["classes_before"] = len(list((tmp_path / "killed").rglob("classes/*.json")))
        os.kill(pids[0], signal.SIGKILL)
        killed["pid"] = pids[0]

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    bank = build_bank(spec, ds, str(tmp_path / "killed"), num_actors=1, progress=False)
    th.join(timeout=30)
    assert "pid" in killed, "no BankFeaturizer actor was killed"
    assert killed["classes_before"] < len(ds.classes), "the kill came after the build had finished: nothing was tested"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    np.testing.assert_array_equal(bank.count, clean.count)
    assert int(bank.count.sum()) == len(ds.train)
    for c in ds.classes:
        for kind in ("sum", "sum_sq"):
            np.testing.assert_array_equal(bank.class_sums("1", c.index)[kind], clean.class_sums("1", c.index)[kind])
    a, b = clean.read_features("1"), bank.read_features("1")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()  # each kept (image, timestep) once, none lost
    np.testing.assert_array_equal(a.column("feature").combine_chunks().flatten().to_numpy(),
                                  b.column("feature").combine_chunks().flatten().to_numpy())


def _flaky_train_factory(marker_dir: str):
    """A stand-in for dap_ray.eval.run._train_one that fails inside the Ray task, per seed:
    0 trains, 1 raises on its first attempt only, 2 always raises, 3 kills its worker process."""
    from dap_ray.eval import run as run_mod

    real = run_mod._train_one

    def flaky(spec, *args):
        import os as _os

        seed = spec["seed"]
        attempt = len([f for f in _os.listdir(marker_dir) if f.startswith(f"seed{seed}-")])
        open(_os.path.join(marker_dir, f"seed{seed}-{attempt}"), "w").close()  # count attempts across processes
        if seed == 1 and attempt == 0:
            raise ValueError("transient failure on the first attempt")
        if seed == 2:
            raise RuntimeError("boom: this training always fails")
        if seed == 3:
            _os._exit(1)  # the worker process dies (as under the OOM killer)
        return real(spec, *args)

    return flaky


@pytest.mark.integration
def test_failed_evaluation_is_retried_or_reported(ray_session, cache_dir, tmp_path, monkeypatch):
    """A training that fails inside its Ray task is retried (runtime.eval_retries); one that still
    fails is a `failed` row with its error in results.json and in the report table, never dropped;
    failures are not cached, so a re-run retries exactly them."""
    from dap_ray.cli import compose
    from dap_ray.config import to_structured
    from dap_ray.data import resolve_dataset
    from dap_ray.eval import run as run_mod
    from dap_ray.report import write_report

    cfg = to_structured(compose("distill", [f"out_dir={tmp_path}", f"cache_dir={cache_dir}", "eval.epochs=1", "eval.seeds=[0,1,2,3]",
                                            "eval.archs=[convnet]", "eval.max_test=20", "runtime.eval_retries=1", "dataset.classes=[0,1]"]))
    ds = resolve_dataset("digits", None, ["0", "1"], cache_dir=str(cache_dir))
    sets = {"few": [r for r in ds.train if r.label == 0][:2] + [r for r in ds.train if r.label == 1][:2]}
    markers = tmp_path / "attempts"
    markers.mkdir()
    monkeypatch.setattr(run_mod, "_train_one", _flaky_train_factory(str(markers)))
    rows = run_mod.evaluate_sets(cfg, ds, sets, str(tmp_path / "eval"), str(cache_dir), progress=False)

    by_seed = {r["seed"]: r for r in rows}
    assert sorted(by_seed) == [0, 1, 2, 3] and len(rows) == 4  # nothing dropped
    assert by_seed[0]["status"] == "ok" and by_seed[1]["status"] == "ok"
    assert len(list(markers.glob("seed1-*"))) == 2  # retried once, then succeeded
    assert by_seed[2]["status"] == "failed" and by_seed[2]["acc"] is None
    assert by_seed[2]["error"] == "RuntimeError: boom: this training always fails"  # the task's own error, one line
    assert len(list(markers.glob("seed2-*"))) == 2  # 1 + eval_retries attempts
    assert by_seed[3]["status"] == "failed" and by_seed[3]["error"].startswith("WorkerCrashedError")
    assert sorted(p.name.rsplit("__", 1)[0] for p in (tmp_path / "eval").glob("*.json")) == ["few__convnet__0", "few__convnet__1"]

    table = write_report(cfg, str(tmp_path), {"rows": rows, "classes": list(ds.classes)})
    assert "(2 failed)" in table  # the cell says how many seeds failed
    md = (tmp_path / "report.md").read_text()
    assert "## Failed trainings" in md and "few/convnet/seed 2" in md and "boom" in md and "few/convnet/seed 3" in md
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in res["rows"]] == ["ok", "ok", "failed", "failed"]
    assert res["summary"]["few/convnet"]["failed"] == 2

    # a re-run (the fault gone) reuses the finished trainings and redoes only the failed ones
    monkeypatch.undo()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval").glob("*.json")}
    rows2 = run_mod.evaluate_sets(cfg, ds, sets, str(tmp_path / "eval"), str(cache_dir), progress=False)
    assert [r["status"] for r in rows2] == ["ok"] * 4
    assert {n: (tmp_path / "eval" / n).stat().st_mtime_ns for n in kept} == kept
    assert [r["acc"] for r in rows2[:2]] == [by_seed[0]["acc"], by_seed[1]["acc"]]


# ---------------------------------------------------------------------------------------------
# half-written files are never taken as finished
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_only_whole_pngs_count_as_finished(tmp_path):
    """Temp files, truncated and zero-byte PNGs under a final name and non-index names do not count."""
    d = tmp_path / "images" / "3"
    d.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    (d / "00000.png").write_bytes(png)
    (d / "00001.png.tmp-123").write_bytes(png)  # a writer killed before its rename
    (d / "00002.png").write_bytes(png[: len(png) // 2])  # truncated under its final name
    (d / "00003.png").write_bytes(b"")  # zero bytes
    (d / "00004.png").write_bytes(png[:-1])  # one byte short
    (d / "notes.png").write_bytes(png)  # not an index
    assert existing_indices(str(tmp_path), "3") == {0}
    assert existing_indices(str(tmp_path), "missing") == set()


@pytest.mark.integration
def test_sampler_regenerates_half_written_images(tiny_dit_dir, ray_session, undisturbed_samples, tmp_path):
    """A run dir with a truncated PNG, a zero-byte PNG, a leftover temp file and a missing image:
    the pool redoes exactly those, rewrites nothing else, and ends byte-identical to a clean run."""
    ref_dir, items, _ = undisturbed_samples
    out = tmp_path / "resume"
    shutil.copytree(ref_dir, out)
    cls = out / "images" / "2"
    (cls / "00001.png").write_bytes((cls / "00001.png").read_bytes()[:40])
    (cls / "00002.png").write_bytes(b"")
    (cls / "00003.png").rename(cls / "00003.png.tmp-999")
    (out / "images" / "0" / "00000.png").unlink()
    bad = {cls / "00001.png", cls / "00002.png", out / "images" / "0" / "00000.png"}
    untouched = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png") if p not in bad}
    rows = run_pool(_sampler_job(tiny_dit_dir, out), items, num_actors=1, progress=False)
    assert _digest(out) == _digest(ref_dir)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in untouched} == untouched
    assert len(rows) == 4 * FAULT_IPC and len({(r["class"], r["index"]) for r in rows}) == 4 * FAULT_IPC


# ---------------------------------------------------------------------------------------------
# bad input: exit status 2 and one clear line, or skipped and reported; nothing produced is lost
# ---------------------------------------------------------------------------------------------


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`python -m dap_ray.distill argv` in this process: exit status and the stderr lines."""
    from dap_ray.distill import main

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def _assert_one_line_error(rc: int, lines: list[str], *needles: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines  # one clear line, no traceback
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _assert_final_error(rc: int, lines: list[str], *needles: str) -> None:
    """A user error found after work began: progress/log lines may precede it, but it ends the
    output as one `error:` line and there is no traceback."""
    assert rc == 2, lines
    assert not any("Traceback" in ln for ln in lines), lines
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert errors == [lines[-1]], lines
    for n in needles:
        assert n in errors[0], (n, errors[0])


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# Every range check of dap_ray.config.validate (no model needed): overrides -> the key the error names.
RANGE_CASES = [
    (["ipc=0"], "ipc"),
    (["methods=[]"], "methods"),
    (["methods=[dap,nope]"], "methods"),
    (["stages=[bank,paint]"], "stages"),
    (["dataset.name=cifar"], "dataset.name"),
    (["dataset=imagefolder", "dataset.root=null"], "dataset.root"),
    (["dataset.test_fraction=1.0"], "dataset.test_fraction"),
    (["model.type=gan"], "model.type"),
    (["model.resolution=4"], "model.resolution"),
    (["model.latent_scale=0"], "model.latent_scale"),
    (["model.cfg_scale=0.5"], "model.cfg_scale"),
    (["model.gamma_range=[20,1]"], "model.gamma_range"),
    (["model.gamma_grid=[]"], "model.gamma_grid"),
    (["model.tune_layers=[]"], "model.tune_layers"),
    (["method.gamma=-1"], "method.gamma"),
    (["method.t_stop=-1"], "method.t_stop"),
    (["method.kernel=cosine"], "method.kernel"),
    (["method.pooling=max"], "method.pooling"),
    (["method.sigma=0"], "method.sigma"),
    (["method.d3hr_groups=0"], "method.d3hr_groups"),
    (["method.d3hr_inversion_steps=0"], "method.d3hr_inversion_steps"),
    (["method.d3hr_stats=[]"], "method.d3hr_stats"),
    (["method.d3hr_stats=[mean,median]"], "method.d3hr_stats"),
    (["method.d3hr_invert_t=-1"], "method.d3hr_invert_t"),
    (["method.d3hr_inversion_cfg=0.5"], "method.d3hr_inversion_cfg"),
    (["method.diver_source=diver"], "method.diver_source"),
    (["method.diver_start_t=-1"], "method.diver_start_t"),
    (["method.diver_fusion_t=-1"], "method.diver_fusion_t"),
    (["method.diver_gamma=-0.5"], "method.diver_gamma"),
    (["sampler.steps=0"], "sampler.steps"),
    (["sampler.steps=1001"], "sampler.steps"),
    (["sampler.eta=1.5"], "sampler.eta"),
    (["sampler.cfg_scale=0.5"], "sampler.cfg_scale"),
    (["sampler.batch_size=0"], "sampler.batch_size"),
    (["sampler.dtype=fp8"], "sampler.dtype"),
    (["bank.batch_size=0"], "bank.batch_size"),
    (["bank.keep_per_class=-1"], "bank.keep_per_class"),
    (["bank.max_per_class=100"], "bank.max_per_class"),  # renamed: the message names its successor
    (["eval.protocol=zero_shot"], "eval.protocol"),
    (["eval.seeds=[]"], "eval.seeds"),
    (["eval.resolution=4"], "eval.resolution"),
    (["eval.recipe=magic"], "eval.recipe"),
    (["eval.epochs=0"], "eval.epochs"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.lr=0"], "eval.lr"),
    (["eval.augment=spin+flip"], "eval.augment"),
    (["eval.eval_every=0"], "eval.eval_every"),
    (["eval.teacher.epochs=0"], "eval.teacher.epochs"),
    (["eval.teacher.library=keras"], "eval.teacher.library"),
    (["eval.test_resize=0.5"], "eval.test_resize"),
    (["eval.temperature=0"], "eval.temperature"),
    (["eval.max_test=0"], "eval.max_test"),
    (["eval.archs=[convnet,vgg99]"], "eval.archs"),
    (["eval.teacher.arch=vgg99"], "eval.teacher.arch"),
    (["runtime.num_cpus=0"], "runtime.num_cpus"),
    (["runtime.sampler_actors=0"], "runtime.sampler_actors"),
    (["runtime.bank_actors=0"], "runtime.bank_actors"),
    (["runtime.gpus_per_actor=-1"], "runtime.gpus_per_actor"),
    (["runtime.gpus_per_eval=-1"], "runtime.gpus_per_eval"),
    (["runtime.cpus_per_actor=0"], "runtime.cpus_per_actor"),
    (["runtime.cpus_per_eval=0"], "runtime.cpus_per_eval"),
    (["runtime.eval_retries=-1"], "runtime.eval_retries"),
    (["runtime.wait_for_nodes_s=-1"], "runtime.wait_for_nodes_s"),
    (["runtime.placement_timeout_s=0"], "runtime.placement_timeout_s"),
]

# The checks that need the loaded model (validate_against_backbone); the tiny DiT has blocks 0..2, T = 1000.
BACKBONE_CASES = [
    (["method.layer=7"], "method.layer"),
    (["bank.layers=[1,9]"], "bank.layers"),
    (["method.t_stop=1001"], "method.t_stop"),
    (["method.d3hr_invert_t=5000"], "method.d3hr_invert_t"),
    (["method.diver_start_t=1001"], "method.diver_start_t"),
    (["method.diver_fusion_t=2000"], "method.diver_fusion_t"),
]


def _validated_keys(func_name: str) -> set[str]:
    """The key names of every _check/_choice call in dap_ray/config.py's `func_name` (from its source)."""
    tree = ast.parse((REPO / "dap_ray" / "config.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func_name)
    keys = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_check", "_choice"):
            arg = node.args[1] if node.func.id == "_check" else node.args[0]
            if isinstance(arg, ast.Constant):
                keys.add(arg.value)
            elif isinstance(arg, ast.JoinedStr):  # f"method.{key}" over a literal tuple of names
                loops = [n for n in ast.walk(fn) if isinstance(n, ast.For) and isinstance(n.iter, ast.Tuple)]
                prefix = "".join(v.value for v in arg.values if isinstance(v, ast.Constant))
                keys |= {prefix + e.value for lp in loops for e in lp.iter.elts if isinstance(e, ast.Constant)}
    return keys


@pytest.mark.unit
def test_every_range_check_has_a_case():
    """New checks in validate()/validate_against_backbone() must get a row in RANGE_CASES/BACKBONE_CASES."""
    assert _validated_keys("validate") <= {k for _, k in RANGE_CASES}, _validated_keys("validate") - {k for _, k in RANGE_CASES}
    assert _validated_keys("validate_against_backbone") <= {k for _, k in BACKBONE_CASES}


@pytest.mark.unit
@pytest.mark.parametrize("override,key", RANGE_CASES + BACKBONE_CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_out_of_range_config_value_exit_2_names_the_key(override, key, tiny_dit_dir, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, lines = _cli([f"model.path={tiny_dit_dir}", f"out_dir={out}", f"cache_dir={cache_dir}", "stages=[sample]", *override], capsys)
    _assert_one_line_error(rc, lines, key + "=")
    assert not out.exists()  # refused before anything is written


def _model_variant(base: Path, dst: Path, how: str) -> Path:
    """A copy of a tiny DiT model directory broken in one way."""
    shutil.copytree(base, dst)
    tr = dst / "transformer"
    if how == "pickle_only":
        for f in tr.glob("*.safetensors"):
            f.unlink()
        (tr / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    elif how == "no_weights":
        for f in tr.glob("*.safetensors"):
            f.unlink()
    elif how == "no_config":
        (tr / "config.json").unlink()
    elif how == "no_scheduler":
        shutil.rmtree(dst / "scheduler")
    elif how == "truncated_weights":
        f = next(tr.glob("*.safetensors"))
        f.write_bytes(f.read_bytes()[:300])
    elif how == "config_has_more_blocks":  # weights for 3 blocks, config says 5: diffusers would leave 2 random
        cfg = json.loads((tr / "config.json").read_text())
        cfg["num_layers"] = 5
        (tr / "config.json").write_text(json.dumps(cfg))
    elif how == "broken_scheduler_json":
        (dst / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": ')
    elif how == "broken_classes_json":
        (dst / "classes.json").write_text("[0, 1")
    elif how == "vae_wrong_latent_channels":  # a 1-channel DiT given a VAE with 4 latent channels
        shutil.copytree(save_tiny_dit(dst.parent / f"{dst.name}_src", in_channels=4, vae=True) / "vae", dst / "vae")
    elif how == "vae_config_mismatch":  # a VAE whose config.json does not describe its weights
        shutil.copytree(save_tiny_dit(dst.parent / f"{dst.name}_src", in_channels=1, vae=True) / "vae", dst / "vae")
        cfg = json.loads((dst / "vae" / "config.json").read_text())
        cfg["block_out_channels"] = [8, 32]
        (dst / "vae" / "config.json").write_text(json.dumps(cfg))
    return dst


MODEL_FAULTS = {
    "missing_dir": "does not exist",
    "pickle_only": "arbitrary code",
    "no_weights": "no weights",
    "no_config": "missing config.json",
    "no_scheduler": "scheduler",
    "truncated_weights": "could not load",
    "config_has_more_blocks": "do not match its config.json",
    "broken_scheduler_json": "not a valid JSON file",
    "broken_classes_json": "not a valid JSON file",
    "vae_wrong_latent_channels": "latent channels",
    "vae_config_mismatch": "could not load the vae",
}


@pytest.mark.unit
@pytest.mark.parametrize("how", sorted(MODEL_FAULTS))
def test_bad_model_directory_exit_2(how, tiny_dit_dir, cache_dir, tmp_path, capsys):
    model = tmp_path / "nowhere" if how == "missing_dir" else _model_variant(tiny_dit_dir, tmp_path / "model", how)
    out = tmp_path / "run"
    rc, lines = _cli([f"model.path={model}", f"out_dir={out}", f"cache_dir={cache_dir}", "stages=[sample]"], capsys)
    _assert_one_line_error(rc, lines, MODEL_FAULTS[how])
    assert not out.exists()


def _folder(root: Path, spec: dict[str, list[bytes]]) -> Path:
    for cls, files in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(files):
            (root / cls / f"img{i}.png").write_bytes(data)
    return root


@pytest.mark.unit
@pytest.mark.parametrize("case", ["empty_class_folder", "unknown_wnid", "unknown_digit_class", "escaping_class", "escaping_digit_class",
                                  "absolute_class"])
def test_bad_dataset_input_exit_2(case, tiny_dit_dir, cache_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = [_png_bytes(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)) for _ in range(3)]
    root = _folder(tmp_path / "data", {"0": good, "1": good})
    (tmp_path / "data" / "2").mkdir()  # a class folder without images
    (tmp_path / "data" / "2" / "readme.txt").write_text("no images here")
    out = tmp_path / "run"
    ov, needle = {
        "empty_class_folder": (["dataset=imagefolder", f"dataset.root={root}"], "class '2' has no image files"),
        "unknown_wnid": (["dataset=imagefolder", f"dataset.root={root}", "dataset.classes=[n99999999]"], "n99999999"),
        "unknown_digit_class": (["dataset.classes=[3,11]"], "11"),
        "escaping_class": (["dataset=imagefolder", f"dataset.root={root}", "dataset.classes=[0,../1]"], "'../1' is not allowed"),
        "escaping_digit_class": (["dataset.classes=[..]"], "'..' is not allowed"),
        "absolute_class": (["dataset=imagefolder", f"dataset.root={root}", "dataset.classes=[/etc]"], "'/etc' is not allowed"),
    }[case]
    rc, lines = _cli([f"model.path={tiny_dit_dir}", f"out_dir={out}", f"cache_dir={cache_dir}", "stages=[sample]", *ov], capsys)
    _assert_one_line_error(rc, lines, needle)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written anywhere else either


def _jpeg(w: int, h: int, color=(30, 140, 220)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.integration
def test_large_and_unreadable_images_in_a_run(tiny_dit_dir, ray_session, tmp_path, capsys):
    """A 6000x4000 JPEG is used like any image; unreadable files are skipped and listed in
    skipped.csv with their reason; a class whose every file is unreadable is exit 2 naming it."""
    from dap_ray.data import read_skipped_csv

    rng = np.random.default_rng(1)
    small = [_png_bytes(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(3)]
    root = _folder(tmp_path / "data", {"0": small, "1": small})
    (root / "0" / "huge.jpg").write_bytes(_jpeg(6000, 4000))
    (root / "1" / "zero.png").write_bytes(b"")
    (root / "1" / "cut.png").write_bytes(small[0][:40])
    cache, out = tmp_path / "cache", tmp_path / "run"
    base = [f"model.path={tiny_dit_dir}", f"cache_dir={cache}", "dataset=imagefolder", f"dataset.root={root}", "dataset.test_fraction=0.25",
            "methods=[random_real,dap]", "stages=[bank,sample]", "ipc=1", "sampler.steps=3", "bank.batch_size=4"]
    rc, lines = _cli(base + [f"out_dir={out}"], capsys)
    assert rc == 0, lines
    skipped = dict(read_skipped_csv(str(out / "skipped.csv")))
    names = {Path(p).name: why for p, why in skipped.items()}
    assert set(names) <= {"zero.png", "cut.png"} and names, names  # whichever of them the split put in train
    assert all(why.startswith(("zero-byte", "truncated", "not an image")) for why in names.values()), names
    assert "huge.jpg" not in names
    res = json.loads(next(cache.glob("banks/*/meta.json")).read_text())
    from dap_ray.data import resolve_dataset

    train = resolve_dataset("imagefolder", str(root), None, test_fraction=0.25).train
    assert res["images"] == len(train) - len(names)  # every readable image, the huge one included
    assert any(r.path.endswith("huge.jpg") for r in train)
    assert len(list((out / "dap" / "images").rglob("*.png"))) == 2

    # a class with no readable image at all: exit 2 naming the class and why, nothing produced lost
    for f in (root / "1").iterdir():
        f.write_bytes(b"not an image")
    before = _digest(out)
    rc, lines = _cli(base + [f"out_dir={tmp_path / 'run2'}"], capsys)
    _assert_final_error(rc, lines, "class(es) 1 have no usable image", "not an image")
    assert _digest(out) == before


@pytest.mark.integration
def test_random_real_passes_over_and_reports_an_unreadable_pick(tiny_dit_dir, ray_session, tmp_path, capsys, caplog):
    """random_real alone (no bank): a drawn training file that cannot be decoded is passed over, the
    next draw of its class takes its place, and the file is listed in skipped.csv with its reason.
    A resumed run (one image deleted) lists it again and refills the index with the same image."""
    from dap_ray.data import load_image, read_skipped_csv

    rng = np.random.default_rng(4)
    root = tmp_path / "data"
    for cls in ("0", "1"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            (root / "train" / cls / f"img{i}.png").write_bytes(_png_bytes(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)))
    base = [f"model.path={tiny_dit_dir}", f"cache_dir={tmp_path / 'cache'}", "dataset=imagefolder", f"dataset.root={root}",
            "methods=[random_real]", "stages=[sample]", "ipc=2"]
    rc, lines = _cli(base + [f"out_dir={tmp_path / 'clean'}"], capsys)
    assert rc == 0, lines
    clean = _digest(tmp_path / "clean" / "random_real" / "images")
    assert len(clean) == 4 and read_skipped_csv(str(tmp_path / "clean" / "skipped.csv")) == []

    # the file class 0's first draw landed on becomes unreadable
    first_img = np.asarray(Image.open(tmp_path / "clean" / "random_real" / "images" / "0" / "00000.png").convert("RGB"))
    (first,) = [p for p in sorted((root / "train" / "0").iterdir()) if np.array_equal(load_image(str(p), 8), first_img)]
    first.write_bytes(b"this is not an image")
    out = tmp_path / "run"
    rc, lines = _cli(base + [f"out_dir={out}"], capsys)
    assert rc == 0, lines
    assert "random_real: 1 unreadable input file(s) skipped; listed in" in caplog.text
    skipped = read_skipped_csv(str(out / "skipped.csv"))
    assert [Path(p) for p, _ in skipped] == [first] and skipped[0][1].startswith("not an image"), skipped
    got = _digest(out / "random_real" / "images")
    assert len(got) == 4 and got["0/00000.png"] == clean["0/00001.png"]  # the next draw moved up
    assert got["0/00001.png"] not in (got["0/00000.png"], clean["0/00000.png"])  # another image, not a duplicate
    assert {k: v for k, v in got.items() if k.startswith("1/")} == {k: v for k, v in clean.items() if k.startswith("1/")}

    (out / "random_real" / "images" / "0" / "00001.png").unlink()  # a run killed before its last image
    rc, lines = _cli(base + [f"out_dir={out}"], capsys)
    assert rc == 0, lines
    assert read_skipped_csv(str(out / "skipped.csv")) == skipped
    assert _digest(out / "random_real" / "images") == got  # refilled with the same image, not a duplicate


@pytest.mark.integration
def test_changed_config_on_existing_out_dir_is_refused_before_any_work(tiny_dit_dir, ray_session, tmp_path, capsys):
    """Another config pointed at an existing out_dir: exit 2 naming the folder, before the bank is
    built, and the run's images and config.yaml are left as they were."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    base = [f"model.path={tiny_dit_dir}", f"out_dir={out}", f"cache_dir={cache}", "dataset.classes=[0,1]", "stages=[sample]",
            "methods=[random_real]"]
    rc, lines = _cli(base + ["ipc=2"], capsys)
    assert rc == 0, lines
    config_before = (out / "config.yaml").read_bytes()
    images_before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    assert len(images_before) == 4
    rc, lines = _cli([*base[:-2], "stages=[bank,sample]", "methods=[random_real,dap]", "ipc=3"], capsys)
    _assert_one_line_error(rc, lines, f"{out}/random_real holds images made with a different config", "another out_dir")
    assert (out / "config.yaml").read_bytes() == config_before
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")} == images_before
    assert not (cache / "banks").exists()  # refused before the (possibly hours-long) bank build


# ---------------------------------------------------------------------------------------------
# driver faults: SIGKILL of `python -m dap_ray.distill`, then the same command again
# ---------------------------------------------------------------------------------------------

def _run_until(cmd, env, cwd, log: Path, done, what: str) -> None:
    """Start the command, SIGKILL it as soon as done() is true; fail if it ends first."""
    proc = start_logged(cmd, env, cwd, log)
    try:
        while proc.poll() is None and not done():
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before {what}: {log.read_text()[-2000:]}"
    finally:
        finish_run(proc, kill=proc.poll() is None)


def _snapshot(*roots: Path, pattern: str = "*") -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for r in roots for p in r.rglob(pattern) if p.is_file()}


def _results(out: Path) -> dict[tuple, tuple]:
    res = json.loads((out / "results.json").read_text())
    return {(r["method"], r["arch"], r["seed"]): (r["status"], r["acc"]) for r in res["rows"]}


@pytest.mark.integration
@pytest.mark.slow
def test_driver_sigkill_then_rerun_resumes_and_matches(reference_run, tiny_dit_dir, tmp_path):
    """SIGKILL the driver mid-bank, then mid-sampling, then mid-evaluation; re-run the same command:
    every committed bank shard (class files, chunk files) is reused, finished images, the bank and
    finished evaluations are reused untouched (same inode and mtime); a truncated PNG under its final
    name is regenerated, a temp file is ignored, an unparsable evaluation JSON is redone; the end
    result equals the undisturbed run byte for byte."""
    import tempfile

    from dap_ray.bank import partial_from_bytes

    ref_out, ref_cache = reference_run[0], reference_run[1]
    out, cache = tmp_path / "run", tmp_path / "cache"
    ray_tmp = tempfile.mkdtemp(prefix="dk", dir="/tmp")
    try:
        cmd, env, log = reference_cmd(tiny_dit_dir, out, cache), clean_env(tmp_path, ray_tmp), tmp_path / "log.txt"

        # 0. killed mid-bank: as soon as the first chunk is featurised (the bank takes seconds after that)
        _run_until(cmd, env, tmp_path, log, lambda: list(cache.glob("banks/*/chunks/c*.safetensors")), "the first bank chunk")
        (bank_dir,) = [p for p in (cache / "banks").iterdir() if p.is_dir()]
        assert not (bank_dir / "_COMMIT").exists(), "the bank was finished before the driver was killed"
        # the classes committed before the kill (their marker is written last): marker, statistics, kept features
        final = {int(p.stem[1:]): json.loads(p.read_text())["count"] for p in (bank_dir / "classes").glob("c*.json")}
        committed = {p: v for p, v in _snapshot(bank_dir / "classes", bank_dir / "stats", bank_dir / "features").items()
                     if int(p.stem[1:]) in final}
        chunks = {p.name: partial_from_bytes(p.read_bytes())["count"] for p in (bank_dir / "chunks").glob("c*.safetensors")}
        assert chunks or final
        n_log = len(log.read_text().splitlines())

        # 1. re-run, killed while sampling `vanilla` (bank committed, random_real done)
        _run_until(cmd, env, tmp_path, log, lambda: list((out / "vanilla" / "images").rglob("*.png")), "vanilla sampling")
        assert list(cache.rglob("banks/*/_COMMIT")) and len(list((out / "random_real" / "images").rglob("*.png"))) == 2 * REFERENCE_IPC
        said = "\n".join(log.read_text().splitlines()[n_log:])
        assert f"({len(final)} classes final, {len(chunks)} chunk(s) on disk," in said, said[-3000:]  # every shard found
        assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in committed} == committed  # reused, not rewritten
        meta = json.loads((bank_dir / "meta.json").read_text())
        # featurised again: only what was neither in a final class nor in a chunk on disk (nothing twice)
        assert meta["images_featurised"] == meta["images"] - sum(final.values()) - sum(
            n for counts in chunks.values() for c, n in counts.items() if c not in final), (meta, final, chunks)
        # the resumed bank holds the undisturbed run's statistics, byte for byte
        (ref_bank,) = [p for p in (ref_cache / "banks").iterdir() if p.is_dir()]

        def stats(bank: Path) -> dict:
            return {p.relative_to(bank).as_posix(): p.read_bytes() for d in ("classes", "stats") for p in (bank / d).rglob("*") if p.is_file()}

        assert stats(bank_dir) == stats(ref_bank)
        cut = out / "random_real" / "images" / "0" / "00000.png"
        cut.write_bytes(cut.read_bytes()[:30])  # truncated under its final name (a writer that was not atomic)
        tmp_file = out / "vanilla" / "images" / "1" / "00001.png.tmp-123"
        tmp_file.parent.mkdir(parents=True, exist_ok=True)
        tmp_file.write_bytes(ref_out.joinpath("vanilla/images/1/00001.png").read_bytes()[:50])  # a killed writer's temp file
        kept = {p: v for p, v in _snapshot(out, pattern="*.png").items() if p != cut}
        kept.update(_snapshot(cache / "banks"))

        # 2. re-run, killed once the first evaluation result is written
        _run_until(cmd, env, tmp_path, log, lambda: list((out / "eval").glob("*.json")), "the first evaluation result")
        assert _digest(out / "random_real") == _digest(ref_out / "random_real")  # the truncated image was redone
        kept.update(_snapshot(out, pattern="*.png"))
        kept.update(_snapshot(out / "eval"))
        names = sorted(p.name for p in (ref_out / "eval").glob("*.json"))  # <set>__<arch>__<seed>__<key>.json: same config, same keys
        assert len(names) == 6
        half = next(out / "eval" / n for n in names if not (out / "eval" / n).exists())
        half.write_text('{"method": "dap", "arch": "convnet", "status": "ok", "acc": 0.9')  # unparsable: never trusted

        # 3. the same command again runs to the end
        rc = finish_run(start_logged(cmd, env, tmp_path, log), kill=False)
        assert rc == 0, log.read_text()[-3000:]
        assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept  # reused, not rewritten
        for m in ("random_real", "vanilla", "dap"):
            assert _digest(out / m / "images") == _digest(ref_out / m / "images"), m
            for c in ("0", "1"):
                assert sorted(p.name for p in (out / m / "images" / c).glob("*.png")) == [f"{i:05d}.png" for i in range(REFERENCE_IPC)]
            import pyarrow.parquet as pq

            assert pq.read_table(out / m / "manifest.parquet").to_pylist() == pq.read_table(ref_out / m / "manifest.parquet").to_pylist()
        assert _results(out) == _results(ref_out)
        assert all(status == "ok" for status, _ in _results(out).values()) and len(_results(out)) == 6
        assert json.loads(half.read_text())["acc"] == _results(ref_out)[(half.name.split("__")[0], "convnet", int(half.name.split("__")[2]))][1]
        assert json.loads((out / "results.json").read_text())["bank"]["reused"] is True
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# safety
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_credentials_never_reach_outputs_or_logs(reference_run):
    """Fake AWS keys in the driver's environment appear in no file of the run directory, the cache,
    Ray's session logs, or the console output."""
    out, cache, work, ray_tmp = reference_run
    files = [p for root in (out, cache, ray_tmp) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.name == "results.json" for p in files) and any(p.suffix == ".log" for p in files)
    for secret in (FAKE_SECRET, FAKE_KEY_ID):
        leaks = [str(p) for p in files + [work / "log.txt"] if secret.encode() in p.read_bytes()]
        assert not leaks, leaks
    cfg = (out / "config.yaml").read_text()
    assert "AWS" not in cfg and "secret" not in cfg.lower()


def _python_files() -> list[Path]:
    roots = [REPO / "dap_ray", REPO / "benchmarks", REPO / "jobs"]
    return sorted(p for r in roots if r.is_dir() for p in r.rglob("*.py"))


@pytest.mark.unit
def test_no_unsafe_deserialisation_in_the_code_base():
    """Weights load from safetensors or torch.load(weights_only=True); nothing unpickles files."""
    unsafe_calls = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"),
                    ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("yaml", "unsafe_load"),
                    ("marshal", "loads"), ("shelve", "open")}
    problems = []
    files = _python_files()
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(m.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal") for m in mods):
                    problems.append(f"{path}:{node.lineno} imports a pickle module")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if (owner, node.func.attr) in unsafe_calls:
                problems.append(f"{where} {owner}.{node.func.attr}")
            if owner == "torch" and node.func.attr == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where} torch.load without weights_only=True")
            if owner in ("np", "numpy") and node.func.attr == "load":
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(f"{where} np.load(allow_pickle=True)")
            if owner == "yaml" and node.func.attr == "load":
                loader = kw.get("Loader")
                if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                    problems.append(f"{where} yaml.load without SafeLoader")
            # diffusers/transformers loaders must be told safetensors; our own backbones' from_pretrained
            # go through dap_ray.backbones (check_safetensors), the tokenizer has no weights
            if node.func.attr == "from_pretrained" and owner not in ("CLIPTokenizer", "DiTBackbone", "SDBackbone"):
                st = kw.get("use_safetensors")
                if not (isinstance(st, ast.Constant) and st.value is True):
                    problems.append(f"{where} {owner}.from_pretrained without use_safetensors=True")
    assert not problems, "\n".join(problems)
    # and the regex view, for calls written in ways the AST check does not see (aliases, getattr)
    text = "\n".join(p.read_text() for p in files)
    assert not re.search(r"\bpickle\.loads?\(|\bread_pickle\(|allow_pickle\s*=\s*True", text)


@pytest.mark.integration
def test_local_ray_starts_no_dashboard_and_no_network_dashboard(tmp_path):
    """init_ray's private local Ray: no dashboard (nothing served on 8265, no web UI URL); the
    ray.init arguments say so explicitly."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="dd", dir="/tmp")
    script = (
        "import json, psutil, ray\n"
        "import dap_ray.runtime as rt\n"
        "seen = {}\n"
        "real_init = ray.init\n"
        "def spy(*a, **kw):\n"
        "    seen.update(kw)\n"
        "    return real_init(*a, **kw)\n"
        "ray.init = spy\n"
        "info = rt.init_ray(None)\n"
        "node = ray._private.worker.global_worker.node\n"
        "listen = []\n"
        "for p in psutil.Process().children(recursive=True):\n"
        "    try:\n"
        "        listen += [[' '.join(p.cmdline())[:40], c.laddr.ip, c.laddr.port] for c in p.net_connections('tcp') if c.status == 'LISTEN']\n"
        "    except psutil.Error:\n"
        "        pass\n"
        "print('RESULT', json.dumps({'mode': info['mode'], 'webui': node.address_info.get('webui_url'), 'kwargs': {k: str(v) for k, v in seen.items()},"
        " 'listen': listen}))\n"
        "ray.shutdown()\n"
    )
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                              start_new_session=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(line[len("RESULT "):])
    assert res["mode"] == "local" and res["kwargs"]["address"] == "local"
    assert res["kwargs"]["include_dashboard"] == "False"
    assert not res["webui"], res["webui"]  # no dashboard: no web UI / job API on any interface
    assert not [x for x in res["listen"] if x[2] == 8265], res["listen"]
    assert res["kwargs"].get("dashboard_host", "127.0.0.1") == "127.0.0.1"
