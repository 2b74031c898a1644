"""report.md and plots/ of a run, from real files: links that resolve, no temp paths, image figures at
native resolution, IPC headers from the rows, and `stages=[report]` rebuilding without Ray (issue 21).

The run folder is written here as a run leaves it (PNG images per method, evaluation rows with their
training history); the report code reads it back through the same functions a run uses.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dap_ray.cli import compose
from dap_ray.config import EvaluateConfig, to_structured
from dap_ray.data.types import ClassInfo
from dap_ray.report import missing_links, write_report
from tests.conftest import read_tensorboard

# integration: matplotlib + PDF figures take a few seconds (no Ray); unit: reads files only

METHODS = ("random_real", "vanilla", "dap")
ARCHS = ("convnet", "resnetap10")
CLASSES = [ClassInfo(i, str(i), f"digit{i}") for i in range(4)]


def _image(path: Path, side: int, seed: int) -> np.ndarray:
    """A random RGB image, unique pixel content per file (so it can be found again in a figure)."""
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _rows(ipc: int, methods=METHODS, archs=ARCHS, seeds=(0, 1, 2)) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for m in methods:
        for a in archs:
            for s in seeds:
                acc = float(0.9 + 0.01 * rng.standard_normal())
                rows.append({"method": m, "arch": a, "seed": s, "ipc": ipc, "status": "ok", "acc": acc,
                             "history": [[e, acc - 0.2 / e] for e in (5, 10, 15, 20)],
                             "test_per_class": {c.key: 30 for c in CLASSES}})
    return rows


def _cfg(run: Path, *extra: str):
    return to_structured(compose("distill", [f"out_dir={run}", "ipc=10", f"eval.archs=[{','.join(ARCHS)}]", "eval.seeds=[0,1,2]", *extra]))


def _find(fig: np.ndarray, block: np.ndarray) -> list[tuple[int, int]]:
    """(y, x) of every exact occurrence of `block` in `fig`."""
    bh, bw = block.shape[:2]
    ys, xs = np.nonzero((fig[: fig.shape[0] - bh + 1, : fig.shape[1] - bw + 1] == block[0, 0]).all(-1))
    return [(y, x) for y, x in zip(ys, xs) if (fig[y : y + bh, x : x + bw] == block).all()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """A distill run folder at IPC 2 (config says ipc=10: the rows are what counts): 64-px images."""
    run = tmp_path_factory.mktemp("run")
    images = {}
    for k, m in enumerate(METHODS):
        for c in CLASSES:
            for i in range(2):
                images[(m, c.key, i)] = _image(run / m / "images" / c.key / f"{i:05d}.png", 64, 1000 * k + 10 * c.index + i)
    (run / "config.yaml").write_text("seed: 0\n")
    table = write_report(_cfg(run), str(run), {"rows": _rows(2), "classes": CLASSES}, {"timings_s": {"total": 1.0}})
    return run, {"images": images, "table": table}


@pytest.mark.integration
def test_every_link_resolves_and_no_temp_path_is_named(run):
    out, _ = run
    md = (out / "report.md").read_text()
    assert missing_links(md, str(out)) == []
    for name in ("accuracy", "curves", "pairs_vanilla_dap", "grid_random_real", "grid_vanilla", "grid_dap"):
        assert f"](plots/{name}.png)" in md and f"](plots/{name}.pdf)" in md, name
        assert (out / "plots" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert str(out) not in md and tempfile.gettempdir() + "/" not in md  # the folder can be copied (docs/default_run)
    assert "[config.yaml](config.yaml)" in md and "[results.json](results.json)" in md
    assert "n = 3 seeds per cell" in md and "95% Student-t confidence interval" in md


@pytest.mark.integration
def test_a_missing_plot_is_found(run, tmp_path):
    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "plots" / "grid_dap.png").unlink()
    assert missing_links((copy / "report.md").read_text(), str(copy)) == ["plots/grid_dap.png"]


@pytest.mark.integration
def test_table_heads_the_ipc_of_the_rows(run):
    _, facts = run
    assert "IPC 2," in facts["table"] and "IPC 10" not in facts["table"]


@pytest.mark.integration
def test_grid_is_native_resolution_without_empty_frames(run):
    out, facts = run
    fig = np.asarray(Image.open(out / "plots" / "grid_vanilla.png").convert("RGB"))
    spots = {}
    for c in CLASSES:
        for i in range(2):
            hits = _find(fig, facts["images"][("vanilla", c.key, i)])
            assert len(hits) == 1, (c.key, i)  # every image once, pixel for pixel (64 px: no enlargement)
            spots[(c.key, i)] = hits[0]
    for c in CLASSES:  # one row per class, its two images side by side
        (y0, x0), (y1, x1) = spots[(c.key, 0)], spots[(c.key, 1)]
        assert y0 == y1 and x1 > x0
    right = max(x for _, x in spots.values()) + 64
    top = min(y for y, _ in spots.values())
    assert (fig[top:, right:] == 255).all()  # IPC 2: two columns, nothing (no empty frame) right of them


@pytest.mark.integration
def test_small_images_are_enlarged_by_whole_pixel_blocks(tmp_path):
    from dap_ray.report import plot_grid

    arr = _image(tmp_path / "set" / "0" / "a.png", 8, 7)
    assert plot_grid(str(tmp_path / "set"), "s", CLASSES[:1], str(tmp_path / "g.png")) is not None
    fig = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    big = np.repeat(np.repeat(arr, 8, axis=0), 8, axis=1)  # each source pixel an 8x8 block
    assert len(_find(fig, big)) == 1


@pytest.mark.integration
def test_pairs_put_vanilla_above_dap_of_the_same_file(run):
    out, facts = run
    fig = np.asarray(Image.open(out / "plots" / "pairs_vanilla_dap.png").convert("RGB"))
    for c in CLASSES:
        (yv, xv), = _find(fig, facts["images"][("vanilla", c.key, 0)])
        (yd, xd), = _find(fig, facts["images"][("dap", c.key, 0)])
        assert xv == xd and yd > yv  # one column per noise: vanilla on top, DAP below
    assert not _find(fig, facts["images"][("random_real", "0", 0)])


@pytest.mark.integration
def test_evaluate_subsample_sets_head_their_own_ipc(tmp_path):
    data = tmp_path / "data"
    for c in CLASSES:
        for i in range(3):
            _image(data / c.key / f"{i:05d}.png", 16, 10 * c.index + i)
    out = tmp_path / "ev"
    cfg = to_structured(compose("evaluate", [f"data={data}", f"out_dir={out}", "ipc=10", "eval.archs=[convnet]", "eval.seeds=[0,1]"]),
                        EvaluateConfig)
    rows = _rows(2, ("set@ipc2",), ("convnet",), (0, 1)) + _rows(1, ("set@ipc1",), ("convnet",), (0, 1))
    table = write_report(cfg, str(out), {"rows": rows, "classes": CLASSES}, {"data": str(data)}, image_root=str(data))
    assert "IPC 2 and 1" in table and "IPC 10" not in table
    assert "| method | IPC | convnet |" in table and "| set@ipc1 | 1 |" in table
    grid = np.asarray(Image.open(out / "plots" / "grid_set_ipc1.png").convert("RGB"))
    img0, img1 = (np.asarray(Image.open(data / "0" / f"0000{i}.png").convert("RGB")) for i in (0, 1))
    assert len(_find(grid, np.repeat(np.repeat(img0, 4, axis=0), 4, axis=1))) == 1  # 16 px shown as 4x4 blocks
    assert not _find(grid, np.repeat(np.repeat(img1, 4, axis=0), 4, axis=1))  # IPC 1: only the first image is shown
    assert missing_links((out / "report.md").read_text(), str(out)) == []


@pytest.mark.integration
def test_stages_report_rebuilds_from_out_dir_without_ray_dataset_or_model(run, tmp_path, capsys):
    """No Ray (an address where nothing answers), no dataset (a root that does not exist), no model."""
    import ray

    from dap_ray.distill import main

    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.md").unlink()
    res = json.loads((copy / "results.json").read_text())
    res["config"]["method"]["rff_features"] = 4096  # a knob an older dap_ray had: the report still rebuilds
    (copy / "results.json").write_text(json.dumps(res))
    ray_before = ray.is_initialized()
    rc = main([f"out_dir={copy}", "stages=[report]", "runtime.address=127.0.0.1:9", "dataset=imagefolder",
               f"dataset.root={tmp_path / 'nowhere'}", f"model.path={tmp_path / 'no_model'}"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert lines[-1] == f"report: {copy}/report.md"
    assert ray.is_initialized() == ray_before
    md = (copy / "report.md").read_text()
    assert missing_links(md, str(copy)) == [] and (copy / "plots" / "pairs_vanilla_dap.png").is_file()
    assert "IPC 2," in md and "| dap |" in md
    assert json.loads((copy / "results.json").read_text())["classes"][3] == {"index": 3, "key": "3", "name": "digit3"}


@pytest.mark.integration
def test_stages_report_without_results_is_one_line(tmp_path, capsys):
    from dap_ray.distill import main

    rc = main([f"out_dir={tmp_path / 'empty'}", "stages=[report]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no results.json" in err[0]


@pytest.mark.unit
def test_docs_default_run_links_resolve_and_name_no_temp_dir():
    """docs/default_run is a run folder's report.md and plots/ as the report wrote them."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "default_run"
    md = (docs / "report.md").read_text()
    assert "](plots/accuracy.png)" in md
    assert missing_links(md, str(docs)) == []
    assert "/tmp/" not in md and tempfile.gettempdir() + "/" not in md


