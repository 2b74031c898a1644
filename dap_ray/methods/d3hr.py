"""D3HR (seed 004, arXiv 2505.18399): DDIM inversion to a Gaussian domain + statistical group sampling.

What the paper does, and how it maps onto this pipeline
-------------------------------------------------------
1. **Inversion.** Every real latent z₀ of class c is mapped by deterministic DDIM inversion
   (conditional on c) to the noise level τ_top: the "high-normality Gaussian domain", where a
   per-dimension Gaussian describes the class far better than it does in the VAE latent space.
   Distributed exactly like the feature bank: ``ray.data.from_items`` -> ``map_batches(decode_batch)``
   -> ``map_batches(D3HRInverter, compute=ActorPoolStrategy(runtime.bank_actors))``; the driver keeps
   each class's inverted latents until the class is complete, then reduces them to its statistics.
2. **Class distribution.** Per dimension: mean μ_c, std σ_c, skewness and excess kurtosis
   (population moments, two-pass, float64, rows sorted by image id so the numbers do not depend on
   the order in which actors finish). Cached per class under ``<cache_dir>/d3hr/<key>/``, the key a
   hash of (model content, dataset files, inversion steps/target/CFG, resolution) like the bank's.
3. **Group sampling.** ``method.d3hr_groups`` candidate groups of IPC noises (100,000 by default: the
   released ``group_sampling.py --m``) are drawn from N(μ_c, diag σ_c²), vectorised: block k of
   groups comes from one generator seeded by (run seed, "d3hr", c, k), the block size fixed by
   (IPC, D) alone, so group g does not depend on how many others are drawn (more groups can only
   lower the best distance) nor on how they are evaluated. The group whose statistics best match
   the class's is kept (:func:`select_group`). One Ray task per class; the chosen noises are
   written to ``<run>/d3hr/noises/<class>.safetensors``.
4. **Generation.** Plain DDIM from the selected noises at the inversion's level, through the shared
   sampler actor pool, with the sampler's CFG scale (the same one the inversion used, as released):
   :class:`D3HRStart` hands each work item its rows of the class's noise file, so the images are the
   same bytes for any pool size.

Group distance: the released score (``generation/group_sampling.py``)
---------------------------------------------------------------------
    d(g) = [ ‖mean(g) − μ_c‖₂ + ‖std(g) − σ_c‖₂ + 0.1 ‖skewness_batch(g)‖₂ (+ 0.1 ‖kurt(g) − kurt_c‖₂) ] / √D

with the released estimators: std(g) the unbiased std over the group's IPC noises per dimension,
σ_c the unbiased std of the class's inverted latents, and ``skewness_batch``: each noise of the group
standardised by the group's per-dimension mean and std, cubed, summed over the D dimensions and scaled
by D / ((D − 1)(D − 2)), giving one value per noise, whose L2 norm over the group is the term (the
released code drives it to 0, a Gaussian's skewness). ``method.d3hr_stats`` picks the terms; the
kurtosis term is ours (not in the released code). The common 1/√D (a per-dimension scale, comparable
across models) does not change which group wins.

Released settings followed (lin-zhao-resoLve/D3HR, ``generation/dit_inversion_save_statistic.py``
and ``group_sampling.py``): the inversion runs the 50-step DDIM schedule with the same CFG as
generation (4.0 for DiT-XL/2: ``model.cfg_scale``) and the statistics are taken at t = 600 of 1000
(``invert`` keeps steps 24–38, ``--i_step 6`` picks t = 600), which is ``method.d3hr_invert_t``'s
default; generation starts there. (The released generation starts one step higher, ``--start_step
18`` = t 620; we start at the statistics' own level.) ``method.d3hr_invert_t=null`` is the paper's
full inversion. The released loop draws ``m // 10`` batches of 10,000 groups (10^8 for m = 100,000);
we draw ``m`` = 100,000 groups, the count its ``--m`` states.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dap_ray import ddim
from dap_ray.config import cfg_scale, config_hash
from dap_ray.data.types import ClassInfo, DatasetSplits
from dap_ray.ddim import final_alpha, schedule
from dap_ray.errors import ConfigError, UserError
from dap_ray.methods.base import Method, RunContext
from dap_ray.runtime import actor_count, iterate_watched
from dap_ray.sampling import WorkItem, seed_for
from dap_ray.storage import expand

log = logging.getLogger(__name__)

STATS = ("mean", "std", "skew", "kurtosis")
STAT_WEIGHTS = {"mean": 1.0, "std": 1.0, "skew": 0.1, "kurtosis": 0.1}
BLOCK_ELEMENTS = 1 << 23  # candidate values drawn per generator block (32 MB in float32); fixes the block size per (IPC, D)


# ---------------------------------------------------------------------------------------------
# pure math: inversion, statistics, group selection (no Ray, no I/O)
# ---------------------------------------------------------------------------------------------


def inversion_timesteps(backbone, steps: int, invert_t: int | None = None) -> list[int]:
    """Ascending DDIM timesteps the inversion walks through: the sampler's schedule for `steps`,
    cut at `invert_t` (None = all of it, i.e. up to the top noise level)."""
    ts = schedule(backbone, steps)  # descending
    if invert_t is not None:
        ts = [t for t in ts if t <= invert_t]
    return ts[::-1]


@torch.no_grad()
def ddim_invert(backbone, z0: torch.Tensor, y: torch.Tensor, steps: int, cfg_scale: float = 1.0,
                invert_t: int | None = None) -> tuple[torch.Tensor, int]:
    """Deterministic DDIM inversion z₀ (B,C,h,w) -> x_τ (B,C,h,w) for dataset labels y (B,).

    The exact mirror of `sampling.sample_latents`: the sampler's step at t maps level t to the next
    lower schedule level (or to ᾱ = final_alpha after the last one) with ε_θ(x_t, t); inversion walks
    the same levels upwards and evaluates ε_θ at the *target* timestep t on the latent it has (one
    level below) — the usual DDIM-inversion approximation (diffusers' DDIMInverseScheduler does the
    same), exact as the step size goes to 0. Returns (x_τ, τ); τ = -1 when no step applies.
    """
    ts = inversion_timesteps(backbone, steps, invert_t)
    x = z0.to(backbone.device, torch.float32)
    if not ts:
        return x, -1
    y = y.to(backbone.device)
    sc = backbone.scheduler_config
    clip = float(sc.get("clip_sample_range", 1.0)) if sc.get("clip_sample", False) else None
    a_prev = final_alpha(backbone)
    for t in ts:
        a_t = ddim.alpha_bar(backbone.alphas_cumprod, t)
        eps = backbone.eps(x, t, y, cfg_scale)
        if clip is not None and a_prev < 1.0:  # mirror the sampler's x̂₀ clipping (clip_sample schedulers)
            x0 = ddim.predict_x0(x, eps, a_prev).clamp(-clip, clip)
            eps = (x - a_prev**0.5 * x0) / (1 - a_prev) ** 0.5
        x = ddim.ddim_invert_step(x, eps, a_prev, a_t)
        a_prev = a_t
    return x, ts[-1]


def distribution_stats(x: torch.Tensor, dim: int = 0, eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """Per-dimension population moments of samples along `dim`: mean, std, skew, kurtosis (excess).

    x: (N, D) for a class or (G, n, D) for candidate groups (dim=1) -> each statistic (D,) / (G, D).
    Two-pass (central) moments. Where the std is 0 (e.g. a group of one sample) skew and kurtosis
    are defined as 0, so a degenerate dimension adds no spurious distance.
    """
    mean = x.mean(dim)
    d = x - mean.unsqueeze(dim)
    std = (d * d).mean(dim).sqrt()
    ok = std > eps
    z = d / torch.where(ok, std, torch.ones_like(std)).unsqueeze(dim)
    skew = torch.where(ok, (z**3).mean(dim), torch.zeros_like(std))
    kurt = torch.where(ok, (z**4).mean(dim) - 3.0, torch.zeros_like(std))
    return {"mean": mean, "std": std, "skew": skew, "kurtosis": kurt}


def _check_stats(stats: Sequence[str]) -> list[str]:
    out = [str(s) for s in stats]
    for s in out:
        if s not in STATS:
            raise ConfigError("method.d3hr_stats", s, f"one of {', '.join(STATS)}")
    if not out:
        raise ConfigError("method.d3hr_stats", list(stats), f"a non-empty list of {', '.join(STATS)}")
    return out


def skewness_batch(candidates: torch.Tensor) -> torch.Tensor:
    """The released D3HR ``skewness_batch``: candidates (G, n, D) -> (G, n).

    Each noise is standardised by its group's per-dimension mean and unbiased std, cubed and summed
    over the D dimensions, times D / ((D - 1)(D - 2)) (the released code's factor, with n the feature
    size). A dimension where the group's std is 0 (one noise, or equal values) contributes 0."""
    mean = candidates.mean(1, keepdim=True)  # (G, 1, D)
    std = group_std(candidates).unsqueeze(1)  # (G, 1, D)
    ok = std > 0
    z = torch.where(ok, (candidates - mean) / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(candidates))
    D = candidates.shape[-1]
    factor = D / ((D - 1) * (D - 2)) if D > 2 else 1.0
    return (z**3).sum(2) * factor  # (G, n)


