"""Evaluation orchestration: one Ray task per (method, architecture, seed), results cached on disk.

Real and distilled images are decoded by the same code and resized alike to `eval.resolution`
(DESIGN.md §8: digits are 8x8, below what the nets downsample). Each finished training writes
`<run>/eval/<method>__<arch>__<seed>.json`; a re-run reuses those. A training that fails is retried
(`runtime.eval_retries`) and, if it still fails, recorded as failed in the results — never dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from dap_ray.data import BadImageError, decode_image, distilled_records, load_images, read_bytes
from dap_ray.data.types import DatasetSplits, ImageRecord
from dap_ray.errors import ConfigError, UserError
from dap_ray.runtime import CapacityWatch, actor_need
from dap_ray.storage import expand, filesystem, write_bytes

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """Images of a list of files decoded at one size: uint8 (N, 3, R, R), which files decoded, what
    failed (path, reason), and a digest of every file's bytes in order (content, not names)."""

    images: torch.Tensor  # (N, 3, R, R) uint8
    ok: list[int]
    bad: list[tuple[str, str]]
    digest: str


def decode_files(paths: Sequence[str], resolution: int, resize: int | None = None) -> Decoded:
    """Decode `paths` as Resize(resize or resolution) + CenterCrop(resolution) (torchvision arithmetic).

    `resize > resolution` is the test transform of RDED/D3HR (Resize(8/7 s) + CenterCrop(s)). Files
    that cannot be used are returned in `bad` with their reason, never dropped silently."""
    out, ok, bad = [], [], []
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        try:
            data = read_bytes(p)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            bad.append((p, f"unreadable: {type(e).__name__}"))
            continue
        h.update(hashlib.sha256(data).digest())
        try:
            img = decode_image(data, resize or resolution)  # (S, S, 3)
        except BadImageError as e:
            bad.append((p, e.reason))
            continue
        if resize and resize != resolution:
            top = int(round((resize - resolution) / 2.0))
            img = img[top : top + resolution, top : top + resolution]
        out.append(img)
        ok.append(i)
    arr = np.stack(out) if out else np.zeros((0, resolution, resolution, 3), np.uint8)
    return Decoded(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), ok, bad, h.hexdigest()[:24])


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,R,R,3) -> float (N,3,R,R) in [0,1] (the nets normalise internally)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


def pick_test(records: Sequence[ImageRecord], limit: int | None) -> list[ImageRecord]:
    """The test records evaluated: all, or a fixed seeded subset of `limit` (eval.max_test)."""
    recs = list(records)
    if limit is not None and len(recs) > limit:
        rng = np.random.default_rng(0)
        recs = [recs[i] for i in sorted(rng.choice(len(recs), limit, replace=False))]
    return recs


def load_split(records: Sequence[ImageRecord], resolution: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    recs = pick_test(records, limit)
    imgs, ok = load_images([r.path for r in recs], resolution)
    return to_float(imgs), torch.tensor([recs[i].label for i in ok], dtype=torch.long)


def train_config(cfg: Any, ipc: int, nclass: int, arch: str):
    from dap_ray.eval.train import TrainConfig

    e = cfg.eval
    preset = {"igd": TrainConfig.igd, "minimax": TrainConfig.minimax, "d3hr": TrainConfig.d3hr, "rded": TrainConfig.rded}[e.recipe]
    kw: dict[str, Any] = {}
    if e.recipe == "rded":
        kw["arch"] = arch
    tc = preset(ipc=ipc, nclass=nclass, **kw)
    over: dict[str, Any] = {}
    if e.epochs is not None:
        over["epochs"] = int(e.epochs)
        if e.recipe == "d3hr":  # D3HR tests over the last ~100 epochs of whatever budget runs
            over["eval_after"] = max(0.0, 1.0 - 100 / int(e.epochs))
    if e.batch_size is not None:
        over["batch_size"] = int(e.batch_size)
    if e.lr is not None:
        over["lr"] = float(e.lr)
    if e.temperature is not None:
        over["temperature"] = float(e.temperature)
    if e.augment is not None:
        over["augment"] = str(e.augment)
    if e.eval_every is not None:
        over["eval_every"] = int(e.eval_every)
    return tc.with_(**over) if over else tc


def _train_one(spec: dict, x_train, y_train, x_test, y_test, teacher_state) -> dict:
    """Body of one evaluation task (runs in a Ray worker)."""
    import time

    from dap_ray.eval.train import train_hard_label, train_soft_label

    torch.set_num_threads(max(1, int(spec.get("threads", 1))))
    device = "cuda" if spec["gpus"] > 0 and torch.cuda.is_available() else "cpu"
    t0 = time.time()
    x_train, x_test, y_test = x_train.to(device), x_test.to(device), y_test.to(device)  # uint8, moved once, kept there
    if spec["protocol"] == "soft_label":
        teacher = teacher_state()
        res = train_soft_label(x_train, y_train, x_test, y_test, spec["arch"], teacher, spec["train_cfg"], spec["seed"], device)
    else:
        res = train_hard_label(x_train, y_train, x_test, y_test, spec["arch"], spec["train_cfg"], spec["seed"], device)
    res = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in res.items()}
    res["seconds"] = round(time.time() - t0, 1)
    return res


