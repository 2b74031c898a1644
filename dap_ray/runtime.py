"""Ray init/attach: join the cluster we are in (ray job submit, `ray start` node, KubeRay) or start a
private local Ray; never initialise twice (Hydra multirun, Tune trials, tests calling main() again).

Where to attach, in order (`_existing_cluster_address`):

1. `runtime.address` from the config (`auto`, `host:port`, `ray://...`; `local` forces a private Ray);
2. `RAY_ADDRESS` — `ray job submit` sets it in the driver to the cluster's GCS address, and so do
   KubeRay RayJobs;
3. a `ray start` node on this machine (its address file, `<ray temp dir>/ray_current_cluster`), if
   its GCS port still answers — a file left by a killed node must not hang the run for minutes;
4. otherwise a private local Ray (`address="local"`, so Ray cannot pick up a stale address file
   itself), its dashboard off.

An `http://` address is the dashboard / job API (what `ray job submit --address` takes), not a
cluster address: that is a user error with a message saying what to do, never a traceback.

Token authentication (Ray >= 2.52: `RAY_AUTH_MODE=token` with `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`): Ray reads it from the environment itself, so this
module neither reads, sets nor logs those variables. Attaching to a node found through its address
file goes through `address="auto"`, which is how Ray enables token mode for a `ray start` node that
has a token; a job driver inherits `RAY_AUTH_MODE` from the node.

Credentials: S3 keys are never put into a Ray runtime_env (it is stored with the job and shown in
the dashboard and `ray list jobs`). A private local Ray is started by this process, so its workers
inherit the whole environment, keys included; on a cluster, workers get the environment of
`ray start` (or the Kubernetes Secret). Only non-secret settings (endpoint, region, caches) are
forwarded by name when attaching from outside a job submission.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dap_ray.errors import ConfigError, UserError
from dap_ray.storage import filesystem

log = logging.getLogger(__name__)

# Non-secret settings a worker needs to reach S3 (moto/MinIO endpoints included) and the caches:
# forwarded by *name* when attaching to a cluster from an interactive driver.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HOME", "DAP_RAY_CACHE")
# Never forwarded: a runtime_env is stored with the job and shown in the dashboard.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Set by Ray's job manager in the environment of a submitted job's driver.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

_HTTP_WHAT = "is the dashboard / job API address (for `ray job` and jobs/submit.sh), not a cluster address"

_lock = threading.Lock()
_info: dict | None = None  # what the first init_ray of this process attached to (plus its GCS address)


def _is_http(address: str) -> bool:
    return address.lower().startswith(("http://", "https://"))


def _gcs_reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Does something accept TCP connections at host:port? (A dead node's address hangs ray.init.)"""
    host, _, port = address.strip().rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _local_node_address(address_file: str | None = None) -> str | None:
    """The GCS address a `ray start` on this machine recorded, if that node still answers."""
    try:
        if address_file is None:
            from ray._common.utils import get_ray_address_file

            address_file = get_ray_address_file(None)
        with open(address_file) as f:
            address = f.read().strip()
    except (OSError, ImportError):  # no file: no `ray start` node here (ImportError: Ray moved it)
        return None
    if not address:
        return None
    if not _gcs_reachable(address):
        log.info("ignoring %s: the Ray node it names (%s) does not answer (stopped without `ray stop`?)", address_file, address)
        return None
    return address


def _existing_cluster_address(cfg_address: str | None, env: Mapping[str, str] | None = None,
                              address_file: str | None = None) -> str | None:
    """Where to attach: the value for `ray.init(address=...)`, or None to start a private local Ray.

    `env` and `address_file` default to the process environment and Ray's address file; tests pass
    their own. Raises ConfigError/UserError for an http:// address (a dashboard, not a cluster).
    """
    env = os.environ if env is None else env
    for key, value in (("runtime.address", cfg_address), ("RAY_ADDRESS", env.get("RAY_ADDRESS"))):
        value = str(value).strip() if value is not None else ""
        if not value:
            continue
        if _is_http(value):
            if key == "runtime.address":
                raise ConfigError(key, value, f"this {_HTTP_WHAT}; use the GCS address host:6379, 'auto' (the Ray "
                                  "node on this machine), 'local' (a private Ray) or null, or submit with jobs/submit.sh")
            raise UserError(f"RAY_ADDRESS={value} {_HTTP_WHAT}: submit the run with jobs/submit.sh, "
                            "or set RAY_ADDRESS to the cluster's GCS address host:6379, or unset it")
        if value == "local":
            return None
        return value
    # A `ray start` node on this machine: attach with "auto" (Ray then resolves the same file and,
    # unlike an explicit address, turns on token authentication when the node has a token).
    return "auto" if _local_node_address(address_file) else None


