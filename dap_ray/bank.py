"""The real-feature bank: Ray Data streams real images through backbone actors that reduce them to
per-class sufficient statistics on their own device.

Pipeline: the training records, sorted by (class, image id), are cut into fixed *chunks* of
`bank.batch_size` images -> `from_items(chunks)` -> `map_batches(decode_chunks)` (tasks) ->
`map_batches(BankFeaturizer)` (a stateful actor class holding VAE + backbone once,
`ActorPoolStrategy`, a GPU each when present). The actor featurises one chunk (one forward batch per
timestep) and reduces it to per-class sums (count, Σφ, Σ‖φ‖², Σ RFF(φ)) per (layer, timestep) in
float64, plus the first `bank.keep_per_class` images' features of each class in float16. It writes
that partial to `chunks/` in the bank directory and returns only the chunk's number: no per-image
feature ever reaches the driver or the object store.

The driver folds the partials class by class in chunk order and, as soon as a class's last chunk is
in, writes that class's files and forgets it, so its memory holds at most the classes that are open
(one or two) whatever the number of classes or images. On disk, per (layer, class):
`stats/<layer>/<class>.safetensors` (count, Σφ (T, D), Σ‖φ‖² (T,), Σ RFF (T, M) in float64) and
`features/layer=<layer>/c<class>.parquet` (the kept images, one row per (image, timestep), float16);
then `classes/<class>.json` (its count, kept ids and skipped files), written last, commits the
class. A sampler actor reads only the classes of its work items, through a bounded cache.

Determinism: the noise for (image, timestep) comes from a generator seeded by (bank seed, image id,
timestep); a chunk's content and its forward batch do not depend on the number of actors or the
order in which they finish; within a chunk the sums run in image-id order, and across chunks in chunk
order. So the statistics are the same bytes for 1 or N actors, and after a resume.

Cache and resume: a bank lives in `<cache_dir>/banks/<key>/`, the key a hash of (model content,
dataset files, layers, timesteps, pooling, noise seed, resolution, RFF settings, kept images, dtype).
Each chunk file is written atomically (it exists only whole) and each class is committed by its
`classes/<class>.json`; a restarted build reuses committed classes and the chunk files of the others,
and does only the rest. `_COMMIT` is written last of all, and only a bank with `_COMMIT` is used.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dap_ray import ddim
from dap_ray.config import config_hash, resolve_dtype
from dap_ray.data import BadImageError, decode_image, read_bytes
from dap_ray.data.types import ClassInfo, DatasetSplits, ImageRecord
from dap_ray.errors import UserError
from dap_ray.guidance import RandomFourierFeatures
from dap_ray.runtime import CapacityWatch, PoolPlan, actor_need, iterate_watched, plan_pool
from dap_ray.sampling import seed_for
from dap_ray.storage import write_bytes

log = logging.getLogger(__name__)

COMMIT = "_COMMIT"
FORMAT = 2  # on-disk layout: per-class statistics and kept features (1 was dense shards + Parquet of every image)
CACHE_CLASSES = 4  # (layer, class) statistics a Bank keeps in memory: a sampler actor needs its work item's class


@dataclass(frozen=True)
class BankSpec:
    """Everything that determines the bank's content (and hence its cache key)."""

    model: dict  # model config (plain dict)
    model_fingerprint: str
    layers: tuple[str, ...]
    timesteps: tuple[int, ...]  # the sampler's DDIM timesteps the bank covers
    pooling: str
    seed: int
    resolution: int
    rff: dict | None = None  # {"num_features", "sigma", "seed"} when the RBF kernel is used
    # per-image features kept per class (float16): the first keep_per_class records by id (an unreadable
    # one among them is not replaced); the statistics always use every image
    keep_per_class: int = 8
    batch_size: int = field(default=64, compare=False)
    dtype: str = "fp32"  # the backbone's precision (sampler.dtype, resolved): bf16 features differ from fp32 ones

    def key(self, dataset_fingerprint: str) -> str:
        d = asdict(self)
        d.pop("batch_size")
        d.pop("model")  # the fingerprint stands for the model's content
        d["dataset"] = dataset_fingerprint
        d["format"] = FORMAT
        return config_hash(d, 24)


def dataset_fingerprint(ds: DatasetSplits) -> str:
    """Hash of the training records (id, label, class keys) and each file's content version: size
    and mtime for a local file, size and ETag for a remote object (taken when it was listed)."""
    from dap_ray.data.images import record_versions

    return config_hash({"classes": [c.key for c in ds.classes], "rows": record_versions(ds.train)}, 24)


def rff_for(spec_rff: dict, dim: int) -> RandomFourierFeatures:
    """RFF with σ relative to √D (feature scales grow with √D), seeded identically everywhere."""
    return RandomFourierFeatures(dim=dim, num_features=int(spec_rff["num_features"]), sigma=float(spec_rff["sigma"]) * math.sqrt(dim), seed=int(spec_rff["seed"]))


