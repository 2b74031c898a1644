"""python -m dap_ray.tune — a Ray Tune sweep over DAP's knobs (γ, layer, t_stop, kernel, σ, CFG scale, ...).

Each trial samples a small distilled set (tune.ipc per class) with its knobs through the same sampler
code as distill, trains an evaluation net on it and reports validation accuracy every few epochs;
ASHA stops bad trials early. The validation images are held out of the *training* split (and out of
the feature bank), so the real test split is touched only once: to evaluate the best configuration
at the end. Outputs under out_dir: results.csv / results.parquet (every trial), plots/ (heatmap of
accuracy over γ × t_stop, accuracy by layer and by every other swept knob), best_overrides.txt (feed
it to `python -m dap_ray.distill $(cat best_overrides.txt)`) and best_config.yaml.
An interrupted sweep continues with tune.resume=true.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
from omegaconf import OmegaConf

from dap_ray.backbones import load_backbone
from dap_ray.cli import run_main
from dap_ray.config import (
    TuneConfig,
    config_hash,
    resolve_cfg_scale,
    resolve_dtype,
    to_structured,
    validate,
    validate_against_backbone,
)
from dap_ray.data import load_images, resolve_dataset
from dap_ray.data.types import DatasetSplits
from dap_ray.errors import UserError
from dap_ray.runtime import check_storage, init_ray, resolve_actor_counts
from dap_ray.storage import expand
from dap_ray.tracking import check_tracking, tune_callbacks
from dap_ray.tune.best import evaluate_best, write_best
from dap_ray.tune.results import results_table, write_plots, write_table
from dap_ray.tune.space import BANK_KEYS, Dim, check_candidates, plain, validate_tune
from dap_ray.tune.trial import (
    METRIC,
    TIME_ATTR,
    SweepSetup,
    build_banks,
    gpus_per_net,
    net_best_column,
    read_json,
    run_trial,
    split_validation,
    trial_dirname,
    write_json,
)

log = logging.getLogger("dap_ray.tune")


def sweep_fingerprint(cfg: Any, dims: Sequence[Dim]) -> str:
    """What makes a sweep the same sweep: resuming with a different one is refused."""
    t = cfg.tune
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "dataset", "method", "sampler", "bank")}
    keep["tune"] = {k: OmegaConf.to_container(t, resolve=True)[k] for k in
                    ("searcher", "num_samples", "scheduler", "grace_period", "reduction_factor", "ipc", "archs", "epochs", "eval_every",
                     "val_per_class", "val_seed")}
    keep["space"] = [(d.key, d.type, d.low, d.high, d.q, list(d.values)) for d in dims]
    keep["eval"] = {"recipe": cfg.eval.recipe, "resolution": cfg.eval.resolution}
    keep["seed"] = cfg.seed
    return config_hash(keep)


def make_tuner(cfg: Any, dims: Sequence[Dim], setup: SweepSetup, storage: str, resume: bool):
    """A new Tuner, or Tuner.restore of the interrupted sweep (finished trials kept, errored ones rerun)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    trainable = tune.with_parameters(run_trial, setup=setup)
    nets = len(t.archs)
    if t.sampler_actors > 0 or nets > 1:  # the trial's own bundle + one per sampler actor and per net (child actors are captured)
        r = cfg.runtime
        bundles = [{"CPU": float(t.cpus_per_trial), "GPU": float(t.gpus_per_trial)}]
        bundles += [{"CPU": float(r.cpus_per_actor), "GPU": float(r.gpus_per_actor)}] * int(t.sampler_actors)
        if nets > 1:
            bundles += [{"CPU": float(t.cpus_per_net), "GPU": gpus_per_net(t)}] * nets
        resources: Any = tune.PlacementGroupFactory(bundles)
    else:
        resources = {"cpu": float(t.cpus_per_trial), "gpu": float(t.gpus_per_trial)}
    trainable = tune.with_resources(trainable, resources)
    exp_path = f"{storage.rstrip('/')}/{t.name}"
    if resume:
        log.info("resuming the sweep at %s", exp_path)
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
    searcher = str(t.searcher)
    if searcher == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch

            search_alg: Any = OptunaSearch(seed=int(cfg.seed))
            if t.max_concurrent:
                search_alg = ConcurrencyLimiter(search_alg, max_concurrent=int(t.max_concurrent))
        except ImportError:
            log.warning("tune.searcher=optuna needs the optuna package (pip install optuna); falling back to random search")
            searcher = "random"
    if searcher != "optuna":
        search_alg = BasicVariantGenerator(max_concurrent=int(t.max_concurrent), random_state=int(cfg.seed))
    scheduler = None
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=int(t.epochs), grace_period=int(t.grace_period),
                                  reduction_factor=float(t.reduction_factor))
    param_space = {d.key: d.to_ray(searcher) for d in dims}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search_alg, scheduler=scheduler, num_samples=int(t.num_samples),
                                    reuse_actors=bool(t.reuse_actors), trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=str(t.name), storage_path=storage, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=int(t.max_failures)),
                                  callbacks=tune_callbacks(cfg.tracking)),  # MLflow / W&B per trial, when switched on
    )


