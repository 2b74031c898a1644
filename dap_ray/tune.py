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

import copy
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dap_ray.cli import run_main
from dap_ray.config import (
    SEARCHERS,
    TUNE_SCHEDULERS,
    TuneConfig,
    config_hash,
    guidance_layer,
    resolve_dtype,
    to_structured,
    validate,
    validate_against_backbone,
)
from dap_ray.data.types import DatasetSplits, ImageRecord
from dap_ray.errors import ConfigError, UserError

log = logging.getLogger("dap_ray.tune")

METRIC = "val_acc"  # what trials report and ASHA compares (accuracy in [0, 1] on the held-out split)
TIME_ATTR = "epoch"  # ASHA's clock: training epochs of the trial's evaluation net
SPACE_TYPES = ("uniform", "loguniform", "quniform", "randint", "lograndint", "choice", "grid")
_RANGE_TYPES = ("uniform", "loguniform", "quniform", "randint", "lograndint")
_ALLOWED_PREFIXES = ("method.", "sampler.")
_ALLOWED_KEYS = ("seed", "bank.seed")
# Knobs that change the bank's content (pooled features, RFF bandwidth, DDIM timesteps, noise seed):
# one bank per value combination, so they must take finitely many values.
BANK_KEYS = ("method.pooling", "method.sigma", "method.rff_features", "method.rff_seed", "sampler.steps", "bank.seed")
METHOD = "dap"  # the method every trial runs (gamma = 0 is vanilla sampling)


# ---------------------------------------------------------------------------------------------
# the search space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    """One swept config key and its distribution."""

    key: str  # dotted config key, e.g. method.gamma
    type: str  # one of SPACE_TYPES
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: tuple = ()

    @property
    def discrete(self) -> bool:
        return self.type in ("choice", "grid")

    @property
    def log(self) -> bool:
        return self.type in ("loguniform", "lograndint")

    def candidates(self) -> list:
        """The values a trial can take (discrete) or the range's end points (validated on the driver)."""
        return list(self.values) if self.discrete else [self.low, self.high]

    def to_ray(self, searcher: str) -> Any:
        """The Ray Tune domain: grid values become grid_search (cross product), the rest are sampled.

        searcher=grid turns `choice` into a grid too; model-based searchers cannot take grid_search,
        so there `grid` becomes a `choice`.
        """
        from ray import tune

        values = list(self.values)
        if self.type == "grid" or (self.type == "choice" and searcher == "grid"):
            return tune.choice(values) if searcher == "optuna" else tune.grid_search(values)
        if self.type == "choice":
            return tune.choice(values)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        if self.type == "randint":  # Ray's upper bound is exclusive; ours is inclusive
            return tune.randint(int(self.low), int(self.high) + 1)
        return tune.lograndint(int(self.low), int(self.high) + 1)


def flatten_space(space: Mapping, prefix: str = "") -> dict[str, dict]:
    """Nested ({method: {gamma: {type: ...}}}) or flat ({"method.gamma": {type: ...}}) -> {dotted key: spec}."""
    out: dict[str, dict] = {}
    for k, v in space.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and "type" in v:
            out[key] = dict(v)
        elif isinstance(v, Mapping) and v:
            out.update(flatten_space(v, key))
        else:
            raise ConfigError(f"tune.space.{key}", v, "a distribution such as {type: loguniform, low: 0.5, high: 20} or {type: grid, values: [0, 400]}")
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_dim(key: str, spec: Mapping, searcher: str) -> Dim:
    """Check one entry of tune.space (no model needed); ConfigError names the key, value and what is allowed."""
    where = f"tune.space.{key}"
    if not (key.startswith(_ALLOWED_PREFIXES) or key in _ALLOWED_KEYS):
        raise ConfigError(where, "(not sweepable)", "keys under method. or sampler., or seed, bank.seed (the model, dataset and evaluation stay fixed in a sweep)")
    schema = OmegaConf.structured(TuneConfig)
    sentinel = object()
    default = OmegaConf.select(schema, key, default=sentinel)
    if default is sentinel or isinstance(default, DictConfig):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "a dotted config key"
        raise ConfigError(where, "(unknown key)", f"a config key; valid keys{' of ' + parent if parent else ''}: {valid}")
    t = spec.get("type")
    if t not in SPACE_TYPES:
        raise ConfigError(f"{where}.type", t, f"one of {', '.join(SPACE_TYPES)}")
    allowed_fields = {"type", "values"} if t in ("choice", "grid") else {"type", "low", "high"} | ({"q"} if t == "quniform" else set())
    extra = sorted(set(spec) - allowed_fields)
    if extra:
        raise ConfigError(f"{where}.{extra[0]}", spec[extra[0]], f"fields of a {t} distribution: {', '.join(sorted(allowed_fields))}")
    if t in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
            raise ConfigError(f"{where}.values", values, "a non-empty list of values")
        return Dim(key, t, values=tuple(values))
    low, high = spec.get("low"), spec.get("high")
    if not (_is_number(low) and _is_number(high)):
        raise ConfigError(f"{where}.low/high", (low, high), "two numbers")
    if searcher == "grid":
        raise ConfigError(f"{where}.type", t, "grid or choice (with values) when tune.searcher=grid")
    if key in BANK_KEYS:
        raise ConfigError(f"{where}.type", t, f"grid or choice: {key} changes the feature bank, which is built once per value before the sweep")
    is_int = t in ("randint", "lograndint")
    if _is_number(default) and isinstance(default, int) and not is_int:
        raise ConfigError(f"{where}.type", t, f"randint, lograndint, choice or grid ({key} is an integer)")
    if is_int and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}.low/high", (low, high), "integers (bounds inclusive)")
    if (low > high) if is_int else (low >= high):
        raise ConfigError(f"{where}.low/high", (low, high), "low < high")
    if t in ("loguniform", "lograndint") and low <= 0:
        raise ConfigError(f"{where}.low", low, "a number > 0 (log scale)")
    q = None
    if t == "quniform":
        q = spec.get("q")
        if not (_is_number(q) and q > 0):
            raise ConfigError(f"{where}.q", q, "a number > 0 (the quantisation step)")
    return Dim(key, t, float(low), float(high), None if q is None else float(q))