class TeacherRef:
    """A teacher trained once (and cached as safetensors), rebuilt inside each evaluation task."""

    def __init__(self, arch: str, num_classes: int, resolution: int, state_path: str, key: str):
        self.arch, self.num_classes, self.resolution, self.state_path = arch, num_classes, resolution, state_path
        self.key = key  # what the teacher's weights depend on (part of every student training's key)

    def __call__(self):
        from safetensors.torch import load as st_load

        from dap_ray.eval.train import TrainConfig, build_model

        dummy = torch.zeros(1, 3, self.resolution, self.resolution)
        model = build_model(self.arch, self.num_classes, dummy, TrainConfig.teacher())
        model.load_state_dict(st_load(read_bytes(self.state_path)))  # local path or s3:// (cache_dir)
        return model.eval().requires_grad_(False)


def classifier_name(model: torch.nn.Module) -> str:
    """Name of the last Linear layer: the classifier of torchvision and timm image models."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Linear classifier to slice")
    return names[-1]


def build_pretrained(library: str, arch: str, num_classes: int = 1000) -> torch.nn.Module:
    """A torchvision or timm model `arch`, random init, never downloading weights."""
    if library == "timm":
        import timm

        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes)
        except RuntimeError as e:
            raise ConfigError("eval.teacher.arch", arch, "a timm model name (timm.list_models())") from e
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise ConfigError("eval.teacher.arch", arch, "a torchvision model name (torchvision.models.list_models())") from e


class PretrainedTeacherRef:
    """A pretrained torchvision/timm classifier from a safetensors file, its classifier cut to the
    subset's rows (RDED ``synthesize/utils.py`` ``pruning_classifier``), ImageNet normalisation in
    front; rebuilt inside each evaluation task."""

    def __init__(self, library: str, arch: str, path: str, rows: list[int], key: str):
        self.library, self.arch, self.path, self.rows, self.key = library, arch, path, rows, key

    def __call__(self) -> torch.nn.Module:
        from safetensors.torch import load as st_load

        from dap_ray.eval.nets import IMAGENET_MEAN, IMAGENET_STD, Normalized

        state = st_load(read_bytes(self.path))
        head = classifier_name(build_pretrained(self.library, self.arch, 1000))
        model = build_pretrained(self.library, self.arch, int(state[f"{head}.weight"].shape[0]))
        model.load_state_dict(state)
        old = model.get_submodule(head)
        idx = torch.tensor(self.rows)
        cut = torch.nn.Linear(old.in_features, len(self.rows), bias=old.bias is not None)
        with torch.no_grad():
            cut.weight.copy_(old.weight[idx])  # (K_subset, D) rows of the subset's classes
            if old.bias is not None:
                cut.bias.copy_(old.bias[idx])
        parent, _, leaf = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, cut)
        return Normalized(model, IMAGENET_MEAN, IMAGENET_STD).eval().requires_grad_(False)


def teacher_rows(cfg: Any, dataset: DatasetSplits, n_rows: int) -> list[int]:
    """The teacher's classifier rows of the dataset's classes, in class order: eval.teacher.classes,
    else every row when the teacher has exactly the subset's classes, else the ImageNet-1K index of
    each class's wnid (a 1000-class teacher on an ImageNet subset)."""
    from dap_ray.data import get_imagenet_index

    given = cfg.eval.teacher.classes
    nclass = len(dataset.classes)
    if given is not None:
        rows = [int(r) for r in given]
        if len(rows) != nclass or not all(0 <= r < n_rows for r in rows):
            raise ConfigError("eval.teacher.classes", rows, f"{nclass} row indices in [0, {n_rows}), one per class in class order")
        return rows
    if n_rows == nclass:
        return list(range(nclass))
    try:
        rows = [int(get_imagenet_index(c.key)) for c in dataset.classes]
    except Exception as e:  # noqa: BLE001 - not wnids: the user must say which rows
        raise ConfigError("eval.teacher.classes", None, f"a list of {nclass} classifier rows: the teacher has {n_rows} classes and the "
                          f"dataset's are not ImageNet wnids ({e})") from e
    if n_rows != 1000:
        raise ConfigError("eval.teacher.classes", None, f"a list of {nclass} classifier rows (the teacher has {n_rows} classes, not 1000)")
    return rows