def runtime_env_for_attach(env: Mapping[str, str] | None = None) -> dict | None:
    """The runtime_env a driver passes when it attaches to a cluster (None = pass none).

    Inside a submitted job the job's own runtime_env (working_dir, env_vars) already reaches every
    worker, and Ray refuses to merge a driver runtime_env that repeats one of its env var names, so
    nothing is passed there. Otherwise only the non-secret FORWARD_ENV names are forwarded.
    """
    env = os.environ if env is None else env
    if JOB_CONFIG_ENV in env:
        return None
    env_vars = {k: env[k] for k in FORWARD_ENV if env.get(k)}
    return {"env_vars": env_vars} if env_vars else None


def _current_gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - informational only
        return None


MAX_AUTO_ACTORS = 4  # CPU model actors: each holds its own copy of the model (GBs for DiT-XL/2 or SD on CPU)


def actor_need(gpus_per_actor: float, cpus_per_actor: float) -> dict[str, float]:
    """The resources one model actor asks Ray for, e.g. {"CPU": 2.0, "GPU": 1.0} (zeros left out)."""
    return {k: float(v) for k, v in (("CPU", cpus_per_actor), ("GPU", gpus_per_actor)) if float(v) > 0}


def actors_that_fit(need: Mapping[str, float], nodes: list[dict] | None = None) -> int:
    """How many actors that each need `need` the cluster's alive nodes can hold at once, counted node by
    node (an actor lives on one node: two nodes with 1 GPU each hold two 1-GPU actors, not one 2-GPU actor).
    `nodes` defaults to `ray.nodes()`; tests pass their own."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    total = 0
    for node in nodes:
        if not node.get("Alive", False):
            continue
        res = node.get("Resources", {})
        total += min((int(res.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=MAX_AUTO_ACTORS)
    return total


def _largest_node(need: Mapping[str, float], nodes: list[dict]) -> str:
    have = [{k: float(n.get("Resources", {}).get(k, 0.0)) for k in need} for n in nodes if n.get("Alive", False)]
    best = max(have, key=lambda r: sum(r.values()), default={k: 0.0 for k in need})
    return ", ".join(f"{k}={v:g}" for k, v in best.items())


def actor_count(requested: int | None, gpus_per_actor: float, cpus_per_actor: float, key: str = "runtime.sampler_actors",
                wait_s: float = 0.0) -> int:
    """How many model actors a pool gets (runtime.bank_actors / sampler_actors), so that every one of
    them can be placed: a pool never hands work to an actor that waits forever for resources.

    null: as many as the cluster's alive nodes hold, node by node — one per `gpus_per_actor` GPUs for
    GPU actors (all the GPUs the cluster has), else one per `cpus_per_actor` CPUs, at most
    MAX_AUTO_ACTORS. A number larger than what fits shrinks to what fits (with a warning). When not
    even one actor fits, a UserError names the missing resources. `wait_s` > 0 (runtime.wait_for_nodes_s)
    first waits that long, saying so, for an autoscaling cluster to add the nodes the pool asks for."""

    import ray

    need = actor_need(gpus_per_actor, cpus_per_actor)
    want = 1 if requested is None else int(requested)
    deadline = time.monotonic() + float(wait_s)
    nodes = ray.nodes()
    fit = actors_that_fit(need, nodes)
    while fit < want and time.monotonic() < deadline:
        log.warning("%s: %d actor(s) of %s fit on the cluster now, %d wanted; waiting up to %.0fs more for nodes",
                    key, fit, need, want, deadline - time.monotonic())
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        nodes = ray.nodes()
        fit = actors_that_fit(need, nodes)
    if fit == 0:
        raise UserError(f"{key}: one actor needs {', '.join(f'{k}={v:g}' for k, v in need.items())} on one node, and no "
                        f"node of the Ray cluster has that (largest: {_largest_node(need, nodes)}); lower runtime.gpus_per_actor "
                        "/ runtime.cpus_per_actor, add nodes, or set runtime.wait_for_nodes_s for an autoscaling cluster")
    if requested is None:
        return fit if "GPU" in need else min(MAX_AUTO_ACTORS, fit)
    if want > fit:
        log.warning("%s=%d: only %d actor(s) of %s fit on the cluster; using %d", key, want, fit, need, fit)
        return fit
    return want


class CapacityWatch:
    """Waiting for capacity, said in the log and bounded in time, for a stage whose pieces (bank actors,
    evaluation trainings) Ray places by itself.

    Work that needs `need` (one actor or task) and fits on no alive node waits in Ray forever: its node
    was lost, or an autoscaler has not added one yet. While that lasts, `check()` says so (what waits,
    the resources it needs, the largest node there is) when it starts and then every `say_every_s`, and
    raises a UserError once it has lasted `timeout_s` (runtime.placement_timeout_s). Work that fits on
    some node but waits for a busy one is not waiting for capacity: nothing is said. Callers call
    `check()` whenever their wait for results times out (`poll_s`)."""

    def __init__(self, what: str, need: Mapping[str, float], timeout_s: float, *, say_every_s: float = 30.0,
                 nodes: Callable[[], list[dict]] | None = None, clock: Callable[[], float] = time.monotonic):
        self.what, self.need, self.timeout_s = what, dict(need), float(timeout_s)
        self.say_every_s, self.clock = float(say_every_s), clock
        self._nodes = nodes
        self.since: float | None = None  # when the work last started to fit on no node
        self._said = 0.0

    @property
    def poll_s(self) -> float:
        """How often a caller should check: often enough to give up on time, never busily."""
        return max(0.05, min(10.0, self.timeout_s / 4))

    def _need_text(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.need.items())

    def check(self) -> None:
        if self._nodes is not None:
            nodes = self._nodes()
        else:
            import ray

            nodes = ray.nodes()
        if actors_that_fit(self.need, nodes) > 0:
            if self.since is not None:
                log.info("%s: capacity is back (%s fits on a node); going on", self.what, self._need_text())
            self.since = None
            return
        now = self.clock()
        if self.since is None:
            self.since = now
        waited = now - self.since
        if waited > self.timeout_s:
            raise UserError(f"{self.what}: no node of the Ray cluster has {self._need_text()} (largest: {_largest_node(self.need, nodes)}) "
                            f"for runtime.placement_timeout_s={self.timeout_s:g}s; add nodes with those resources (or let the "
                            "autoscaler), lower what one piece asks for, or raise runtime.placement_timeout_s; finished work is kept")
        if waited == 0.0 or now - self._said >= self.say_every_s:
            log.warning("%s: waiting for capacity: one piece needs %s on one node and no alive node has it (largest: %s); "
                        "waited %.0fs, giving up after runtime.placement_timeout_s=%gs", self.what, self._need_text(),
                        _largest_node(self.need, nodes), waited, self.timeout_s)
            self._said = now


T = TypeVar("T")


def iterate_watched(items: Iterable[T], watch: CapacityWatch) -> Iterator[T]:
    """The items of `items` (a blocking iterator, e.g. a Ray Data stream), produced on a background
    thread so that `watch.check()` runs whenever none arrived for `watch.poll_s`; an error of the
    producer is raised here.

    If the consumer stops early (the watch gave up, its own error, a `break`), the stream is ended
    before this returns: the producer is usually blocked inside `next()` waiting for an item that will
    not come (a Ray Data stream whose actor fits no node), so it is interrupted there (`_interrupt`).
    A Ray Data stream then shuts its executor down, pending actors included; left running, that
    executor outlived the run, kept asking the cluster for the actor, and after `ray.shutdown()` at
    exit called Ray again, which started a new local Ray in a process that was ending."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    end = object()

    def give(entry: tuple) -> None:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.5)
                return
            except queue.Full:
                continue

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                give((item, None))
                if stop.is_set():
                    break
            else:
                give((end, None))
        except _StreamStopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            give((end, e))
        finally:
            close = getattr(it, "close", None)
            if stop.is_set() and close is not None:  # the consumer gave up: end the stream here, quietly
                try:
                    close()
                except BaseException:  # noqa: BLE001 - its errors have no one to go to (nor a second interrupt)
                    pass

    def run() -> None:
        try:
            produce()
        except _StreamStopped:  # the interrupt arrived after produce's own handlers: nothing left to end
            pass

    thread = threading.Thread(target=run, name="iterate_watched", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item, err = q.get(timeout=watch.poll_s)
            except queue.Empty:
                watch.check()
                continue
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=0.5)  # a producer that was between items sees `stop` by itself
        if thread.is_alive():
            _interrupt(thread)
            thread.join(timeout=STREAM_STOP_TIMEOUT_S)
            if thread.is_alive():
                log.warning("a stream did not end within %gs of being stopped; it is left to end by itself", STREAM_STOP_TIMEOUT_S)


