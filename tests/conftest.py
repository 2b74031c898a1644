"""Shared fixtures: tiny real diffusers models saved with save_pretrained, a private cache dir, Ray.

No test downloads anything. Tiny models are built here, saved in diffusers format and loaded back
through the same code path as real ones.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# One thread per test process: the CI machine has 2 cores and Ray workers run beside pytest.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def save_tiny_dit(path: Path, *, num_classes: int = 10, sample_size: int = 8, in_channels: int = 1, layers: int = 3,
                  heads: int = 2, head_dim: int = 8, vae: bool = False, seed: int = 0, learned_sigma: bool = False,
                  class_names: list[str] | None = None, vae_channels: tuple[int, ...] = (8, 16)) -> Path:
    """A random DiT (optionally with a tiny VAE) saved as a diffusers pipeline directory.

    The VAE has one block per entry of `vae_channels` and downsamples 2**(blocks - 1) times: more
    blocks give large images (many bytes per image) at the cost of a few thin convolutions."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=layers, sample_size=sample_size,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=num_classes,
    )
    # diffusers leaves adaLN-Zero at zero only in the original; randomise so outputs depend on inputs
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model.save_pretrained(path / "transformer", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False).save_pretrained(path / "scheduler")
    if vae:
        n = len(vae_channels)
        v = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                          up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(vae_channels),
                          latent_channels=in_channels, norm_num_groups=math.gcd(4, *vae_channels), sample_size=sample_size * 2 ** (n - 1))
        v.save_pretrained(path / "vae", safe_serialization=True)
    if class_names is not None:
        (path / "classes.json").write_text(json.dumps({"classes": class_names}))
    return path


@contextlib.contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """The warnings diffusers logs while the block runs (its loggers do not propagate to the root
    logger, so caplog does not see them)."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        yield said
    finally:
        logging.getLogger("diffusers").removeHandler(handler)


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """Pixel-space 8x8 single-channel DiT with classes '0'..'9' (the digits layout), random weights."""
    return save_tiny_dit(tmp_path_factory.mktemp("tiny_dit"), class_names=[str(i) for i in range(10)])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A private dap_ray cache (datasets, banks, teachers) for the test session."""
    d = tmp_path_factory.mktemp("cache")
    return d


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR", log_to_driver=False)
    yield ray
    left = running_ray_data_executors()
    ray.shutdown()
    # A Ray Data execution still running here was abandoned by some code path (a stream nobody ended):
    # after shutdown its thread calls Ray again, which starts a new local Ray in a process that is ending
    # and, when that Ray is gone, kills the process with exit code 1 after the suite has passed.
    assert not left, f"Ray Data executions left running by the tests: {left}"