def get_pretrained_teacher(cfg: Any, dataset: DatasetSplits) -> PretrainedTeacherRef:
    """Check the pretrained teacher once on the driver (file, architecture, rows) and key it by its content."""
    from safetensors.torch import load as st_load

    from dap_ray.config import config_hash

    t = cfg.eval.teacher
    try:
        data = read_bytes(str(t.path))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ConfigError("eval.teacher.path", t.path, f"a readable .safetensors file ({type(e).__name__})") from None
    try:
        state = st_load(data)
    except Exception as e:  # noqa: BLE001 - not safetensors: a user error
        raise ConfigError("eval.teacher.path", t.path, f"a .safetensors file of {t.library} {t.arch} weights ({e})") from None
    head = classifier_name(build_pretrained(str(t.library), str(t.arch), 1000))
    if f"{head}.weight" not in state:
        raise ConfigError("eval.teacher.path", t.path, f"{t.library} {t.arch} weights (no {head}.weight in the file)")
    rows = teacher_rows(cfg, dataset, int(state[f"{head}.weight"].shape[0]))
    key = f"pretrained:{t.library}:{t.arch}:{hashlib.sha256(data).hexdigest()[:20]}:{config_hash(rows)}"
    return PretrainedTeacherRef(str(t.library), str(t.arch), str(t.path), rows, key)


def get_teacher(cfg: Any, dataset: DatasetSplits, x_real: torch.Tensor, y_real: torch.Tensor, cache_dir: str) -> TeacherRef:
    """Train the soft-label teacher on the full real training split once; cache it by content.

    The cache goes through fsspec like every other path, so cache_dir may be an s3:// URI."""
    from safetensors.torch import save as st_save

    from dap_ray.bank import dataset_fingerprint
    from dap_ray.config import config_hash
    from dap_ray.eval.train import TrainConfig, train_teacher

    t = cfg.eval.teacher
    key = config_hash({"data": dataset_fingerprint(dataset), "arch": t.arch, "epochs": t.epochs, "res": cfg.eval.resolution})
    path = f"{cache_dir.rstrip('/')}/teachers/{t.arch}-{key}.safetensors"
    fs, p = filesystem(path)
    if not fs.exists(p):
        log.info("training the %s teacher on %d real images (cached at %s)", t.arch, len(x_real), path)
        model = train_teacher(x_real, y_real, t.arch, TrainConfig.teacher(epochs=int(t.epochs)), seed=0)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        write_bytes(fs, p, st_save({k: v.contiguous() for k, v in model.state_dict().items()}))  # local: temp + rename
    return TeacherRef(t.arch, len(dataset.classes), int(cfg.eval.resolution), path, f"trained:{t.arch}-{key}")


