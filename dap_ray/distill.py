"""python -m dap_ray.distill — bank → sample → evaluate → report, for every method in `methods`.

With no arguments this is the embedded default: scikit-learn's real digits, the packaged digits DiT,
local Ray on CPU, IPC 10, random_real / vanilla / dap, hard-label evaluation over 3 seeds.
Every stage writes files under out_dir and skips work that is already there, so re-running the
same command after a crash resumes it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import fsspec
from omegaconf import OmegaConf

from dap_ray.cli import run_main
from dap_ray.config import (
    config_hash,
    diver_run_source,
    guidance_layer,
    resolve_cfg_scale,
    resolve_dtype,
    to_structured,
    validate,
    validate_against_backbone,
)
from dap_ray.errors import UserError
from dap_ray.sampling import guidance_strength
from dap_ray.storage import expand, write_bytes
from dap_ray.tracking import check_tracking

if TYPE_CHECKING:
    from dap_ray.data.types import ClassInfo

log = logging.getLogger("dap_ray.distill")


def method_hash(cfg: Any, method: str, classes: Sequence[ClassInfo]) -> str:
    """What determines a method's images: if it changes, old images in out_dir must not be reused.

    DIVER refining an external set (method.diver_source) also depends on that set's files: their
    names and content versions (size + mtime locally, size + ETag on S3) are part of its hash."""
    parts: dict[str, Any] = {"method": method, "seed": cfg.seed, "ipc": cfg.ipc, "dataset": cfg.dataset, "model": cfg.model}
    if method != "random_real":
        parts["sampler"] = {k: v for k, v in OmegaConf.to_container(cfg.sampler).items() if k != "batch_size"}
        parts["batch"] = cfg.sampler.batch_size  # fixed batch composition is part of byte-identity
    if method in ("dap", "d3hr", "diver"):
        parts["knobs"] = cfg.method
        parts["bank"] = {"seed": cfg.bank.seed}
    if method == "diver" and diver_run_source(cfg) is None:
        from dap_ray.data import distilled_records
        from dap_ray.data.images import record_versions

        # a method of this run (dap, vanilla, ...) needs nothing more: that set follows from this config
        parts["diver_source_files"] = config_hash({"rows": record_versions(distilled_records(str(cfg.method.diver_source), classes))})
    return config_hash(OmegaConf.create(OmegaConf.to_container(OmegaConf.create(parts), resolve=True)))


def _check_method_dir(run_dir: str, method: str, h: str, *, write: bool = True) -> None:
    """Refuse a method folder made with another config; with write, record this config's hash."""
    fs, p = fsspec.core.url_to_fs(f"{run_dir}/{method}/config_hash.txt")
    if fs.exists(p):
        old = fs.cat_file(p).decode().strip()
        if old != h:
            raise UserError(
                f"{run_dir}/{method} holds images made with a different config (hash {old}, now {h}); "
                "use another out_dir or delete that folder"
            )
    elif write:
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        write_bytes(fs, p, (h + "\n").encode())  # atomic: a kill mid-write must not leave an empty hash


def write_manifest(run_dir: str, method: str, rows: list[dict], h: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: (r["label"], r["index"]))
    table = pa.table({
        "class": [r["class"] for r in rows],
        "label": pa.array([int(r["label"]) for r in rows], pa.int32()),
        "index": pa.array([int(r["index"]) for r in rows], pa.int32()),
        "seed": pa.array([int(r["seed"]) for r in rows], pa.uint64()),
        "method": [method] * len(rows),
        "config_hash": [h] * len(rows),
        "path": [f"images/{r['class']}/{int(r['index']):05d}.png" for r in rows],
    })
    path = f"{run_dir}/{method}/manifest.parquet"
    fs, p = fsspec.core.url_to_fs(path)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    fs.pipe_file(p, sink.getvalue().to_pybytes())
    return path


STRENGTH_FILE = "guidance_strength.json"


def read_guidance_strength(run_dir: str, methods: Sequence[str]) -> dict[str, dict]:
    """{method: {"mean", "per_step", "images"}} of the guided methods of a run (their guidance_strength.json):
    the mean |Δε| / |ε| of a guided step, the number to compare γ by across layers, poolings and kernels."""
    out = {}
    for name in methods:
        fs, p = fsspec.core.url_to_fs(f"{run_dir}/{name}/{STRENGTH_FILE}")
        if fs.exists(p):
            out[name] = json.loads(fs.cat_file(p))
    return out