@pytest.mark.integration
def test_tensorboard_events_hold_accuracies_curves_strength_and_grids(tmp_path):
    """tracking.tensorboard=true: the run's accuracies (mean per method × net, each seed), every
    training's curve, DAP's guidance strength per step, the image grids and the config, read back."""
    run = tmp_path / "run"
    for m in METHODS:
        for c in CLASSES:
            _image(run / m / "images" / c.key / "00000.png", 16, c.index)
    rows = _rows(1)
    gs = {"dap": {"mean": 0.1, "per_step": {"900": 0.2, "500": 0.1, "100": 0.05}, "images": 4}}
    write_report(_cfg(run, "tracking.tensorboard=true"), str(run), {"rows": rows, "classes": CLASSES}, {"guidance_strength": gs})
    ev = read_tensorboard(run / "tensorboard")
    for m in METHODS:
        for a in ARCHS:
            accs = [100 * r["acc"] for r in rows if (r["method"], r["arch"]) == (m, a)]
            assert ev[f"accuracy/{m}/{a}"] == [(0, pytest.approx(float(np.mean(accs)), abs=1e-3))]
            assert [s for s, _ in ev[f"accuracy_per_seed/{m}/{a}"]] == [0, 1, 2]
            first = next(r for r in rows if (r["method"], r["arch"], r["seed"]) == (m, a, 0))
            assert ev[f"curve/{m}/{a}/seed0"] == [(e, pytest.approx(100 * acc, abs=1e-3)) for e, acc in first["history"]]
        assert f"images/{m}" in ev
    assert ev["guidance_strength/dap"] == [(0, pytest.approx(0.2)), (1, pytest.approx(0.1)), (2, pytest.approx(0.05))]
    assert any(tag.startswith("config") for tag in ev)
    # off by default: no folder
    run2 = tmp_path / "run2"
    write_report(_cfg(run2), str(run2), {"rows": rows, "classes": CLASSES})
    assert not (run2 / "tensorboard").exists()