def _error_line(e: BaseException) -> str:
    """One readable line for a failed training: the task's own exception (a RayTaskError's first
    line is only Ray's coloured `ray::task() (pid=…)` header), without terminal colour codes."""
    import re

    cause = getattr(e, "cause", None) or e
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0].strip() if lines else ''}"[:300]


def training_key(cfg: Any, arch: str, seed: int, tc: Any, real_fp: str, set_fp: str, teacher: TeacherRef | PretrainedTeacherRef | None) -> tuple[str, dict]:
    """(hash, parts) of everything that shapes one training's accuracy: the protocol and recipe, the
    net, the image size and test transform, the full training config (lr, epochs, batch size,
    augmentation, schedule, ...), the teacher, the real test data and the distilled set's content.
    A result is reused only under the same hash, so no change of setting can return an old number."""
    from dataclasses import asdict

    from dap_ray.config import config_hash

    e = cfg.eval
    parts = {"preset": str(e.name), "protocol": str(e.protocol), "recipe": str(e.recipe), "arch": arch, "seed": int(seed), "resolution": int(e.resolution),
             "test_resize": test_resize(cfg), "train_cfg": asdict(tc), "teacher": None if teacher is None else teacher.key,
             "real_data": real_fp, "distilled": set_fp}
    return config_hash(parts, 20), parts


def test_resize(cfg: Any) -> int:
    """Shorter side the test images are resized to before the center crop to eval.resolution:
    `eval.test_resize` x resolution (RDED/D3HR: Resize(8/7 s) + CenterCrop(s), 256 for 224)."""
    return int(round(float(cfg.eval.test_resize) * int(cfg.eval.resolution)))


