"""The real-feature bank: Ray Data streams real images through backbone actors into Parquet + statistics.

Pipeline: `from_items(records)` -> `map_batches(decode)` (tasks) -> `map_batches(BankFeaturizer)`
(a stateful actor class holding VAE + backbone once, `ActorPoolStrategy`, a GPU each when present)
-> the driver streams the output, writes Parquet shards and accumulates per-class sufficient
statistics (count, Σφ, Σ‖φ‖², Σ RFF(φ)) per (layer, timestep) in float64.

Determinism: the noise for (image, timestep) comes from a generator seeded by (bank seed, image id,
timestep), so features do not depend on the number of actors, the batch size or the order of work.

Cache and resume: a bank lives in `<cache_dir>/banks/<key>/`, the key a hash of (model content,
dataset files, layers, timesteps, pooling, noise seed, resolution, RFF settings). Each shard is
committed by its `part-K.done.json` (written last, holding the ids it covers); a restarted build
skips those ids; `_COMMIT` is written last of all, and only a bank with `_COMMIT` is used.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
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
from dap_ray.runtime import plan_pool
from dap_ray.sampling import seed_for
from dap_ray.storage import write_bytes

log = logging.getLogger(__name__)

COMMIT = "_COMMIT"
SHARD_IMAGES = 512  # images per Parquet shard (and per resume checkpoint)


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
    max_per_class: int | None = None  # per-sample rows kept per class (statistics always use all)
    batch_size: int = field(default=64, compare=False)
    dtype: str = "fp32"  # the backbone's precision (sampler.dtype, resolved): bf16 features differ from fp32 ones

    def key(self, dataset_fingerprint: str) -> str:
        d = asdict(self)
        d.pop("batch_size")
        d.pop("model")  # the fingerprint stands for the model's content
        d["dataset"] = dataset_fingerprint
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
# Ray Data stages
# ---------------------------------------------------------------------------------------------


DECODE_CPUS = 0.5  # CPUs of one decode task (shrunk on small nodes by runtime.plan_pool)


def model_pipeline(records: Sequence[ImageRecord], udf: type, constructor_kwargs: dict, resolution: int, batch_size: int,
                   num_actors: int, gpus_per_actor: float, cpus_per_actor: float):
    """records -> decode tasks -> a restartable pool of `udf` actors (each holds the model once).

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
    num_actors, cpus_per_actor, decode_cpus = plan.actors, plan.cpus_per_actor, plan.side_cpus
    items = [{"id": r.id, "path": r.path, "label": r.label} for r in records]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(batch_size, 1), 64)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"resolution": resolution}, batch_size=batch_size, batch_format="numpy",
                        num_cpus=decode_cpus)
    return ds.map_batches(
        udf,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
    )