def _tracked_run(tmp_path: Path, *overrides: str) -> tuple[Path, list[dict], dict, dict]:
    """A run folder as a run leaves it, reported with the given tracking overrides: (run, rows, gs, results.json)."""
    run = tmp_path / "run"
    for m in METHODS:
        for c in CLASSES:
            _image(run / m / "images" / c.key / "00000.png", 16, c.index)
    rows = _rows(1)
    gs = {"dap": {"mean": 0.1, "per_step": {"900": 0.2, "500": 0.1, "100": 0.05}, "images": 4}}
    write_report(_cfg(run, *overrides), str(run), {"rows": rows, "classes": CLASSES}, {"guidance_strength": gs})
    return run, rows, gs, json.loads((run / "results.json").read_text())


@pytest.mark.integration
def test_mlflow_run_holds_config_accuracies_curves_and_plots(tmp_path, monkeypatch):
    """tracking.mlflow=<file store>: one MLflow run, read back with MlflowClient: the flattened resolved
    config as params, every accuracy of results.json (mean per method × net, each seed), the curves and
    guidance strength with their steps, and the plot PNGs, results.json and report.md as artifacts."""
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'dap_ray[mlflow]'")
    from mlflow.tracking import MlflowClient

    # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set; a file store
    # is the one backend that needs neither a server nor SQLAlchemy
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path}/mlruns"
    run, rows, _, results = _tracked_run(tmp_path, f"tracking.mlflow={uri}", "tracking.mlflow_experiment=digits")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("digits")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1
    r = client.get_run(found[0].info.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["dap_ray.run_dir"] == str(run)
    p = r.data.params
    assert p["ipc"] == "10" and p["eval.archs"] == str(list(ARCHS)) and p["method.gamma"] == str(results["config"]["method"]["gamma"])
    def leaves(d: dict) -> int:
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in d.values())

    assert p["tracking.mlflow"] == uri and len(p) == leaves(results["config"]) > 50  # every key of the resolved config
    for cell, s in results["summary"].items():
        assert r.data.metrics[f"accuracy/{cell}"] == pytest.approx(s["mean"], abs=1e-6)
        hist = client.get_metric_history(r.info.run_id, f"accuracy_per_seed/{cell}")
        assert sorted((m.step, m.value) for m in hist) == [(int(s_), pytest.approx(a, abs=1e-6)) for s_, a in enumerate(s["accs"])]
    first = next(x for x in rows if (x["method"], x["arch"], x["seed"]) == ("dap", "convnet", 0))
    curve = client.get_metric_history(r.info.run_id, "curve/dap/convnet/seed0")
    assert sorted((m.step, m.value) for m in curve) == [(e, pytest.approx(100 * a, abs=1e-4)) for e, a in first["history"]]
    gs = client.get_metric_history(r.info.run_id, "guidance_strength/dap")
    assert sorted((m.step, m.value) for m in gs) == [(0, pytest.approx(0.2)), (1, pytest.approx(0.1)), (2, pytest.approx(0.05))]
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert {"results.json", "report.md", "plots"} <= top
    assert {f"plots/{f.name}" for f in (run / "plots").glob("*.png")} == plots and "plots/accuracy.png" in plots


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run's transaction log (<run>/run-<id>.wandb), the file `wandb sync`
    uploads: an offline run writes no wandb-summary.json, this is its only record of what was logged.
    Format: ':W&B' + 2-byte magic + version byte, then LevelDB log blocks of 32 KiB; each chunk has a
    7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last). The CRC is not checked."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.integration
