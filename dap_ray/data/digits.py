"""The built-in dataset: scikit-learn's 1,797 real 8x8 handwritten digits, as an ImageFolder tree.

It is materialised once as grayscale PNGs under
``<cache_dir>/datasets/digits-v1/{train,test}/<digit>/<sklearn index>.png`` and then resolved like
any ImageFolder (``dap_ray.data.resolve_digits``), so everything downstream has one code path. The split is fixed: stratified, 20 %
test, ``random_state=0``. Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

import numpy as np

from dap_ray.errors import UserError

VERSION = "digits-v1"  # bump when the tree's content or layout changes
MARKER = ".complete.json"  # written last; a tree without it is half-written and rebuilt
DIGIT_NAMES = {str(i): n for i, n in enumerate("zero one two three four five six seven eight nine".split())}
TEST_SIZE = 0.2
SPLIT_SEED = 0


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "dap_ray")


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"train"|"test": (uint8 images (N, 8, 8), labels (N,), sklearn indices (N,))}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    index = np.arange(len(images))
    tr, te = train_test_split(index, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=digits.target)
    return {s: (images[i], digits.target[i], i) for s, i in (("train", np.sort(tr)), ("test", np.sort(te)))}


def _write_tree(tree: str) -> dict[str, int]:
    from PIL import Image

    counts = {}
    for split, (images, labels, indices) in digits_split().items():
        for d in DIGIT_NAMES:
            os.makedirs(os.path.join(tree, split, d), exist_ok=True)
        for img, label, idx in zip(images, labels, indices):
            Image.fromarray(img, mode="L").save(os.path.join(tree, split, str(int(label)), f"{int(idx)}.png"))
        counts[split] = len(indices)
    return counts


def materialize_digits(cache_dir: str | None = None) -> str:
    """Path of the complete digits ImageFolder tree, building it first if needed.

    The tree is built in a uniquely named temp folder and renamed into place after its marker is
    written, so concurrent callers (e.g. several Ray workers) and killed builds never expose a
    half-written tree; a leftover tree without the marker is removed and rebuilt.
    """
    if cache_dir and "://" in cache_dir:
        cache_dir = None  # cache_dir=s3://...: the built-in digits are small and stay on local disk
    base = os.path.join(os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir())), "datasets")
    final = os.path.join(base, VERSION)
    if os.path.exists(os.path.join(final, MARKER)):
        return final
    tmp = os.path.join(base, f".{VERSION}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(base, exist_ok=True)
        counts = _write_tree(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"version": VERSION, "counts": counts, "test_size": TEST_SIZE, "seed": SPLIT_SEED}, f)
        if os.path.exists(final) and not os.path.exists(os.path.join(final, MARKER)):
            # A half-written leftover: move it aside atomically, then delete it at leisure.
            trash = f"{tmp}.stale"
            try:
                os.rename(final, trash)
            except OSError:
                pass  # another builder moved it first
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost a race: another process renamed its complete tree into place first.
            if not os.path.exists(os.path.join(final, MARKER)):
                raise
    except PermissionError as e:
        raise UserError(
            f"cannot write the digits dataset under {base!r} ({e.strerror}); set cache_dir to a writable folder"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_temps(base)
    return final


def _remove_stale_temps(base: str, max_age_s: float = 3600.0) -> None:
    """Delete temp trees of builds killed long ago (a live build finishes in seconds)."""
    now = time.time()
    for entry in os.scandir(base):
        if entry.name.startswith(f".{VERSION}.tmp-"):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > max_age_s:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass
