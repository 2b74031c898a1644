"""Experiment tracking, opt-in: a run's results as TensorBoard events (`tracking.tensorboard=true`).

`tensorboard --logdir <out_dir>/tensorboard` then shows, per run: each method × net's test accuracy
(mean over seeds, and each seed), every training's test-accuracy curve over epochs, DAP's guidance
strength per DDIM step, the image grids and the resolved config. Sweeps need no switch: Ray Tune's
own TensorBoard logger writes every trial's reports (val_acc, each net's val_acc/<arch>) into its
trial folder under tune.storage_path.

Written with tensorboardX (a dependency of ray[tune]); on object stores the events are written to a
local temp folder and uploaded.

MLflow (`tracking.mlflow=<tracking URI>`, extra `dap_ray[mlflow]`) and Weights & Biases
(`tracking.wandb=<project>`, extra `dap_ray[wandb]`) get the same scalars (`scalars()`, one list for
every backend), the resolved config and the plot PNGs: one MLflow run / one W&B run per distill or
evaluate run. Sweeps log each trial through Ray Tune's MLflowLoggerCallback / WandbLoggerCallback
(`tune_callbacks()`). The packages are optional extras, imported only by the functions that use them;
`check_tracking()` runs before any work so a switch without its package is exit 2 and one line.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np

from dap_ray.errors import UserError
from dap_ray.storage import is_local

TENSORBOARD_DIR = "tensorboard"  # under the run directory
WANDB_DIR = "wandb"  # W&B's own folder under the run directory (offline runs stay there for `wandb sync`)
#: switch -> (module to import, the extra that installs it)
BACKENDS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
MLFLOW_BATCH = 100  # MLflow's log_batch takes at most 100 params (and 1000 metrics) per call
MLFLOW_PARAM_CHARS = 6000  # MLflow's longest param value


def _grid_image(url: str) -> np.ndarray | None:
    """A plot PNG as (H, W, 3) uint8, or None when the run has none."""
    from PIL import Image

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with Image.open(io.BytesIO(fs.cat_file(path))) as im:
        return np.asarray(im.convert("RGB"))


def scalars(payload: Mapping[str, Any]) -> Iterator[tuple[str, float, int]]:
    """(tag, value, step) of every scalar a run logs, the same for each backend; accuracies in %.

    accuracy/<method>/<arch>: mean over seeds (step 0); accuracy_per_seed/<method>/<arch>: step = seed;
    curve/<method>/<arch>/seed<s>: test accuracy, step = epoch; guidance_strength/<method>: one point
    per guided DDIM step in sampling order (t falls), step = its index.
    """
    for cell, s in sorted((payload.get("summary") or {}).items()):
        if s.get("n"):
            yield f"accuracy/{cell}", float(s["mean"]), 0  # cell = <method>/<arch>
    for r in payload.get("rows") or []:
        if r.get("status") != "ok" or r.get("acc") is None:
            continue
        cell = f"{r['method']}/{r['arch']}"
        yield f"accuracy_per_seed/{cell}", 100.0 * float(r["acc"]), int(r["seed"])
        for epoch, acc in r.get("history") or []:
            yield f"curve/{cell}/seed{int(r['seed'])}", 100.0 * float(acc), int(epoch)
    for method, gs in sorted((payload.get("guidance_strength") or {}).items()):
        for i, (_, v) in enumerate(sorted(((int(t), float(v)) for t, v in (gs.get("per_step") or {}).items()), reverse=True)):
            yield f"guidance_strength/{method}", v, i


def write_tensorboard(run_dir: str, payload: Mapping[str, Any], grids: Mapping[str, str], config_yaml: str) -> str:
    """TensorBoard events of one run under <run_dir>/tensorboard; returns that folder.

    `payload` is what results.json holds (rows, summary, guidance_strength); scalars are accuracies in %.
    `grids` maps each method to its image-grid PNG (report.py's plots/grid_<method>.png).
    """
    from tensorboardX import SummaryWriter

    fs, rp = fsspec.core.url_to_fs(run_dir)
    remote = not is_local(fs)
    local = tempfile.mkdtemp(prefix="dap_ray_tb_") if remote else f"{rp}/{TENSORBOARD_DIR}"
    try:
        writer = SummaryWriter(logdir=local)
        try:
            writer.add_text("config", "```\n" + config_yaml + "\n```", 0)
            for tag, value, step in scalars(payload):
                writer.add_scalar(tag, value, step)
            for m, url in grids.items():
                img = _grid_image(url)
                if img is not None:
                    writer.add_image(f"images/{m}", img, 0, dataformats="HWC")
        finally:
            writer.close()
        if remote:
            fs.put(local, f"{rp}/{TENSORBOARD_DIR}", recursive=True)
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    return f"{run_dir.rstrip('/')}/{TENSORBOARD_DIR}"


# ---------------------------------------------------------------------------------------------
# MLflow and Weights & Biases: optional extras
# ---------------------------------------------------------------------------------------------


def _import_backend(switch: str, value: object) -> Any:
    """The backend's package, or a UserError naming the extra to install (exit 2, one line)."""
    module, extra = BACKENDS[switch]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"tracking.{switch}={value!r} needs the {module} package: pip install 'dap_ray[{extra}]' "
                        f"(or set tracking.{switch}=null)") from None


def _mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_tracking(tracking: Any) -> None:
    """Before any work: every enabled backend imports, and MLflow's store answers (a file store that
    MLflow refuses, an unreachable server), so a run does not fail at its report hours later."""
    if tracking.mlflow is not None:
        _import_backend("mlflow", tracking.mlflow)
        try:
            _mlflow_client(str(tracking.mlflow)).get_experiment_by_name(str(tracking.mlflow_experiment))
        except Exception as e:  # noqa: BLE001 - any store error is the user's URI/setup: one line
            raise UserError(f"tracking.mlflow={tracking.mlflow!r}: MLflow cannot use this tracking store: {_first_line(e)}") from None
    if tracking.wandb is not None:
        _import_backend("wandb", tracking.wandb)


def tune_callbacks(tracking: Any) -> list[Any]:
    """Ray Tune logger callbacks of the enabled backends: one MLflow run / W&B run per trial, with the
    trial's knobs as params/config and every report (val_acc, val_acc/<arch>) as a metric."""
    out: list[Any] = []
    if tracking.mlflow is not None:
        _import_backend("mlflow", tracking.mlflow)
        from ray.air.constants import TRAINING_ITERATION
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class TrialMLflow(MLflowLoggerCallback):
            """Ray's callback with each report's keys made storable by every MLflow store (mlflow_metrics)."""

            def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
                self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=mlflow_metrics(result),
                                             step=result.get("timesteps_total") or result[TRAINING_ITERATION])

        out.append(TrialMLflow(tracking_uri=str(tracking.mlflow), experiment_name=str(tracking.mlflow_experiment), tags={"dap_ray": "tune"}))
    if tracking.wandb is not None:
        _import_backend("wandb", tracking.wandb)
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=str(tracking.wandb)))  # WANDB_MODE, WANDB_ENTITY from the environment
    return out


def mlflow_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """A trial's report as MLflow metrics: flattened with '/', numbers only, keys MLflow accepts. A key
    under another key (val_acc/convnet beside val_acc) takes '.' instead (val_acc.convnet): MLflow's
    file store keeps each metric as a file named by its key, and no file val_acc can also be a folder."""
    flat: dict[str, float] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v):
                flat[mlflow_key(f"{prefix}{k}")] = float(v)

    walk(result, "")
    parents = {k.rsplit("/", i)[0] for k in flat for i in range(1, k.count("/") + 1)}
    clash = parents & set(flat)
    return {(k.replace("/", ".") if any(k.startswith(f"{c}/") for c in clash) else k): v for k, v in flat.items()}


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> strings (MLflow params are flat strings), lists as JSON-ish text."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:MLFLOW_PARAM_CHARS]
    return out


def mlflow_key(tag: str) -> str:
    """MLflow allows letters, digits, _ - . space : / in keys; e.g. evaluate's `distilled@ipc10` set is
    logged as `distilled_ipc10`."""
    return re.sub(r"[^\w\-. :/]", "_", tag)


def _local_files(urls: Sequence[str], tmp: str) -> list[str]:
    """The files that exist among `urls`, as local paths (object-store ones downloaded into `tmp`)."""
    out = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            continue
        if is_local(fs):
            out.append(path)
        else:
            local = os.path.join(tmp, os.path.basename(path))
            fs.get_file(path, local)
            out.append(local)
    return out