def check_locations(cfg: Any) -> None:
    """Every place the run reads or writes, checked before anything is read or written: exit 2 with
    one line (a file as out_dir, no S3 credentials, a missing bucket), never a traceback later."""
    from dap_ray.runtime import check_storage

    for key in ("out_dir", "cache_dir"):
        check_storage(expand(cfg[key]), key)
    if cfg.dataset.name == "imagefolder" and "://" in str(cfg.dataset.root or ""):
        check_storage(str(cfg.dataset.root), "dataset.root")


def prepare(cfg_raw: Any) -> tuple[Any, Any, Any]:
    """Validate the config and its locations, resolve the dataset, build the backbone's structure (no weights)."""
    from dap_ray.backbones import load_backbone
    from dap_ray.data import resolve_dataset

    cfg = to_structured(cfg_raw)
    validate(cfg)
    check_tracking(cfg.tracking)  # a tracking switch without its package: exit 2 now, not at the report
    resolve_dtype(cfg)  # sampler.dtype=auto -> bf16 / fp32, once, for every actor, hash and cache key
    resolve_cfg_scale(cfg)  # sampler.cfg_scale=null -> the model's own (model.cfg_scale)
    check_locations(cfg)
    ds = cfg.dataset
    dataset = resolve_dataset(ds.name, ds.root, OmegaConf.to_container(ds.classes) if OmegaConf.is_config(ds.classes) else ds.classes,
                              train_dir=ds.train_dir, test_dir=ds.test_dir, test_fraction=ds.test_fraction, seed=ds.split_seed,
                              cache_dir=expand(cfg.cache_dir))
    # The driver's copy is built from the model's config files on the meta device: schedule, shapes,
    # layer names and class table, no weights read and no forward run here (a KubeRay head is sized for
    # orchestration, not for holding the backbone); the bank and sampler actors load the weights.
    backbone = load_backbone(OmegaConf.to_container(cfg.model, resolve=True), "meta")
    validate_against_backbone(cfg, backbone)
    backbone.bind_classes(dataset.classes)
    return cfg, dataset, backbone