def decode_batch(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Read + decode + resize/crop; unreadable files become ok=False rows with the reason."""
    n = len(batch["id"])
    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    ok = np.ones(n, bool)
    reasons = np.array([""] * n, dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = decode_image(read_bytes(str(path)), resolution)
        except BadImageError as e:
            ok[i], reasons[i] = False, e.reason
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            ok[i], reasons[i] = False, f"unreadable: {type(e).__name__}"
    return {**batch, "image": images, "ok": ok, "reason": reasons}


class BankFeaturizer:
    """Stateful Ray Data UDF: holds the backbone once per actor; one batch of images in, features out."""

    def __init__(self, spec: BankSpec, classes: Sequence[ClassInfo], device: str | None = None):
        from dap_ray.backbones import load_backbone, torch_dtype

        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = load_backbone(spec.model, self.device, torch_dtype(spec.dtype, self.device))
        self.backbone.bind_classes(classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = featurize(self.backbone, self.spec, batch["image"], batch["label"], [str(i) for i in batch["id"]], batch["ok"])
        out = {k: batch[k] for k in ("id", "path", "label", "ok", "reason")}
        for layer, arr in feats.items():
            out[f"feat_{layer}"] = arr
        return out


@torch.no_grad()
def featurize(backbone, spec: BankSpec, images: np.ndarray, labels: np.ndarray, ids: Sequence[str], ok: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """uint8 (B,R,R,3) images -> {layer: float32 (B, T, D)}: φ_ℓ(z_t) for every bank timestep.

    Pure torch (no Ray): the plain-loop reference in tests and benchmarks calls this too.
    """
    from dap_ray.backbones import pool_features

    x = backbone.images_to_tensor(images)  # (B,3,R,R) in [-1,1]
    z0 = backbone.encode(x)  # (B,C,h,w)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in spec.layers}
    for t in spec.timesteps:
        noise = torch.stack([torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(seed_for("bank", spec.seed, i, t))) for i in ids])
        z_t = ddim.add_noise(z0, noise.to(z0.device), float(backbone.alphas_cumprod[t]))
        feats = backbone.features(z_t, t, y, list(spec.layers))
        for layer in spec.layers:
            out[layer].append(pool_features(feats[layer], spec.pooling).float().cpu())  # (B, D)
    res = {layer: torch.stack(v, dim=1).numpy() for layer, v in out.items()}  # (B, T, D)
    if ok is not None:
        for arr in res.values():
            arr[~np.asarray(ok, bool)] = 0.0
    return res


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


class StatsAccumulator:
    """Per-class sums per (layer, timestep) in float64: count (C,), sum (C,T,D), sum_sq (C,T), rff_sum (C,T,M)."""

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

    def to_bytes(self) -> bytes:
        t = {"count": torch.from_numpy(self.count)}
        for layer in self.sum:
            t[f"{layer}/sum"] = torch.from_numpy(self.sum[layer])
            t[f"{layer}/sum_sq"] = torch.from_numpy(self.sum_sq[layer])
            if layer in self.rff_sum:
                t[f"{layer}/rff_sum"] = torch.from_numpy(self.rff_sum[layer])
        return st_save(t)

    @classmethod
    def from_bytes(cls, blob: bytes, num_classes: int, spec: BankSpec) -> StatsAccumulator:
        t = st_load(blob)
        acc = cls(num_classes, spec)
        acc.count = t["count"].numpy().copy()
        for name, v in t.items():
            if name == "count":
                continue
            layer, kind = name.rsplit("/", 1)
            {"sum": acc.sum, "sum_sq": acc.sum_sq, "rff_sum": acc.rff_sum}[kind][layer] = v.numpy().copy()
        return acc


@dataclass
class Bank:
    """A finished bank: where it is, its spec and its per-class statistics."""

    path: str
    spec: BankSpec
    classes: list[ClassInfo]
    stats: StatsAccumulator
    skipped: list[tuple[str, str]]
    meta: dict

    def class_stats(self, layer: str, label: int, t: int) -> dict[str, torch.Tensor]:
        """Finalized statistics of one (class, layer, timestep), as guidance.class_energy expects."""
        ti = self.spec.timesteps.index(t)
        n = int(self.stats.count[label])
        if n == 0:
            raise UserError(f"class {self.classes[label].key!r} has no usable real image in the bank")
        out = {
            "count": torch.tensor(n),
            "mean": torch.from_numpy(self.stats.sum[layer][label, ti] / n),
            "mean_sq_norm": torch.tensor(self.stats.sum_sq[layer][label, ti] / n),
        }
        if self.stats.rff_sum:
            out["rff_mean"] = torch.from_numpy(self.stats.rff_sum[layer][label, ti] / n)
        return out

    def rff(self, layer: str) -> RandomFourierFeatures | None:
        return rff_for(self.spec.rff, self.stats.sum[layer].shape[-1]) if self.spec.rff else None

    def class_features(self, layer: str, label: int, t: int) -> torch.Tensor:
        """The kept per-image features of one (class, layer, timestep): (n_kept, D) float32, rows in id order.

        The images kept per class are `spec.max_per_class` (all when null); DAP's exact RBF energy runs
        over them. UserError when none is kept for the class."""
        fs, root = fsspec.core.url_to_fs(self.path)
        files = sorted(fs.glob(f"{root}/layer={layer}/*.parquet"))
        filters = [("label", "=", int(label)), ("timestep", "=", int(t))]
        tables = [pq.read_table(f, filesystem=fs, columns=["id", "feature"], filters=filters) for f in files]
        table = pa.concat_tables(tables).sort_by("id") if tables else None
        if table is None or table.num_rows == 0:
            raise UserError(f"the bank keeps no feature of class {self.classes[label].key!r} at layer {layer}, t={t}: "
                            "kernel=rbf needs bank.max_per_class >= 2 (null keeps every image)")
        col = table.column("feature").combine_chunks()  # FixedSizeList<float32>[D]
        dim = col.type.list_size
        return torch.from_numpy(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=True))

    def read_features(self, layer: str) -> pa.Table:
        """The per-sample Parquet rows of one layer (sorted by id, timestep)."""
        fs, root = fsspec.core.url_to_fs(self.path)
        files = sorted(fs.glob(f"{root}/layer={layer}/*.parquet"))
        tables = [pq.read_table(f, filesystem=fs) for f in files]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables).sort_by([("id", "ascending"), ("timestep", "ascending")])


# ---------------------------------------------------------------------------------------------
# build / load
# ---------------------------------------------------------------------------------------------


def _table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes: zstd for the id/path/label columns; the float features stored plain, because
    zstd saved ~2% on them for most of the driver's write time."""
    sink = pa.BufferOutputStream()
    codecs = {name: ("none" if name == "feature" else "zstd") for name in table.column_names}
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, sink, compression=codecs, use_dictionary=strings)
    return sink.getvalue().to_pybytes()