def write_mlflow(uri: str, experiment: str, run_dir: str, payload: Mapping[str, Any], files: Sequence[str]) -> str:
    """One MLflow run for a distill/evaluate run: params = the flattened resolved config, metrics =
    `scalars()` (step as MLflow's step), `files` (results.json, report.md, plot PNGs) as artifacts
    (PNGs under plots/). Returns the MLflow run id."""
    _import_backend("mlflow", uri)
    from mlflow.entities import Metric, Param, RunTag

    client = _mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    name = os.path.basename(run_dir.rstrip("/")) or "run"
    run_id = client.create_run(exp_id, run_name=name, tags={"dap_ray.run_dir": run_dir}).info.run_id
    status = "FAILED"
    try:
        params = [Param(k, v) for k, v in sorted(flatten(payload.get("config") or {}).items())]
        for i in range(0, len(params), MLFLOW_BATCH):
            client.log_batch(run_id, params=params[i:i + MLFLOW_BATCH])
        now = int(1000 * time.time())
        metrics = [Metric(mlflow_key(tag), value, now, step) for tag, value, step in scalars(payload)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.log_batch(run_id, tags=[RunTag("dap_ray.methods", ",".join(sorted({r["method"] for r in payload.get("rows") or []})))])
        with tempfile.TemporaryDirectory(prefix="dap_ray_mlflow_") as tmp:
            for path in _local_files(files, tmp):
                client.log_artifact(run_id, path, "plots" if path.endswith(".png") else None)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def write_wandb(project: str, run_dir: str, payload: Mapping[str, Any], files: Sequence[str]) -> str:
    """One W&B run for a distill/evaluate run, its files in <run_dir>/wandb (WANDB_MODE decides online,
    offline or disabled): config = the resolved config; history: one row of accuracies (so the summary
    holds them), one row per epoch of the training curves (x: `epoch`), one per guided DDIM step (x:
    `guidance_step`), one of the plot PNGs as images. Returns the run's folder (offline) or URL."""
    wandb = _import_backend("wandb", project)
    fs, rp = fsspec.core.url_to_fs(run_dir)
    remote = not is_local(fs)
    local = tempfile.mkdtemp(prefix="dap_ray_wandb_") if remote else rp
    os.makedirs(local, exist_ok=True)
    rows: dict[str, dict[int, dict[str, float]]] = {"accuracy": {}, "curve": {}, "guidance_strength": {}}
    for tag, value, step in scalars(payload):
        group = tag.split("/", 1)[0]
        if group == "accuracy_per_seed":  # one key per seed: the summary keeps every seed's accuracy
            rows["accuracy"].setdefault(0, {})[f"{tag}/seed{step}"] = value
        else:
            rows[group].setdefault(0 if group == "accuracy" else step, {})[tag] = value
    try:
        try:
            run = wandb.init(project=project, dir=local, name=os.path.basename(run_dir.rstrip("/")) or "run",
                             config=dict(payload.get("config") or {}), job_type="dap_ray", reinit="create_new")
        except Exception as e:  # noqa: BLE001 - no credentials online, a bad project: the user's setup
            raise UserError(f"tracking.wandb={project!r}: W&B could not start a run: {_first_line(e)} "
                            "(WANDB_API_KEY / `wandb login`, or WANDB_MODE=offline)") from None
        try:
            run.define_metric("epoch")
            run.define_metric("curve/*", step_metric="epoch")
            run.define_metric("guidance_step")
            run.define_metric("guidance_strength/*", step_metric="guidance_step")
            run.log(rows["accuracy"].get(0, {}))
            for epoch, row in sorted(rows["curve"].items()):
                run.log({"epoch": epoch, **row})
            for i, row in sorted(rows["guidance_strength"].items()):
                run.log({"guidance_step": i, **row})
            with tempfile.TemporaryDirectory(prefix="dap_ray_wandb_files_") as tmp:
                pngs = [p for p in _local_files(files, tmp) if p.endswith(".png")]
                if pngs:
                    run.log({f"plots/{os.path.splitext(os.path.basename(p))[0]}": wandb.Image(p) for p in pngs})
            where = str(run.url or f"{run_dir.rstrip('/')}/{WANDB_DIR}")
        finally:
            run.finish()
            # finish() returns before wandb-core has written the run's transaction log (run-<id>.wandb, what
            # `wandb sync` uploads offline); teardown waits for it, so the folder is complete when we copy
            # it to an object store or the command exits
            wandb.teardown()
        if remote:
            fs.put(f"{local}/{WANDB_DIR}", f"{rp}/{WANDB_DIR}", recursive=True)
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    return where