# ---------------------------------------------------------------------------------------------
# chunks: the fixed units of work and of summation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """`batch_size` consecutive records in (class, id) order: one forward batch and one partial sum."""

    index: int
    records: tuple[ImageRecord, ...]
    keep: tuple[bool, ...]  # among the first keep_per_class records of its class

    @property
    def labels(self) -> set[int]:
        return {r.label for r in self.records}


def plan_chunks(records: Sequence[ImageRecord], batch_size: int, keep_per_class: int) -> list[Chunk]:
    """Cut the records, sorted by (class, id), into chunks of `batch_size`. Pure and canonical: the
    same records give the same chunks, so sums folded chunk by chunk are the same bytes on every
    build, whatever the number of actors or which chunks a crashed build had finished. A chunk may
    span classes (a class of 3 images does not make a forward batch of 3)."""
    rows = sorted(records, key=lambda r: (r.label, r.id))
    seen: dict[int, int] = {}
    keep = []
    for r in rows:
        keep.append(seen.get(r.label, 0) < keep_per_class)
        seen[r.label] = seen.get(r.label, 0) + 1
    size = max(1, int(batch_size))
    return [Chunk(k, tuple(rows[s : s + size]), tuple(keep[s : s + size])) for k, s in enumerate(range(0, len(rows), size))]


# ---------------------------------------------------------------------------------------------
# Ray Data stages
# ---------------------------------------------------------------------------------------------


DECODE_CPUS = 0.5  # CPUs of one decode task (shrunk on small nodes by runtime.plan_pool)


@dataclass(frozen=True)
class ActorPipeline:
    """A Ray Data stream through a pool of model actors, with the plan it was sized by."""

    dataset: Any  # ray.data.Dataset: the udf's output rows
    plan: PoolPlan
    gpus_per_actor: float

    def watch(self, what: str, timeout_s: float) -> CapacityWatch:
        """The capacity watch of this pipeline: what one of its actors asks for (from the plan the pool
        was made with), bounded by runtime.placement_timeout_s."""
        return CapacityWatch(what, actor_need(self.gpus_per_actor, self.plan.cpus_per_actor), timeout_s)


def actor_pipeline(items: list[dict], decode: Any, decode_kwargs: dict, udf: type, constructor_kwargs: dict, batch_size: int,
                   num_actors: int, gpus_per_actor: float, cpus_per_actor: float, blocks: int) -> ActorPipeline:
    """items -> decode tasks -> a restartable pool of `udf` actors (each holds the model once).

    The Ray Data path shared by the feature bank and D3HR's inversion. A killed actor is restarted
    and its batch redone: Ray Data's actor pool creates its actors with max_restarts=-1 and
    max_task_retries=-1 unless told otherwise (ActorPoolMapOperator._apply_default_remote_args).
    Passing them ourselves would go through `**ray_remote_args`, deprecated in Ray 2.60 (removed in
    2.64), which has no named parameter for them; tests/test_bank.py checks the restart."""
    import ray

    # sized against each node, not the cluster's sum: on three 1-CPU nodes, 3 actors x 0.83 CPU
    # (the sum's answer) leave no node room for a 0.5-CPU decode task and the pipeline hangs
    plan = plan_pool(ray.nodes(), num_actors, cpus_per_actor, gpus_per_actor, side_cpus=DECODE_CPUS)
    if plan.actors < num_actors:
        log.info("%s: %d actor(s) of %.2f CPU instead of %d: the alive nodes place no more beside the decode tasks",
                 udf.__name__, plan.actors, plan.cpus_per_actor, num_actors)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(blocks, 64)))
    ds = ds.map_batches(decode, fn_kwargs=decode_kwargs, batch_size=batch_size, batch_format="numpy", num_cpus=plan.side_cpus)
    ds = ds.map_batches(
        udf,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=gpus_per_actor,
        num_cpus=plan.cpus_per_actor,
    )
    return ActorPipeline(ds, plan, gpus_per_actor)


