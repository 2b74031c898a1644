"""The bank's per-class statistics against a float64 reference computed one image at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dap_ray.bank import BankSpec, StatsAccumulator, _shard_tables, _table_bytes, rff_for

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
    a.merge(StatsAccumulator.from_bytes(b.to_bytes(), C, spec))
    np.testing.assert_array_equal(a.count, whole.count)
    for name in ("sum", "sum_sq", "rff_sum"):
        np.testing.assert_allclose(getattr(a, name)["2"], getattr(whole, name)["2"], rtol=1e-6)


def test_shard_parquet_round_trips_features_exactly():
    spec = _spec(None)
    rng = np.random.default_rng(2)
    f = rng.standard_normal((3, T, D)).astype(np.float32)
    rows = {"id": np.array(["a", "b", "c"], dtype=object), "path": np.array(["/x/a.png", "/x/b.png", "/x/c.png"], dtype=object),
            "label": np.array([0, 1, 1]), "ok": np.array([True, False, True]), "feat_2": f}
    table = _shard_tables(rows, spec, keep={"a", "b", "c"})["2"]
    back = pq.read_table(pa.BufferReader(_table_bytes(table)))
    assert back.column("id").to_pylist() == ["a"] * T + ["c"] * T  # the unreadable row is not written
    assert back.column("timestep").to_pylist() == list(spec.timesteps) * 2
    feats = np.asarray(back.column("feature").combine_chunks().flatten()).reshape(2, T, D)
    np.testing.assert_array_equal(feats, f[[0, 2]])
    meta = pq.read_metadata(pa.BufferReader(_table_bytes(table)))
    codecs = {meta.schema.column(i).path: meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
    assert codecs["id"] == "ZSTD" and codecs["feature.list.element"] == "UNCOMPRESSED"
    assert back.column("label").to_pylist() == [0] * T + [1] * T