def parse_space(cfg: Any) -> list[Dim]:
    space = OmegaConf.to_container(cfg.tune.space, resolve=True) if OmegaConf.is_config(cfg.tune.space) else dict(cfg.tune.space)
    flat = flatten_space(space)
    if not flat:
        raise ConfigError("tune.space", "{}", "at least one swept key, e.g. tune.space.method.gamma={type: loguniform, low: 0.5, high: 20}")
    return [parse_dim(k, v, str(cfg.tune.searcher)) for k, v in flat.items()]


def validate_tune(cfg: Any) -> list[Dim]:
    """Range checks of the tune section and the space's structure; returns the parsed space."""
    from dap_ray.eval.nets import list_nets

    t = cfg.tune

    def check(ok: bool, key: str, value: object, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"tune.{key}", value, allowed)

    check(t.searcher in SEARCHERS, "searcher", t.searcher, f"one of {', '.join(SEARCHERS)}")
    check(t.scheduler in TUNE_SCHEDULERS, "scheduler", t.scheduler, f"one of {', '.join(TUNE_SCHEDULERS)}")
    check(t.num_samples >= 1, "num_samples", t.num_samples, "an integer >= 1")
    check(t.max_concurrent >= 0, "max_concurrent", t.max_concurrent, "an integer >= 0 (0 = as many as resources allow)")
    check(t.ipc >= 1, "ipc", t.ipc, "an integer >= 1")
    check(t.arch in list_nets(), "arch", t.arch, f"one of {', '.join(list_nets())}")
    check(t.epochs >= 1, "epochs", t.epochs, "an integer >= 1")
    check(1 <= t.eval_every <= t.epochs, "eval_every", t.eval_every, f"an integer in [1, tune.epochs={t.epochs}]")
    check(1 <= t.grace_period <= t.epochs, "grace_period", t.grace_period, f"an integer in [1, tune.epochs={t.epochs}]")
    check(t.reduction_factor >= 2, "reduction_factor", t.reduction_factor, "an integer >= 2")
    check(t.val_per_class >= 1, "val_per_class", t.val_per_class, "an integer >= 1")
    check(len(t.test_seeds) >= 1, "test_seeds", list(t.test_seeds), "a non-empty list of integers")
    check(t.cpus_per_trial > 0, "cpus_per_trial", t.cpus_per_trial, "a number > 0")
    check(t.gpus_per_trial >= 0, "gpus_per_trial", t.gpus_per_trial, "a number >= 0 (fractions share a GPU)")
    check(t.sampler_actors >= 0, "sampler_actors", t.sampler_actors, "an integer >= 0 (0 = sample inside the trial)")
    check(t.max_failures >= 0, "max_failures", t.max_failures, "an integer >= 0")
    check(bool(t.name) and "/" not in t.name, "name", t.name, "a non-empty folder name without '/'")
    return parse_space(cfg)


def _plain(v: Any) -> Any:
    """numpy scalars (Ray samples them) -> Python values, so configs and JSON take them."""
    return v.item() if isinstance(v, np.generic) else v


def apply_knobs(cfg: Any, knobs: Mapping[str, Any]) -> Any:
    """A copy of the structured cfg with the trial's values set (types checked by the schema)."""
    out = copy.deepcopy(cfg)
    for key, value in knobs.items():
        try:
            OmegaConf.update(out, key, _plain(value), merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"tune.space.{key}", value, str(e).splitlines()[0]) from None
    return out


