"""ImageFolder datasets on a local path or ``s3://bucket/prefix`` (one code path, via fsspec).

Layouts:

* ``root/<train_dir>/<class>/...`` (+ optional ``root/<test_dir>/<class>/...``): the ImageNet layout
  (``train``/``val``); test is empty if ``<test_dir>`` does not exist.
* ``root/<class>/...``: a deterministic stratified test split of ``test_fraction`` is carved from
  each class (seeded by ``seed`` and the class key, on the sorted file list).

Images are found recursively under each class folder by extension (case-insensitive); hidden files
and folders (``.name``, e.g. macOS ``._x.jpg`` resource forks) are ignored. Classes are the sorted
class folders, or the ones ``classes`` selects (a preset name, a list, or a comma-separated string).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from dap_ray.data.classlists import PRESETS, get_class_list, get_imagenet_name, is_imagenet_wnid
from dap_ray.data.images import listing_version
from dap_ray.data.types import ClassInfo, DatasetSplits, ImageRecord
from dap_ray.errors import ConfigError, UserError
from dap_ray.storage import filesystem, is_local

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def check_class_key(key: str) -> str:
    """Refuse class names that are not one plain folder name (they could escape a directory tree)."""
    bad = (
        not key
        or key in (".", "..")
        or "/" in key
        or "\\" in key
        or os.path.isabs(key)
        or any(ord(c) < 32 for c in key)
    )
    if bad:
        raise UserError(
            f"class name {key!r} is not allowed: a class must be one plain folder name "
            "(no '..', '/', '\\', absolute paths or control characters)"
        )
    return key


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _parse_classes(classes: str | Sequence[str] | None) -> tuple[str | None, list[str] | None]:
    """(preset or None, selected keys or None for all)."""
    if classes is None:
        return None, None
    if isinstance(classes, str):
        text = classes.strip()
        if not text:
            return None, None
        if text.lower() in PRESETS:
            return text.lower(), [w for w, _ in get_class_list(text.lower())]
        keys = [c.strip() for c in text.split(",") if c.strip()]
    else:
        keys = [str(c).strip() for c in classes]
        if not keys:
            return None, None
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise UserError(f"dataset.classes lists {_few(dupes)} more than once")
    for k in keys:
        check_class_key(k)
    return None, keys


def _check_root(fs: Any, base: str, root: str) -> None:
    try:
        exists = fs.exists(base)
        isdir = exists and fs.isdir(base)
    except Exception as e:  # noqa: BLE001 — e.g. NoSuchBucket, access denied, no credentials
        raise UserError(f"dataset root {root!r} cannot be read: {type(e).__name__}: {e}") from e
    if not exists:
        raise UserError(f"dataset root {root!r} does not exist")
    if not isdir:
        raise UserError(f"dataset root {root!r} is not a directory")


def _list_class_dirs(fs: Any, split_root: str) -> list[str]:
    names = []
    for entry in fs.ls(split_root, detail=True):
        # fsspec reports a local symlink as type "other"; class folders symlinked from a full
        # ImageNet tree are a common way to build subsets, so follow them.
        is_dir = entry.get("type") == "directory" or (entry.get("islink") and fs.isdir(entry["name"]))
        if not is_dir:
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        names.append(check_class_key(name))
    return sorted(set(names))


def _walk_local(class_root: str) -> list[str]:
    # os.walk uses scandir without a stat per file, far faster than fsspec's local find on
    # ImageNet-sized trees (1.28M files); like fsspec it does not descend into nested symlinks.
    return [os.path.join(d, f).replace(os.sep, "/") for d, _, files in os.walk(class_root) for f in files]


def _list_images(fs: Any, split_root: str, key: str) -> list[tuple[str, str, str]]:
    """Sorted (id relative to split_root, full path or URI, content version) of the image files of
    one class. The version of a remote object (size + ETag) comes with the listing; a local file's
    is left empty (its size and mtime are read when a fingerprint is taken, not for every file here).
    """
    class_root = _join(split_root, key)
    prefix = split_root.rstrip("/") + "/"
    local = is_local(fs)
    listing = {p: "" for p in _walk_local(class_root)} if local else {
        p: listing_version(info) for p, info in fs.find(class_root, detail=True).items()
    }
    out = []
    for p, version in listing.items():
        rel = p[len(prefix) :] if p.startswith(prefix) else f"{key}/" + p.split(f"/{key}/", 1)[-1]
        if any(part.startswith(".") for part in rel.split("/")) or not is_image_file(rel):
            continue
        out.append((rel, p if local else fs.unstrip_protocol(p), version))
    return sorted(out)


def _class_infos(preset: str | None, keys: list[str], class_names: dict[str, str] | None) -> list[ClassInfo]:
    preset_names = dict(get_class_list(preset)) if preset else {}
    infos = []
    for i, key in enumerate(keys):
        if key in preset_names:
            name = preset_names[key]
        elif class_names and key in class_names:
            name = class_names[key]
        elif is_imagenet_wnid(key):
            name = get_imagenet_name(key)
        else:
            name = key
        infos.append(ClassInfo(index=i, key=key, name=name))
    return infos


def _n_test(n: int, fraction: float) -> int:
    # Round half up, and keep at least one training image per class.
    return max(0, min(n - 1, math.floor(n * fraction + 0.5)))


def carve_split(
    records: list[ImageRecord], classes: list[ClassInfo], test_fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Deterministic stratified split: per class, a seeded permutation of the id-sorted records.

    The generator is seeded by (seed, crc32(class key)), so a class's split does not depend on
    which other classes are selected, on listing order, or on the Python hash seed.
    """
    by_label: dict[int, list[ImageRecord]] = {c.index: [] for c in classes}
    for r in records:
        by_label[r.label].append(r)
    train, test = [], []
    for c in classes:
        recs = sorted(by_label[c.index], key=lambda r: r.id)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(c.key.encode("utf-8"))])
        test_idx = set(rng.permutation(len(recs))[: _n_test(len(recs), test_fraction)].tolist())
        for i, r in enumerate(recs):
            (test if i in test_idx else train).append(r)
    return sorted(train, key=lambda r: r.id), sorted(test, key=lambda r: r.id)


