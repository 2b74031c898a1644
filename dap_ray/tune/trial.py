"""One trial of a sweep, and what the trials share: the validation split, the banks, the setup.

Each trial samples a small distilled set with its knobs through DAP's own sampler code, trains each
evaluation net of tune.archs on it and reports every few epochs each net's validation accuracy and
their mean (the mean is what ASHA and the searcher compare).
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
    # ObjectRefs of the validation images, uint8 (N, R, R, 3) at eval.resolution, and labels int64 (N,),
    # put once by the driver: every trial and every net reads the same copy (3 GB at ImageNet-1K 224 px)
    val_images: Any
    val_labels: Any
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
                          cpus_per_actor=float(r.cpus_per_actor), placement_timeout_s=float(r.placement_timeout_s))
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
    from dap_ray.sampling import SamplerWorker, split_finished, work_items

    method = DAP()
    ctx = RunContext(cfg=cfg, dataset=dataset, backbone_info=None, run_dir=run_dir, bank=bank, progress=False)
    if sampler_actors > 0:
        cfg.runtime.sampler_actors = int(sampler_actors)
        method.run(ctx)
        return ctx.method_dir(method.name)
    job = sampler_job(ctx, method.name, method.recipe(ctx) if cfg.method.gamma > 0 else None)
    items = work_items(method.name, len(dataset.classes), int(cfg.ipc), int(cfg.sampler.batch_size))
    pending, _ = split_finished(job, items)
    if pending:
        worker = SamplerWorker(job)
        for it in pending:
            worker.render(it)
    return ctx.method_dir(method.name)


def read_json(fs, path: str) -> Any:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def write_json(fs, path: str, obj: Any) -> None:
    fs.pipe_file(path, json.dumps(obj, indent=1, default=str).encode())


def net_metric(arch: str) -> str:
    """The report key of one net's validation accuracy."""
    return f"{METRIC}/{arch}"


def net_best_column(arch: str) -> str:
    """One net's best validation accuracy: its column in results.csv."""
    return f"val_acc_best/{arch}"


def gpus_per_net(t: Any) -> float:
    """GPUs of each net's actor in a multi-net trial: tune.gpus_per_net, null = tune.gpus_per_trial."""
    return float(t.gpus_per_trial if t.gpus_per_net is None else t.gpus_per_net)


def train_reporting(images: np.ndarray, labels: np.ndarray, val_images: np.ndarray, val_labels: np.ndarray, arch: str, tc: Any,
                    seed: int, device: str, report: Any) -> None:
    """Train one evaluation net on uint8 images (N, R, R, 3), calling report(epoch, acc) at each check."""
    import torch

    from dap_ray.eval.run import to_float
    from dap_ray.eval.train import train_hard_label

    x = to_float(np.array(images))  # (N, 3, R, R) in [0, 1]; a copy: object-store arrays are read-only
    x_val = to_float(np.array(val_images))  # (V, 3, R, R)
    y, y_val = torch.from_numpy(np.array(labels)).long(), torch.from_numpy(np.array(val_labels)).long()
    train_hard_label(x, y, x_val, y_val, arch, tc, seed=seed, device=device, report=report)