def check_candidates(cfg: Any, dims: Sequence[Dim], backbone: Any) -> None:
    """Every value a trial can take must pass the same checks as a distill run (layers need the model)."""
    for d in dims:
        for v in d.candidates():
            if d.type in ("randint", "lograndint"):
                v = int(v)
            try:
                c = apply_knobs(cfg, {d.key: v})
                validate(c)
                validate_against_backbone(c, backbone)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{d.key}", v, e.allowed) from None


# ---------------------------------------------------------------------------------------------
# what the trials share
# ---------------------------------------------------------------------------------------------


def split_validation(dataset: DatasetSplits, per_class: int, seed: int) -> tuple[DatasetSplits, list[ImageRecord]]:
    """Hold out `per_class` training images of each class (seeded, by sorted id): the validation split.

    Returns (the dataset the bank is built from: train minus validation, test unchanged) and the
    validation records. The held-out images never enter the bank, so a trial's guidance has not seen
    the images it is scored on.
    """
    from dap_ray.sampling import seed_for

    keep, val = [], []
    for c in dataset.classes:
        recs = sorted((r for r in dataset.train if r.label == c.index), key=lambda r: r.id)
        if len(recs) <= per_class:
            raise ConfigError("tune.val_per_class", per_class, f"fewer than the {len(recs)} training images of class {c.key!r}")
        rng = np.random.default_rng(seed_for(seed, "tune-val", c.key) % 2**32)
        chosen = set(rng.choice(len(recs), per_class, replace=False).tolist())
        for i, r in enumerate(recs):
            (val if i in chosen else keep).append(r)
    return DatasetSplits(dataset.name, dataset.root, list(dataset.classes), keep, list(dataset.test)), val


@dataclass
class SweepSetup:
    """What every trial gets (through tune.with_parameters, i.e. the object store): no trial rebuilds any of it."""

    base: dict  # the resolved TuneConfig (ipc = tune.ipc), plain container
    keys: tuple[str, ...]  # swept keys
    bank_keys: tuple[str, ...]  # swept keys that select the bank
    banks: dict[str, tuple[str, Any]]  # bank id -> (bank path, BankSpec)
    dataset: DatasetSplits  # train = the bank's images; test = the validation records
    val_images: np.ndarray  # uint8 (N, R, R, 3) at eval.resolution
    val_labels: np.ndarray  # int64 (N,)
    trials_dir: str  # <out_dir>/trials: images and markers of each trial
    sampler_actors: int  # 0 = in-process sampling


def bank_id(combo: Mapping[str, Any]) -> str:
    return config_hash({k: _plain(v) for k, v in sorted(combo.items())})


def build_banks(cfg: Any, dims: Sequence[Dim], backbone: Any, dataset: DatasetSplits, cache_dir: str) -> dict[str, tuple[str, Any]]:
    """Build (or reuse from the cache) every bank the space needs, once, on the driver.

    One bank covers every candidate layer and every DDIM timestep (so layer and t_stop sweeps share
    it) and carries RFF statistics when `rbf` is among the kernels; keys in BANK_KEYS take one bank
    per value combination.
    """
    from dap_ray.bank import build_bank, make_spec
    from dap_ray.runtime import actor_count

    by_key = {d.key: d for d in dims}
    if "method.layer" in by_key:
        layers = list(dict.fromkeys(str(v) for v in by_key["method.layer"].values))
    else:
        layers = [guidance_layer(cfg)]
    layers += [str(x) for x in (cfg.bank.layers or []) if str(x) not in layers]
    kernels = set(by_key["method.kernel"].values) if "method.kernel" in by_key else {cfg.method.kernel}
    bank_dims = [by_key[k] for k in BANK_KEYS if k in by_key]
    banks = {}
    for values in itertools.product(*(d.values for d in bank_dims)):
        combo = {d.key: v for d, v in zip(bank_dims, values)}
        c = apply_knobs(cfg, combo)
        if "rbf" in kernels:
            c.method.kernel = "rbf"
        spec = make_spec(c, backbone, layers)
        r = cfg.runtime
        bank = build_bank(spec, dataset, cache_dir, num_actors=actor_count(r.bank_actors, float(r.gpus_per_actor), float(r.cpus_per_actor), "runtime.bank_actors"),
                          gpus_per_actor=float(r.gpus_per_actor),
                          cpus_per_actor=float(r.cpus_per_actor))
        log.info("bank %s: %s (%d images, layers %s, %s)", bank_id(combo), bank.path, bank.meta["images"], ",".join(layers),
                 "reused" if bank.meta.get("reused") else "built")
        banks[bank_id(combo)] = (bank.path, bank.spec)
    return banks


def trial_config(setup: SweepSetup, knobs: Mapping[str, Any]) -> Any:
    cfg = apply_knobs(to_structured(OmegaConf.create(setup.base), TuneConfig), knobs)
    validate(cfg)
    return cfg


