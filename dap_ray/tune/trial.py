"""One trial of a sweep, and what the trials share: the validation split, the banks, the setup.

Each trial samples a small distilled set with its knobs through DAP's own sampler code, trains the
evaluation net on it and reports validation accuracy every few epochs (ASHA compares them).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from omegaconf import OmegaConf

from dap_ray.config import TuneConfig, config_hash, guidance_layer, to_structured, validate
from dap_ray.data import distilled_records, load_images
from dap_ray.data.types import DatasetSplits, ImageRecord
from dap_ray.errors import ConfigError
from dap_ray.tune.space import BANK_KEYS, Dim, apply_knobs, plain

log = logging.getLogger("dap_ray.tune")

METRIC = "val_acc"  # what trials report and ASHA compares (accuracy in [0, 1] on the held-out split)
TIME_ATTR = "epoch"  # ASHA's clock: training epochs of the trial's evaluation net
METHOD = "dap"  # the method every trial runs (gamma = 0 is vanilla sampling)


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
    return config_hash({k: plain(v) for k, v in sorted(combo.items())})


def build_banks(cfg: Any, dims: Sequence[Dim], backbone: Any, dataset: DatasetSplits, cache_dir: str) -> dict[str, tuple[str, Any]]:
    """Build (or reuse from the cache) every bank the space needs, once, on the driver.

    One bank covers every candidate layer and every DDIM timestep (so layer and t_stop sweeps share
    it) and keeps per-image features (bank.keep_per_class) for the RBF kernel; keys in BANK_KEYS take one
    bank per value combination.
    """
    from dap_ray.bank import build_bank, make_spec
    from dap_ray.runtime import actor_count

    by_key = {d.key: d for d in dims}
    if "method.layer" in by_key:
        layers = list(dict.fromkeys(str(v) for v in by_key["method.layer"].values))
    else:
        layers = [guidance_layer(cfg)]
    layers += [str(x) for x in (cfg.bank.layers or []) if str(x) not in layers]
    bank_dims = [by_key[k] for k in BANK_KEYS if k in by_key]
    banks = {}
    for values in itertools.product(*(d.values for d in bank_dims)):
        combo = {d.key: v for d, v in zip(bank_dims, values)}
        c = apply_knobs(cfg, combo)
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


def read_json(fs, path: str) -> Any:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def write_json(fs, path: str, obj: Any) -> None:
    fs.pipe_file(path, json.dumps(obj, indent=1, default=str).encode())


def run_trial(config: dict, setup: SweepSetup) -> None:
    """One trial: sample a small set with this trial's knobs, train on it, report val_acc every few epochs.

    Idempotent: `done.json` in the trial's folder holds a finished trial's history; a trial Tune runs
    again (its driver was killed before Tune recorded the finish) replays those reports instead of
    sampling and training again. `attempt-<k>.json` records each attempt that did the work.
    """
    import torch
    from ray import tune

    from dap_ray.eval.run import to_float, train_config
    from dap_ray.eval.train import train_hard_label

    trial_id = tune.get_context().get_trial_id()
    knobs = {k: plain(config[k]) for k in setup.keys}
    tdir = f"{setup.trials_dir}/{trial_id}"
    fs, tp = fsspec.core.url_to_fs(tdir)
    fs.makedirs(tp, exist_ok=True)
    done = read_json(fs, f"{tp}/done.json")
    if done is not None and done.get("knobs") == json.loads(json.dumps(knobs)):
        best = -1.0
        for epoch, acc in done["history"]:
            best = max(best, acc)
            tune.report({METRIC: acc, "val_acc_best": best, TIME_ATTR: epoch, "replayed": True})
        return
    attempt = len(fs.glob(f"{tp}/attempt-*.json"))
    write_json(fs, f"{tp}/attempt-{attempt}.json", {"knobs": knobs, "started": time.time()})

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
            write_json(fs, f"{tp}/done.json", {"knobs": knobs, "history": history, "val_acc_best": best, "sample_seconds": sample_s,
                                                "train_seconds": time.time() - t0 - sample_s})
        tune.report({METRIC: acc, "val_acc_best": best, TIME_ATTR: epoch, "sample_seconds": sample_s})

    train_hard_label(x, y, x_val, y_val, t.arch, tc, seed=int(cfg.seed), device=device, report=report)


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"