def _shard_tables(rows: dict[str, np.ndarray], spec: BankSpec, keep: set[str]) -> dict[str, pa.Table]:
    """Long format per layer: one row per (image, timestep): id, path, label, timestep, layer, feature (D,)."""
    out = {}
    sel = [i for i, (i_id, ok) in enumerate(zip(rows["id"], rows["ok"])) if ok and str(i_id) in keep]
    T = len(spec.timesteps)
    for layer in spec.layers:
        f = rows[f"feat_{layer}"][sel]  # (n, T, D)
        n, D = len(sel), f.shape[-1]
        flat = pa.array(f.reshape(-1).astype(np.float32))
        feature = pa.FixedSizeListArray.from_arrays(flat, D)
        out[layer] = pa.table({
            "id": pa.array(np.repeat(np.asarray(rows["id"], dtype=object)[sel], T).astype(str)),
            "path": pa.array(np.repeat(np.asarray(rows["path"], dtype=object)[sel], T).astype(str)),
            "label": pa.array(np.repeat(np.asarray(rows["label"])[sel], T).astype(np.int32)),
            "timestep": pa.array(np.tile(np.asarray(spec.timesteps, np.int32), n)),
            "layer": pa.array([layer] * (n * T)),
            "feature": feature,
        })
    return out


def _kept_ids(records: Sequence[ImageRecord], max_per_class: int | None) -> set[str]:
    """Per-sample rows kept: the first max_per_class ids of each class in sorted order (deterministic)."""
    if max_per_class is None:
        return {r.id for r in records}
    by_class: dict[int, list[str]] = {}
    for r in sorted(records, key=lambda r: r.id):
        by_class.setdefault(r.label, []).append(r.id)
    return {i for ids in by_class.values() for i in ids[:max_per_class]}


def load_bank(path: str, spec: BankSpec, classes: Sequence[ClassInfo]) -> Bank | None:
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(f"{root}/{COMMIT}"):
        return None
    stats = StatsAccumulator.from_bytes(fs.cat_file(f"{root}/stats.safetensors"), len(classes), spec)
    meta = json.loads(fs.cat_file(f"{root}/meta.json"))
    skipped = [tuple(x) for x in meta.get("skipped", [])]
    return Bank(path, spec, list(classes), stats, skipped, meta)


