"""Plain records shared by every dataset source (digits, local ImageFolder, S3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassInfo:
    index: int  # dataset label, 0..C-1, in the order of the class list
    key: str  # folder name in the ImageFolder tree (a wnid for ImageNet-style trees)
    name: str  # human-readable name (used for prompts and reports)


@dataclass(frozen=True)
class ImageRecord:
    id: str  # stable id: path relative to the split root, e.g. "n01440764/img_001.JPEG"
    path: str  # full path or URI (local path or s3://bucket/...)
    label: int  # ClassInfo.index
    # Content version captured where the dataset was listed, without an extra request per object:
    # "size:ETag" for a remote object (images.listing_version); "" for a local file, whose
    # size:mtime is read when a fingerprint needs it (images.file_version).
    version: str = ""


@dataclass
class DatasetSplits:
    """A resolved dataset: its classes and the image records of each split."""

    name: str
    root: str
    classes: list[ClassInfo]
    train: list[ImageRecord]
    test: list[ImageRecord]