def run(cfg_raw: Any) -> int:
    from dap_ray.data import write_skipped_csv
    from dap_ray.methods import RunContext, get_method
    from dap_ray.runtime import init_ray, resolve_actor_counts

    if list(cfg_raw.get("stages") or []) == ["report"]:  # no Ray, no dataset, no model: the report of what out_dir holds
        from dap_ray.report import rebuild_report

        cfg = to_structured(cfg_raw)
        validate(cfg)
        check_tracking(cfg.tracking)
        print(rebuild_report(expand(cfg.out_dir)))
        print(f"report: {expand(cfg.out_dir)}/report.md")  # the last line: where to look
        return 0
    t_start = time.time()
    cfg, dataset, backbone = prepare(cfg_raw)
    run_dir = expand(cfg.out_dir)
    methods = [get_method(m) for m in cfg.methods]
    # once per method: DIVER's hash lists its source folder (a remote listing on S3)
    hashes = {m.name: method_hash(cfg, m.name, dataset.classes) for m in methods} if "sample" in cfg.stages else {}
    for name, h in hashes.items():  # refuse a changed config now: before the bank, before config.yaml is overwritten
        _check_method_dir(run_dir, name, h, write=False)
    log.info("dataset: %s, %d classes, %d train / %d test images", dataset.name, len(dataset.classes), len(dataset.train), len(dataset.test))
    ray_info = init_ray(cfg.runtime)
    # the sampler pool is sized when sampling starts, against the nodes alive then (null = auto): nodes
    # that join during the bank are used, lost ones are not counted
    sampler_actors = cfg.runtime.sampler_actors
    resolve_actor_counts(cfg.runtime)
    # Ray is up: only now is anything written to out_dir, so a refused or failed start leaves it as it was
    fs, rp = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(rp, exist_ok=True)
    fs.pipe_file(f"{rp}/config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    log.info("run directory: %s", run_dir)
    ray_info = {**ray_info, "bank_actors": int(cfg.runtime.bank_actors), "sampler_actors": int(cfg.runtime.sampler_actors)}
    log.info("ray: %s", ray_info)
    timings: dict[str, float] = {}

    # 1. bank
    bank = None
    if "bank" in cfg.stages and any(m.uses_bank for m in methods):
        from dap_ray.bank import build_bank, make_spec

        t0 = time.time()
        layers = [guidance_layer(cfg)] + [str(x) for x in (cfg.bank.layers or []) if str(x) != guidance_layer(cfg)]
        spec = make_spec(cfg, backbone, layers)
        bank = build_bank(spec, dataset, expand(cfg.cache_dir), num_actors=int(cfg.runtime.bank_actors),
                          gpus_per_actor=float(cfg.runtime.gpus_per_actor), cpus_per_actor=float(cfg.runtime.cpus_per_actor),
                          placement_timeout_s=float(cfg.runtime.placement_timeout_s))
        timings["bank"] = time.time() - t0
        log.info("bank: %s (%d images, %s, %d skipped)", bank.path, bank.meta["images"], "reused" if bank.meta.get("reused") else f"{bank.meta.get('images_per_second')} img/s", len(bank.skipped))
    skipped = list(bank.skipped) if bank is not None else []
    skipped_csv = write_skipped_csv(run_dir, skipped)
    if skipped:
        log.warning("%d unreadable input file(s) skipped; listed in %s", len(skipped), skipped_csv)

    # 2. sample
    ctx = RunContext(cfg=cfg, dataset=dataset, backbone_info=backbone, run_dir=run_dir, bank=bank, skipped=skipped)
    if "sample" in cfg.stages:
        from dap_ray.sampling import SamplerPool

        r = cfg.runtime
        # one pool for every sampler method of the run: the model is loaded once per actor, not per method
        with SamplerPool(sampler_actors, float(r.gpus_per_actor), float(r.cpus_per_actor), float(r.placement_timeout_s)) as ctx.sampler_pool:
            for m in methods:
                if m.uses_bank and bank is None:
                    raise UserError(f"method {m.name} needs the bank stage (stages={list(cfg.stages)})")
                t0 = time.time()
                h = hashes[m.name]
                _check_method_dir(run_dir, m.name, h)
                if m.own_ray_stage:
                    ctx.sampler_pool.close()  # restarted on its next use
                n_skipped = len(ctx.skipped)
                rows = m.run(ctx)
                if len(ctx.skipped) > n_skipped:
                    log.warning("%s: %d unreadable input file(s) skipped; listed in %s", m.name, len(ctx.skipped) - n_skipped, skipped_csv)
                write_manifest(run_dir, m.name, rows, h)
                strength = guidance_strength(rows)
                if strength is not None:  # kept beside the images: a resumed run that renders nothing still reports it
                    write_bytes(fs, f"{rp}/{m.name}/{STRENGTH_FILE}", json.dumps(strength, indent=1).encode())
                    log.info("%s: guidance strength |Δε|/|ε| = %.3g (mean over guided steps)", m.name, strength["mean"])
                timings[f"sample/{m.name}"] = time.time() - t0
                log.info("%s: %d images in %s/%s/images (%.1fs)", m.name, len(rows), run_dir, m.name, timings[f"sample/{m.name}"])
        ctx.sampler_pool = None

    # 3. evaluate
    results = None
    if "evaluate" in cfg.stages:
        from dap_ray.eval.run import evaluate_run
        from dap_ray.metrics import measure_sets

        t0 = time.time()
        results = evaluate_run(cfg, dataset, run_dir, [m.name for m in methods])
        sets = results.pop("sets")
        if cfg.eval.metrics:
            try:
                results["metrics"] = measure_sets(cfg, dataset, sets, expand(cfg.cache_dir), tsne=bool(cfg.eval.tsne))
            except Exception as e:  # noqa: BLE001 - a metric failure must not lose the accuracy table
                log.warning("representativeness metrics failed: %s", e)
        timings["evaluate"] = time.time() - t0
        if results["skipped"]:  # unreadable test (and distilled) files: listed beside the training split's
            ctx.skipped.extend(results["skipped"])
            write_skipped_csv(run_dir, ctx.skipped)
            log.warning("%d unusable test/distilled file(s) left out of evaluation; listed in %s", len(results["skipped"]), skipped_csv)

    # 4. report
    timings["total"] = time.time() - t_start
    table = None
    if "report" in cfg.stages and results is not None:
        from dap_ray.report import write_report

        extra = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "ray": ray_info, "skipped": len(ctx.skipped),
                 "guidance_strength": read_guidance_strength(run_dir, [m.name for m in methods]),
                 "bank": None if bank is None else {k: bank.meta.get(k) for k in ("key", "images", "images_per_second", "image_timesteps_per_second", "build_seconds", "reused")}}
        table = write_report(cfg, run_dir, results, extra)
    elif "report" in cfg.stages:  # no evaluation this time: the report of the run's stored results, with its images now
        from dap_ray.report import rebuild_report

        fs_r, rp_r = fsspec.core.url_to_fs(run_dir)
        if fs_r.exists(f"{rp_r}/results.json"):
            table = rebuild_report(run_dir)
        else:
            log.warning("no report: %s has no results.json yet (add the evaluate stage)", run_dir)
    if table is not None:
        print(table)
    log.info("done in %.0fs; outputs in %s", time.time() - t_start, run_dir)
    if table is not None:
        print(f"report: {run_dir}/report.md")  # the last line: where to look
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("dap_ray.distill", __doc__, "distill", run, argv)


if __name__ == "__main__":
    sys.exit(main())