def trial_bank(setup: SweepSetup, knobs: Mapping[str, Any]):
    from dap_ray.bank import load_bank

    path, spec = setup.banks[bank_id({k: knobs[k] for k in setup.bank_keys})]
    bank = load_bank(path, spec, setup.dataset.classes)
    if bank is None:
        raise RuntimeError(f"the sweep's bank at {path} is gone (it is built before the sweep; re-run to rebuild it)")
    return bank


def sample_set(cfg: Any, dataset: DatasetSplits, bank: Any, run_dir: str, sampler_actors: int = 0) -> str:
    """cfg.ipc images per class under <run_dir>/dap/images with the DAP method's own code.

    sampler_actors = 0: the SamplerWorker runs inside this process (a trial holding one CPU cannot
    wait for a nested actor that needs another); k > 0: the method's actor pool (`DAP.run`), whose
    actors land in the trial's placement group. Either way finished images are skipped, so a
    restarted trial only renders what is missing.
    """
    from dap_ray.methods import RunContext
    from dap_ray.methods.dap import DAP, sampler_job
    from dap_ray.sampling import SamplerWorker, existing_indices, work_items

    method = DAP()
    ctx = RunContext(cfg=cfg, dataset=dataset, backbone_info=None, run_dir=run_dir, bank=bank, progress=False)
    if sampler_actors > 0:
        cfg.runtime.sampler_actors = int(sampler_actors)
        method.run(ctx)
        return ctx.method_dir(method.name)
    job = sampler_job(ctx, method.name, method.recipe(ctx) if cfg.method.gamma > 0 else None)
    items = work_items(method.name, len(dataset.classes), int(cfg.ipc), int(cfg.sampler.batch_size))
    pending = [it for it in items if not set(range(it.start, it.stop)) <= existing_indices(job.out_dir, job.classes[it.label].key)]
    if pending:
        worker = SamplerWorker(job)
        for it in pending:
            worker.render(it)
    return ctx.method_dir(method.name)


def _read_json(fs, path: str) -> Any:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _write_json(fs, path: str, obj: Any) -> None:
    fs.pipe_file(path, json.dumps(obj, indent=1, default=str).encode())


def _trial(config: dict, setup: SweepSetup) -> None:
    """One trial: sample a small set with this trial's knobs, train on it, report val_acc every few epochs.

    Idempotent: `done.json` in the trial's folder holds a finished trial's history; a trial Tune runs
    again (its driver was killed before Tune recorded the finish) replays those reports instead of
    sampling and training again. `attempt-<k>.json` records each attempt that did the work.
    """
    import torch
    from ray import tune

    from dap_ray.eval.run import distilled_records, load_images, to_float, train_config
    from dap_ray.eval.train import train_hard_label

    trial_id = tune.get_context().get_trial_id()
    knobs = {k: _plain(config[k]) for k in setup.keys}
    tdir = f"{setup.trials_dir}/{trial_id}"
    fs, tp = fsspec.core.url_to_fs(tdir)
    fs.makedirs(tp, exist_ok=True)
    done = _read_json(fs, f"{tp}/done.json")
    if done is not None and done.get("knobs") == json.loads(json.dumps(knobs)):
        best = -1.0
        for epoch, acc in done["history"]:
            best = max(best, acc)
            tune.report({METRIC: acc, "val_acc_best": best, TIME_ATTR: epoch, "replayed": True})
        return
    attempt = len(fs.glob(f"{tp}/attempt-*.json"))
    _write_json(fs, f"{tp}/attempt-{attempt}.json", {"knobs": knobs, "started": time.time()})

    cfg = trial_config(setup, knobs)
    t = cfg.tune
    torch.set_num_threads(max(1, int(t.cpus_per_trial)))
    device = "cuda" if t.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    t0 = time.time()
    img_dir = sample_set(cfg, setup.dataset, trial_bank(setup, knobs), tdir, setup.sampler_actors)
    sample_s = time.time() - t0
    recs = distilled_records(f"{img_dir}/images", setup.dataset.classes)
    res = int(cfg.eval.resolution)
    imgs, ok = load_images([r.path for r in recs], res)
    x = to_float(imgs)  # (N, 3, R, R) in [0, 1]
    y = torch.tensor([recs[i].label for i in ok], dtype=torch.long)  # (N,)
    x_val = to_float(np.array(setup.val_images))  # (V, 3, R, R); a copy: object-store arrays are read-only
    y_val = torch.from_numpy(np.array(setup.val_labels)).long()  # (V,)
    nclass = len(setup.dataset.classes)
    tc = train_config(cfg, int(cfg.ipc), nclass, t.arch).with_(epochs=int(t.epochs), eval_every=int(t.eval_every), eval_after=0.0,
                                                               num_classes=nclass)
    history: list[list] = []

    def report(epoch: int, acc: float) -> None:
        history.append([int(epoch), float(acc)])
        best = max(a for _, a in history)
        if epoch >= tc.epochs:  # before the last report: Tune may end the trial inside tune.report (max_t)
            _write_json(fs, f"{tp}/done.json", {"knobs": knobs, "history": history, "val_acc_best": best, "sample_seconds": sample_s,
                                                "train_seconds": time.time() - t0 - sample_s})
        tune.report({METRIC: acc, "val_acc_best": best, TIME_ATTR: epoch, "sample_seconds": sample_s})

    train_hard_label(x, y, x_val, y_val, t.arch, tc, seed=int(cfg.seed), device=device, report=report)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def _expand(path: str) -> str:
    from dap_ray.storage import expand

    return expand(path)