def evaluate_sets(
    cfg: Any,
    dataset: DatasetSplits,
    sets: dict[str, list[ImageRecord]],
    results_dir: str,
    cache_dir: str,
    progress: bool = True,
    skipped: list | None = None,
) -> list[dict]:
    """Train every (set, arch, seed) as a Ray task; returns one row per training (failed ones marked).

    Each finished training is cached as `<results_dir>/<set>__<arch>__<seed>__<key>.json`, `key` the
    hash of :func:`training_key`: a re-run with the same settings reuses it, any change retrains.
    Unusable test and distilled files are appended to `skipped` as (path, reason, split)."""
    import ray
    from tqdm.auto import tqdm

    from dap_ray.config import config_hash

    res = int(cfg.eval.resolution)
    test_recs = pick_test(dataset.test, cfg.eval.max_test)
    test = decode_files([r.path for r in test_recs], res, test_resize(cfg))
    y_test = torch.tensor([test_recs[i].label for i in test.ok], dtype=torch.long)
    if skipped is not None:
        skipped += [(p, why, "test") for p, why in test.bad]
    if test.bad:
        log.warning("%d test file(s) could not be used and are not in the test set (listed in skipped.csv)", len(test.bad))
    test_per_class = {c.key: int((y_test == c.index).sum()) for c in dataset.classes}
    real_fp = config_hash({"classes": [c.key for c in dataset.classes], "test": test.digest, "labels": y_test.tolist()}, 20)
    fs, rdir = fsspec.core.url_to_fs(results_dir)
    fs.makedirs(rdir, exist_ok=True)
    teacher = None
    if cfg.eval.protocol == "soft_label" and cfg.eval.teacher.path:
        teacher = get_pretrained_teacher(cfg, dataset)
    elif cfg.eval.protocol == "soft_label":
        x_real, y_real = load_split(dataset.train, res)
        teacher = get_teacher(cfg, dataset, x_real, y_real, cache_dir)
    x_test_ref, y_test_ref = ray.put(test.images), ray.put(y_test)
    task = ray.remote(_train_one).options(num_cpus=float(cfg.runtime.cpus_per_eval), num_gpus=float(cfg.runtime.gpus_per_eval),
                                          max_retries=int(cfg.runtime.eval_retries), retry_exceptions=True)
    rows, pending = [], {}
    nclass = len(dataset.classes)
    for name, recs in sets.items():
        dec = decode_files([r.path for r in recs], res)
        if skipped is not None:
            skipped += [(p, why, f"distilled:{name}") for p, why in dec.bad]
        y_tr = torch.tensor([recs[i].label for i in dec.ok], dtype=torch.long)
        set_fp = config_hash({"content": dec.digest, "labels": y_tr.tolist()}, 20)
        n_ok = len(dec.ok)
        ipc = max(1, n_ok // max(nclass, 1))
        x_ref, y_ref = ray.put(dec.images), ray.put(y_tr)
        for arch in cfg.eval.archs:
            tc = train_config(cfg, ipc, nclass, arch)
            for seed in cfg.eval.seeds:
                key, parts = training_key(cfg, arch, int(seed), tc, real_fp, set_fp, teacher)
                fname = f"{rdir}/{name}__{arch}__{int(seed)}__{key}.json"
                base = {"method": name, "arch": arch, "seed": int(seed), "ipc": ipc, "protocol": cfg.eval.protocol, "recipe": cfg.eval.recipe,
                        "epochs": tc.epochs, "n_train": n_ok, "n_test": int(len(y_test)), "test_per_class": test_per_class, "key": key,
                        "config": parts}
                if fs.exists(fname):
                    try:
                        cached = json.loads(fs.cat_file(fname))
                    except ValueError:  # unreadable (not written by us: ours are atomic): train again
                        cached = {}
                    if cached.get("status") == "ok" and cached.get("key") == key:
                        rows.append(cached)
                        continue
                spec = {"arch": arch, "seed": int(seed), "train_cfg": tc, "protocol": cfg.eval.protocol, "gpus": float(cfg.runtime.gpus_per_eval),
                        "threads": max(1, int(cfg.runtime.cpus_per_eval))}
                ref = task.remote(spec, x_ref, y_ref, x_test_ref, y_test_ref, teacher)
                pending[ref] = (base, fname)
    bar = tqdm(total=len(pending), desc="evaluation trainings", unit="run", disable=not progress)
    remaining = list(pending)
    # a training that fits on no alive node (its GPU node lost, the autoscaler not there yet) waits in
    # Ray forever: say so, and give up after runtime.placement_timeout_s (finished trainings are kept)
    watch = CapacityWatch("evaluation", actor_need(float(cfg.runtime.gpus_per_eval), float(cfg.runtime.cpus_per_eval)),
                          float(cfg.runtime.placement_timeout_s))
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1, timeout=watch.poll_s)
        if not done:
            try:
                watch.check()
            except UserError:
                for ref in remaining:  # given up: take the queued trainings back out of Ray
                    ray.cancel(ref)
                raise
            continue
        base, fname = pending[done[0]]
        try:
            out = ray.get(done[0])
            row = {**base, "status": "ok", "acc": float(out["acc"]), "acc_best": out.get("acc_best"), "acc_last": out.get("acc_last"),
                   "seconds": out.get("seconds"), "history": [[int(e), float(a)] for e, a in out.get("history", [])]}
            write_bytes(fs, fname, json.dumps(row).encode())  # temp + rename: a killed driver leaves no half file
        except Exception as e:  # noqa: BLE001 - reported in the table, never silently dropped
            row = {**base, "status": "failed", "acc": None, "error": _error_line(e)}
            log.error("evaluation %s/%s/seed %s failed after retries: %s", base["method"], base["arch"], base["seed"], row["error"])
        rows.append(row)
        bar.update(1)
    bar.close()
    return sorted(rows, key=lambda r: (list(sets).index(r["method"]), r["arch"], r["seed"]))


def evaluate_run(cfg: Any, dataset: DatasetSplits, run_dir: str, methods: Sequence[str]) -> dict:
    """Evaluate each method's images of this run (`out["sets"]`: the records evaluated, by method).
    `out["skipped"]` lists the test and distilled files that could not be used (path, reason, split)."""
    sets = {m: distilled_records(f"{run_dir}/{m}/images", dataset.classes) for m in methods}
    skipped: list[tuple[str, str, str]] = []
    rows = evaluate_sets(cfg, dataset, sets, f"{run_dir}/eval", expand(cfg.cache_dir), skipped=skipped)
    return {"rows": rows, "classes": list(dataset.classes), "skipped": skipped, "sets": sets}
