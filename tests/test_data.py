"""Dataset layer: digits, ImageFolder resolution, decoding of odd/bad files, class lists."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dap_ray.data import (
    BadImageError,
    decode_image,
    get_class_list,
    get_imagenet_index,
    load_image,
    read_bytes,
    read_skipped_csv,
    resolve_dataset,
    write_skipped_csv,
)
from dap_ray.data import digits as digits_mod
from dap_ray.errors import UserError

pytestmark = pytest.mark.unit

R = 16  # decode resolution used throughout: small keeps the tests fast


# ---------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_jpeg(w: int = 40, h: int = 30, color=(200, 40, 40)) -> bytes:
    return encode(Image.new("RGB", (w, h), color), "JPEG", quality=95)


def noisy_jpeg(w: int = 64, h: int = 48) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr), "JPEG", quality=90)


def corrupt_jpeg() -> bytes:
    """A JPEG whose headers parse but whose first Huffman table is garbage: decoding fails."""
    data = bytearray(noisy_jpeg())
    i = 2
    while data[i + 1] != 0xC4:  # walk the marker segments to the first DHT
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    length = int.from_bytes(data[i + 2 : i + 4], "big")
    data[i + 5 : i + 2 + length] = b"\xff" * (length - 3)
    return bytes(data)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a huge size (a decompression bomb as far as the header goes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def odd_files() -> dict[str, bytes]:
    """Good images in exotic modes and bad files, by file name."""
    grey16 = Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16))  # 16-bit mid-grey
    assert grey16.mode.startswith("I;16")
    palette = Image.new("P", (24, 24), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = red, 1 = blue
    palette.paste(1, (0, 0, 12, 24))  # left half blue
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 0, 0)
    rgba[:, 10:, 3] = 255  # left half fully transparent black, right half opaque black
    good = rgb_jpeg(w=200, h=100)
    return {
        "good.jpg": good,
        "gray.png": encode(Image.new("L", (30, 20), 77), "PNG"),
        "palette.png": encode(palette, "PNG", transparency=0),  # red is transparent
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG", quality=95),  # red
        "grey16.png": encode(grey16, "PNG"),
        "corrupt.jpg": corrupt_jpeg(),
        "garbage.jpg": good[:4] + bytes(range(256)) * 4,  # JPEG magic, then garbage
        "text.jpg": b"this is not an image, just text\n",
        "empty.jpg": b"",
        "truncated.jpg": noisy_jpeg()[:600],
    }


BAD_REASONS = {
    "corrupt.jpg": ("corrupt:",),
    "garbage.jpg": ("not an image:",),
    "text.jpg": ("not an image:",),
    "empty.jpg": ("zero-byte file",),
    "truncated.jpg": ("truncated:",),
}


def make_tree(root: Path, files: dict[str, dict[str, bytes]]) -> Path:
    """files: {"class/sub/name.jpg": bytes} relative to root."""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def tiny_png(value: int = 100) -> bytes:
    return encode(Image.new("RGB", (4, 4), (value, value, value)), "PNG")


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "name", ["good.jpg", "gray.png", "palette.png", "rgba.png", "cmyk.jpg", "grey16.png"]
)
def test_good_files_decode_to_rgb_uint8(name):
    arr = decode_image(odd_files()[name], R)
    assert arr.shape == (R, R, 3) and arr.dtype == np.uint8


def test_exotic_modes_keep_sensible_values():
    f = odd_files()
    grey16 = decode_image(f["grey16.png"], R)
    assert np.all(np.abs(grey16.astype(int) - 128) <= 1), "16-bit mid-grey must stay mid-grey"
    assert np.all(decode_image(f["gray.png"], R) == 77)
    cmyk = decode_image(f["cmyk.jpg"], R).reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60, cmyk  # CMYK (0,255,255,0) is red
    rgba = decode_image(f["rgba.png"], R)
    assert np.all(rgba[:, : R // 2 - 1] == 255), "transparent pixels are composited on white"
    assert np.all(rgba[:, R // 2 + 1 :] == 0)
    pal = decode_image(f["palette.png"], R)
    assert np.all(pal[:, : R // 2 - 1] == (0, 0, 255)), "opaque palette entries keep their colour"
    assert np.all(pal[:, R // 2 + 1 :] == 255), "transparent palette entry -> white"


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.int32), "I"), 127),  # 16-bit data in I
        (Image.fromarray(np.full((8, 8), 200, dtype=np.int32), "I"), 200),  # 8-bit data in I
        (Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F"), 128),  # float in [0, 1]
        (Image.new("1", (8, 8), 1), 255),
        (Image.new("LA", (8, 8), (0, 0)), 255),  # fully transparent -> white
    ],
    ids=["I16range", "I8range", "F01", "1bit", "LA"],
)
def test_high_depth_and_alpha_modes(img, expected):
    fmt = "TIFF" if img.mode in ("I", "F") else "PNG"
    out = decode_image(encode(img, fmt), 4)
    assert out.shape == (4, 4, 3) and np.all(np.abs(out.astype(int) - expected) <= 1), out[0, 0]


def test_resize_shorter_side_then_center_crop():
    # 3:1 image: left third red, middle green, right blue -> the center crop is all green.
    arr = np.zeros((30, 90, 3), dtype=np.uint8)
    arr[:, :30, 0] = arr[:, 30:60, 1] = arr[:, 60:, 2] = 255
    out = decode_image(encode(Image.fromarray(arr), "PNG"), R)
    assert out.shape == (R, R, 3)
    assert np.all(out[:, 2:-2, 1] >= 250) and np.all(out[:, 2:-2, [0, 2]] <= 5)


def test_upscales_small_images():
    out = decode_image(tiny_png(90), 32)
    assert out.shape == (32, 32, 3) and np.all(out == 90)


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_bad_files_raise_bad_image_error_with_reason(name):
    with pytest.raises(BadImageError) as exc:
        decode_image(odd_files()[name], R)
    assert exc.value.reason.startswith(BAD_REASONS[name]), exc.value.reason


def test_decompression_bomb_is_refused_without_decoding():
    with pytest.raises(BadImageError) as exc:
        decode_image(png_header_only(100_000, 100_000), R)
    assert exc.value.reason.startswith("decompression bomb"), exc.value.reason


def test_large_legal_jpeg_decodes(monkeypatch):
    data = rgb_jpeg(3000, 2000, color=(10, 120, 250))
    out = decode_image(data, R)
    assert out.shape == (R, R, 3)
    assert np.all(np.abs(out.astype(int) - (10, 120, 250)) <= 6)
    # The limit is ours and explicit: the same image over a lowered limit is a bomb.
    monkeypatch.setattr("dap_ray.data.images.MAX_PIXELS", 1_000_000)
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(data, R)


def test_load_image_and_read_bytes(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(tiny_png(33))
    assert read_bytes(str(p)) == p.read_bytes()
    assert np.all(load_image(str(p), 8) == 33)
    with pytest.raises(BadImageError, match="unreadable"):
        load_image(str(tmp_path / "missing.png"), 8)


# ---------------------------------------------------------------- skipped.csv


def test_write_skipped_csv_round_trips(tmp_path):
    rows = [("b/x.jpg", "zero-byte file"), ('a/y, with comma "q".jpg', "not an image: cannot identify")]
    path = write_skipped_csv(str(tmp_path / "run"), rows)
    assert path == str(tmp_path / "run" / "skipped.csv")
    assert Path(path).read_text().splitlines()[0] == "path,reason,split"
    assert read_skipped_csv(path) == sorted(rows)
    assert read_skipped_csv(path, with_split=True) == sorted((p, r, "train") for p, r in rows)  # (path, reason) rows: the training split
    mixed = [("v/a.jpg", "truncated: x", "test"), ("t/b.jpg", "zero-byte file", "train")]
    assert read_skipped_csv(write_skipped_csv(str(tmp_path / "run"), mixed), with_split=True) == sorted(mixed)
    assert read_skipped_csv(write_skipped_csv(str(tmp_path / "run"), [])) == []
    assert not list((tmp_path / "run").glob("*.tmp-*")), "no temp files left behind"


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_with_bad_files_lists_everything_and_decodes_the_good(tmp_path):
    files = {f"cls_a/{n}": d for n, d in odd_files().items()}
    files.update({f"cls_b/img{i}.PNG": tiny_png(10 * i) for i in range(5)})
    files.update({"cls_b/notes.txt": b"x", "cls_b/._img0.PNG": b"\0\0", "README.md": b"x"})
    root = make_tree(tmp_path / "ds" / "train", files).parent
    ds = resolve_dataset("imagefolder", str(root), None)
    assert [c.key for c in ds.classes] == ["cls_a", "cls_b"]
    assert [c.name for c in ds.classes] == ["cls_a", "cls_b"]
    assert ds.test == []  # no val/ folder
    ids = [r.id for r in ds.train]
    assert ids == sorted(ids)
    assert "cls_b/notes.txt" not in ids and "cls_b/._img0.PNG" not in ids  # not images / hidden
    assert len(ds.train) == len(odd_files()) + 5
    skipped = []
    for rec in ds.train:
        try:
            assert load_image(rec.path, R).shape == (R, R, 3)
        except BadImageError as e:
            skipped.append((rec.id, e.reason))
    assert sorted(i for i, _ in skipped) == sorted(f"cls_a/{n}" for n in BAD_REASONS)
    assert read_skipped_csv(write_skipped_csv(str(tmp_path / "run"), skipped)) == sorted(skipped)


def imagenet_tree(root: Path, wnids: list[str], n_train: int = 3, n_val: int = 2) -> Path:
    files = {}
    for w in wnids:
        files.update({f"train/{w}/{w}_{i}.JPEG": tiny_png(i) for i in range(n_train)})
        files.update({f"val/{w}/ILSVRC2012_val_{w}_{i}.JPEG": tiny_png(i) for i in range(n_val)})
    return make_tree(root, files)


def test_preset_selects_wnids_in_label_order_with_names(tmp_path):
    woof = [w for w, _ in get_class_list("imagewoof")]
    nette = [w for w, _ in get_class_list("imagenette")]
    root = imagenet_tree(tmp_path / "imagenet", sorted(woof + nette))
    ds = resolve_dataset("imagefolder", str(root), "imagewoof")
    assert [c.key for c in ds.classes] == woof  # label order, not sorted
    assert [c.index for c in ds.classes] == list(range(10))
    assert ds.classes[0].name == "Australian terrier" and ds.classes[2].name == "Samoyed"
    assert len(ds.train) == 30 and len(ds.test) == 20
    by_key = {c.key: c.index for c in ds.classes}
    assert all(by_key[r.id.split("/")[0]] == r.label for r in ds.train + ds.test)
    assert {r.id.split("/")[0] for r in ds.train} == set(woof)
    assert ds.train[0].path == str(root / "train" / ds.train[0].id)
    # explicit list (string or list): given order, ImageNet names for wnids
    ds2 = resolve_dataset("imagefolder", str(root), f"{nette[3]},{nette[0]}")
    assert [(c.key, c.name) for c in ds2.classes] == [(nette[3], "chain saw"), (nette[0], "tench")]
    ds3 = resolve_dataset("imagefolder", str(root), [nette[0]])
    assert len(ds3.train) == 3 and ds3.classes[0].name == "tench"


def test_carved_split_is_stratified_deterministic_and_subset_independent(tmp_path):
    files = {f"{c}/{i:03d}.png": tiny_png(i) for c in ("cat", "dog", "emu") for i in range(10)}
    root = make_tree(tmp_path / "flat", files)
    ds = resolve_dataset("imagefolder", str(root), None, test_fraction=0.2, seed=1)
    assert Counter(r.label for r in ds.test) == {0: 2, 1: 2, 2: 2}
    assert len(ds.train) == 24 and not {r.id for r in ds.train} & {r.id for r in ds.test}
    again = resolve_dataset("imagefolder", str(root), None, test_fraction=0.2, seed=1)
    assert again.train == ds.train and again.test == ds.test
    other_seed = resolve_dataset("imagefolder", str(root), None, test_fraction=0.2, seed=2)
    assert {r.id for r in other_seed.test} != {r.id for r in ds.test}
    only_dog = resolve_dataset("imagefolder", str(root), "dog", test_fraction=0.2, seed=1)
    assert {r.id for r in only_dog.test} == {r.id for r in ds.test if r.id.startswith("dog/")}


def test_symlinked_class_folders_are_followed(tmp_path):
    src = make_tree(tmp_path / "full", {f"n01440764/{i}.png": tiny_png() for i in range(3)})
    (tmp_path / "subset").mkdir()
    (tmp_path / "subset" / "n01440764").symlink_to(src / "n01440764")
    ds = resolve_dataset("imagefolder", str(tmp_path / "subset"), None, test_fraction=0.0)
    assert len(ds.train) == 3 and ds.classes[0].name == "tench"


# ---------------------------------------------------------------- user errors


def test_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist") as exc:
        resolve_dataset("imagefolder", str(tmp_path / "nowhere"), None)
    assert "nowhere" in str(exc.value)
    with pytest.raises(UserError, match="dataset.root"):
        resolve_dataset("imagefolder", None, None)


def test_unknown_class_names_the_class_and_lists_existing(tmp_path):
    root = imagenet_tree(tmp_path / "in", ["n01440764", "n02102040"])
    with pytest.raises(UserError) as exc:
        resolve_dataset("imagefolder", str(root), "n99999999")
    msg = str(exc.value)
    assert "n99999999" in msg and "n01440764" in msg and "imagewoof" in msg  # presets hinted
    with pytest.raises(UserError, match="10 class folders .* of preset 'imagewoof'"):
        resolve_dataset("imagefolder", str(root), "imagewoof")


def test_empty_class_is_a_user_error(tmp_path):
    root = make_tree(tmp_path / "ds", {"a/1.png": tiny_png(), "b/readme.txt": b"no images here"})
    with pytest.raises(UserError, match="class 'b' has no image files"):
        resolve_dataset("imagefolder", str(root), None)


@pytest.mark.parametrize("bad", ["../etc", "..", "/etc", "a/b", "a\\b", ["a", "../x"]])
def test_class_names_escaping_the_tree_are_refused(tmp_path, bad):
    root = make_tree(tmp_path / "ds", {"a/1.png": tiny_png()})
    with pytest.raises(UserError, match="not allowed"):
        resolve_dataset("imagefolder", str(root), bad)


def test_unknown_preset_and_dataset_names():
    with pytest.raises(UserError) as exc:
        get_class_list("imagewof")
    assert "imagewoof" in str(exc.value) and "imagenet1k" in str(exc.value)
    with pytest.raises(UserError, match="dataset.name"):
        resolve_dataset("cifar99", None, None)


# ---------------------------------------------------------------- class lists


def test_class_lists_and_imagenet_indices():
    expected_in_idx = {  # PROTOCOLS.md 1.2-1.4, "IN idx" column
        "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
        "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
        "imageidc": [452, 64, 374, 236, 993, 176, 882, 904, 503, 74],
    }
    for preset, idx in expected_in_idx.items():
        cl = get_class_list(preset)
        assert len(cl) == 10
        assert [get_imagenet_index(w) for w, _ in cl] == idx
    in1k = get_class_list("imagenet1k")
    assert len(in1k) == 1000 and len({w for w, _ in in1k}) == 1000
    assert [w for w, _ in in1k] == sorted(w for w, _ in in1k)
    assert in1k[0] == ("n01440764", "tench") and in1k[999][0] == "n15075141"
    with pytest.raises(UserError):
        get_imagenet_index("n00000000")


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_digits_split_is_fixed_stratified_and_complete(digits_cache):
    ds = resolve_dataset("digits", None, None, cache_dir=digits_cache)
    assert ds.name == "digits"
    assert [c.key for c in ds.classes] == [str(i) for i in range(10)]
    assert [c.name for c in ds.classes][:3] == ["zero", "one", "two"]
    assert all(c.index == int(c.key) for c in ds.classes)
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    ids = {r.id.split("/")[1] for r in ds.train} | {r.id.split("/")[1] for r in ds.test}
    assert len(ids) == 1797  # every sklearn index exactly once
    tr, te = Counter(r.label for r in ds.train), Counter(r.label for r in ds.test)
    for c in range(10):
        assert abs(te[c] / (tr[c] + te[c]) - 0.2) < 0.02, (c, tr[c], te[c])
    again = resolve_dataset("digits", "/ignored", None, cache_dir=digits_cache)
    assert again.train == ds.train and again.test == ds.test


def test_digits_pixels_match_sklearn(digits_cache):
    from sklearn.datasets import load_digits

    ds = resolve_dataset("digits", None, ["3", "7"], cache_dir=digits_cache)
    assert [c.key for c in ds.classes] == ["3", "7"] and [c.name for c in ds.classes] == ["three", "seven"]
    digits = load_digits()
    for rec in ds.train[:5] + ds.test[:5]:
        idx = int(rec.id.split("/")[1].removesuffix(".png"))
        assert digits.target[idx] == int(ds.classes[rec.label].key)
        arr = load_image(rec.path, 8)
        expected = np.rint(digits.images[idx] * 255 / 16).astype(np.uint8)
        assert np.array_equal(arr[..., 0], expected) and np.array_equal(arr[..., 2], expected)


def test_half_written_digits_tree_is_rebuilt(tmp_path):
    final = tmp_path / "datasets" / digits_mod.VERSION
    (final / "train" / "0").mkdir(parents=True)
    (final / "train" / "0" / "0.png").write_bytes(b"half")  # no marker: an interrupted build
    stale = tmp_path / "datasets" / f".{digits_mod.VERSION}.tmp-1-dead"  # a build killed long ago
    stale.mkdir()
    os.utime(stale, (0, 0))
    tree = digits_mod.materialize_digits(str(tmp_path))
    assert tree == str(final) and (final / digits_mod.MARKER).exists()
    pngs = list((final / "train" / "0").glob("*.png"))
    assert len(pngs) > 100 and all(Image.open(p).size == (8, 8) for p in pngs)  # "half" replaced
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name != digits_mod.VERSION]