def model_pipeline(records: Sequence[ImageRecord], udf: type, constructor_kwargs: dict, resolution: int, batch_size: int,
                   num_actors: int, gpus_per_actor: float, cpus_per_actor: float) -> ActorPipeline:
    """One row per image: records -> `decode_batch` tasks -> `udf` actors (D3HR's inversion)."""
    items = [{"id": r.id, "path": r.path, "label": r.label} for r in records]
    return actor_pipeline(items, decode_batch, {"resolution": resolution}, udf, constructor_kwargs, batch_size, num_actors,
                          gpus_per_actor, cpus_per_actor, blocks=len(items) // max(batch_size, 1))


def chunk_pipeline(chunks: Sequence[Chunk], udf: type, constructor_kwargs: dict, resolution: int, num_actors: int,
                   gpus_per_actor: float, cpus_per_actor: float) -> ActorPipeline:
    """One row per chunk: chunks -> `decode_chunks` tasks -> `udf` actors, one chunk per call, so the
    actor's forward batch is exactly the chunk (Ray Data would otherwise re-bundle rows freely)."""
    size = max((len(c.records) for c in chunks), default=1)
    items = [{"chunk": c.index, "records": json.dumps([[r.id, r.path, int(r.label), bool(k)] for r, k in zip(c.records, c.keep)])}
             for c in chunks]
    return actor_pipeline(items, decode_chunks, {"resolution": resolution, "size": size}, udf, constructor_kwargs, 1, num_actors,
                          gpus_per_actor, cpus_per_actor, blocks=len(items))


def _decode_one(path: str, resolution: int) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(read_bytes(str(path)), resolution), ""
    except BadImageError as e:
        return None, e.reason
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        return None, f"unreadable: {type(e).__name__}"


def decode_batch(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Read + decode + resize/crop; unreadable files become ok=False rows with the reason."""
    n = len(batch["id"])
    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    ok = np.ones(n, bool)
    reasons = np.array([""] * n, dtype=object)
    for i, path in enumerate(batch["path"]):
        img, reasons[i] = _decode_one(str(path), resolution)
        if img is None:
            ok[i] = False
        else:
            images[i] = img
    return {**batch, "image": images, "ok": ok, "reason": reasons}


def decode_chunks(batch: dict[str, np.ndarray], resolution: int, size: int) -> dict[str, np.ndarray]:
    """Chunk rows -> their images, padded to `size` slots (Ray Data's tensor columns want one shape);
    an unreadable file is an ok=False slot, its reason in the JSON `reasons` column."""
    n = len(batch["chunk"])
    images = np.zeros((n, size, resolution, resolution, 3), np.uint8)
    ok = np.zeros((n, size), bool)
    reasons = np.array([""] * n, dtype=object)
    for j, rec in enumerate(batch["records"]):
        why = []
        for i, (_, path, _, _) in enumerate(json.loads(str(rec))):
            img, reason = _decode_one(path, resolution)
            why.append(reason)
            if img is not None:
                images[j, i], ok[j, i] = img, True
        reasons[j] = json.dumps(why)
    return {"chunk": batch["chunk"], "records": batch["records"], "image": images, "ok": ok, "reasons": reasons}


class BankFeaturizer:
    """Stateful Ray Data UDF: holds the backbone once per actor; one chunk in, its partial sums written
    to the bank's `chunks/` folder, only the chunk's number and size returned."""

    def __init__(self, spec: BankSpec, classes: Sequence[ClassInfo], root: str, device: str | None = None):
        from dap_ray.backbones import load_backbone, torch_dtype

        self.spec, self.root = spec, root
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = load_backbone(spec.model, self.device, torch_dtype(spec.dtype, self.device))
        self.backbone.bind_classes(classes)
        self.rffs: dict[str, RandomFourierFeatures] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fs, root = fsspec.core.url_to_fs(self.root)
        sizes = []
        for j, k in enumerate(batch["chunk"]):
            recs = json.loads(str(batch["records"][j]))
            n = len(recs)
            reasons = json.loads(str(batch["reasons"][j]))
            part = reduce_chunk(self.backbone, self.spec, batch["image"][j][:n], np.array([r[2] for r in recs]), [r[0] for r in recs],
                                batch["ok"][j][:n], np.array([r[3] for r in recs], bool), self.rffs)
            part["skipped"] = [[r[1], why] for r, why in zip(recs, reasons) if why]
            write_bytes(fs, chunk_path(root, int(k)), partial_to_bytes(part))
            sizes.append(n)
        return {"chunk": np.asarray(batch["chunk"]), "n": np.asarray(sizes)}


def chunk_path(root: str, k: int) -> str:
    return f"{root}/chunks/c{k:07d}.safetensors"


def _timestep_features(backbone, spec: BankSpec, images: np.ndarray, labels: np.ndarray, ids: Sequence[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(timestep index, {layer: (B, D) float32 on the backbone's device}) for every bank timestep."""
    from dap_ray.backbones import pool_features

    x = backbone.images_to_tensor(images)  # (B,3,R,R) in [-1,1]
    z0 = backbone.encode(x)  # (B,C,h,w)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    for ti, t in enumerate(spec.timesteps):
        noise = torch.stack([torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(seed_for("bank", spec.seed, i, t))) for i in ids])
        z_t = ddim.add_noise(z0, noise.to(z0.device), float(backbone.alphas_cumprod[t]))
        feats = backbone.features(z_t, t, y, list(spec.layers))
        yield ti, {layer: pool_features(feats[layer], spec.pooling).float() for layer in spec.layers}


@torch.no_grad()
def featurize(backbone, spec: BankSpec, images: np.ndarray, labels: np.ndarray, ids: Sequence[str], ok: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """uint8 (B,R,R,3) images -> {layer: float32 (B, T, D)}: φ_ℓ(z_t) for every bank timestep.

    Pure torch (no Ray): the plain-loop reference in tests and benchmarks, and the metrics, call this.
    The bank's actors call `reduce_chunk`, which never holds (B, T, D)."""
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in spec.layers}
    for _, feats in _timestep_features(backbone, spec, images, labels, ids):
        for layer in spec.layers:
            out[layer].append(feats[layer].cpu())  # (B, D)
    res = {layer: torch.stack(v, dim=1).numpy() for layer, v in out.items()}  # (B, T, D)
    if ok is not None:
        for arr in res.values():
            arr[~np.asarray(ok, bool)] = 0.0
    return res


@torch.no_grad()
def reduce_chunk(backbone, spec: BankSpec, images: np.ndarray, labels: np.ndarray, ids: Sequence[str], ok: np.ndarray,
                 keep: np.ndarray, rffs: dict[str, RandomFourierFeatures] | None = None) -> dict:
    """One chunk -> its partial: per class present (usable images only), per layer, float64 sums
    {"sum": (T, D), "sum_sq": (T,), "rff_sum": (T, M)}, the count, and the kept images' features
    (k, T, D) float16 with their ids.

    Reduced on the backbone's device, one timestep at a time (never (B, T, D) at once); each class's
    sum runs over its images in chunk order (ids ascending), so the bytes depend on the chunk only.
    Unreadable images (ok=False, zeros) stay in the forward batch, so its shape is the chunk's."""
    rffs = {} if rffs is None else rffs
    ok = np.asarray(ok, bool)
    labels = np.asarray(labels, np.int64)
    keep = np.asarray(keep, bool) & ok
    classes = sorted({int(c) for c in labels[ok]})
    T = len(spec.timesteps)
    part: dict[str, Any] = {"count": {c: int(((labels == c) & ok).sum()) for c in classes}, "sums": {}, "kept": {},
                            "kept_ids": {c: [str(ids[i]) for i in np.flatnonzero(keep & (labels == c))] for c in classes}}
    if not classes:
        return part
    idx = {c: torch.as_tensor(np.flatnonzero(ok & (labels == c))) for c in classes}
    kidx = {c: torch.as_tensor(np.flatnonzero(keep & (labels == c))) for c in classes}
    for ti, feats in _timestep_features(backbone, spec, images, labels, ids):
        for layer, f in feats.items():  # f: (B, D) float32
            if spec.rff and layer not in rffs:
                rffs[layer] = rff_for(spec.rff, f.shape[-1])
            for c in classes:
                fc = f[idx[c].to(f.device)].double()  # (n_c, D)
                s = part["sums"].setdefault((layer, c), {"sum": np.zeros((T, f.shape[-1])), "sum_sq": np.zeros(T)})
                s["sum"][ti] = fc.sum(0).cpu().numpy()
                s["sum_sq"][ti] = float((fc * fc).sum())
                if spec.rff:
                    z = rffs[layer](fc).sum(0).cpu().numpy()  # (M,)
                    s.setdefault("rff_sum", np.zeros((T, len(z))))[ti] = z
                kept = part["kept"].setdefault((layer, c), np.zeros((len(kidx[c]), T, f.shape[-1]), np.float16))
                if len(kidx[c]):
                    kept[:, ti] = f[kidx[c].to(f.device)].half().cpu().numpy()
    return part


def partial_to_bytes(part: dict) -> bytes:
    """A chunk's partial as safetensors: tensors named <kind>/<class>/<layer>, the rest in the metadata."""
    t: dict[str, torch.Tensor] = {}
    for (layer, c), s in part["sums"].items():
        for kind, v in s.items():
            t[f"{kind}/{c}/{layer}"] = torch.from_numpy(np.ascontiguousarray(v))
    for (layer, c), v in part["kept"].items():
        t[f"kept/{c}/{layer}"] = torch.from_numpy(np.ascontiguousarray(v))
    meta = {"count": json.dumps(part["count"]), "kept_ids": json.dumps(part["kept_ids"]), "skipped": json.dumps(part.get("skipped", []))}
    return st_save(t, metadata=meta)


def partial_from_bytes(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
    part: dict[str, Any] = {"count": {int(c): v for c, v in json.loads(meta["count"]).items()}, "sums": {}, "kept": {},
                            "kept_ids": {int(c): v for c, v in json.loads(meta["kept_ids"]).items()},
                            "skipped": [tuple(x) for x in json.loads(meta["skipped"])]}
    for name, v in st_load(blob).items():
        kind, c, layer = name.split("/", 2)
        if kind == "kept":
            part["kept"][(layer, int(c))] = v.numpy()
        else:
            part["sums"].setdefault((layer, int(c)), {})[kind] = v.numpy()
    return part


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


class StatsAccumulator:
    """Dense in-memory per-class sums per (layer, timestep) in float64: count (C,), sum (C,T,D),
    sum_sq (C,T), rff_sum (C,T,M). For banks built in one process (tests, benchmarks, tools) from
    `featurize` output; the Ray build never holds (C, T, D): it writes per-class files."""

    def __init__(self, num_classes: int, spec: BankSpec, dims: dict[str, int] | None = None):
        self.C, self.T, self.spec = num_classes, len(spec.timesteps), spec
        self.count = np.zeros(num_classes, np.int64)
        self.sum: dict[str, np.ndarray] = {}
        self.sum_sq: dict[str, np.ndarray] = {}
        self.rff_sum: dict[str, np.ndarray] = {}
        self._rff: dict[str, RandomFourierFeatures] = {}
        for layer, d in (dims or {}).items():
            self._init_layer(layer, d)

    def _init_layer(self, layer: str, dim: int) -> None:
        self.sum[layer] = np.zeros((self.C, self.T, dim), np.float64)
        self.sum_sq[layer] = np.zeros((self.C, self.T), np.float64)
        if self.spec.rff:
            self._rff[layer] = rff_for(self.spec.rff, dim)
            self.rff_sum[layer] = np.zeros((self.C, self.T, self._rff[layer].num_features), np.float64)

    def add(self, labels: np.ndarray, feats: dict[str, np.ndarray]) -> None:
        """Add a batch: labels (B,), feats {layer: (B, T, D)} float32.

        Grouped per class (a boolean mask per class present) rather than `np.add.at`, which is
        unbuffered and ~10x slower; sums accumulate in float64 without a float64 copy of the batch."""
        labels = np.asarray(labels, np.int64)
        self.count += np.bincount(labels, minlength=self.C)
        groups = [(int(c), labels == c) for c in np.unique(labels)]
        for layer, f in feats.items():  # f: (B, T, D)
            if layer not in self.sum:
                self._init_layer(layer, f.shape[-1])
            z = None
            if self.spec.rff:  # (B, T, M) random features of every (image, timestep)
                z = self._rff[layer](torch.from_numpy(np.asarray(f, np.float64)).reshape(-1, f.shape[-1])).reshape(len(labels), self.T, -1).numpy()
            for c, mask in groups:
                fc = f[mask]  # (n_c, T, D)
                self.sum[layer][c] += fc.sum(0, dtype=np.float64)
                self.sum_sq[layer][c] += np.einsum("ntd,ntd->nt", fc, fc).sum(0, dtype=np.float64)  # ‖φ‖² per (image, t)
                if z is not None:
                    self.rff_sum[layer][c] += z[mask].sum(0)

    def merge(self, other: StatsAccumulator) -> None:
        self.count += other.count
        for layer in other.sum:
            if layer not in self.sum:
                self._init_layer(layer, other.sum[layer].shape[-1])
            self.sum[layer] += other.sum[layer]
            self.sum_sq[layer] += other.sum_sq[layer]
            if other.rff_sum:
                self.rff_sum[layer] += other.rff_sum[layer]

    def class_sums(self, layer: str, label: int) -> dict[str, np.ndarray]:
        out = {"sum": self.sum[layer][label], "sum_sq": self.sum_sq[layer][label]}
        if layer in self.rff_sum:
            out["rff_sum"] = self.rff_sum[layer][label]
        return out


@dataclass
class Bank:
    """A finished bank: where it is, its spec, and its per-class statistics, read one (layer, class)
    at a time through a bounded LRU cache (an in-memory `StatsAccumulator` instead, for a bank built
    in one process)."""

    path: str
    spec: BankSpec
    classes: list[ClassInfo]
    stats: StatsAccumulator | None  # None: the per-class files under `path`
    skipped: list[tuple[str, str]]
    meta: dict
    cache_classes: int = CACHE_CLASSES
    _cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)

    @property
    def count(self) -> np.ndarray:
        """(C,) usable real images per class."""
        return self.stats.count if self.stats is not None else np.asarray(self.meta["counts"], np.int64)

    def dim(self, layer: str) -> int:
        return int(self.stats.sum[layer].shape[-1]) if self.stats is not None else int(self.meta["dims"][layer])

    def class_sums(self, layer: str, label: int) -> dict[str, np.ndarray]:
        """float64 {"sum": (T, D), "sum_sq": (T,), "rff_sum": (T, M)} of one (layer, class)."""
        if self.stats is not None:
            return self.stats.class_sums(layer, label)
        key = (layer, int(label))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        fs, root = fsspec.core.url_to_fs(self.path)
        sums = {k: v.numpy() for k, v in st_load(fs.cat_file(stats_path(root, layer, int(label)))).items() if k != "count"}
        self._cache[key] = sums
        while len(self._cache) > max(1, self.cache_classes):
            self._cache.popitem(last=False)
        return sums

    def class_stats(self, layer: str, label: int, t: int) -> dict[str, torch.Tensor]:
        """Finalized statistics of one (class, layer, timestep), as guidance.class_energy expects."""
        ti = self.spec.timesteps.index(t)
        n = int(self.count[label])
        if n == 0:
            raise UserError(f"class {self.classes[label].key!r} has no usable real image in the bank")
        s = self.class_sums(layer, label)
        out = {
            "count": torch.tensor(n),
            "mean": torch.from_numpy(s["sum"][ti] / n),
            "mean_sq_norm": torch.tensor(s["sum_sq"][ti] / n),
        }
        if "rff_sum" in s:
            out["rff_mean"] = torch.from_numpy(s["rff_sum"][ti] / n)
        return out

    def class_features(self, layer: str, label: int, t: int | None = None) -> torch.Tensor:
        """The kept real images' features of one (class, layer, timestep), the first `keep_per_class`
        by id: (n_kept, D) float32, rows in id order (t defaults to the least noisy bank timestep).
        UserError when the bank keeps none for the class."""
        t = min(self.spec.timesteps) if t is None else int(t)
        if t not in self.spec.timesteps:
            raise ValueError(f"timestep {t} is not in the bank (it has {list(self.spec.timesteps)})")
        fs, root = fsspec.core.url_to_fs(self.path)
        path = features_path(root, layer, int(label))
        table = None
        if self.stats is None and fs.exists(path):
            table = pq.read_table(path, filesystem=fs, columns=["id", "timestep", "feature"])
            table = table.filter(pc.equal(table["timestep"], t)).sort_by("id")
        if table is None or table.num_rows == 0:
            raise UserError(f"the bank keeps no feature of class {self.classes[label].key!r} at layer {layer}, t={t} "
                            f"(bank.keep_per_class={self.spec.keep_per_class})")
        flat = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return torch.from_numpy(flat.astype(np.float32).reshape(table.num_rows, self.dim(layer)))

    def rff(self, layer: str) -> RandomFourierFeatures | None:
        return rff_for(self.spec.rff, self.dim(layer)) if self.spec.rff else None

    def read_features(self, layer: str) -> pa.Table:
        """The kept per-image rows of one layer, every class (sorted by id, timestep); float16 features."""
        fs, root = fsspec.core.url_to_fs(self.path)
        files = sorted(fs.glob(f"{root}/features/layer={layer}/*.parquet"))
        tables = [pq.read_table(f, filesystem=fs) for f in files]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables).sort_by([("id", "ascending"), ("timestep", "ascending")])


# ---------------------------------------------------------------------------------------------
# per-class files
# ---------------------------------------------------------------------------------------------


def stats_path(root: str, layer: str, label: int) -> str:
    return f"{root}/stats/{layer}/c{label:05d}.safetensors"


def features_path(root: str, layer: str, label: int) -> str:
    return f"{root}/features/layer={layer}/c{label:05d}.parquet"


def class_marker(root: str, label: int) -> str:
    return f"{root}/classes/c{label:05d}.json"


def kept_table(layer: str, label: int, ids: Sequence[str], paths: Sequence[str], kept: np.ndarray, timesteps: Sequence[int]) -> pa.Table:
    """Long format: one row per (kept image, timestep): id, path, label, timestep, layer, feature (D,) float16."""
    n, T = len(ids), len(timesteps)
    feature = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(kept, np.float16).reshape(-1)), kept.shape[-1])
    return pa.table({
        "id": pa.array(np.repeat(np.asarray(ids, dtype=object), T).astype(str), pa.string()),
        "path": pa.array(np.repeat(np.asarray(paths, dtype=object), T).astype(str), pa.string()),
        "label": pa.array(np.full(n * T, label, np.int32)),
        "timestep": pa.array(np.tile(np.asarray(timesteps, np.int32), n)),
        "layer": pa.array([layer] * (n * T), pa.string()),
        "feature": feature,
    })


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes: zstd for the id/path/label columns; the float features stored plain, because
    zstd saved ~2% on them for most of the write time."""
    sink = pa.BufferOutputStream()
    codecs = {name: ("none" if name == "feature" else "zstd") for name in table.column_names}
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, sink, compression=codecs, use_dictionary=strings)
    return sink.getvalue().to_pybytes()


class ClassFold:
    """The driver's running sums of one class, folded chunk by chunk in chunk order."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.kept: dict[str, list[np.ndarray]] = {}
        self.kept_ids: list[str] = []
        self.skipped: list[tuple[str, str]] = []

    def add(self, part: dict, label: int) -> None:
        self.count += part["count"].get(label, 0)
        self.kept_ids += part["kept_ids"].get(label, [])
        for (layer, c), s in part["sums"].items():
            if c != label:
                continue
            acc = self.sums.setdefault(layer, {})
            for kind, v in s.items():
                acc[kind] = acc[kind] + v if kind in acc else v.copy()
            self.kept.setdefault(layer, []).append(part["kept"][(layer, c)])

    def write(self, fs, root: str, spec: BankSpec, label: int, paths: dict[str, str]) -> dict:
        """The class's files, its marker last; returns the marker's content."""
        for layer in spec.layers:
            if layer not in self.sums:  # no usable image: the build stops on it before _COMMIT
                continue
            t = {"count": torch.tensor(self.count, dtype=torch.int64), **{k: torch.from_numpy(v) for k, v in self.sums[layer].items()}}
            fs.makedirs(f"{root}/stats/{layer}", exist_ok=True)
            write_bytes(fs, stats_path(root, layer, label), st_save(t))
            kept = np.concatenate(self.kept[layer]) if self.kept.get(layer) else np.zeros((0, len(spec.timesteps), 0), np.float16)
            fs.makedirs(f"{root}/features/layer={layer}", exist_ok=True)
            write_bytes(fs, features_path(root, layer, label),
                        table_bytes(kept_table(layer, label, self.kept_ids, [paths[i] for i in self.kept_ids], kept, spec.timesteps)))
        marker = {"count": self.count, "kept_ids": self.kept_ids, "skipped": sorted(self.skipped),
                  "dims": {layer: int(s["sum"].shape[-1]) for layer, s in self.sums.items()}}
        write_bytes(fs, class_marker(root, label), json.dumps(marker).encode())
        return marker


