"""Every path on S3: a reduced distill reads its dataset from, caches its bank in, and writes its run
directory to a bucket of a real S3 server (moto's, on 127.0.0.1), and the results read back
through s3fs. Also: a missing bucket is a one-line user error (exit 2), and the credentials appear
in no file of the run, of the bank cache, nor in the run's output.

The distill runs in a subprocess with the S3 environment, so it starts its own private Ray whose
workers inherit that environment (a Ray already running in the test process would not have it).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BUCKET = "dap-ray-test"
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 5  # a digits subset: enough for IPC 2 and a quick bank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port for this module; stopped (by its PID) afterwards."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = VENV_BIN / "moto_server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """The S3 environment (endpoint + credentials), set before any Ray starts; distinctive values so
    that a leak is found by searching for them."""
    creds = {"AWS_ACCESS_KEY_ID": f"AKIATEST{secrets.token_hex(6).upper()}",
             "AWS_SECRET_ACCESS_KEY": f"moto-secret-{secrets.token_hex(12)}"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    return creds


def _s3fs():
    import s3fs

    # A fresh instance: listings cached by an earlier instance must not hide what the run wrote.
    return s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def _upload_digits(fs, tmp_path: Path) -> None:
    """The digits ImageFolder (train/ and val/, the names dataset=imagefolder expects) into the bucket."""
    from dap_ray.data.digits import materialize_digits

    tree = Path(materialize_digits(str(tmp_path / "local-cache")))
    stage = tmp_path / "stage"
    for split, dst, n in (("train", "train", TRAIN_PER_CLASS), ("test", "val", VAL_PER_CLASS)):
        for class_dir in sorted((tree / split).iterdir()):
            out = stage / dst / class_dir.name
            out.mkdir(parents=True)
            for png in sorted(class_dir.glob("*.png"))[:n]:
                shutil.copy(png, out / png.name)
    fs.mkdir(BUCKET)
    fs.put(str(stage) + "/", f"{BUCKET}/digits/", recursive=True)


def _distill(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "dap_ray.distill", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.mark.timeout(600)
def test_reduced_distill_with_dataset_cache_and_run_dir_on_s3(s3_env, tiny_dit_dir, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from tests.conftest import small_overrides

    fs = _s3fs()
    _upload_digits(fs, tmp_path)
    assert len(fs.find(f"{BUCKET}/digits/train")) == 10 * TRAIN_PER_CLASS

    run = f"s3://{BUCKET}/runs/r1"
    args = small_overrides(tiny_dit_dir, run, f"s3://{BUCKET}/cache", **{
        "dataset": "imagefolder", "dataset.root": f"s3://{BUCKET}/digits",
        # a private local Ray whatever else runs on this machine (its workers inherit the S3 env)
        "runtime.address": "local", "runtime.num_cpus": "2"})
    r = _distill(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    fs = _s3fs()
    res = json.loads(fs.cat_file(f"{run}/results.json"))
    methods = ["random_real", "vanilla", "dap"]
    assert [row["method"] for row in res["rows"]] == methods
    assert all(row["status"] == "ok" and 0.0 <= row["acc"] <= 1.0 for row in res["rows"]), res["rows"]
    assert res["config"]["dataset"]["root"] == f"s3://{BUCKET}/digits" and res["ray"]["mode"] == "local"
    assert res["bank"]["images"] == 10 * TRAIN_PER_CLASS and res["skipped"] == 0
    report = fs.cat_file(f"{run}/report.md").decode()
    assert all(f"| {m} |" in report for m in methods)
    assert fs.exists(f"{run}/plots/accuracy.png") and fs.exists(f"{run}/config.yaml")
    for m in methods:
        table = pq.read_table(io.BytesIO(fs.cat_file(f"{run}/{m}/manifest.parquet")))
        pngs = sorted(p for p in fs.find(f"{run}/{m}/images") if p.endswith(".png"))
        assert table.num_rows == len(pngs) == 10 * 2, (m, table.num_rows, len(pngs))
        assert sorted(f"{BUCKET}/runs/r1/{m}/{p}" for p in table.column("path").to_pylist()) == pngs
        for p in pngs[:3]:  # real PNGs at the model's resolution
            with Image.open(io.BytesIO(fs.cat_file(p))) as img:
                assert img.size == (8, 8)
        assert len(fs.find(f"{run}/eval")) >= 1
    assert fs.find(f"{BUCKET}/cache/banks", withdirs=False) and any(p.endswith("/_COMMIT") for p in fs.find(f"{BUCKET}/cache/banks"))

    # credentials appear nowhere: not in any object the run or the cache holds, not in its output
    leaks = []
    for key in fs.find(f"{BUCKET}/runs") + fs.find(f"{BUCKET}/cache"):
        blob = fs.cat_file(key)
        leaks += [(key, name) for name, value in s3_env.items() if value.encode() in blob]
    leaks += [("stdout/stderr", name) for name, value in s3_env.items() if value in r.stdout + r.stderr]
    assert not leaks, leaks

    # again (bank and sampling only): the bank comes from the S3 cache, finished images are kept
    before = {p: fs.info(p)["LastModified"] for p in fs.find(f"{run}/dap/images")}
    r2 = _distill([*args, "stages=[bank,sample]", "methods=[dap]"])
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert any(ln.startswith("[dap_ray] bank: ") and "reused" in ln for ln in r2.stderr.splitlines()), r2.stderr[-3000:]
    fs = _s3fs()
    assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{run}/dap/images")} == before


@pytest.mark.timeout(120)
def test_dataset_fingerprint_follows_s3_object_content(s3_env):
    """An object overwritten under the same key (same size, other bytes) changes the fingerprint that
    keys the cached feature bank (and D3HR's inversion); with nothing changed it is stable. The
    version (size + ETag) comes from the listing; a distilled set on S3 (DIVER's source) gets it too."""
    from dap_ray.bank import dataset_fingerprint
    from dap_ray.data import distilled_records, resolve_dataset
    from dap_ray.data.images import record_versions

    fs = _s3fs()
    bucket = f"dap-ray-fingerprint-{secrets.token_hex(3)}"
    fs.mkdir(bucket)
    for cls in ("a", "b"):
        for i in range(2):  # only listed, never decoded here: any bytes do
            fs.pipe_file(f"{bucket}/ds/train/{cls}/img{i}.png", bytes([65 + i]) * 64)

    def resolve():
        ds = resolve_dataset("imagefolder", f"s3://{bucket}/ds", None)
        return ds, dataset_fingerprint(ds), record_versions(distilled_records(f"s3://{bucket}/ds/train", ds.classes))

    ds1, fp1, src1 = resolve()
    assert [r.id for r in ds1.train] == ["a/img0.png", "a/img1.png", "b/img0.png", "b/img1.png"]
    assert all(r.version.startswith("64:") and len(r.version) > 3 for r in ds1.train), ds1.train
    assert resolve()[1:] == (fp1, src1)  # nothing changed: same fingerprint

    fs.pipe_file(f"{bucket}/ds/train/a/img0.png", b"Z" * 64)  # same key, same size, other bytes
    ds2, fp2, src2 = resolve()
    assert fp2 != fp1 and src2 != src1
    assert [r.id for r, old in zip(ds2.train, ds1.train) if r.version != old.version] == ["a/img0.png"]
    assert resolve()[1:] == (fp2, src2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("key", ["dataset.root", "out_dir"])  # cache_dir takes out_dir's code path
def test_missing_bucket_is_a_one_line_user_error(s3_env, tiny_dit_dir, tmp_path, key):
    from tests.conftest import small_overrides

    fs = _s3fs()
    if not fs.exists(BUCKET):
        _upload_digits(fs, tmp_path)
    paths = {"dataset.root": f"s3://{BUCKET}/digits", "out_dir": f"s3://{BUCKET}/runs/missing-{key}",
             "cache_dir": f"s3://{BUCKET}/cache"}
    missing = f"no-such-bucket-{secrets.token_hex(4)}"
    paths[key] = f"s3://{missing}/x"
    args = small_overrides(tiny_dit_dir, paths["out_dir"], paths["cache_dir"],
                           **{"dataset": "imagefolder", "dataset.root": paths["dataset.root"], "runtime.address": "local"})
    r = _distill(args, timeout=200)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-4000:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and missing in err[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not _s3fs().exists(missing)  # never created behind the user's back


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_sweep_with_storage_cache_and_out_dir_on_s3(s3_env, tiny_dit_dir, tmp_path):
    """A one-trial sweep whose Tune storage (pyarrow's S3 filesystem), bank cache and outputs are on S3."""
    import pandas as pd

    fs = _s3fs()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    out, storage = f"s3://{BUCKET}/sweeps/s1", f"s3://{BUCKET}/tune-storage"
    args = ["tune=quick", f"model.path={tiny_dit_dir}", f"out_dir={out}", f"cache_dir=s3://{BUCKET}/tune-cache",
            f"tune.storage_path={storage}", 'dataset.classes=["0","1"]',
            "sampler.steps=5", "sampler.batch_size=2", "tune.epochs=2", "tune.eval_every=1", "tune.grace_period=1",
            "tune.val_per_class=5", "tune.test_seeds=[0]", "eval.max_test=40",
            "tune.space.method.gamma={type:grid,values:[2.0]}", "tune.space.method.t_stop={type:grid,values:[600]}",
            'tune.space.method.layer={type:choice,values:["1"]}', "runtime.address=local", "runtime.num_cpus=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-m", "dap_ray.tune", *args], env=env, capture_output=True, text=True, timeout=500, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    fs = _s3fs()
    df = pd.read_csv(io.BytesIO(fs.cat_file(f"{out}/results.csv")), dtype={"trial_id": str})
    assert len(df) == 1 and df["val_acc_best"].between(0, 1).all(), df
    tid = df["trial_id"].iloc[0]
    assert len([p for p in fs.find(f"{out}/trials/{tid}") if p.endswith(".png")]) == 2 * 2
    # Tune's own experiment state went to tune.storage_path on S3, and the sweep can be found there again
    assert any("experiment_state" in p or p.endswith("tuner.pkl") for p in fs.find(f"{storage}/"))
    assert fs.find(f"{BUCKET}/tune-cache/banks")
    r2 = subprocess.run([sys.executable, "-m", "dap_ray.tune", *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r2.returncode == 2 and "tune.resume=true" in r2.stderr, r2.stderr[-3000:]

    leaks = [(key, name) for key in fs.find(f"{out}/") + fs.find(f"{storage}/") for name, value in s3_env.items()
             if value.encode() in fs.cat_file(key)]
    leaks += [("stdout/stderr", name) for name, value in s3_env.items() if value in r.stdout + r.stderr]
    assert not leaks, leaks