STREAM_STOP_TIMEOUT_S = 30.0  # a Ray Data executor's shutdown joins its loop for 2 s, then kills its actors


class _StreamStopped(BaseException):
    """Raised inside a producer thread whose consumer has stopped; a BaseException so that no
    `except Exception` of the stream swallows it (Ray Data's iterator ends its executor on any)."""


def _interrupt(thread: threading.Thread) -> None:
    """Raise _StreamStopped in `thread` at its next Python instruction. A thread blocked in Python
    code (Ray Data's output wait is a 10 ms sleep loop) ends there; Python has no other way to stop a
    thread that waits inside a library we do not control (PyThreadState_SetAsyncExc, the C API)."""
    if thread.ident is None:
        return
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_StreamStopped))
    if n > 1:  # never for a real thread id; the C API asks to undo it if it happens
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)


MIN_ACTOR_CPUS = 0.1  # below this an actor's share is no share: use fewer actors instead


@dataclass(frozen=True)
class PoolPlan:
    """Resource sizes for a pool of model actors (+ optional side tasks, e.g. Ray Data decode tasks)."""

    actors: int
    cpus_per_actor: float
    side_cpus: float  # CPUs of one side task (0: the pool has none)


def plan_pool(nodes: list[dict], num_actors: int, cpus_per_actor: float, gpus_per_actor: float = 0.0,
              side_cpus: float = 0.0) -> PoolPlan:
    """Pure: sizes for `num_actors` model actors on `nodes` (`ray.nodes()` entries; dead ones are
    ignored) such that nothing waits on a piece that fits on no node.

    * An actor is at most as large as the largest node (a 2-CPU actor never places on 1-CPU nodes).
    * With side tasks (the decode tasks feeding a Ray Data actor pool), however Ray places the
      actors some node keeps room for one: every node wastes less than one side task, so if the
      actors leave at least (#nodes x side task) CPUs of the total free, one node has a side task's
      room (pigeonhole). The actors' share shrinks to make it so, never below MIN_ACTOR_CPUS;
      below that there are fewer actors. (The cluster's sum alone gave three 1-CPU nodes 3 actors
      x 0.83 CPU: 0.17 CPU left per node, no 0.5-CPU decode task placeable, a hang; issue 22.)
    * Never more actors than the nodes place at that size (GPU actors: one per `gpus_per_actor`
      GPUs of a node), and at least one.
    """
    cpu_nodes = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes if n.get("Alive", False)]
    cpu_nodes = [c for c in cpu_nodes if c > 0]
    if not cpu_nodes:
        return PoolPlan(max(1, int(num_actors)), float(cpus_per_actor), float(side_cpus))
    biggest = max(cpu_nodes)
    side = min(float(side_cpus), biggest / 4) if side_cpus > 0 else 0.0
    budget = sum(cpu_nodes) - len(cpu_nodes) * side  # CPUs the actors may take, all nodes together
    cpus = min(float(cpus_per_actor), biggest - side)
    n = max(1, int(num_actors))
    if n * cpus > budget + 1e-9:
        cpus = max(MIN_ACTOR_CPUS, budget / n)
        n = max(1, min(n, int(budget / cpus + 1e-9)))
    n = max(1, min(n, actors_that_fit(actor_need(gpus_per_actor, cpus), nodes)))
    return PoolPlan(n, round(cpus, 4), side)


