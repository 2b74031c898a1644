"""Reading and decoding images, and the bad-file report (``skipped.csv``).

Every path goes through fsspec, so a local path and an ``s3://`` URI work the same. S3 endpoint and
credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), never
from files.

Decoding policy (``decode_image``): every readable image becomes ``(R, R, 3)`` uint8 RGB.

* Alpha (RGBA, LA, palette with transparency) is composited on **white**, not dropped: dropping it
  exposes whatever colour the fully transparent pixels happen to store (often black or noise).
* 16-bit grayscale (``I;16*``) is scaled by 1/257, so 65535 -> 255 and mid-grey stays mid-grey.
  32-bit ``I`` is read as 16-bit when its values fit 0..65535 and exceed 255, as 8-bit when they
  fit 0..255, and min-max normalised otherwise; float ``F`` in [0, 1] is scaled by 255, in
  [0, 255] kept, otherwise min-max normalised.
* CMYK and other modes use PIL's ``convert("RGB")``; EXIF orientation is *not* applied, like
  torchvision's ImageFolder loader the reference pipelines use.
* Resize: shorter side to R with antialiased bicubic, then center crop to R x R (torchvision's
  ``Resize(R)`` + ``CenterCrop(R)`` arithmetic). Large JPEGs are first DCT-downscaled with
  ``Image.draft`` to no less than 2R on the shorter side, which is fast and keeps the antialiasing.
* Images over ``MAX_PIXELS`` pixels are refused as decompression bombs (header check, nothing is
  decoded); anything smaller, however large, is decoded.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dap_ray.data.digits import VERSION as DIGITS_VERSION
from dap_ray.data.digits import materialize_digits
from dap_ray.data.types import ImageRecord
from dap_ray.storage import filesystem, is_local

# Generous: a 16k x 12k photo passes. PIL's own check warns above MAX_IMAGE_PIXELS and raises above
# twice that; we raise the threshold to ours and do the check ourselves so the reason is clear.
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_PIXELS)


class BadImageError(Exception):
    """An input file that cannot be used as an image; ``reason`` is short and goes to skipped.csv."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def listing_version(info: Mapping[str, Any]) -> str:
    """Content version of a remote object from its fsspec listing entry (``ls``/``find`` with
    ``detail=True``, so no request per object): ``size:ETag``. S3 gives every upload a new ETag,
    even one of the same size under the same key; a store without ETags falls back to its
    modification time."""
    tag = next((info[k] for k in ("ETag", "etag", "LastModified", "last_modified", "mtime") if info.get(k)), "")
    tag = str(tag).strip('"')  # S3 quotes its ETags
    return f"{info.get('size')}:{tag}"


def file_version(path: str, version: str = "") -> str:
    """Content version of one input file, for cache keys: the one captured at listing when there
    is one (remote objects, ``listing_version``), else ``size:mtime_ns`` of a local file
    (``missing`` when it is gone)."""
    if version or "://" in path:
        return version
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def record_versions(records: Iterable[ImageRecord]) -> list[tuple[str, int, str]]:
    """(id, label, content version) of each record: what a cache key over input files hashes."""
    return [(r.id, r.label, file_version(r.path, r.version)) for r in records]


def read_bytes(path: str) -> bytes:
    """All bytes of a local file or ``s3://`` object (errors propagate unchanged).

    A file of the built-in digits tree that is missing here is rebuilt first: the driver
    materialises that tree on its own node's disk, and on a multi-node cluster (KubeRay) the Ray
    workers that decode it run elsewhere. Its content is deterministic, so every node builds the
    same files.
    """
    fs, p = filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            return f.read()
    except FileNotFoundError:
        marker = f"/datasets/{DIGITS_VERSION}/"
        if "://" in path or marker not in path:
            raise
        materialize_digits(path.split(marker, 1)[0])
        with fs.open(p, "rb") as f:
            return f.read()


