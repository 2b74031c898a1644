"""Datasets: built-in digits, ImageFolder (local or S3), shipped class lists, bad-file policy."""

from __future__ import annotations

from collections.abc import Sequence

from dap_ray.data.classlists import (
    PRESETS,
    get_class_list,
    get_imagenet_index,
    get_imagenet_lemmas,
    get_imagenet_name,
)
from dap_ray.data.digits import DIGIT_NAMES, materialize_digits
from dap_ray.data.imagefolder import IMAGE_EXTENSIONS, distilled_records, resolve_imagefolder
from dap_ray.data.images import (
    MAX_PIXELS,
    BadImageError,
    decode_image,
    load_image,
    load_images,
    read_bytes,
    read_skipped_csv,
    write_skipped_csv,
)
from dap_ray.data.types import ClassInfo, DatasetSplits, ImageRecord
from dap_ray.errors import ConfigError

DATASETS: tuple[str, ...] = ("digits", "imagefolder")


def resolve_digits(classes: str | Sequence[str] | None = None, *, cache_dir: str | None = None) -> DatasetSplits:
    """Digits as DatasetSplits (keys "0".."9", names "zero".."nine"), optionally a class subset."""
    tree = materialize_digits(cache_dir)
    return resolve_imagefolder(tree, classes, train_dir="train", test_dir="test", name="digits", class_names=DIGIT_NAMES)


def resolve_dataset(
    name: str,
    root: str | None,
    classes: str | Sequence[str] | None,
    *,
    train_dir: str = "train",
    test_dir: str = "val",
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
) -> DatasetSplits:
    """Resolve a dataset config to its classes and train/test image records.

    ``digits`` ignores ``root`` and the split options (its split is fixed); ``imagefolder`` reads
    ``root`` (local path or ``s3://``). User mistakes raise ``UserError`` with one clear message.
    """
    if name == "digits":
        return resolve_digits(classes, cache_dir=cache_dir)
    if name == "imagefolder":
        return resolve_imagefolder(
            root,
            classes,
            train_dir=train_dir,
            test_dir=test_dir,
            test_fraction=test_fraction,
            seed=seed,
            storage_options=storage_options,
        )
    raise ConfigError("dataset.name", name, f"one of {', '.join(DATASETS)}")


__all__ = [
    "BadImageError",
    "ClassInfo",
    "DATASETS",
    "DatasetSplits",
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "MAX_PIXELS",
    "PRESETS",
    "decode_image",
    "distilled_records",
    "get_class_list",
    "get_imagenet_index",
    "get_imagenet_lemmas",
    "get_imagenet_name",
    "load_image",
    "load_images",
    "read_bytes",
    "read_skipped_csv",
    "resolve_dataset",
    "resolve_digits",
    "resolve_imagefolder",
    "write_skipped_csv",
]