def build_bank(
    spec: BankSpec,
    dataset: DatasetSplits,
    cache_dir: str,
    *,
    num_actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    progress: bool = True,
) -> Bank:
    """Build (or reuse, or resume) the bank of `dataset.train` for `spec`; returns the finished Bank."""

    key = spec.key(dataset_fingerprint(dataset))
    path = f"{cache_dir.rstrip('/')}/banks/{key}"
    bank = load_bank(path, spec, dataset.classes)
    if bank is not None:
        log.info("bank: reusing %s", path)
        bank.meta["reused"] = True
        return bank
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    write_bytes(fs, f"{root}/spec.json", json.dumps(asdict(spec), indent=1, default=str).encode())

    # Resume: shards committed by an earlier (killed) build.
    acc = StatsAccumulator(len(dataset.classes), spec)
    done: set[str] = set()
    skipped: list[tuple[str, str]] = []
    shard_ids = []
    for marker in sorted(fs.glob(f"{root}/part-*.done.json")):
        info = json.loads(fs.cat_file(marker))
        k = info["shard"]
        acc.merge(StatsAccumulator.from_bytes(fs.cat_file(f"{root}/part-{k:05d}.stats.safetensors"), len(dataset.classes), spec))
        done.update(info["ids"])
        skipped.extend(tuple(x) for x in info["skipped"])
        shard_ids.append(k)
    next_shard = max(shard_ids, default=-1) + 1
    todo = [r for r in dataset.train if r.id not in done]
    if done:
        log.info("bank: resuming %s (%d images already done, %d to go)", path, len(done), len(todo))
    keep = _kept_ids(dataset.train, spec.max_per_class)

    t0 = time.time()
    n_images = 0
    first_batch_at: float | None = None  # seconds until the first featurised batch: actor start + model load
    if todo:
        ds = model_pipeline(todo, BankFeaturizer, {"spec": spec, "classes": dataset.classes}, spec.resolution, spec.batch_size,
                            num_actors, gpus_per_actor, cpus_per_actor)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="feature bank", unit="img", disable=not progress)
        buf: list[dict[str, np.ndarray]] = []
        buffered = 0

        def flush() -> None:
            nonlocal next_shard, buf, buffered
            if not buf:
                return
            rows = {k: np.concatenate([b[k] for b in buf]) for k in buf[0]}
            part = StatsAccumulator(len(dataset.classes), spec)
            okm = rows["ok"].astype(bool)
            part.add(rows["label"][okm], {layer: rows[f"feat_{layer}"][okm] for layer in spec.layers})
            bad = [(str(p), str(r)) for p, r, o in zip(rows["path"], rows["reason"], okm) if not o]
            for layer, table in _shard_tables(rows, spec, keep).items():
                if table.num_rows:
                    fs.makedirs(f"{root}/layer={layer}", exist_ok=True)
                    write_bytes(fs, f"{root}/layer={layer}/part-{next_shard:05d}.parquet", _table_bytes(table))
            write_bytes(fs, f"{root}/part-{next_shard:05d}.stats.safetensors", part.to_bytes())
            # The marker last: a shard without it is ignored (and overwritten) by a resumed build.
            info = {"shard": next_shard, "ids": [str(i) for i in rows["id"]], "skipped": bad}
            write_bytes(fs, f"{root}/part-{next_shard:05d}.done.json", json.dumps(info).encode())
            acc.merge(part)
            skipped.extend(bad)
            next_shard += 1
            buf, buffered = [], 0

        # fixed-size batches: shard boundaries (and resume checkpoints) do not depend on how Ray
        # happened to bundle the blocks
        for batch in ds.iter_batches(batch_size=spec.batch_size, batch_format="numpy"):
            if first_batch_at is None:
                first_batch_at = time.time() - t0
            buf.append(batch)
            buffered += len(batch["id"])
            n_images += len(batch["id"])
            bar.update(len(batch["id"]))
            if buffered >= SHARD_IMAGES:
                flush()
        flush()
        bar.close()
    seconds = time.time() - t0
    empty = [c for c in dataset.classes if acc.count[c.index] == 0]
    if empty:  # skipped.csv is not written yet (the run stops here): name the files and reasons in the message
        paths = {r.path for r in dataset.train if r.label in {c.index for c in empty}}
        bad = [f"{p} ({why})" for p, why in sorted(skipped) if p in paths]
        raise UserError(f"class(es) {', '.join(c.key for c in empty)} have no usable image: {len(bad)} unreadable file(s)"
                        + (f", e.g. {'; '.join(bad[:2])}" if bad else ""))
    meta = {
        "key": key,
        "images": int(acc.count.sum()),
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
    write_bytes(fs, f"{root}/stats.safetensors", acc.to_bytes())
    write_bytes(fs, f"{root}/meta.json", json.dumps(meta, indent=1).encode())
    write_bytes(fs, f"{root}/{COMMIT}", b"ok\n")
    meta["reused"] = False
    return Bank(path, spec, list(dataset.classes), acc, sorted(skipped), meta)


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
        max_per_class=cfg.bank.max_per_class,
        batch_size=int(cfg.bank.batch_size),
        dtype=resolve_dtype(cfg),  # the bank runs in the sampler's precision, resolved once on the driver
    )