# ---------------------------------------------------------------------------------------------
# build / load
# ---------------------------------------------------------------------------------------------


def load_bank(path: str, spec: BankSpec, classes: Sequence[ClassInfo]) -> Bank | None:
    """A committed bank's handle: its meta only; statistics are read per class when asked for."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(f"{root}/{COMMIT}"):
        return None
    meta = json.loads(fs.cat_file(f"{root}/meta.json"))
    skipped = [tuple(x) for x in meta.get("skipped", [])]
    return Bank(path, spec, list(classes), None, skipped, meta)


def build_bank(
    spec: BankSpec,
    dataset: DatasetSplits,
    cache_dir: str,
    *,
    num_actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    progress: bool = True,
    placement_timeout_s: float = 600.0,
) -> Bank:
    """Build (or reuse, or resume) the bank of `dataset.train` for `spec`; returns the finished Bank.
    While no alive node can place a bank actor (nodes lost, an autoscaler not there yet) the build says
    so and gives up after `placement_timeout_s` (runtime.placement_timeout_s); committed chunks stay."""

    key = spec.key(dataset_fingerprint(dataset))
    path = f"{cache_dir.rstrip('/')}/banks/{key}"
    bank = load_bank(path, spec, dataset.classes)
    if bank is not None:
        log.info("bank: reusing %s", path)
        bank.meta["reused"] = True
        return bank
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(f"{root}/chunks", exist_ok=True)
    fs.makedirs(f"{root}/classes", exist_ok=True)
    write_bytes(fs, f"{root}/spec.json", json.dumps(asdict(spec), indent=1, default=str).encode())

    chunks = plan_chunks(dataset.train, spec.batch_size, spec.keep_per_class)
    paths = {r.id: r.path for r in dataset.train}
    last_chunk: dict[int, int] = {}  # class -> its last chunk: the class is complete once that chunk is folded
    for ch in chunks:
        for c in ch.labels:
            last_chunk[c] = ch.index
    # Resume: committed classes are final; chunk files of the others are reused.
    final: dict[int, dict] = {}
    for c in last_chunk:
        if fs.exists(class_marker(root, c)):
            final[c] = json.loads(fs.cat_file(class_marker(root, c)))
    on_disk = {int(p.rsplit("/c", 1)[-1].split(".")[0]) for p in fs.glob(f"{root}/chunks/c*.safetensors")}
    needed = [ch for ch in chunks if not ch.labels <= set(final)]
    todo = [ch for ch in needed if ch.index not in on_disk]
    if final or on_disk:
        log.info("bank: resuming %s (%d classes final, %d chunk(s) on disk, %d of %d chunks to go)", path, len(final),
                 len(on_disk), len(todo), len(chunks))

    t0 = time.time()
    n_images = 0
    first_batch_at: float | None = None  # seconds until the first featurised chunk: actor start + model load
    folds: dict[int, ClassFold] = {}
    ready: set[int] = {ch.index for ch in needed if ch.index in on_disk}
    pos = 0  # index into `needed`: the next chunk to fold
    folded: deque[Chunk] = deque()  # folded chunks whose file is still on disk

    def fold_ready() -> None:
        """Fold the finished chunks in chunk order; write each class as its last chunk goes in; drop
        a chunk's file once every class it holds is written."""
        nonlocal pos
        while pos < len(needed) and needed[pos].index in ready:
            ch = needed[pos]
            part = partial_from_bytes(fs.cat_file(chunk_path(root, ch.index)))
            label_of = {r.path: r.label for r in ch.records}
            for p, why in part["skipped"]:
                if label_of[p] not in final:
                    folds.setdefault(label_of[p], ClassFold()).skipped.append((p, why))
            for c in sorted(ch.labels - set(final)):
                folds.setdefault(c, ClassFold()).add(part, c)
                if last_chunk[c] == ch.index:
                    final[c] = folds.pop(c).write(fs, root, spec, c, paths)
            folded.append(ch)
            # classes complete in chunk order, so the folded chunks whose classes are all written
            # are a prefix of `folded`
            while folded and folded[0].labels <= final.keys():
                fs.rm(chunk_path(root, folded.popleft().index))
            pos += 1

    fold_ready()
    if todo:
        pipe = chunk_pipeline(todo, BankFeaturizer, {"spec": spec, "classes": dataset.classes, "root": path}, spec.resolution,
                            num_actors, gpus_per_actor, cpus_per_actor)
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(ch.records) for ch in todo), desc="feature bank", unit="img", disable=not progress)
        # closing(): an error while folding ends the stream here, not when its traceback is freed
        with closing(iterate_watched(pipe.dataset.iter_batches(batch_size=1, batch_format="numpy"),
                                     pipe.watch("bank", placement_timeout_s))) as batches:
            for batch in batches:
                if first_batch_at is None:
                    first_batch_at = time.time() - t0
                for k, n in zip(batch["chunk"], batch["n"]):
                    ready.add(int(k))
                    n_images += int(n)
                    bar.update(int(n))
                fold_ready()
        bar.close()
    fold_ready()
    if pos < len(needed):  # a chunk the pipeline never returned: a bug, never a silent partial bank
        raise RuntimeError(f"bank: chunk {needed[pos].index} of {path} was not produced")
    seconds = time.time() - t0
    counts = np.zeros(len(dataset.classes), np.int64)
    skipped: list[tuple[str, str]] = []
    dims: dict[str, int] = {}
    for c, m in final.items():
        counts[c] = m["count"]
        skipped += [tuple(x) for x in m["skipped"]]
        dims.update(m.get("dims", {}))
    empty = [c for c in dataset.classes if counts[c.index] == 0]
    if empty:  # skipped.csv is not written yet (the run stops here): name the files and reasons in the message
        paths_empty = {r.path for r in dataset.train if r.label in {c.index for c in empty}}
        bad = [f"{p} ({why})" for p, why in sorted(skipped) if p in paths_empty]
        raise UserError(f"class(es) {', '.join(c.key for c in empty)} have no usable image: {len(bad)} unreadable file(s)"
                        + (f", e.g. {'; '.join(bad[:2])}" if bad else ""))
    meta = {
        "key": key,
        "format": FORMAT,
        "images": int(counts.sum()),
        "images_featurised": n_images,  # by this build (a resumed one does only what was missing)
        "counts": counts.tolist(),
        "dims": dims,
        "skipped": sorted(skipped),
        "build_seconds": round(seconds, 2),
        "images_per_second": round(n_images / seconds, 2) if n_images and seconds > 0 else None,
        "image_timesteps_per_second": round(n_images * len(spec.timesteps) / seconds, 2) if n_images and seconds > 0 else None,
        # start-up (worker start, imports, model load, first batch) vs the rate once running
        "first_batch_seconds": None if first_batch_at is None else round(first_batch_at, 2),
        "steady_images_per_second": (round((n_images - spec.batch_size) / (seconds - first_batch_at), 2)
                                     if first_batch_at is not None and n_images > spec.batch_size and seconds > first_batch_at else None),
        "num_actors": num_actors,
        "timesteps": list(spec.timesteps),
        "layers": list(spec.layers),
    }
    write_bytes(fs, f"{root}/meta.json", json.dumps(meta, indent=1).encode())
    write_bytes(fs, f"{root}/{COMMIT}", b"ok\n")
    meta["reused"] = False
    return Bank(path, spec, list(dataset.classes), None, sorted(skipped), meta)


def make_spec(cfg: Any, backbone, layers: Sequence[str]) -> BankSpec:
    """The bank a distill config needs: all DDIM timesteps of the sampler (so t_stop sweeps reuse it)."""
    from omegaconf import OmegaConf

    from dap_ray.backbones import model_fingerprint

    model = OmegaConf.to_container(cfg.model, resolve=True)
    return BankSpec(
        model=model,
        model_fingerprint=model_fingerprint(model),
        layers=tuple(str(x) for x in layers),
        timesteps=tuple(ddim.schedule(backbone, int(cfg.sampler.steps))),
        pooling=str(cfg.method.pooling),
        seed=int(cfg.bank.seed),
        resolution=int(backbone.resolution),
        rff=None,  # DAP's RBF guidance is exact over the kept features (Bank.class_features), not RFF
        keep_per_class=int(cfg.bank.keep_per_class),
        batch_size=int(cfg.bank.batch_size),
        dtype=resolve_dtype(cfg),  # the bank runs in the sampler's precision, resolved once on the driver
    )