def load_images(paths: Sequence[str], resolution: int) -> tuple[np.ndarray, list[int]]:
    """Decode `paths` at `resolution`; returns uint8 (N,R,R,3) and the indices that decoded."""
    out, ok = [], []
    for i, p in enumerate(paths):
        try:
            out.append(decode_image(read_bytes(p), resolution))
            ok.append(i)
        except BadImageError:
            continue
    arr = np.stack(out) if out else np.zeros((0, resolution, resolution, 3), np.uint8)
    return arr, ok


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _to_8bit(arr: np.ndarray, kind: str) -> np.ndarray:
    """High-bit-depth or float grayscale -> uint8 by scaling (not clipping)."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if kind == "16":
        out = arr / 257.0
    elif kind == "I" and lo >= 0 and hi <= 255:
        out = arr
    elif kind == "I" and lo >= 0 and hi <= 65535:
        out = arr / 257.0
    elif kind == "F" and lo >= 0 and hi <= 1:
        out = arr * 255.0
    elif kind == "F" and lo >= 0 and hi <= 255:
        out = arr
    else:  # unknown range: stretch to 0..255 (a constant image becomes mid-grey rather than NaN)
        out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.full_like(arr, 128.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB following the module's policy (alpha on white, 16-bit scaled)."""
    mode = img.mode
    if mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(img), "16"), "L").convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(img), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    ):
        return _composite_on_white(img)
    return img if mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side -> resolution (antialiased bicubic), then center crop (torchvision arithmetic)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = resolution, int(resolution * h / w)
    else:
        new_w, new_h = int(resolution * w / h), resolution
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = int(round((new_w - resolution) / 2.0))
    top = int(round((new_h - resolution) / 2.0))
    return img.crop((left, top, left + resolution, top + resolution))


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Encoded bytes -> (resolution, resolution, 3) uint8 RGB; unusable input -> BadImageError."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if not data:
        raise BadImageError("zero-byte file")
    try:
        with warnings.catch_warnings():
            # Our MAX_PIXELS check below gives the verdict; PIL's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w < 1 or h < 1:
                raise BadImageError(f"corrupt: empty image {w}x{h}")
            if w * h > MAX_PIXELS:
                raise BadImageError(f"decompression bomb: {w}x{h} = {w * h} pixels > {MAX_PIXELS}")
            if img.format == "JPEG":
                # DCT scaling at decode time: a 6000x4000 JPEG decodes at 1/8 the cost.
                img.draft(None, (2 * resolution, 2 * resolution))
            img.load()  # decode now, inside the try, so truncation and corrupt data are caught here
            out = resize_center_crop(to_rgb(img), resolution)
            arr = np.asarray(out, dtype=np.uint8)
    except BadImageError:
        raise
    except UnidentifiedImageError as e:
        # PIL's message names the BytesIO object; the leading bytes say more about what it was.
        raise BadImageError(f"not an image: unknown format, starts with {data[:8]!r}") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(f"decompression bomb: {_short(e)}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        msg = _short(e)
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise BadImageError(f"truncated: {msg}") from e
        raise BadImageError(f"corrupt: {msg}") from e
    if arr.shape != (resolution, resolution, 3):  # defensive: never hand a wrong shape downstream
        raise BadImageError(f"corrupt: decoded to shape {arr.shape}")
    return arr


def load_image(path: str, resolution: int) -> np.ndarray:
    """read_bytes + decode_image. A file that vanished or cannot be opened -> BadImageError.

    Other I/O errors (network, throttling) propagate, so the caller's retry logic sees them
    instead of the file being silently skipped.
    """
    try:
        data = read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise BadImageError(f"unreadable: {type(e).__name__}: {_short(e)}") from e
    return decode_image(data, resolution)


def write_skipped_csv(run_dir: str, rows: Iterable[Sequence[str]]) -> str:
    """Write ``<run_dir>/skipped.csv`` (columns path,reason,split; sorted) and return its path.

    A row is (path, reason) for a training-split file or (path, reason, split), split one of
    ``train``, ``test`` or ``distilled:<set>``. Written even when ``rows`` is empty, so its presence
    says "checked, nothing skipped". Local files are written to a temp name and renamed; an S3
    object appears atomically on upload.
    """
    fs, base = filesystem(run_dir)
    out_path = run_dir.rstrip("/") + "/skipped.csv"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason", "split"])
    full = {(str(r[0]), str(r[1]), str(r[2]) if len(r) > 2 else "train") for r in rows}
    for path, reason, split in sorted(full):
        writer.writerow([path, reason, split])
    payload = buf.getvalue().encode("utf-8")
    target = base.rstrip("/") + "/skipped.csv"
    if is_local(fs):
        os.makedirs(base, exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    else:
        with fs.open(target, "wb") as f:
            f.write(payload)
    return out_path


def read_skipped_csv(path: str, with_split: bool = False) -> list[tuple[str, ...]]:
    """Rows (path, reason) — or (path, reason, split) with ``with_split`` — of a skipped.csv."""
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        text = f.read().decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0][:2] != ["path", "reason"]:
        raise ValueError(f"{path} is not a skipped.csv (header {rows[:1]})")
    if with_split:
        return [(r[0], r[1], r[2] if len(r) > 2 else "train") for r in rows[1:]]
    return [(r[0], r[1]) for r in rows[1:]]