def resolve_actor_counts(runtime: Any) -> None:
    """Fill runtime.bank_actors and runtime.sampler_actors in place (after init_ray): null becomes the
    number that fits the cluster, a number larger than what fits shrinks (see `actor_count`)."""
    for key in ("bank_actors", "sampler_actors"):
        runtime[key] = actor_count(runtime[key], float(runtime.gpus_per_actor), float(runtime.cpus_per_actor),
                                   f"runtime.{key}", float(runtime.get("wait_for_nodes_s", 0.0) or 0.0))


def init_ray(runtime: Any | None = None, *, quiet: bool = True) -> dict:
    """Initialise Ray once per process; returns a short, credential-free description of the cluster:
    {"mode": "attached" | "local" | "already-initialized", "gcs_address": ..., "python": the driver's
    interpreter (on a cluster: the environment `ray start` ran from)}.

    A second call (Hydra multirun, Tune, tests) returns the first call's description while that Ray
    is still up; a Ray someone else initialised (a test fixture) is used as it is.
    """
    global _info
    import ray

    with _lock:
        if ray.is_initialized():
            gcs = _current_gcs_address()
            if _info is not None and _info.get("gcs_address") == gcs:
                return dict(_info)
            return {"mode": "already-initialized", "address": gcs}
        cfg_address = getattr(runtime, "address", None) if runtime is not None else None
        address = _existing_cluster_address(cfg_address)
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": True}
        if address is not None:
            if not address.startswith(("auto", "ray://")) and not _gcs_reachable(address, timeout_s=5.0):
                source = "runtime.address" if cfg_address else "RAY_ADDRESS"
                raise UserError(f"{source}={address}: no Ray cluster answers there; start one (`ray start --head`), "
                                "fix the address, or unset it to run on a private local Ray")
            if any(os.environ.get(k) for k in SECRET_ENV) and JOB_CONFIG_ENV not in os.environ:
                log.info("attaching to a Ray cluster: S3 credentials of this shell are not sent to its workers "
                         "(they get the environment of `ray start` or the Kubernetes Secret)")
            try:
                ray.init(address=address, runtime_env=runtime_env_for_attach(), **kwargs)
            except ConnectionError as e:
                raise UserError(f"could not attach to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
            _info = {"mode": "attached", "address": address, "gcs_address": _current_gcs_address(), "python": sys.executable}
            log.info("attached to the Ray cluster at %s", _info["gcs_address"] or address)
            return dict(_info)
        num_cpus = getattr(runtime, "num_cpus", None) if runtime is not None else None
        # A private local Ray: "local" so Ray itself ignores RAY_ADDRESS and stale address files; no
        # dashboard; its processes are children of this one, so workers inherit the S3 environment.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        _info = {"mode": "local", "num_cpus": num_cpus, "gcs_address": _current_gcs_address(), "python": sys.executable}
        return dict(_info)


S3_CREDENTIALS_HOW = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for MinIO or another "
                      "S3-compatible endpoint), or AWS_PROFILE with ~/.aws/credentials")