def test_wandb_offline_run_holds_config_accuracies_curves_and_plots(tmp_path, monkeypatch):
    """tracking.wandb=<project> with WANDB_MODE=offline: the run's W&B folder under <out_dir>/wandb holds
    the resolved config, every accuracy (history and summary), the curves against `epoch`, the guidance
    strength against `guidance_step` and the plot PNGs as images; nothing reaches the network."""
    pytest.importorskip("wandb", reason="the wandb extra: pip install 'dap_ray[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # not the user's ~/.config/wandb
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run, rows, _, results = _tracked_run(tmp_path, "tracking.wandb=dap-ray-test")
    logs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    records = _wandb_records(logs[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # the run was finished
    info = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert info.project == "dap-ray-test" and info.display_name == "run"
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert config["ipc"] == 10 and config["eval"]["archs"] == list(ARCHS) and config["tracking"]["wandb"] == "dap-ray-test"
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    logged = {k: json.loads(v) for h in history for k, v in h.items() if k.startswith("accuracy")}
    for cell, s in results["summary"].items():
        assert logged[f"accuracy/{cell}"] == pytest.approx(s["mean"], abs=1e-6)
        for seed, a in enumerate(s["accs"]):
            assert logged[f"accuracy_per_seed/{cell}/seed{seed}"] == pytest.approx(a, abs=1e-6)
    first = next(x for x in rows if (x["method"], x["arch"], x["seed"]) == ("dap", "convnet", 0))
    curve = [(json.loads(h["epoch"]), json.loads(h["curve/dap/convnet/seed0"])) for h in history if "curve/dap/convnet/seed0" in h]
    assert curve == [(e, pytest.approx(100 * a, abs=1e-4)) for e, a in first["history"]]
    gs = [(json.loads(h["guidance_step"]), json.loads(h["guidance_strength/dap"])) for h in history if "guidance_strength/dap" in h]
    assert gs == [(0, pytest.approx(0.2)), (1, pytest.approx(0.1)), (2, pytest.approx(0.05))]
    # a wandb.Image is logged as its fields (plots/<name>/_type, .../path) and a copy under the run's files/
    images = {k.rsplit("/", 1)[0]: h[k.rsplit("/", 1)[0] + "/path"] for h in history for k, v in h.items()
              if k.startswith("plots/") and k.endswith("/_type") and json.loads(v) == "image-file"}
    assert set(images) == {f"plots/{f.stem}" for f in (run / "plots").glob("*.png")} and "plots/accuracy" in images
    assert all((logs[0].parent / "files" / json.loads(path)).is_file() for path in images.values())
    # the summary (what W&B's run table compares) keeps the last value of each key: the accuracies
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert summary["accuracy/dap/convnet"] == pytest.approx(results["summary"]["dap/convnet"]["mean"], abs=1e-6)