class NetTrainer:
    """One net of a multi-net trial, in its own actor (a bundle of the trial's placement group).

    The net trains in a thread of the actor and hands each check over a one-slot queue, so it is never
    more than one check ahead of the trial that asks for them: when ASHA stops the trial between
    checks, the trial kills this actor and the net's remaining epochs are not spent."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, val_images: np.ndarray, val_labels: np.ndarray, arch: str, tc: Any,
                 seed: int, threads: int, use_gpu: bool):
        import queue
        import threading

        import torch

        torch.set_num_threads(max(1, threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.checks: queue.Queue = queue.Queue(maxsize=1)

        def work() -> None:
            try:
                train_reporting(images, labels, val_images, val_labels, arch, tc, seed, device,
                                lambda e, a: self.checks.put((int(e), float(a))))
            except BaseException as e:  # noqa: BLE001 - raised again by next_check, in the trial
                self.checks.put(e)
                return
            self.checks.put(None)

        threading.Thread(target=work, daemon=True, name=f"train-{arch}").start()

    def next_check(self) -> tuple[int, float] | None:
        """(epoch, val acc) of the next check; None once the net has trained all its epochs."""
        item = self.checks.get()
        if isinstance(item, BaseException):
            raise item
        return item


def run_trial(config: dict, setup: SweepSetup) -> None:
    """One trial: sample a small set with this trial's knobs, train each of tune.archs on it, report
    every few epochs each net's val_acc and their mean (METRIC, what ASHA compares).

    One net trains in the trial's own process; several train in parallel as NetTrainer actors, one
    per bundle of the trial's placement group (`make_tuner`), each giving the checks it gives alone.
    Idempotent: `done.json` in the trial's folder holds a finished trial's history; a trial Tune runs
    again (its driver was killed before Tune recorded the finish) replays those reports instead of
    sampling and training again. `attempt-<k>.json` records each attempt that did the work.
    """
    import ray
    import torch
    from ray import tune

    from dap_ray.eval.run import train_config

    trial_id = tune.get_context().get_trial_id()
    knobs = {k: plain(config[k]) for k in setup.keys}
    tdir = f"{setup.trials_dir}/{trial_id}"
    fs, tp = fsspec.core.url_to_fs(tdir)
    fs.makedirs(tp, exist_ok=True)
    done = read_json(fs, f"{tp}/done.json")
    if done is not None and done.get("knobs") == json.loads(json.dumps(knobs)):
        best = -1.0
        for epoch, acc, per_net in done["history"]:
            best = max(best, acc)
            tune.report({METRIC: acc, "val_acc_best": best, TIME_ATTR: epoch, **{net_metric(a): v for a, v in per_net.items()},
                         "replayed": True})
        return
    attempt = len(fs.glob(f"{tp}/attempt-*.json"))
    write_json(fs, f"{tp}/attempt-{attempt}.json", {"knobs": knobs, "started": time.time()})

    cfg = trial_config(setup, knobs)
    t = cfg.tune
    archs = [str(a) for a in t.archs]
    torch.set_num_threads(max(1, int(t.cpus_per_trial)))
    t0 = time.time()
    img_dir = sample_set(cfg, setup.dataset, trial_bank(setup, knobs), tdir, setup.sampler_actors)
    sample_s = time.time() - t0
    recs = distilled_records(f"{img_dir}/images", setup.dataset.classes)
    imgs, ok = load_images([r.path for r in recs], int(cfg.eval.resolution))  # uint8 (N, R, R, 3)
    labels = np.asarray([recs[i].label for i in ok], np.int64)  # (N,)
    nclass = len(setup.dataset.classes)
    tcs = {a: train_config(cfg, int(cfg.ipc), nclass, a).with_(epochs=int(t.epochs), eval_every=int(t.eval_every), eval_after=0.0,
                                                               num_classes=nclass) for a in archs}
    history: list[list] = []  # [epoch, mean acc, {arch: acc}] per check

    def report(epoch: int, accs: dict[str, float]) -> None:
        mean = float(np.mean([accs[a] for a in archs]))
        history.append([int(epoch), mean, dict(accs)])
        best = max(h[1] for h in history)
        if epoch >= int(t.epochs):  # before the last report: Tune may end the trial inside tune.report (max_t)
            write_json(fs, f"{tp}/done.json", {"knobs": knobs, "archs": archs, "history": history, "val_acc_best": best,
                                                "sample_seconds": sample_s, "train_seconds": time.time() - t0 - sample_s})
        tune.report({METRIC: mean, "val_acc_best": best, TIME_ATTR: epoch, **{net_metric(a): accs[a] for a in archs},
                     "sample_seconds": sample_s})

    if len(archs) == 1:
        device = "cuda" if t.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
        val_images, val_labels = ray.get([setup.val_images, setup.val_labels])
        train_reporting(imgs, labels, val_images, val_labels, archs[0], tcs[archs[0]], int(cfg.seed), device,
                        lambda e, a: report(e, {archs[0]: a}))
        return
    gpus = gpus_per_net(t)
    actor = ray.remote(NetTrainer).options(num_cpus=float(t.cpus_per_net), num_gpus=gpus, max_restarts=0)
    data = [ray.put(imgs), ray.put(labels), setup.val_images, setup.val_labels]  # one copy in the store for every net
    nets = [actor.remote(*data, a, tcs[a], int(cfg.seed), int(max(1.0, float(t.cpus_per_net))), gpus > 0) for a in archs]
    try:
        while True:
            checks = dict(zip(archs, ray.get([n.next_check.remote() for n in nets])))  # raises a net's own error
            if all(c is None for c in checks.values()):
                return
            epochs = {c[0] if c is not None else None for c in checks.values()}
            if len(epochs) != 1:  # every net checks at the same epochs (tcs): anything else is a bug, not a result
                raise RuntimeError(f"the nets of trial {trial_id} reported different checks: {checks}")
            report(epochs.pop(), {a: c[1] for a, c in checks.items()})
    finally:
        for n in nets:
            ray.kill(n)  # finished, stopped by ASHA, or a net failed: no net trains on


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"