def resolve_imagefolder(
    root: str | None,
    classes: str | Sequence[str] | None = None,
    *,
    train_dir: str = "train",
    test_dir: str = "val",
    test_fraction: float = 0.2,
    seed: int = 0,
    storage_options: dict | None = None,
    name: str = "imagefolder",
    class_names: dict[str, str] | None = None,
) -> DatasetSplits:
    """List an ImageFolder tree into DatasetSplits; user mistakes raise UserError naming the thing.

    ``class_names`` maps folder keys to human names (used for digits); presets and ImageNet wnids
    get their names from the shipped class lists; other folders are named after themselves.
    """
    if not root or not str(root).strip():
        raise ConfigError("dataset.root", root, "a local directory or s3://bucket/prefix")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ConfigError("dataset.test_fraction", test_fraction, "a number in [0, 1)")
    for key, sub in (("dataset.train_dir", train_dir), ("dataset.test_dir", test_dir)):
        parts = str(sub).replace("\\", "/").split("/")
        if not sub or os.path.isabs(sub) or any(p in ("", ".", "..") for p in parts):
            raise ConfigError(key, sub, "a relative folder name inside the dataset root, without '..'")
    root = str(root).strip()
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    fs, base = filesystem(root, storage_options)
    base = base.rstrip("/") or base
    _check_root(fs, base, root)
    local = is_local(fs)

    def uri(p: str) -> str:
        return p if local else fs.unstrip_protocol(p)

    train_root, test_root = _join(base, train_dir), _join(base, test_dir)
    layout_dirs = fs.isdir(train_root)
    if not layout_dirs:
        train_root, test_root = base, None
    elif not fs.isdir(test_root):
        test_root = None

    available = _list_class_dirs(fs, train_root)
    if not available:
        raise UserError(
            f"no class folders in {uri(train_root)!r}: expected <class>/<image> "
            f"(or {train_dir}/<class>/<image>) under the dataset root"
        )
    preset, keys = _parse_classes(classes)
    if keys is None:
        keys = available
    available_set = set(available)
    missing = [k for k in keys if k not in available_set]
    if missing:
        what = (
            f"class folder {missing[0]!r}"
            if len(missing) == 1
            else f"{len(missing)} class folders ({_few(missing)})"
        )
        src = f" of preset {preset!r}" if preset else ""
        hint = ""
        if isinstance(classes, str) and preset is None and "," not in classes:
            hint = f"; valid presets are {', '.join(PRESETS)}"
        raise UserError(
            f"{what}{src} not found in {uri(train_root)!r}; existing class folders: {_few(available)}{hint}"
        )
    infos = _class_infos(preset, keys, class_names)

    records: list[ImageRecord] = []
    for c in infos:
        files = _list_images(fs, train_root, c.key)
        if not files:
            raise UserError(
                f"class {c.key!r} has no image files in {uri(_join(train_root, c.key))!r} "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        records.extend(ImageRecord(id=rel, path=path, label=c.index, version=v) for rel, path, v in files)

    if layout_dirs:
        train = sorted(records, key=lambda r: r.id)
        test = []
        if test_root is not None:
            for c in infos:
                if fs.isdir(_join(test_root, c.key)):
                    test.extend(
                        ImageRecord(id=rel, path=path, label=c.index, version=v)
                        for rel, path, v in _list_images(fs, test_root, c.key)
                    )
        test.sort(key=lambda r: r.id)
    else:
        train, test = carve_split(records, infos, float(test_fraction), seed)
    return DatasetSplits(name=name, root=uri(base), classes=infos, train=train, test=test)


def distilled_records(folder: str, classes: Sequence[Any], ipc: int | None = None) -> list[ImageRecord]:
    """Records of an ImageFolder of distilled images (<folder>/<class key>/*.png|jpg), sorted by name;
    the first `ipc` per class when subsampling (IPC 100 -> 50 -> 10 from one set). Remote records carry
    the content version of their listing entry (size + ETag), as the dataset's do."""
    fs, root = filesystem(folder)
    proto = "" if "://" not in folder else folder.split("://", 1)[0] + "://"
    recs = []
    for c in classes:
        d = f"{root.rstrip('/')}/{c.key}"
        fs.invalidate_cache(d)  # list what the store holds now, not an earlier listing of this process
        entries = fs.ls(d, detail=True) if fs.exists(d) else []
        files = sorted((e["name"], listing_version(e) if proto else "") for e in entries if is_image_file(e["name"]))
        if ipc is not None:
            files = files[:ipc]
        recs += [ImageRecord(f"{c.key}/{f.rsplit('/', 1)[-1]}", proto + f if proto and not f.startswith(proto) else f, c.index, v)
                 for f, v in files]
    return recs