def sweep_fingerprint(cfg: Any, dims: Sequence[Dim]) -> str:
    """What makes a sweep the same sweep: resuming with a different one is refused."""
    t = cfg.tune
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "dataset", "method", "sampler", "bank")}
    keep["tune"] = {k: OmegaConf.to_container(t, resolve=True)[k] for k in
                    ("searcher", "num_samples", "scheduler", "grace_period", "reduction_factor", "ipc", "arch", "epochs", "eval_every",
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
    trainable = tune.with_parameters(_trial, setup=setup)
    if t.sampler_actors > 0:  # the trial's own bundle + one per sampler actor (child actors are captured)
        r = cfg.runtime
        bundles = [{"CPU": float(t.cpus_per_trial), "GPU": float(t.gpus_per_trial)}]
        bundles += [{"CPU": float(r.cpus_per_actor), "GPU": float(r.gpus_per_actor)}] * int(t.sampler_actors)
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
                                    reuse_actors=bool(t.reuse_actors), trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=str(t.name), storage_path=storage, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=int(t.max_failures))),
    )


def results_table(grid: Any, dims: Sequence[Dim], epochs: int):
    """One row per trial: knobs, last and best val_acc, epochs reached, reports, status (completed /
    stopped by ASHA / error), sorted best first."""
    import pandas as pd

    rows = []
    for r in grid:
        m = r.metrics or {}
        hist = r.metrics_dataframe
        reports = 0 if hist is None or METRIC not in getattr(hist, "columns", []) else int(hist[METRIC].notna().sum())
        best = float(hist[METRIC].max()) if reports else math.nan
        epoch = int(m.get(TIME_ATTR, 0) or 0)
        status = "error" if r.error is not None else ("completed" if epoch >= epochs else "stopped")
        row = {"trial_id": str(r.path).rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")}
        for d in dims:
            v = _plain(r.config.get(d.key))
            row[d.key] = str(v) if d.key == "method.layer" else v
        row.update({METRIC: float(m.get(METRIC, math.nan)), "val_acc_best": best, "epochs": epoch, "reports": reports, "status": status,
                    "seconds": round(float(m.get("time_total_s", math.nan)), 1),
                    "error": "" if r.error is None else f"{type(r.error).__name__}: {str(r.error).splitlines()[0] if str(r.error) else ''}"[:300]})
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["val_acc_best", "trial_id"], ascending=[False, True], na_position="last").reset_index(drop=True)
    return df


