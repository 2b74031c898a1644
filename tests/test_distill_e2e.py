"""A reduced `python -m dap_ray.distill` as a subprocess, then `python -m dap_ray.evaluate` on its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from dap_ray.report import missing_links
from tests.conftest import REPO, read_tensorboard, small_overrides

pytestmark = pytest.mark.integration


def _run(module: str, args: list[str], cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    env |= {k: os.environ[k] for k in ("PYTHONPATH", "RAY_ADDRESS") if k in os.environ}  # a checkout beside the installed one
    return subprocess.run([sys.executable, "-m", module, *args, "runtime.num_cpus=2"], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def reduced_run(tiny_dit_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    out, cache = work / "run", work / "cache"
    args = small_overrides(tiny_dit_dir, out, cache, **{"eval.archs": "[convnet,resnetap10]", "eval.tsne": "true", "eval.metrics": "true",
                                                              "eval.teacher.arch": "convnet", "eval.teacher.epochs": "2",
                                                              "tracking.tensorboard": "true"})
    proc = _run("dap_ray.distill", args, work)  # cwd is not the repo: the entry point must still find its configs
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, proc, work


def test_distill_writes_results_report_and_plots(reduced_run):
    out, _, proc, _ = reduced_run
    res = json.loads((out / "results.json").read_text())
    cells = {(r["method"], r["arch"]) for r in res["rows"] if r["status"] == "ok"}
    assert cells == {(m, a) for m in ("random_real", "vanilla", "dap") for a in ("convnet", "resnetap10")}
    assert all(0.0 <= r["acc"] <= 1.0 for r in res["rows"])
    assert {"bank", "total"} <= set(res["timings_s"])
    assert res["bank"]["images_per_second"] > 0
    gs = res["guidance_strength"]  # mean |Δε|/|ε| of DAP's guided steps, per step
    assert set(gs) == {"dap"} and gs["dap"]["mean"] > 0 and gs["dap"]["images"] == 20 and gs["dap"]["per_step"]
    md = (out / "report.md").read_text()
    assert "| random_real |" in md and "| dap |" in md and "±" in md
    for name in ("accuracy", "curves", "pairs_vanilla_dap", "grid_random_real", "grid_vanilla", "grid_dap", "tsne"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name
        assert (out / "plots" / f"{name}.pdf").is_file(), name
    assert missing_links(md, str(out)) == [] and str(out) not in md
    assert "| method | convnet | resnetap10 |" in proc.stdout  # the table is printed
    assert (out / "config.yaml").is_file() and (out / "skipped.csv").is_file()
    events = read_tensorboard(out / "tensorboard")  # tracking.tensorboard=true: the same numbers for TensorBoard
    assert {f"accuracy/{m}/{a}" for m in ("random_real", "vanilla", "dap") for a in ("convnet", "resnetap10")} <= set(events)
    assert events["accuracy/dap/convnet"][0][1] == pytest.approx(res["summary"]["dap/convnet"]["mean"], abs=1e-3)
    assert events["guidance_strength/dap"] and "images/dap" in events


def test_every_method_has_ipc_images_and_a_manifest(reduced_run):
    out = reduced_run[0]
    for m in ("random_real", "vanilla", "dap"):
        pngs = sorted((out / m / "images").rglob("*.png"))
        assert len(pngs) == 2 * 10, m  # IPC 2 x 10 digit classes
        t = pq.read_table(out / m / "manifest.parquet")
        assert t.num_rows == 20
        assert set(t.column_names) >= {"class", "index", "seed", "method", "config_hash"}
        assert set(t.column("method").to_pylist()) == {m}


def test_rerun_reuses_everything(reduced_run, tiny_dit_dir):
    out, cache, _, work = reduced_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "plots" not in p.parts}
    evals = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*.json")}
    args = small_overrides(tiny_dit_dir, out, cache, **{"eval.archs": "[convnet,resnetap10]", "eval.tsne": "true", "eval.metrics": "true",
                                                              "eval.teacher.arch": "convnet", "eval.teacher.epochs": "2"})
    proc = _run("dap_ray.distill", args, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in evals} == evals
    res = json.loads((out / "results.json").read_text())
    assert res["bank"]["reused"] is True
    assert res["guidance_strength"]["dap"]["images"] == 20  # nothing rendered again: read back from dap/guidance_strength.json


def test_changed_config_refuses_existing_out_dir(reduced_run, tiny_dit_dir):
    out, cache, _, work = reduced_run
    proc = _run("dap_ray.distill", small_overrides(tiny_dit_dir, out, cache, **{"method.gamma": "7.5"}), work)
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_any_folder_with_subsampling(reduced_run, tiny_dit_dir):
    out, cache, _, work = reduced_run
    ev = work / "ev"
    proc = _run("dap_ray.evaluate", [f"data={out / 'random_real' / 'images'}", "name=rr", "subsample=[2,1]", f"out_dir={ev}",
                                     f"cache_dir={cache}", f"model.path={tiny_dit_dir}", "eval.epochs=2", "eval.seeds=[0]",
                                     "eval.archs=[convnet]", "eval.tsne=false", "eval.max_test=100", "eval.teacher.arch=convnet",
                                     "eval.teacher.epochs=2"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((ev / "results.json").read_text())
    assert {(r["method"], r["ipc"]) for r in res["rows"]} == {("rr@ipc2", 2), ("rr@ipc1", 1)}
    assert "IPC 2 and 1" in proc.stdout and "IPC 10" not in proc.stdout  # the IPCs evaluated, not the config's ipc
    assert res["metrics"]["methods"]["rr@ipc2"]["inv_d"] > 0
    assert (ev / "report.md").is_file() and (ev / "plots" / "accuracy.png").is_file()


def test_evaluate_missing_folder_is_exit_2(tmp_path):
    proc = _run("dap_ray.evaluate", [f"data={tmp_path / 'nope'}"], tmp_path)
    assert proc.returncode == 2 and "nope" in proc.stderr
    assert REPO.is_dir()