def check_storage(url: str, key: str) -> None:
    """Fail early, with one line naming the key and what to do, when a location cannot be used;
    creates nothing.

    Local: an existing file, or a folder that cannot be created (under a file, no permission).
    S3: no credentials (botocore finds none in the environment, a profile or an instance role), a
    bucket that cannot be accessed, or one that does not exist. Why: s3fs's makedirs silently
    *creates* a missing bucket (a typo in out_dir becomes a new bucket), and with no credentials
    s3fs answers "does not exist", which sends the user looking for the wrong problem.
    """
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        check_local_dir(url.removeprefix("file://"), key)
        return
    if not url.startswith(("s3://", "s3a://")):
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise UserError(f"{key}={url}: no S3 credentials found; {S3_CREDENTIALS_HOW}")
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        exists = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - access denied, endpoint unreachable
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{key}={url}: cannot access bucket {bucket!r} ({type(e).__name__}: {first})") from None
    if not exists:
        raise UserError(f"{key}={url}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                        "create it first, dap_ray never creates buckets")


def check_local_dir(path: str, key: str) -> None:
    """A local folder that exists or can be created by this user; creates nothing."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise UserError(f"{key}={path} is an existing file, not a folder; choose a folder path (created if missing)")
    parent = p
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{key}={path} cannot be created: {parent} is a file; choose a folder path that is not under a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path} cannot be created or written: no write permission in {parent}; choose a folder you can write")


def device_for(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; platform.processor() elsewhere), for the figures
    that say which machine they were measured on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name() -> str:
    """This machine's first CUDA device and how many there are, or "no GPU"."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop a CPU run that only describes the machine
        pass
    return "no GPU"
