"""python -m dap_ray.tune: the search space and its checks, a 4-trial digits sweep end to end, and a
sweep whose driver is SIGKILLed after its first trial, then resumed with tune.resume=true.

The integration sweeps use the tiny random DiT on 4 digit classes with 5 DDIM steps and a few training
epochs: accuracies are meaningless, the plumbing (bank once, trials, reports, ASHA, restore, outputs)
is what is tested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from dap_ray.cli import compose
from dap_ray.config import DistillConfig, TuneConfig, to_structured, validate
from dap_ray.errors import ConfigError
from dap_ray.tune.best import format_override
from dap_ray.tune.results import axis_labels
from dap_ray.tune.space import Dim, flatten_space, parse_dim, validate_tune
from dap_ray.tune.sweep import main
from dap_ray.tune.trial import split_validation
from tests.conftest import read_tensorboard

REPO = Path(__file__).resolve().parent.parent


def sweep_overrides(model_dir: Path, out_dir: Path, cache: Path, **extra: str) -> list[str]:
    """The quick sweep (2 x 2 grid of gamma x t_stop, layer drawn per trial) shrunk for 2 busy cores."""
    ov = {
        "model.path": str(model_dir), "out_dir": str(out_dir), "cache_dir": str(cache), "dataset.classes": '["0","1","2","3"]',
        "sampler.steps": "5", "sampler.batch_size": "2", "tune.epochs": "6", "tune.eval_every": "2", "tune.grace_period": "4",
        "tune.val_per_class": "10", "tune.test_seeds": "[0]", "eval.max_test": "80",
    }
    ov.update(extra)
    return ["tune=quick"] + [f"{k}={v}" for k, v in ov.items()]


def structured(overrides: list[str]):
    cfg = to_structured(compose("tune", overrides), TuneConfig)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# unit: config, space, overrides
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("option", ["default", "grid", "quick"])
def test_shipped_tune_configs_compose_and_validate(option):
    cfg = structured([f"tune={option}"])
    dims = validate_tune(cfg)
    keys = {d.key for d in dims}
    assert {"method.gamma", "method.layer", "method.t_stop"} <= keys
    if option == "default":  # gamma's range follows the backbone's model.gamma_range
        gamma = next(d for d in dims if d.key == "method.gamma")
        assert (gamma.type, gamma.low, gamma.high) == ("loguniform", *map(float, cfg.model.gamma_range))


@pytest.mark.unit
def test_flat_and_nested_space_are_the_same():
    nested = {"method": {"gamma": {"type": "grid", "values": [1, 2]}, "layer": {"type": "choice", "values": ["1"]}}}
    flat = {"method.gamma": {"type": "grid", "values": [1, 2]}, "method.layer": {"type": "choice", "values": ["1"]}}
    assert flatten_space(nested) == flatten_space(flat) == {"method.gamma": {"type": "grid", "values": [1, 2]},
                                                            "method.layer": {"type": "choice", "values": ["1"]}}
    with pytest.raises(ConfigError, match="tune.space.method.gamma"):
        flatten_space({"method": {"gamma": 3}})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "spec", "searcher", "match"),
    [
        ("method.gama", {"type": "grid", "values": [1]}, "random", r"tune.space.method.gama=.*valid keys of method: .*gamma"),
        ("model.path", {"type": "grid", "values": ["a"]}, "random", "not sweepable"),
        ("sampler.cfg_scales", {"type": "grid", "values": [1]}, "random", r"unknown key.*valid keys of sampler: .*cfg_scale"),
        ("method.gamma", {"type": "normal", "low": 1, "high": 2}, "random", r"type='normal'.*loguniform"),
        ("method.gamma", {"type": "loguniform", "low": 0, "high": 2}, "random", r"low=0.*log scale"),
        ("method.gamma", {"type": "uniform", "low": 3, "high": 2}, "random", "low < high"),
        ("method.gamma", {"type": "uniform", "low": 1, "high": 2}, "grid", "when tune.searcher=grid"),
        ("method.gamma", {"type": "grid", "values": []}, "random", "non-empty list"),
        ("method.gamma", {"type": "uniform", "low": 1, "high": 2, "values": [1]}, "random", "fields of a uniform"),
        ("method.t_stop", {"type": "uniform", "low": 0, "high": 500}, "random", "is an integer"),
        ("bank.seed", {"type": "randint", "low": 0, "high": 5}, "random", "changes the feature bank"),
        ("sampler.steps", {"type": "randint", "low": 10, "high": 50}, "random", "changes the feature bank"),
        ("method.gamma", {"type": "quniform", "low": 1, "high": 2}, "random", "quantisation"),
    ],
)
def test_bad_space_entries_name_key_value_and_allowed(key, spec, searcher, match):
    with pytest.raises(ConfigError, match=match):
        parse_dim(key, spec, searcher)


@pytest.mark.unit
def test_space_types_map_to_ray_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    assert parse_dim("method.gamma", {"type": "grid", "values": [1, 5]}, "random").to_ray("random") == {"grid_search": [1, 5]}
    # searcher=grid: choice is a grid too; a model-based searcher cannot take grid_search
    assert parse_dim("method.layer", {"type": "choice", "values": ["1", "2"]}, "grid").to_ray("grid") == {"grid_search": ["1", "2"]}
    assert isinstance(parse_dim("method.gamma", {"type": "grid", "values": [1, 5]}, "random").to_ray("optuna"), Categorical)
    g = parse_dim("method.gamma", {"type": "loguniform", "low": 0.5, "high": 20}, "random").to_ray("random")
    assert isinstance(g, Float) and (g.lower, g.upper) == (0.5, 20.0)
    t = parse_dim("method.t_stop", {"type": "randint", "low": 0, "high": 800}, "random").to_ray("random")
    assert isinstance(t, Integer) and (t.lower, t.upper) == (0, 801)  # our bounds are inclusive, Ray's upper is not


@pytest.mark.unit
def test_axis_bins_continuous_values_and_keeps_discrete_ones():
    gamma = Dim("method.gamma", "loguniform", 1.0, 100.0)
    labels, order = axis_labels([1.0, 1.5, 9.0, 11.0, 99.0, 50.0], gamma, bins=2)
    assert order == ["1–10", "10–100"] and labels == ["1–10", "1–10", "1–10", "10–100", "10–100", "10–100"]
    t_stop = Dim("method.t_stop", "grid", values=(600, 0))
    assert axis_labels([600, 0, 600], t_stop) == (["600", "0", "600"], ["0", "600"])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "value"),
    [("method.gamma", 3.2145678901234), ("method.layer", "2"), ("method.t_stop", 0), ("model.path", "/tmp/a-b/c_d.x"),
     ("dataset.classes", ["n01440764", "n02102040"]), ("sampler.cfg_scale", 1.0), ("bank.keep_per_class", 3),
     ("method.kernel", "rbf"), ("dataset.root", "s3://bucket/image,woof"), ("dataset.classes", ["0", "1"]), ("model.name", "true")],
)
def test_override_lines_round_trip_through_distill(key, value):
    line = format_override(key, value)
    cfg = to_structured(compose("distill", [line]), DistillConfig)
    got = OmegaConf.to_container(cfg, resolve=True)
    for part in key.split("."):
        got = got[part]
    assert got == value and type(got) is type(value)
    assert format_override("model.prompt_template", "a photo of a {name}") is None  # spaces: left to the yaml


@pytest.mark.unit
def test_validation_split_is_held_out_of_the_bank_and_deterministic(cache_dir):
    from dap_ray.data import resolve_dataset

    full = resolve_dataset("digits", None, ["0", "1"], cache_dir=str(cache_dir))
    bank_ds, val = split_validation(full, 7, seed=0)
    again, val2 = split_validation(full, 7, seed=0)
    _, other = split_validation(full, 7, seed=1)
    assert [r.id for r in val] == [r.id for r in val2] and {r.id for r in val} != {r.id for r in other}
    assert sorted(r.label for r in val) == [0] * 7 + [1] * 7
    assert not {r.id for r in val} & {r.id for r in bank_ds.train}
    assert len(bank_ds.train) + len(val) == len(full.train) and bank_ds.test == full.test
    with pytest.raises(ConfigError, match="tune.val_per_class"):
        split_validation(full, 10_000, seed=0)


@pytest.mark.unit
def test_cli_user_errors_exit_2_before_any_work(tiny_dit_dir, tmp_path, cache_dir, capsys):
    base = sweep_overrides(tiny_dit_dir, tmp_path / "run", cache_dir)
    assert main(base + ["tune.searcher=bayes"]) == 2
    assert "tune.searcher='bayes'" in capsys.readouterr().err
    # layer "7" does not exist in the 3-block model: caught on the driver, before Ray or any bank
    assert main(base + ['tune.space.method.layer.values=["1","7"]']) == 2
    err = capsys.readouterr().err
    assert "tune.space.method.layer='7'" in err and "one of 0, 1, 2" in err
    assert main(base + ["tune.space.method.t_stop.values=[0,5000]"]) == 2
    assert "tune.space.method.t_stop=5000" in capsys.readouterr().err
    assert main(base + ["tune.archs=[convnet,resnet99]"]) == 2
    err = capsys.readouterr().err
    assert "tune.archs='resnet99'" in err and "resnetap10" in err
    assert main(base + ["tune.archs=[convnet,convnet]"]) == 2
    assert "distinct net names" in capsys.readouterr().err
    assert main(base + ["tune.arch=convnet"]) == 2  # the old single-net key: an unknown key that names the valid ones
    assert "archs" in capsys.readouterr().err
    assert not (tmp_path / "run" / "ray_results").exists()


@pytest.mark.integration
def test_a_net_trained_in_its_actor_reports_what_it_reports_alone(ray_session):
    """A multi-net trial trains each net in a NetTrainer actor: the checks it hands over are those of
    the same training in-process (same seed, same bytes), one at a time, then None."""
    import numpy as np
    import ray
    from sklearn.datasets import load_digits

    from dap_ray.eval.run import train_config
    from dap_ray.tune.trial import NetTrainer, train_reporting

    d = load_digits()
    img = np.repeat((d.images[:, :, :, None] * 255 / 16).astype(np.uint8), 3, axis=3)  # (N, 8, 8, 3)
    x, y, xv, yv = img[:40], d.target[:40].astype(np.int64), img[100:160], d.target[100:160].astype(np.int64)
    cfg = structured(["tune=quick"])
    tc = train_config(cfg, 4, 10, "convnet").with_(epochs=4, eval_every=2, eval_after=0.0, num_classes=10)
    alone: list[tuple[int, float]] = []
    train_reporting(x, y, xv, yv, "convnet", tc, 3, "cpu", lambda e, a: alone.append((e, a)))
    net = ray.remote(NetTrainer).options(num_cpus=0.25).remote(x, y, xv, yv, "convnet", tc, 3, 1, False)
    got = [ray.get(net.next_check.remote(), timeout=120) for _ in range(len(alone) + 1)]
    ray.kill(net)
    assert [e for e, _ in alone] == [2, 4]
    assert got == [*alone, None]


# ---------------------------------------------------------------------------------------------
# integration: real Ray Tune sweeps
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_quick_sweep_end_to_end(tiny_dit_dir, tmp_path, cache_dir, ray_session, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    out = tmp_path / "sweep"
    t0 = time.time()
    # two nets per trial (each an actor in the trial's placement group): 0.5 + 2 x 0.25 CPU, two trials at once;
    # tracking.mlflow: Ray Tune's MLflowLoggerCallback logs each trial as its own MLflow run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise (see test_report)
    mlflow_uri = f"file://{tmp_path}/mlruns"
    nets = {"tune.archs": "[convnet,resnetap10]", "tune.cpus_per_trial": "0.5", "tune.cpus_per_net": "0.25",
            "tracking.mlflow": mlflow_uri, "tracking.mlflow_experiment": "sweep"}
    assert main(sweep_overrides(tiny_dit_dir, out, cache_dir, **nets)) == 0
    printed = capsys.readouterr().out
    assert "test accuracy of the best configuration" in printed and "mean over 2 nets: convnet" in printed

    # the results table: every trial, both formats, knobs as columns, several reports each
    df = pd.read_csv(out / "results.csv", dtype={"method.layer": str, "trial_id": str})
    pq = pd.read_parquet(out / "results.parquet")
    assert len(df) == len(pq) == 4
    assert set(zip(df["method.gamma"], df["method.t_stop"])) == {(2.0, 0), (2.0, 600), (10.0, 0), (10.0, 600)}
    assert set(df["method.layer"]) <= {"1", "2"}
    assert set(df["status"]) <= {"completed", "stopped"}, df[["status", "error"]]
    assert df["val_acc_best"].between(0, 1).all() and (df["val_acc_best"] >= df["val_acc"]).all()
    # each net's own column; the objective is their mean at each check, so its best is at most the mean of their bests
    per_net = df[["val_acc_best/convnet", "val_acc_best/resnetap10"]]
    assert per_net.notna().all().all() and (df["val_acc_best"] <= per_net.mean(axis=1) + 1e-9).all()
    assert (df["reports"] >= 2).all()  # intermediate results: every eval_every epochs, ASHA's grace is 2 reports
    assert (df.loc[df["status"] == "completed", "epochs"] == 6).all()
    assert list(df["val_acc_best"]) == sorted(df["val_acc_best"], reverse=True)
    client = MlflowClient(mlflow_uri)
    mlflow_runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    runs = {(float(r.data.params["method.gamma"]), int(r.data.params["method.t_stop"]), str(r.data.params["method.layer"])): r
            for r in mlflow_runs}
    assert len(mlflow_runs) == len(runs) == 4  # one run per trial
    for tid in df["trial_id"]:  # Tune's own record of each trial holds the same intermediate reports
        progress = pd.read_csv(out / "ray_results" / "sweep" / f"trial_{tid}" / "progress.csv")
        assert len(progress) == int(df.loc[df["trial_id"] == tid, "reports"].iloc[0]) >= 2
        assert list(progress["epoch"]) == list(range(2, 2 * len(progress) + 1, 2))
        assert progress["val_acc"].to_numpy() == pytest.approx(progress[["val_acc/convnet", "val_acc/resnetap10"]].mean(axis=1).to_numpy())
        # TensorBoard: Ray Tune's logger writes every report of the trial (the mean and each net)
        events = read_tensorboard(out / "ray_results" / "sweep" / f"trial_{tid}")
        for key in ("val_acc", "val_acc/convnet", "val_acc/resnetap10"):
            tag = next(t for t in events if t.endswith(f"tune/{key}"))
            assert [v for _, v in events[tag]] == pytest.approx(list(progress[key]))
        # MLflow: the trial's run has its knobs as params and every report as the metric's history; a net's
        # report is val_acc.<arch> there (MLflow's file store cannot hold val_acc and val_acc/<arch> side by side)
        row = df.loc[df["trial_id"] == tid].iloc[0]
        run = runs[(float(row["method.gamma"]), int(row["method.t_stop"]), str(row["method.layer"]))]
        assert run.info.status == "FINISHED"
        for key, column in (("val_acc", "val_acc"), ("val_acc.convnet", "val_acc/convnet"), ("val_acc.resnetap10", "val_acc/resnetap10")):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert [v for _, v in hist] == pytest.approx(list(progress[column]))

    # the bank was built once on the driver, before any trial started, and never rebuilt
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["keys"] == ["method.gamma", "method.t_stop", "method.layer"]
    starts = [json.loads(p.read_text())["started"] for p in (out / "trials").glob("*/attempt-*.json")]
    assert len(starts) == 4
    from dap_ray.data import resolve_dataset

    bank_ds, _ = split_validation(resolve_dataset("digits", None, ["0", "1", "2", "3"], cache_dir=str(cache_dir)), 10, seed=0)
    banks = [p.parent for p in (cache_dir / "banks").glob("*/_COMMIT")
             if json.loads((p.parent / "meta.json").read_text())["images"] == len(bank_ds.train)]
    assert len(banks) == 1 and (banks[0] / "_COMMIT").stat().st_mtime < min(starts)
    assert json.loads((banks[0] / "meta.json").read_text())["layers"] == ["1", "2"]
    # each trial's images live in its own folder
    for tid in df["trial_id"]:
        assert len(list((out / "trials" / tid / "dap" / "images").glob("*/*.png"))) == 4 * 2

    # plots
    for name in ("heatmap_gamma_t_stop", "acc_by_layer", "acc_by_gamma", "acc_by_t_stop"):
        with Image.open(out / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
        assert (out / "plots" / f"{name}.pdf").read_bytes().startswith(b"%PDF")  # the vector copy beside it

    # the best configuration: an override file distill accepts, the yaml, and one test-split result
    best = df.iloc[0]
    lines = (out / "best_overrides.txt").read_text().split()
    assert lines[-3:] == [f"method.gamma={float(best['method.gamma'])!r}", f"method.t_stop={int(best['method.t_stop'])}",
                          f"method.layer='{best['method.layer']}'"]  # quoted: a layer name stays a string
    assert f"model.path={tiny_dit_dir}" in lines and "sampler.steps=5" in lines
    dcfg = to_structured(compose("distill", lines), DistillConfig)
    validate(dcfg)
    assert (dcfg.method.gamma, dcfg.method.t_stop, dcfg.method.layer) == (best["method.gamma"], best["method.t_stop"], best["method.layer"])
    assert dcfg.model.path == str(tiny_dit_dir) and dcfg.sampler.steps == 5 and list(dcfg.dataset.classes) == ["0", "1", "2", "3"]
    doc = OmegaConf.load(out / "best_config.yaml")
    assert doc.trial_id == best["trial_id"] and doc.val_acc_best == pytest.approx(best["val_acc_best"])
    assert len(doc.test.accs) == 1 and 0 <= doc.test.acc_mean <= 100 and doc.test.failed == 0
    per_arch = doc.test.per_arch
    assert doc.test.acc_mean == pytest.approx((per_arch.convnet.acc_mean + per_arch.resnetap10.acc_mean) / 2, abs=0.02)
    for arch in ("convnet", "resnetap10"):
        test_rows = list((out / "best_test" / best["trial_id"]).glob(f"dap__{arch}__0__*.json"))
        assert len(test_rows) == 1 and json.loads(test_rows[0].read_text())["n_train"] == 8

    # running the same sweep again is refused (it would overwrite); resume is the way to continue it
    assert main(sweep_overrides(tiny_dit_dir, out, cache_dir, **nets)) == 2
    assert "tune.resume=true" in capsys.readouterr().err
    # and resuming it with another budget, space or nets is refused too: it would mix incomparable trials
    assert main(sweep_overrides(tiny_dit_dir, out, cache_dir, **{**nets, "tune.resume": "true", "tune.epochs": "8"})) == 2
    assert "started with other settings" in capsys.readouterr().err
    assert main(sweep_overrides(tiny_dit_dir, out, cache_dir, **{"tune.resume": "true"})) == 2
    assert "started with other settings" in capsys.readouterr().err
    print(f"quick sweep: {time.time() - t0:.0f}s")


@pytest.mark.integration
def test_killed_sweep_resumes_without_redoing_finished_trials(tiny_dit_dir, tmp_path, cache_dir, ray_session):
    out = tmp_path / "sweep"
    # one trial at a time, every trial runs all its epochs (FIFO): the kill lands between trials
    ov = sweep_overrides(tiny_dit_dir, out, cache_dir, **{"tune.max_concurrent": "1", "tune.scheduler": "fifo", "tune.epochs": "40",
                                                           "tune.eval_every": "10", "tune.test_best": "false", "runtime.num_cpus": "2",
                                                           "runtime.address": "local"})  # a private Ray, whatever runs beside
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dap_ray.tune", *ov], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the driver and the Ray it started
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list((out / "trials").glob("*/done.json")):
            time.sleep(0.1)
        done_before = sorted(p.parent.name for p in (out / "trials").glob("*/done.json"))
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies without cleaning up: an interrupted sweep
        proc.wait()
        log.close()
    assert 1 <= len(done_before) < 4, "the sweep must be interrupted after its first trial, not after all of them"
    before = {tid: (out / "trials" / tid / "done.json").read_bytes() for tid in done_before}
    exp = out / "ray_results" / "sweep"
    assert len(list(exp.glob("trial_*"))) >= 1

    assert main(ov + ["tune.resume=true"]) == 0
    df = pd.read_csv(out / "results.csv", dtype={"method.layer": str, "trial_id": str})
    assert len(df) == 4 and set(df["status"]) == {"completed"}, df[["trial_id", "status", "error"]]
    assert set(done_before) <= set(df["trial_id"])  # the same trials: restored, not a new sweep
    assert len(list(exp.glob("trial_*"))) == 4 and len(list((out / "trials").iterdir())) == 4
    for tid in done_before:  # finished before the kill: neither sampled nor trained again
        assert [p.name for p in (out / "trials" / tid).glob("attempt-*.json")] == ["attempt-0.json"]
        assert (out / "trials" / tid / "done.json").read_bytes() == before[tid]
    for tid in set(df["trial_id"]) - set(done_before):
        assert (out / "trials" / tid / "done.json").exists()
    assert (df["reports"] == 4).all()  # epochs 10, 20, 30, 40
    assert (out / "best_overrides.txt").exists() and not (out / "best_test").exists()  # tune.test_best=false