def write_table(df: Any, out_dir: str) -> None:
    import io

    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.pipe_file(f"{root}/results.csv", df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    fs.pipe_file(f"{root}/results.parquet", buf.getvalue())


# -- plots ------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _axis(values: Any, dim: Dim, bins: int = 5) -> tuple[list[str], list[str]]:
    """Labels of each trial's value on one heatmap axis, and the ordered axis labels. A continuous
    knob with many distinct values is binned (log-spaced bins for log distributions)."""
    vals = [_plain(v) for v in values]
    uniq = sorted(set(vals), key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
    if dim.discrete or len(uniq) <= bins:
        return [_fmt(v) for v in vals], [_fmt(v) for v in uniq]
    lo, hi = float(dim.low), float(dim.high)
    edges = np.geomspace(lo, hi, bins + 1) if dim.log else np.linspace(lo, hi, bins + 1)
    labels = [f"{_fmt(float(edges[i]))}–{_fmt(float(edges[i + 1]))}" for i in range(bins)]
    idx = np.clip(np.searchsorted(edges, np.asarray(vals, float), side="right") - 1, 0, bins - 1)
    return [labels[i] for i in idx], labels


def _save_fig(fig: Any, path: str) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(p, buf.getvalue())


def plot_heatmap(df: Any, dx: Dim, dy: Dim, path: str) -> None:
    """Mean best validation accuracy (%) per (x, y) cell over the trials in it; n trials per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] != "error"]
    xs, xl = _axis(ok[dx.key], dx)
    ys, yl = _axis(ok[dy.key], dy)
    acc = np.full((len(yl), len(xl)), np.nan)
    n = np.zeros((len(yl), len(xl)), int)
    stopped = np.zeros((len(yl), len(xl)), int)
    cells: dict[tuple[int, int], list[float]] = {}
    for x, y, a, st in zip(xs, ys, ok["val_acc_best"], ok["status"]):
        cells.setdefault((yl.index(y), xl.index(x)), []).append(100.0 * float(a))
        stopped[yl.index(y), xl.index(x)] += st == "stopped"
    for (i, j), v in cells.items():
        acc[i, j], n[i, j] = float(np.mean(v)), len(v)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(xl), 1.0 + 0.8 * len(yl)))
    im = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", origin="lower", aspect="auto")
    for i in range(len(yl)):
        for j in range(len(xl)):
            if n[i, j]:
                mark = f", {stopped[i, j]} stopped" if stopped[i, j] else ""
                ax.text(j, i, f"{acc[i, j]:.1f}\n(n={n[i, j]}{mark})", ha="center", va="center", fontsize=8,
                        color="white" if acc[i, j] < np.nanmean(acc) else "black")
    ax.set_xticks(range(len(xl)), xl, rotation=30 if len(xl) > 4 else 0)
    ax.set_yticks(range(len(yl)), yl)
    ax.set_xlabel(dx.key)
    ax.set_ylabel(dy.key)
    title = f"validation accuracy (%) over {dx.key.split('.')[-1]} × {dy.key.split('.')[-1]}"
    if stopped.any():
        title += "\n(stopped: ended early by ASHA, at fewer epochs)"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean best val acc (%)")
    _save_fig(fig, path)


def plot_by_knob(df: Any, dim: Dim, path: str) -> None:
    """Best validation accuracy of every trial against one knob (points), with the mean per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] != "error"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    acc = 100.0 * ok["val_acc_best"].astype(float).to_numpy()
    status = ok["status"].to_numpy()
    if dim.discrete:
        labels, order = _axis(ok[dim.key], dim)
        x = np.array([order.index(v) for v in labels], float)
        means = [float(np.mean(acc[x == i])) if (x == i).any() else np.nan for i in range(len(order))]
        ax.bar(range(len(order)), means, alpha=0.3, color="gray", label="mean")
        x = x + (np.random.default_rng(0).random(len(x)) - 0.5) * 0.2  # jitter
        ax.set_xticks(range(len(order)), order)
    else:
        x = ok[dim.key].astype(float).to_numpy()
        if dim.log:
            ax.set_xscale("log")
    for st, color, label in (("completed", "C0", "trial (all epochs)"), ("stopped", "C1", "trial stopped early by ASHA")):
        m = status == st
        if m.any():
            ax.scatter(x[m], acc[m], alpha=0.8, color=color, label=label)
    ax.set_xlabel(dim.key)
    ax.set_ylabel("best val acc (%)")
    ax.set_title(f"validation accuracy by {dim.key.split('.')[-1]}")
    ax.legend(fontsize=7)
    _save_fig(fig, path)


def write_plots(df: Any, dims: Sequence[Dim], out_dir: str) -> list[str]:
    by_key = {d.key: d for d in dims}
    paths = []
    if len(df[df["status"] != "error"]) == 0:
        return paths
    if "method.gamma" in by_key and "method.t_stop" in by_key:
        p = f"{out_dir}/plots/heatmap_gamma_t_stop.png"
        plot_heatmap(df, by_key["method.gamma"], by_key["method.t_stop"], p)
        paths.append(p)
    names = [d.key.rsplit(".", 1)[-1] for d in dims]
    for d, name in zip(dims, names):
        if names.count(name) > 1:
            name = d.key.replace(".", "_")
        p = f"{out_dir}/plots/acc_by_{name}.png"
        plot_by_knob(df, d, p)
        paths.append(p)
    return paths


# -- the best configuration -------------------------------------------------------------------


def _hydra_parse(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={text}").value()


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types (2 != "2" here: a quoted layer name must stay a string)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _override_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_text(_plain(v)) for v in value) + "]"
    text = str(value)
    try:
        if _same(_hydra_parse(text), text):
            return text
    except Exception:  # noqa: BLE001 - the grammar rejects it unquoted: quote it
        pass
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_override(key: str, value: Any) -> str | None:
    """`key=value` that Hydra parses back to the same value and type (strings that look like numbers,
    booleans or hold grammar characters are quoted); None when that is impossible in a file read with
    `$(cat best_overrides.txt)`: the shell splits words at whitespace and keeps quotes literal."""
    value = _plain(value)
    if isinstance(value, tuple):
        value = list(value)
    text = _override_text(value)
    if any(ch.isspace() for ch in text):
        return None
    try:
        ok = _same(_hydra_parse(text), value)
    except Exception:  # noqa: BLE001
        ok = False
    return f"{key}={text}" if ok else None


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_leaves(v, key))
        else:
            out[key] = v
    return out