def group_std(candidates: torch.Tensor) -> torch.Tensor:
    """Unbiased std over each group's noises (torch.std's default, as released): (G, n, D) -> (G, D); 0 for n = 1."""
    if candidates.shape[1] < 2:
        return torch.zeros_like(candidates[:, 0])
    return candidates.std(1)


def group_distances(candidates: torch.Tensor, target: dict[str, torch.Tensor], stats: Sequence[str]) -> torch.Tensor:
    """The released score / √D for candidates (G, n, D) against a class's statistics -> (G,) float64.

    target: {"mean", "std", "kurtosis": (D,), "count": N (optional)} with the population std of the
    class's N inverted latents (as cached); it is turned into the unbiased one the released code uses."""
    stats = _check_stats(stats)
    if candidates.ndim != 3:
        raise ValueError(f"candidates must be (groups, ipc, dim); got shape {tuple(candidates.shape)}")
    c = candidates.float()
    D = c.shape[-1]
    dist = torch.zeros(c.shape[0], dtype=torch.float64)
    n_class = int(target["count"].reshape(-1)[0]) if "count" in target else 0
    for s in stats:
        if s == "mean":
            term = (c.mean(1) - target["mean"].float().reshape(1, D)).norm(dim=1)
        elif s == "std":
            sigma = target["std"].double() * (math.sqrt(n_class / (n_class - 1)) if n_class > 1 else 1.0)
            term = (group_std(c) - sigma.float().reshape(1, D)).norm(dim=1)
        elif s == "skew":
            term = skewness_batch(c).norm(dim=1)
        else:  # kurtosis: ours, population excess kurtosis against the class's
            term = (distribution_stats(c, dim=1)["kurtosis"] - target["kurtosis"].float().reshape(1, D)).norm(dim=1)
        dist = dist + STAT_WEIGHTS[s] * term.double() / math.sqrt(D)
    return dist


