"""The bank's per-class statistics against a float64 reference computed one image at a time; the
actor's chunk reduction, its file format, the chunk plan and the kept-feature Parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dap_ray.bank import (
    BankSpec,
    StatsAccumulator,
    featurize,
    kept_table,
    partial_from_bytes,
    partial_to_bytes,
    plan_chunks,
    reduce_chunk,
    rff_for,
    table_bytes,
)
from dap_ray.data.types import ImageRecord

pytestmark = pytest.mark.unit

C, T, D = 4, 3, 6


def _spec(rff: dict | None) -> BankSpec:
    return BankSpec(model={}, model_fingerprint="x", layers=("2",), timesteps=(900, 500, 100), pooling="tokens", seed=0,
                    resolution=8, rff=rff)


def _reference(labels: np.ndarray, f: np.ndarray, spec: BankSpec) -> dict[str, np.ndarray]:
    """Sums the slow obvious way: a Python loop over images, float64 throughout."""
    ref = {"count": np.zeros(C, np.int64), "sum": np.zeros((C, T, D)), "sum_sq": np.zeros((C, T))}
    rff = rff_for(spec.rff, D) if spec.rff else None
    if rff is not None:
        ref["rff_sum"] = np.zeros((C, T, rff.num_features))
    for lab, fi in zip(labels, f.astype(np.float64)):
        ref["count"][lab] += 1
        ref["sum"][lab] += fi
        ref["sum_sq"][lab] += (fi**2).sum(-1)
        if rff is not None:
            ref["rff_sum"][lab] += rff(torch.from_numpy(fi)).numpy()
    return ref


@pytest.mark.parametrize("rff", [None, {"num_features": 16, "sigma": 1.0, "seed": 3}])
def test_grouped_sums_equal_per_image_reference(rff):
    spec = _spec(rff)
    rng = np.random.default_rng(0)
    acc = StatsAccumulator(C, spec)
    all_labels, all_f = [], []
    for n in (5, 1, 9):  # uneven batches; class 3 never appears; repeated classes within a batch
        labels = rng.choice([0, 1, 2], n)
        f = rng.standard_normal((n, T, D)).astype(np.float32) * 3
        acc.add(labels, {"2": f})
        all_labels.append(labels)
        all_f.append(f)
    ref = _reference(np.concatenate(all_labels), np.concatenate(all_f), spec)
    np.testing.assert_array_equal(acc.count, ref["count"])
    assert acc.count[3] == 0 and not acc.sum["2"][3].any()
    np.testing.assert_allclose(acc.sum["2"], ref["sum"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.sum_sq["2"], ref["sum_sq"], rtol=1e-6)
    if rff:
        np.testing.assert_allclose(acc.rff_sum["2"], ref["rff_sum"], rtol=1e-10, atol=1e-12)
    else:
        assert not acc.rff_sum


def test_merge_of_halves_equals_whole():
    spec = _spec({"num_features": 8, "sigma": 2.0, "seed": 0})
    rng = np.random.default_rng(1)
    labels = rng.integers(0, C, 12)
    f = rng.standard_normal((12, T, D)).astype(np.float32)
    whole, a, b = (StatsAccumulator(C, spec) for _ in range(3))
    whole.add(labels, {"2": f})
    a.add(labels[:7], {"2": f[:7]})
    b.add(labels[7:], {"2": f[7:]})
    a.merge(b)
    np.testing.assert_array_equal(a.count, whole.count)
    for name in ("sum", "sum_sq", "rff_sum"):
        np.testing.assert_allclose(getattr(a, name)["2"], getattr(whole, name)["2"], rtol=1e-6)


def test_kept_parquet_round_trips_float16_features_exactly():
    spec = _spec(None)
    rng = np.random.default_rng(2)
    kept = rng.standard_normal((2, T, D)).astype(np.float16)
    table = kept_table("2", 1, ["a", "c"], ["/x/a.png", "/x/c.png"], kept, spec.timesteps)
    back = pq.read_table(pa.BufferReader(table_bytes(table)))
    assert back.column("id").to_pylist() == ["a"] * T + ["c"] * T
    assert back.column("timestep").to_pylist() == list(spec.timesteps) * 2
    feats = np.asarray(back.column("feature").combine_chunks().flatten()).reshape(2, T, D)
    assert feats.dtype == np.float16
    np.testing.assert_array_equal(feats, kept)
    meta = pq.read_metadata(pa.BufferReader(table_bytes(table)))
    codecs = {meta.schema.column(i).path: meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
    assert codecs["id"] == "ZSTD" and codecs["feature.list.element"] == "UNCOMPRESSED"
    assert back.column("label").to_pylist() == [1] * (2 * T)


def test_plan_chunks_is_canonical_and_keeps_the_first_ids_per_class():
    recs = [ImageRecord(f"{c}-{i:02d}", f"/d/{c}/{i}.png", c) for c in (2, 0, 1) for i in (5, 1, 3, 0, 4, 2)]
    a = plan_chunks(recs, 4, 2)
    b = plan_chunks(list(reversed(recs)), 4, 2)
    assert a == b  # the order the records come in does not matter
    flat = [r for ch in a for r in ch.records]
    assert [(r.label, r.id) for r in flat] == sorted((r.label, r.id) for r in recs)
    assert [ch.index for ch in a] == list(range(5)) and [len(ch.records) for ch in a] == [4, 4, 4, 4, 2]
    kept = [r.id for ch in a for r, k in zip(ch.records, ch.keep) if k]
    assert kept == ["0-00", "0-01", "1-00", "1-01", "2-00", "2-01"]
    assert a[1].labels == {0, 1}  # a chunk spans classes: small classes still make full batches


@pytest.mark.parametrize("rff", [None, {"num_features": 16, "sigma": 1.0, "seed": 3}])
def test_reduce_chunk_equals_per_image_float64_reference(tiny_dit_dir, rff):
    """The actor's reduction: per-class float64 sums of exactly featurize's features, bad images left
    out, kept images float16, and the safetensors partial round-trips bit for bit."""
    from dap_ray.backbones import load_backbone
    from dap_ray.data.types import ClassInfo

    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    bb.bind_classes([ClassInfo(i, str(i), str(i)) for i in range(10)])
    spec = BankSpec(model={}, model_fingerprint="x", layers=("0", "2"), timesteps=(900, 100), pooling="tokens", seed=1,
                    resolution=8, rff=rff)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([3, 3, 3, 5, 5, 7])
    ids = [f"i{k}" for k in range(6)]
    ok = np.array([True, False, True, True, True, False])  # image 5 is class 7's only one: 7 is absent
    keep = np.array([True, True, False, True, False, True])
    part = reduce_chunk(bb, spec, images, labels, ids, ok, keep)
    feats = featurize(bb, spec, images, labels, ids)  # {layer: (B, T, D)} float32, the same forward batch
    assert part["count"] == {3: 2, 5: 2}
    assert part["kept_ids"] == {3: ["i0"], 5: ["i3"]}
    for layer in spec.layers:
        r = rff_for(rff, feats[layer].shape[-1]) if rff else None
        for c, rows in ((3, [0, 2]), (5, [3, 4])):
            f = feats[layer][rows].astype(np.float64)
            s = part["sums"][(layer, c)]
            np.testing.assert_allclose(s["sum"], f.sum(0), rtol=1e-12)
            np.testing.assert_allclose(s["sum_sq"], (f**2).sum((0, 2)), rtol=1e-12)
            if r is not None:
                z = sum(r(torch.from_numpy(fi)).numpy() for fi in f)  # (T, M)
                np.testing.assert_allclose(s["rff_sum"], z, rtol=1e-9, atol=1e-12)
            else:
                assert "rff_sum" not in s
            np.testing.assert_array_equal(part["kept"][(layer, c)], feats[layer][[rows[0]]].astype(np.float16))
    part["skipped"] = [("/d/i1.png", "truncated")]
    back = partial_from_bytes(partial_to_bytes(part))
    assert back["count"] == part["count"] and back["kept_ids"] == part["kept_ids"] and back["skipped"] == part["skipped"]
    for key, s in part["sums"].items():
        for kind, v in s.items():
            assert np.array_equal(back["sums"][key][kind], v)