def context_overrides(cfg: Any) -> dict[str, Any]:
    """Settings of the sweep that differ from distill's defaults in the sections that shape the images
    (model, dataset, method, sampler, bank, seed): the knobs were best *in this context*."""
    from dap_ray.cli import compose
    from dap_ray.config import DistillConfig

    default = OmegaConf.to_container(to_structured(compose("distill", []), DistillConfig), resolve=True)
    mine = OmegaConf.to_container(cfg, resolve=True)
    out = {}
    for section in ("seed", "model", "dataset", "method", "sampler", "bank"):
        a = _leaves({section: mine[section]})
        b = _leaves({section: default[section]})
        out.update({k: v for k, v in a.items() if b.get(k, object()) != v})
    return out


def write_best(cfg: Any, row: Mapping[str, Any], dims: Sequence[Dim], out_dir: str, test: dict | None) -> list[str]:
    """best_overrides.txt (one key=value a line, for `python -m dap_ray.distill $(cat best_overrides.txt)`)
    and best_config.yaml. The swept knobs come last, so they win over any context line."""
    knobs = {d.key: _plain(row[d.key]) for d in dims}
    best_cfg = apply_knobs(cfg, knobs)
    context = {k: v for k, v in context_overrides(best_cfg).items() if k not in knobs}
    lines, unformattable = [], {}
    for k, v in list(context.items()) + list(knobs.items()):
        text = format_override(k, v)
        if text is None:
            unformattable[k] = v
        else:
            lines.append(text)
    if unformattable:
        log.warning("best_overrides.txt leaves out %s (values with spaces); they are in best_config.yaml", ", ".join(unformattable))
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.pipe_file(f"{root}/best_overrides.txt", ("\n".join(lines) + "\n").encode())
    doc = {"knobs": knobs, "context": context, "not_in_overrides_file": unformattable, "trial_id": row["trial_id"],
           "val_acc_best": float(row["val_acc_best"]), "status": row["status"], "test": test,
           "usage": "python -m dap_ray.distill $(cat best_overrides.txt)"}
    fs.pipe_file(f"{root}/best_config.yaml", OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(doc, default=str)))).encode())
    return lines


def evaluate_best(cfg: Any, setup: SweepSetup, full: DatasetSplits, knobs: Mapping[str, Any], trial_id: str, out_dir: str, cache_dir: str) -> dict:
    """Retrain the best configuration's images (tune.test_seeds) and evaluate on the real test split:
    the only time the sweep touches it. Images come from the best trial's folder (re-sampled, with the
    same seeds and bytes, if that folder is not reachable from here)."""
    from dap_ray.eval.run import distilled_records, evaluate_sets
    from dap_ray.report import summarize

    t = cfg.tune
    best_cfg = trial_config(setup, knobs)
    tdir = f"{setup.trials_dir}/{trial_id}"
    img_dir = sample_set(best_cfg, setup.dataset, trial_bank(setup, knobs), tdir, 0)
    recs = distilled_records(f"{img_dir}/images", full.classes)
    ev = copy.deepcopy(best_cfg)
    ev.eval.protocol = "hard_label"
    ev.eval.archs = [str(t.arch)]
    ev.eval.seeds = [int(s) for s in t.test_seeds]
    ev.eval.epochs = int(t.epochs)
    rows = evaluate_sets(ev, full, {METHOD: recs}, f"{out_dir}/best_test/{trial_id}", cache_dir, progress=False)
    cell = summarize(rows)[(METHOD, str(t.arch))]
    return {"arch": str(t.arch), "seeds": list(ev.eval.seeds), "epochs": int(t.epochs), "ipc": int(best_cfg.ipc),
            "acc_mean": round(cell["mean"], 2), "acc_std": round(cell["std"], 2), "accs": [round(a, 2) for a in cell["accs"]],
            "failed": cell["failed"], "images": img_dir}