def _argmin_first(values: torch.Tensor) -> int:
    """Index of the smallest value, the first one on ties (torch.argmin does not promise which)."""
    return int(torch.nonzero(values == values.min())[0, 0])


def select_group(candidates: torch.Tensor, target_stats: dict[str, torch.Tensor], stats: Sequence[str]) -> int:
    """Index of the candidate group (G, IPC, D) whose statistics best match the class (smallest
    :func:`group_distances`; the first one on ties)."""
    return _argmin_first(group_distances(candidates, target_stats, stats))


def block_size(ipc: int, dim: int) -> int:
    """Groups per generator block: fixed by (IPC, D), so group g's values never depend on the count drawn."""
    return max(1, BLOCK_ELEMENTS // max(ipc * dim, 1))


def candidate_block(mean: torch.Tensor, std: torch.Tensor, ipc: int, seed: int, class_key: str, block: int) -> torch.Tensor:
    """Groups [block * B, (block + 1) * B) of a class, B = block_size(ipc, D): (B, ipc, D) float32 ~ N(mean, diag std²),
    from one CPU generator seeded by (seed, "d3hr", class_key, block) (identical on any machine)."""
    D = mean.shape[0]
    g = torch.Generator().manual_seed(seed_for(seed, "d3hr", class_key, block))
    eps = torch.randn((block_size(ipc, D), ipc, D), generator=g)
    return mean.float() + std.float() * eps


def candidate_group(mean: torch.Tensor, std: torch.Tensor, ipc: int, seed: int, class_key: str, group: int) -> torch.Tensor:
    """Candidate group `group` of a class (ipc, D): row group % B of its block."""
    b = block_size(ipc, mean.shape[0])
    return candidate_block(mean, std, ipc, seed, class_key, group // b)[group % b]


def select_noises(target: dict[str, torch.Tensor], ipc: int, groups: int, stats: Sequence[str], seed: int,
                  class_key: str) -> tuple[torch.Tensor, int, float]:
    """Draw `groups` candidate groups for one class and keep the best: (noises (ipc, D), index, distance).

    Block by block (memory bounded by BLOCK_ELEMENTS whatever the count; each block drawn and scored
    in a few vectorised calls)."""
    mean, std = target["mean"], target["std"]
    b = block_size(ipc, mean.shape[0])
    best_d, best_i, best = math.inf, -1, None
    for block in range((groups + b - 1) // b):
        cand = candidate_block(mean, std, ipc, seed, class_key, block)[: groups - block * b]
        d = group_distances(cand, target, stats)
        j = _argmin_first(d)
        if float(d[j]) < best_d:  # strict: an earlier block wins ties
            best_d, best_i, best = float(d[j]), block * b + j, cand[j].clone()
    assert best is not None
    return best, best_i, best_d


# ---------------------------------------------------------------------------------------------
# the inversion stage on Ray Data, with its per-class cache
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InversionSpec:
    """Everything that determines the inverted class statistics (and hence their cache key)."""

    model: dict
    model_fingerprint: str
    steps: int
    invert_t: int | None
    cfg_scale: float
    resolution: int
    batch_size: int = field(default=64, compare=False)

    def key(self, dataset_fingerprint: str) -> str:
        d = asdict(self)
        d.pop("batch_size")
        d.pop("model")  # the fingerprint stands for the model's content
        d["dataset"] = dataset_fingerprint
        d["version"] = 1
        return config_hash(d, 24)


class D3HRInverter:
    """Stateful Ray Data UDF: holds the backbone once per actor; a batch of images in, inverted latents out."""

    def __init__(self, spec: InversionSpec, classes: Sequence[ClassInfo], device: str | None = None):
        from dap_ray.backbones import load_backbone

        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = load_backbone(spec.model, self.device)
        self.backbone.bind_classes(classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        n = len(ok)
        D = int(np.prod(self.backbone.latent_shape))
        latent = np.zeros((n, D), np.float32)
        if ok.any():
            x = self.backbone.images_to_tensor(batch["image"][ok])  # (b,3,R,R) in [-1,1]
            with torch.no_grad():
                z0 = self.backbone.encode(x)  # (b,C,h,w)
            y = torch.as_tensor(np.asarray(batch["label"])[ok], dtype=torch.long)
            xt, _ = ddim_invert(self.backbone, z0, y, self.spec.steps, self.spec.cfg_scale, self.spec.invert_t)
            latent[ok] = xt.reshape(int(ok.sum()), D).float().cpu().numpy()
        return {"id": batch["id"], "label": batch["label"], "ok": ok, "reason": batch["reason"], "latent": latent}


def _write_atomic(path: str, data: bytes) -> None:
    """Temp name + rename on a local filesystem (a half-written file is never taken as done); an S3 PUT is atomic."""
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        tmp = f"{p}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    else:
        fs.pipe_file(p, data)


def class_stats_path(cache_path: str, class_key: str) -> str:
    return f"{cache_path.rstrip('/')}/class-{class_key}.safetensors"


def load_class_stats(path: str) -> dict[str, torch.Tensor]:
    """{count, mean, std, skew, kurtosis} of one class (float64; count a 1-element int64)."""
    fs, p = fsspec.core.url_to_fs(path)
    return dict(st_load(fs.cat_file(p)))


def class_stats_skipped(path: str) -> list[tuple[str, str]]:
    """The unreadable inputs (path, reason) of one class, kept in its statistics file's metadata so
    a run that reuses the cached statistics still reports them (safetensors: an 8-byte little-endian
    header length, then a JSON header whose "__metadata__" holds str -> str)."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return [tuple(x) for x in json.loads(header.get("__metadata__", {}).get("skipped", "[]"))]


@dataclass
class InversionResult:
    path: str  # <cache_dir>/d3hr/<key>
    reused: list[str]  # classes whose statistics were already cached
    computed: list[str]
    skipped: list[tuple[str, str]]  # unreadable inputs (path, reason)


def invert_dataset(spec: InversionSpec, dataset: DatasetSplits, cache_dir: str, *, num_actors: int = 1,
                   gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0, progress: bool = True,
                   placement_timeout_s: float = 600.0) -> InversionResult:
    """Invert every training image of the classes not cached yet; write each class's statistics as
    soon as all its images are back (a killed run resumes class by class). While no alive node can place
    an inversion actor it says so, and gives up after `placement_timeout_s`."""

    from dap_ray.bank import dataset_fingerprint, model_pipeline

    key = spec.key(dataset_fingerprint(dataset))
    path = f"{cache_dir.rstrip('/')}/d3hr/{key}"
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    if not fs.exists(f"{root}/spec.json"):
        _write_atomic(f"{path}/spec.json", json.dumps(asdict(spec), indent=1, default=str).encode())
    classes = {c.index: c for c in dataset.classes}
    reused = [c.key for c in dataset.classes if fs.exists(class_stats_path(root, c.key))]
    todo = [r for r in dataset.train if classes[r.label].key not in reused]
    expected = Counter(r.label for r in todo)
    missing = [c.key for c in dataset.classes if c.key not in reused and expected[c.index] == 0]
    if missing:
        raise UserError(f"class(es) {', '.join(missing)} have no training image for D3HR's inversion")
    computed: list[str] = []
    skipped = [row for c in dataset.classes if c.key in reused for row in class_stats_skipped(class_stats_path(root, c.key))]
    empty: list[str] = []
    paths = {r.id: r.path for r in todo}
    if todo:
        log.info("d3hr: inverting %d images of %d classes (%d steps) into %s", len(todo), len(expected), spec.steps, path)
        pipe = model_pipeline(todo, D3HRInverter, {"spec": spec, "classes": dataset.classes}, spec.resolution, spec.batch_size,
                            num_actors, gpus_per_actor, cpus_per_actor)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="d3hr inversion", unit="img", disable=not progress)
        pending: dict[int, list[dict[str, np.ndarray]]] = {}
        received: Counter = Counter()

        def flush(label: int) -> None:
            parts = pending.pop(label)
            ids = np.concatenate([p["id"] for p in parts]).astype(str)
            ok = np.concatenate([p["ok"] for p in parts]).astype(bool)
            lat = np.concatenate([p["latent"] for p in parts])
            reasons = np.concatenate([p["reason"] for p in parts])
            bad = [(paths[str(i)], str(r)) for i, r, o in zip(ids, reasons, ok) if not o]
            skipped.extend(bad)
            key_c = classes[label].key
            if not ok.any():
                empty.append(key_c)
                return
            order = np.argsort(ids[ok], kind="stable")  # order-independent sums => same bytes for any pool
            x = torch.from_numpy(lat[ok][order]).to(torch.float64)  # (N, D)
            st = distribution_stats(x, dim=0)
            blob = st_save({"count": torch.tensor([x.shape[0]], dtype=torch.int64), **{k: v.contiguous() for k, v in st.items()}},
                           metadata={"skipped": json.dumps(sorted(bad))})
            _write_atomic(class_stats_path(path, key_c), blob)
            computed.append(key_c)

        watch = pipe.watch("d3hr inversion", placement_timeout_s)
        # closing(): an error while writing a class ends the stream here, not when its traceback is freed
        with closing(iterate_watched(pipe.dataset.iter_batches(batch_size=None, batch_format="numpy"), watch)) as batches:
            for batch in batches:
                labels = np.asarray(batch["label"])
                for label in np.unique(labels).tolist():
                    m = labels == label
                    pending.setdefault(label, []).append({k: np.asarray(batch[k])[m] for k in ("id", "ok", "latent", "reason")})
                    received[label] += int(m.sum())
                    if received[label] == expected[label]:
                        flush(label)
                bar.update(len(labels))
        bar.close()
        if pending:  # every image comes back exactly once; anything else is a bug, not a user error
            raise RuntimeError(f"d3hr inversion: incomplete classes {sorted(pending)} ({dict(received)} of {dict(expected)})")
    if skipped:
        log.warning("d3hr: %d unreadable training image(s) skipped", len(skipped))
    if empty:
        raise UserError(f"class(es) {', '.join(empty)} have no usable image for D3HR's inversion")
    return InversionResult(path, reused, computed, skipped)


# ---------------------------------------------------------------------------------------------
# group selection per class (Ray tasks) and the sampler's start recipe
# ---------------------------------------------------------------------------------------------


def noise_path(noise_dir: str, class_key: str) -> str:
    return f"{noise_dir.rstrip('/')}/{class_key}.safetensors"


def select_class_to_file(stats_file: str, out_file: str, ipc: int, groups: int, stats: Sequence[str], seed: int,
                         class_key: str) -> dict:
    """One class's group sampling: reads its cached statistics, writes the chosen noises (ipc, D)."""
    target = load_class_stats(stats_file)
    noises, index, dist = select_noises(target, ipc, groups, stats, seed, class_key)
    _write_atomic(out_file, st_save({"noises": noises.contiguous(), "group": torch.tensor([index]), "distance": torch.tensor([dist], dtype=torch.float64)}))
    return {"class": class_key, "group": index, "distance": dist}


def select_all(inversion_path: str, noise_dir: str, classes: Sequence[ClassInfo], ipc: int, groups: int,
               stats: Sequence[str], seed: int, cpus: float = 1.0) -> list[dict]:
    """Group sampling for every class without a noise file yet, one Ray task per class."""
    import ray

    stats = _check_stats(stats)
    fs, root = fsspec.core.url_to_fs(noise_dir)
    todo = [c for c in classes if not fs.exists(noise_path(root, c.key))]  # a re-run reuses finished classes
    if not todo:
        return []
    task = ray.remote(num_cpus=cpus, max_retries=3)(select_class_to_file)
    refs = [task.remote(class_stats_path(inversion_path, c.key), noise_path(noise_dir, c.key), ipc, groups, stats, seed, c.key) for c in todo]
    return ray.get(refs)


@dataclass(frozen=True)
class D3HRStart:
    """Picklable start recipe: a work item's rows of its class's selected noises, at level start_t."""

    noise_dir: str
    start_t: int

    def latents(self, backbone, item: WorkItem, seeds: Sequence[int]) -> tuple[torch.Tensor, int]:
        xs = []
        for part in item.parts:  # each class's rows [start, stop) of its noise file, in batch order
            key = backbone.classes[part.label].key
            fs, p = fsspec.core.url_to_fs(noise_path(self.noise_dir, key))
            noises = st_load(fs.cat_file(p))["noises"]  # (ipc, D)
            if noises.shape[0] < part.stop:
                raise RuntimeError(f"{p} holds {noises.shape[0]} noises; item needs indices up to {part.stop}")
            xs.append(noises[part.start : part.stop].reshape(part.stop - part.start, *backbone.latent_shape))
        return torch.cat(xs), self.start_t  # (B, C, h, w)


def inversion_spec(cfg: Any, backbone) -> InversionSpec:
    from omegaconf import OmegaConf

    from dap_ray.backbones import model_fingerprint

    m = cfg.method
    model = OmegaConf.to_container(cfg.model, resolve=True)
    invert_t = m.d3hr_invert_t
    # the released code inverts with the generation's CFG (4.0 for DiT-XL/2): the sampler's, unless set
    inv_cfg = cfg_scale(cfg) if m.d3hr_inversion_cfg is None else float(m.d3hr_inversion_cfg)
    return InversionSpec(
        model=model,
        model_fingerprint=model_fingerprint(model),
        steps=int(m.d3hr_inversion_steps),
        invert_t=None if invert_t is None else int(invert_t),
        cfg_scale=inv_cfg,
        resolution=int(backbone.resolution),
        batch_size=int(cfg.bank.batch_size),
    )


class D3HR(Method):
    name = "d3hr"
    own_ray_stage = True  # the inversion's actor pool and the group-selection tasks

    def run(self, ctx: RunContext) -> list[dict]:
        from dap_ray.methods.dap import run_sampler_method

        cfg, backbone = ctx.cfg, ctx.backbone_info
        m, r = cfg.method, cfg.runtime
        spec = inversion_spec(cfg, backbone)
        ts = inversion_timesteps(backbone, spec.steps, spec.invert_t)
        if not ts:
            raise ConfigError("method.d3hr_invert_t", spec.invert_t, f"at least the lowest inversion timestep ({inversion_timesteps(backbone, spec.steps)[0]})")
        start_t = ts[-1]
        if start_t not in schedule(backbone, int(cfg.sampler.steps)):
            log.warning("d3hr: inversion ends at t=%d, not a step of the %d-step sampler; generation starts at the next "
                        "lower step (set method.d3hr_inversion_steps = sampler.steps for an exact round trip)", start_t, cfg.sampler.steps)
        inv = invert_dataset(spec, ctx.dataset, expand(str(cfg.cache_dir)),
                             num_actors=actor_count(r.bank_actors, float(r.gpus_per_actor), float(r.cpus_per_actor), "runtime.bank_actors"),
                             gpus_per_actor=float(r.gpus_per_actor), cpus_per_actor=float(r.cpus_per_actor), progress=ctx.progress,
                             placement_timeout_s=float(r.placement_timeout_s))
        log.info("d3hr: class statistics in %s (%d reused, %d computed)", inv.path, len(inv.reused), len(inv.computed))
        ctx.report_skipped(inv.skipped)  # the run's skipped.csv (already there when the bank skipped them too)
        noise_dir = f"{ctx.method_dir(self.name)}/noises"
        picked = select_all(inv.path, noise_dir, ctx.dataset.classes, int(cfg.ipc), int(m.d3hr_groups), list(m.d3hr_stats),
                            int(cfg.seed), float(r.cpus_per_actor))
        for p in picked:
            log.info("d3hr: class %s: group %d of %d (distance %.4g)", p["class"], p["group"], m.d3hr_groups, p["distance"])
        return run_sampler_method(ctx, self.name, None, D3HRStart(noise_dir, int(start_t)))