def run(cfg_raw: Any) -> int:
    """Validate → bank(s) once → Tuner (new or restored) → table, plots, best override, final test."""
    import ray
    from ray import tune

    t_start = time.time()
    cfg = to_structured(cfg_raw, TuneConfig)
    validate(cfg)
    check_tracking(cfg.tracking)  # a tracking switch without its package: exit 2 before the banks are built
    resolve_dtype(cfg)  # sampler.dtype=auto -> bf16 / fp32 once: trials and banks see the resolved name
    resolve_cfg_scale(cfg)  # sampler.cfg_scale=null -> model.cfg_scale, unless the space sweeps it
    dims = validate_tune(cfg)
    t = cfg.tune
    cfg.ipc = int(t.ipc)  # trials sample tune.ipc images per class
    ds = cfg.dataset
    full = resolve_dataset(ds.name, ds.root, OmegaConf.to_container(ds.classes) if OmegaConf.is_config(ds.classes) else ds.classes,
                           train_dir=ds.train_dir, test_dir=ds.test_dir, test_fraction=ds.test_fraction, seed=ds.split_seed,
                           cache_dir=expand(cfg.cache_dir))
    backbone = load_backbone(OmegaConf.to_container(cfg.model, resolve=True), "meta")  # configs only: no weights on the driver
    validate_against_backbone(cfg, backbone)
    backbone.bind_classes(full.classes)
    check_candidates(cfg, dims, backbone)
    sweep_ds, val_recs = split_validation(full, int(t.val_per_class), int(t.val_seed))

    out_dir = expand(cfg.out_dir)
    storage = expand(t.storage_path) if t.storage_path else f"{out_dir}/ray_results"
    exp_path = f"{storage.rstrip('/')}/{t.name}"
    for key, url in (("out_dir", out_dir), ("cache_dir", expand(cfg.cache_dir)), ("tune.storage_path", storage)):
        check_storage(url, key)  # a missing s3:// bucket: exit 2 now, not a new bucket or a traceback mid-sweep
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    fp = sweep_fingerprint(cfg, dims)
    can_restore = tune.Tuner.can_restore(exp_path)
    prev = read_json(fs, f"{root}/sweep.json")
    if can_restore and not t.resume:
        raise UserError(f"a sweep already exists at {exp_path}: pass tune.resume=true to continue it, or choose another tune.name or out_dir")
    if can_restore and prev is not None and prev.get("fingerprint") != fp:
        raise UserError(f"the sweep at {exp_path} was started with other settings (space, budget, model or data); "
                        "resume it with the same settings, or choose another tune.name or out_dir")
    resume = bool(t.resume and can_restore)
    if t.resume and not can_restore:
        log.warning("tune.resume=true but there is no sweep to restore at %s; starting one", exp_path)
    fs.pipe_file(f"{root}/config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    write_json(fs, f"{root}/sweep.json", {"fingerprint": fp, "experiment": exp_path, "keys": [d.key for d in dims]})
    log.info("sweep over %s (%s search, %s); outputs in %s", ", ".join(d.key for d in dims), t.searcher, t.scheduler, out_dir)
    log.info("dataset: %s, %d classes; bank on %d training images, validation %d held out, test %d (used once, at the end)",
             full.name, len(full.classes), len(sweep_ds.train), len(val_recs), len(full.test))

    ray_info = init_ray(cfg.runtime)
    resolve_actor_counts(cfg.runtime)
    log.info("ray: %s", ray_info)
    t0 = time.time()
    banks = build_banks(cfg, dims, backbone, sweep_ds, expand(cfg.cache_dir))
    bank_s = time.time() - t0
    val_imgs, ok = load_images([r.path for r in val_recs], int(cfg.eval.resolution))
    setup = SweepSetup(
        base=OmegaConf.to_container(cfg, resolve=True),
        keys=tuple(d.key for d in dims),
        bank_keys=tuple(k for k in BANK_KEYS if k in {d.key for d in dims}),
        banks=banks,
        dataset=DatasetSplits(sweep_ds.name, sweep_ds.root, sweep_ds.classes, sweep_ds.train, val_recs),
        val_images=ray.put(val_imgs),
        val_labels=ray.put(np.asarray([val_recs[i].label for i in ok], np.int64)),
        trials_dir=f"{out_dir}/trials",
        sampler_actors=int(t.sampler_actors),
    )
    tuner = make_tuner(cfg, dims, setup, storage, resume)
    t0 = time.time()
    grid = tuner.fit()
    sweep_s = time.time() - t0

    df = results_table(grid, dims, int(t.epochs), [str(a) for a in t.archs])
    write_table(df, out_dir)
    plots = write_plots(df, dims, out_dir)
    good = df[(df["status"] != "error") & df["val_acc_best"].notna()] if len(df) else df
    n_err = int((df["status"] == "error").sum()) if len(df) else 0
    log.info("%d trials (%d completed, %d stopped early by ASHA, %d errors) in %.0fs; bank %.0fs", len(df),
             int((df["status"] == "completed").sum()) if len(df) else 0, int((df["status"] == "stopped").sum()) if len(df) else 0, n_err, sweep_s, bank_s)
    if len(good) == 0:
        log.error("no trial reported a validation accuracy; see the error column of %s/results.csv", out_dir)
        return 1
    best = good.iloc[0]
    knobs = {d.key: plain(best[d.key]) for d in dims}
    test = None
    if t.test_best:
        test = evaluate_best(cfg, setup, full, knobs, str(best["trial_id"]), out_dir, expand(cfg.cache_dir))
    lines = write_best(cfg, best, dims, out_dir, test)
    cols = ["trial_id"] + [d.key for d in dims] + ["val_acc_best"] + ([net_best_column(a) for a in t.archs] if len(t.archs) > 1 else []) \
        + ["epochs", "status"]
    print(df[cols].head(10).to_string(index=False))
    print(f"\nbest (val acc {100 * float(best['val_acc_best']):.1f}%): {' '.join(f'{k}={v}' for k, v in knobs.items())}")
    if test is not None:
        nets = ", ".join(f"{a} {c['acc_mean']:.1f} ± {c['acc_std']:.1f}" for a, c in test["per_arch"].items())
        mean = "failed" if test["acc_mean"] is None else f"{test['acc_mean']:.1f} ± {test['acc_std']:.1f}%"
        print(f"test accuracy of the best configuration (IPC {test['ipc']}, {len(test['seeds'])} seed(s)): {mean}"
              + (f" (mean over {len(test['per_arch'])} nets: {nets})" if len(test["per_arch"]) > 1 else f" ({test['archs'][0]})"))
    print(f"table: {out_dir}/results.csv; plots: {', '.join(plots)}")
    where = f"{out_dir}/best_overrides.txt" if "://" not in out_dir else "best_overrides.txt (copy it from out_dir first)"
    print(f"distill with it: python -m dap_ray.distill $(cat {where})  ({len(lines)} overrides)")
    log.info("done in %.0fs", time.time() - t_start)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("dap_ray.tune", __doc__, "tune", run, argv)
