"""Shipped ImageNet class lists: ImageNette, ImageWoof, ImageIDC and ImageNet-1K.

Each list is a small tab-separated text file in ``dap_ray/data/classlists/`` (``wnid<TAB>name``,
one class a line, label ``i`` = line ``i``; ``#`` lines are comments). The ImageNet-1K file has a
third column with the full WordNet lemmas and is in the standard sorted-wnid order, so its line
number is the ImageNet-1K class index (the label id of DiT-XL/2 and other ImageNet models).
It was generated once from timm's ImageNet metadata, so runtime does not depend on timm internals.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from dap_ray.errors import UserError

PRESETS: tuple[str, ...] = ("imagenette", "imagewoof", "imageidc", "imagenet1k")


@cache
def _read(preset: str) -> tuple[tuple[str, ...], ...]:
    text = resources.files("dap_ray.data").joinpath("classlists", f"{preset}.txt").read_text("utf-8")
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rows.append(tuple(line.split("\t")))
    return tuple(rows)


def get_class_list(preset: str) -> list[tuple[str, str]]:
    """(wnid, human name) of a preset in its label order; unknown preset -> UserError."""
    key = preset.strip().lower() if isinstance(preset, str) else preset
    if key not in PRESETS:
        raise UserError(f"unknown class list {preset!r}: valid presets are {', '.join(PRESETS)}")
    return [(row[0], row[1]) for row in _read(key)]


@cache
def _imagenet_index() -> dict[str, int]:
    return {row[0]: i for i, row in enumerate(_read("imagenet1k"))}


def is_imagenet_wnid(wnid: str) -> bool:
    """True if ``wnid`` is one of the 1000 ImageNet-1K classes."""
    return wnid in _imagenet_index()


def get_imagenet_index(wnid: str) -> int:
    """0-based ImageNet-1K class index of a wnid (the class id DiT-XL/2 is conditioned on)."""
    try:
        return _imagenet_index()[wnid]
    except KeyError:
        raise UserError(f"{wnid!r} is not an ImageNet-1K wnid (expected e.g. 'n01440764')") from None


def get_imagenet_name(wnid: str) -> str:
    """Short human name of an ImageNet-1K wnid (first WordNet lemma), e.g. 'tench'."""
    return _read("imagenet1k")[get_imagenet_index(wnid)][1]


def get_imagenet_lemmas(wnid: str) -> str:
    """All WordNet lemmas of an ImageNet-1K wnid, e.g. 'tench, Tinca tinca' (disambiguates 'crane')."""
    return _read("imagenet1k")[get_imagenet_index(wnid)][2]