def run(cfg_raw: Any) -> int:
    """Validate → bank(s) once → Tuner (new or restored) → table, plots, best override, final test."""
    from ray import tune

    from dap_ray.backbones import load_backbone
    from dap_ray.data import resolve_dataset
    from dap_ray.eval.run import load_images
    from dap_ray.runtime import check_storage, init_ray, resolve_actor_counts

    t_start = time.time()
    cfg = to_structured(cfg_raw, TuneConfig)
    validate(cfg)
    resolve_dtype(cfg)  # sampler.dtype=auto -> bf16 / fp32 once: trials and banks see the resolved name
    dims = validate_tune(cfg)
    t = cfg.tune
    cfg.ipc = int(t.ipc)  # trials sample tune.ipc images per class
    ds = cfg.dataset
    full = resolve_dataset(ds.name, ds.root, OmegaConf.to_container(ds.classes) if OmegaConf.is_config(ds.classes) else ds.classes,
                           train_dir=ds.train_dir, test_dir=ds.test_dir, test_fraction=ds.test_fraction, seed=ds.split_seed,
                           cache_dir=_expand(cfg.cache_dir))
    backbone = load_backbone(OmegaConf.to_container(cfg.model, resolve=True), "cpu")
    validate_against_backbone(cfg, backbone)
    backbone.bind_classes(full.classes)
    check_candidates(cfg, dims, backbone)
    sweep_ds, val_recs = split_validation(full, int(t.val_per_class), int(t.val_seed))

    out_dir = _expand(cfg.out_dir)
    storage = _expand(t.storage_path) if t.storage_path else f"{out_dir}/ray_results"
    exp_path = f"{storage.rstrip('/')}/{t.name}"
    for key, url in (("out_dir", out_dir), ("cache_dir", _expand(cfg.cache_dir)), ("tune.storage_path", storage)):
        check_storage(url, key)  # a missing s3:// bucket: exit 2 now, not a new bucket or a traceback mid-sweep
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    fp = sweep_fingerprint(cfg, dims)
    can_restore = tune.Tuner.can_restore(exp_path)
    prev = _read_json(fs, f"{root}/sweep.json")
    if can_restore and not t.resume:
        raise UserError(f"a sweep already exists at {exp_path}: pass tune.resume=true to continue it, or choose another tune.name or out_dir")
    if can_restore and prev is not None and prev.get("fingerprint") != fp:
        raise UserError(f"the sweep at {exp_path} was started with other settings (space, budget, model or data); "
                        "resume it with the same settings, or choose another tune.name or out_dir")
    resume = bool(t.resume and can_restore)
    if t.resume and not can_restore:
        log.warning("tune.resume=true but there is no sweep to restore at %s; starting one", exp_path)
    fs.pipe_file(f"{root}/config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    _write_json(fs, f"{root}/sweep.json", {"fingerprint": fp, "experiment": exp_path, "keys": [d.key for d in dims]})
    log.info("sweep over %s (%s search, %s); outputs in %s", ", ".join(d.key for d in dims), t.searcher, t.scheduler, out_dir)
    log.info("dataset: %s, %d classes; bank on %d training images, validation %d held out, test %d (used once, at the end)",
             full.name, len(full.classes), len(sweep_ds.train), len(val_recs), len(full.test))

    ray_info = init_ray(cfg.runtime)
    resolve_actor_counts(cfg.runtime)
    log.info("ray: %s", ray_info)
    t0 = time.time()
    banks = build_banks(cfg, dims, backbone, sweep_ds, _expand(cfg.cache_dir))
    bank_s = time.time() - t0
    val_imgs, ok = load_images([r.path for r in val_recs], int(cfg.eval.resolution))
    setup = SweepSetup(
        base=OmegaConf.to_container(cfg, resolve=True),
        keys=tuple(d.key for d in dims),
        bank_keys=tuple(k for k in BANK_KEYS if k in {d.key for d in dims}),
        banks=banks,
        dataset=DatasetSplits(sweep_ds.name, sweep_ds.root, sweep_ds.classes, sweep_ds.train, val_recs),
        val_images=val_imgs,
        val_labels=np.asarray([val_recs[i].label for i in ok], np.int64),
        trials_dir=f"{out_dir}/trials",
        sampler_actors=int(t.sampler_actors),
    )
    tuner = make_tuner(cfg, dims, setup, storage, resume)
    t0 = time.time()
    grid = tuner.fit()
    sweep_s = time.time() - t0

    df = results_table(grid, dims, int(t.epochs))
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
    knobs = {d.key: _plain(best[d.key]) for d in dims}
    test = None
    if t.test_best:
        test = evaluate_best(cfg, setup, full, knobs, str(best["trial_id"]), out_dir, _expand(cfg.cache_dir))
    lines = write_best(cfg, best, dims, out_dir, test)
    cols = ["trial_id"] + [d.key for d in dims] + ["val_acc_best", "epochs", "status"]
    print(df[cols].head(10).to_string(index=False))
    print(f"\nbest (val acc {100 * float(best['val_acc_best']):.1f}%): {' '.join(f'{k}={v}' for k, v in knobs.items())}")
    if test is not None:
        print(f"test accuracy of the best configuration ({test['arch']}, IPC {test['ipc']}, {len(test['seeds'])} seed(s)): "
              f"{test['acc_mean']:.1f} ± {test['acc_std']:.1f}%")
    print(f"table: {out_dir}/results.csv; plots: {', '.join(plots)}")
    where = f"{out_dir}/best_overrides.txt" if "://" not in out_dir else "best_overrides.txt (copy it from out_dir first)"
    print(f"distill with it: python -m dap_ray.distill $(cat {where})  ({len(lines)} overrides)")
    log.info("done in %.0fs", time.time() - t_start)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("dap_ray.tune", __doc__, "tune", run, argv)


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray then pickles the trial function by reference.
    from dap_ray.tune import main as _main

    sys.exit(_main())