def running_ray_data_executors(grace_s: float = 10.0) -> list[str]:
    """Names of the Ray Data executor threads still alive after `grace_s` (and a garbage collection,
    which shuts down the executors of datasets nobody holds)."""
    gc.collect()
    deadline = time.monotonic() + grace_s
    while True:
        left = [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor-")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def small_overrides(model_dir: Path, out_dir: Path, cache: Path, **extra: str) -> list[str]:
    """Overrides for a reduced distill run on digits (tiny model, few steps, short evaluation)."""
    ov = {
        "model.path": str(model_dir), "out_dir": str(out_dir), "cache_dir": str(cache), "ipc": "2",
        "sampler.steps": "5", "sampler.batch_size": "2",
        "eval": "digits",  # the CPU preset also for dataset=imagefolder (whose default is the 224-px IGD protocol)
        "eval.epochs": "2", "eval.seeds": "[0]", "eval.archs": "[convnet]",
        "eval.tsne": "false", "eval.metrics": "false", "eval.max_test": "100",
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


# ---------------------------------------------------------------------------------------------
# The reference run: one undisturbed reduced distill in a subprocess (private local Ray), for the
# tests that disturb the same run (a SIGKILLed driver, lost nodes) and compare with it byte for byte
# ---------------------------------------------------------------------------------------------

FAKE_KEY_ID = "AKIAFAKEKEYID7Q3ZP5W"
FAKE_SECRET = "fAkE/SeCrEt+9d1c0ffee0ddba11-not-a-real-key"


REFERENCE_IPC = 10  # images per class of the reference run (2 classes)


def reference_overrides(model_dir: Path, out: Path, cache: Path) -> list[str]:
    """The reference run's overrides. The knobs that decide the images are pinned: the reference and
    the disturbed runs compose minutes apart."""
    # Bank batches of 16: each bank actor gets several batches. One image per sampler item, IPC 10:
    # a sampler method has 20 items, several per actor of a 3-node test cluster, rendered back to back.
    # One item of the tiny DiT (20 DDIM steps) takes ~30 ms on a quiet machine, too short for a test to
    # catch by itself; an actor working through its run of items is what gives a test the time to take
    # its node while it renders one (or to kill the driver mid-sampling).
    return small_overrides(model_dir, out, cache, **{"ipc": str(REFERENCE_IPC), "dataset.classes": "[0,1]", "eval.seeds": "[0,1]",
                                                     "method.gamma": "5", "method.t_stop": "400", "sampler.cfg_scale": "2", "seed": "0",
                                                     "bank.batch_size": "16", "sampler.steps": "20", "sampler.batch_size": "1"})


def reference_cmd(model_dir: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "dap_ray.distill", *reference_overrides(model_dir, out, cache), "runtime.num_cpus=2"]


def clean_env(work: Path, ray_tmp: str) -> dict[str, str]:
    """A clean environment: fake S3 credentials (must never be written anywhere), Ray's temp dir
    (its session logs) under a short private path so the test can read every log Ray writes."""
    return {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work),
            "RAY_TMPDIR": ray_tmp, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}


def start_logged(cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """The command in its own session (its process group: the driver and the Ray it starts), output to `log`."""
    with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish_run(proc: subprocess.Popen, kill: bool) -> int:
    """SIGKILL the driver (only the driver: the fault under test) or let it end, wait for it, then make
    sure no process of its session (Ray's local cluster it started) outlives it."""
    if kill:
        os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait(timeout=900)
    time.sleep(1.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session, created by start_new_session
    except ProcessLookupError:
        pass
    return rc


@pytest.fixture(scope="session")
def reference_run(tiny_dit_dir, tmp_path_factory):
    """The undisturbed reference run, with fake S3 credentials in its env: (out, cache, work, ray_tmp)."""
    work = tmp_path_factory.mktemp("reference")
    ray_tmp = tempfile.mkdtemp(prefix="dr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    out, cache = work / "run", work / "cache"
    proc = start_logged(reference_cmd(tiny_dit_dir, out, cache), clean_env(work, ray_tmp), work, work / "log.txt")
    rc = finish_run(proc, kill=False)
    assert rc == 0, (work / "log.txt").read_text()[-3000:]
    yield out, cache, work, Path(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under `folder`: tag -> [(step, value)], plus the
    image and text tags (as tag -> []). Reads the TFRecord framing (length, crc, data, crc) itself."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    for f in files:
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                field = v.WhichOneof("value")
                out.setdefault(v.tag, [])
                if field == "simple_value":
                    out[v.tag].append((int(event.step), float(v.simple_value)))
    return out


def check_shared_prefix(bb, x: torch.Tensor, y: torch.Tensor, layer: str, t: int) -> None:
    """eps_with_features gives the CFG eps and the conditional branch's layer output of separate passes,
    and the guidance gradient through it equals the one through the separate guidance forward."""
    for cfg in (1.0, 2.0):
        with torch.no_grad():
            eps_ref = bb.eps(x, t, y, cfg)
        feats_ref = bb.features(x, t, y, [layer])[layer]
        with torch.enable_grad():
            xs = x.clone().requires_grad_(True)
            eps, feats = bb.eps_with_features(xs, t, y, cfg, layer)
            assert not eps.requires_grad and feats.requires_grad and torch.is_grad_enabled()
            (g_shared,) = torch.autograd.grad(feats.square().sum(), xs)
            xr = x.clone().requires_grad_(True)
            (g_ref,) = torch.autograd.grad(bb.features(xr, t, y, [layer])[layer].square().sum(), xr)
        torch.testing.assert_close(eps, eps_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats.detach(), feats_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_shared, g_ref, rtol=1e-4, atol=1e-5)

