"""Node loss (issue 22): resource plans that fit each node, and a real multi-node Ray cluster on one
machine (`ray.cluster_utils.Cluster`: a head and two worker raylets of 1 CPU each) that the reduced
default run, and a small Tune sweep, attach to through RAY_ADDRESS, as to any cluster.

The planning function is pure and tested on made-up clusters; the cluster tests are real Ray."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pandas as pd
import psutil
import pytest
from omegaconf import OmegaConf

from dap_ray.data.types import ClassInfo
from dap_ray.errors import UserError
from dap_ray.runtime import CapacityWatch, iterate_watched, plan_pool
from dap_ray.sampling import SamplerJob, SamplerPool, existing_indices, work_items
from dap_ray.tune.sweep import main as tune_main
from tests.conftest import REFERENCE_IPC, finish_run, reference_cmd, start_logged
from tests.test_tune import sweep_overrides

CLASSES = tuple(ClassInfo(i, str(i), str(i)) for i in range(10))


def _nodes(*cpus: float, gpus: float = 0.0) -> list[dict]:
    """`ray.nodes()` entries of alive nodes with these CPUs (and GPUs each)."""
    return [{"Alive": True, "Resources": {"CPU": c, **({"GPU": gpus} if gpus else {})}} for c in cpus]


def _worst_free(nodes: list[float], n: int, cpus: float) -> float:
    """The most CPU some node keeps free under the *worst* placement of n actors of `cpus` each
    (any placement Ray may choose: every assignment of actors to nodes that fits)."""
    worst = None
    for counts in itertools.product(range(n + 1), repeat=len(nodes)):
        if sum(counts) != n or any(k * cpus > cap + 1e-9 for k, cap in zip(counts, nodes)):
            continue
        best_free = max(cap - k * cpus for k, cap in zip(counts, nodes))
        worst = best_free if worst is None else min(worst, best_free)
    assert worst is not None, f"{n} actors of {cpus} CPU do not fit on {nodes} at all"
    return worst


@pytest.mark.unit
@pytest.mark.parametrize("nodes, actors, cpus", [
    ([1.0, 1.0, 1.0], 3, 1.0),  # the hang of issue 22: three 1-CPU nodes
    ([1.0, 1.0, 1.0], 4, 1.0),
    ([1.0, 1.0], 2, 1.0),
    ([1.0], 1, 1.0),
    ([2.0], 2, 1.0),  # the CI machine's local Ray
    ([4.0, 1.0], 4, 1.0),  # mixed sizes
    ([8.0, 2.0, 1.0], 4, 2.0),
    ([0.5, 0.5, 0.5, 0.5], 4, 1.0),  # nodes smaller than one actor as configured
    ([16.0, 1.0], 2, 4.0),
])
def test_bank_plan_leaves_a_decode_task_room_on_some_node(nodes, actors, cpus):
    """Whatever placement Ray picks for the actors, some node still has room for one decode task, and
    every actor fits on some node: the Ray Data pipeline never waits on a task no node can run."""
    plan = plan_pool(_nodes(*nodes), actors, cpus, side_cpus=0.5)
    assert 1 <= plan.actors <= actors
    assert 0 < plan.side_cpus <= 0.5 and plan.cpus_per_actor <= cpus
    assert plan.cpus_per_actor <= max(nodes)
    assert _worst_free(nodes, plan.actors, plan.cpus_per_actor) >= plan.side_cpus - 1e-9


@pytest.mark.unit
def test_bank_plan_on_three_one_cpu_nodes_is_not_the_sums_answer():
    """The cluster's sum (3 CPUs) gave 3 actors x 0.83 CPU: 0.17 CPU left on each node, no room for
    a 0.5-CPU decode task anywhere. Per node: 3 actors of 0.75 and decode tasks of 0.25."""
    plan = plan_pool(_nodes(1.0, 1.0, 1.0), 3, 1.0, side_cpus=0.5)
    assert (plan.actors, plan.cpus_per_actor, plan.side_cpus) == (3, 0.75, 0.25)
    # one node, as before this change (local Ray on 2 CPUs): two actors of 0.75 + decode 0.5
    plan = plan_pool(_nodes(2.0), 2, 1.0, side_cpus=0.5)
    assert (plan.actors, plan.cpus_per_actor, plan.side_cpus) == (2, 0.75, 0.5)


@pytest.mark.unit
def test_sampler_plan_fits_each_node():
    """Without side tasks an actor is never larger than the largest node, and never more actors than
    the nodes place one by one (2 x 1.5-CPU nodes hold two 1-CPU actors, not three)."""
    assert plan_pool(_nodes(1.5, 1.5), 3, 1.0) == plan_pool(_nodes(1.5, 1.5), 2, 1.0)
    assert plan_pool(_nodes(1.5, 1.5), 3, 1.0).actors == 2
    assert plan_pool(_nodes(1.0, 1.0, 1.0), 3, 2.0).cpus_per_actor == 1.0  # a 2-CPU actor would place nowhere
    assert plan_pool(_nodes(4.0), 3, 1.0).actors == 3
    assert plan_pool([], 2, 1.0).actors == 2  # nothing known (no node yet): as configured


@pytest.mark.unit
def test_dead_nodes_and_gpu_actors_are_counted_per_node():
    nodes = _nodes(8.0, 8.0, gpus=1.0) + _nodes(2.0) + [{"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert plan_pool(nodes, 4, 2.0, 1.0, side_cpus=0.5).actors == 2  # one per 1-GPU node; the dead node counts nothing
    assert plan_pool(nodes, 4, 2.0, 1.0, side_cpus=0.5).cpus_per_actor == 2.0


# ---------------------------------------------------------------------------------------------
# the sampler pool follows the cluster (real local Ray; resources held by a blocker actor)
# ---------------------------------------------------------------------------------------------


def _job(model_dir, out) -> SamplerJob:
    return SamplerJob(model={"type": "dit", "path": str(model_dir)}, classes=CLASSES[:4], out_dir=str(out), seed=11,
                      steps=4, cfg_scale=2.0, eta=0.0, dtype="fp32")


@pytest.fixture
def hold_cpus(ray_session):
    """Hold `n` of the local Ray's CPUs with an idle actor (what another job, or a lost node, leaves missing)."""
    import ray

    held = []

    def hold(n: float):
        actor = ray.remote(num_cpus=n)(_Blocker).remote()
        ray.get(actor.ping.remote())
        held.append(actor)
        return actor

    yield hold
    for a in held:
        ray.kill(a)


class _Blocker:
    def ping(self) -> bool:
        return True


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_pool_never_waits_on_an_actor_that_cannot_be_placed(tiny_dit_dir, ray_session, hold_cpus, tmp_path):
    """Two actors asked for, room for one: the one that is placed renders every item, the other stays
    pending without an item (ray.util.ActorPool handed it half of them and waited forever)."""
    import ray

    hold_cpus(ray.cluster_resources()["CPU"] - 1.0)
    items = work_items("vanilla", 4, 2, 2)
    with SamplerPool(num_actors=2, cpus_per_actor=1.0, placement_timeout_s=120) as pool:
        rows = pool.run(_job(tiny_dit_dir, tmp_path / "one_placed"), items, progress=False)
        assert len(pool.actors) == 2  # the pending one was asked for; it got no work
    assert sorted((r["class"], r["index"]) for r in rows) == sorted((c.key, i) for c in CLASSES[:4] for i in range(2))
    for c in CLASSES[:4]:
        assert sorted(existing_indices(str(tmp_path / "one_placed"), c.key)) == [0, 1]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_pool_waiting_for_capacity_says_what_and_gives_up(tiny_dit_dir, ray_session, hold_cpus, tmp_path, caplog):
    """No node has room for a sampler actor (the cluster counts the CPUs, another job holds them): the
    run says which resources it waits for and stops with a UserError naming runtime.placement_timeout_s."""
    import ray

    hold_cpus(ray.cluster_resources()["CPU"])
    with caplog.at_level(logging.WARNING, logger="dap_ray.sampling"), pytest.raises(UserError) as err, \
            SamplerPool(num_actors=1, cpus_per_actor=1.0, placement_timeout_s=4) as pool:
        pool.run(_job(tiny_dit_dir, tmp_path / "none"), work_items("vanilla", 1, 2, 2), progress=False, desc="sampling vanilla")
    assert "runtime.placement_timeout_s=4" in str(err.value) and "CPU=1" in str(err.value)
    said = [r.getMessage() for r in caplog.records if "waiting for capacity" in r.getMessage()]
    assert said and "CPU=1" in said[0] and "free now: CPU=0" in said[0], said
    assert not (tmp_path / "none" / "images").exists() or not list((tmp_path / "none").rglob("*.png"))


# ---------------------------------------------------------------------------------------------
# the bank and evaluation stages (Ray places their pieces): waiting for capacity, said and bounded
# ---------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_capacity_watch_says_what_it_waits_for_resets_and_gives_up(caplog):
    """Nothing is said while the piece fits some node (busy or not); once it fits none, the watch says
    so at once and then every say_every_s, names the resources, resets when a node with them comes
    back, and raises a UserError naming runtime.placement_timeout_s once the wait has lasted the timeout."""
    clock, nodes = _Clock(), [_nodes(1.0, 1.0, gpus=1.0)]
    watch = CapacityWatch("evaluation", {"CPU": 1.0, "GPU": 1.0}, 60.0, say_every_s=20.0, nodes=lambda: nodes[0], clock=clock)
    with caplog.at_level(logging.WARNING, logger="dap_ray.runtime"):
        watch.check()
        assert watch.since is None and not caplog.records
        nodes[0] = _nodes(4.0)  # the GPU nodes are gone
        watch.check()
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and "evaluation: waiting for capacity" in said[0] and "CPU=1, GPU=1" in said[0], said
        assert "largest: CPU=4, GPU=0" in said[0] and "runtime.placement_timeout_s=60s" in said[0]
        clock.now += 10
        watch.check()
        assert len(caplog.records) == 1  # not again before say_every_s
        clock.now += 15
        watch.check()
        assert len(caplog.records) == 2 and "waited 25s" in caplog.records[-1].getMessage()
        nodes[0] = _nodes(1.0, gpus=1.0)  # a node with a GPU joined (the autoscaler): the wait starts over
        watch.check()
        assert watch.since is None
        nodes[0] = []
        watch.check()
        clock.now += 60
        watch.check()  # exactly the timeout: still waiting
        clock.now += 1
        with pytest.raises(UserError) as err:
            watch.check()
    assert "evaluation: no node of the Ray cluster has CPU=1, GPU=1" in str(err.value)
    assert "runtime.placement_timeout_s=60s" in str(err.value) and "finished work is kept" in str(err.value)


@pytest.mark.unit
def test_iterate_watched_yields_in_order_checks_while_waiting_and_raises_the_producers_error():
    checks = []

    class Watch:
        poll_s = 0.05

        def check(self):
            checks.append(1)

    def slow():
        yield 1
        time.sleep(0.5)  # nothing arrives for ten polls
        yield 2
        raise ValueError("the stream broke")

    got = []
    with pytest.raises(ValueError, match="the stream broke"):
        for x in iterate_watched(slow(), Watch()):
            got.append(x)
    assert got == [1, 2] and len(checks) >= 3
    assert list(iterate_watched(iter(range(100)), Watch())) == list(range(100))


@pytest.mark.unit
def test_iterate_watched_ends_a_stream_blocked_in_next_when_the_watch_gives_up():
    """The producer waits inside the stream for an item that never comes (as Ray Data waits for an
    actor that fits no node): when the watch gives up, the stream is interrupted there and its own
    cleanup runs before the error reaches the caller; no thread is left behind."""
    ended = threading.Event()

    class Watch:
        poll_s = 0.05
        calls = 0

        def check(self):
            self.calls += 1
            if self.calls > 4:
                raise UserError("gave up")

    def stuck():
        yield 0
        try:
            while True:  # Ray Data's output wait: a short sleep in a Python loop
                time.sleep(0.01)
        finally:
            ended.set()  # where Ray Data shuts its executor (and its pending actors) down

    got = []
    with pytest.raises(UserError, match="gave up"):
        for x in iterate_watched(stuck(), Watch()):
            got.append(x)
    assert got == [0]
    assert ended.is_set(), "the stream was still waiting after the caller had the error"
    assert not [t for t in threading.enumerate() if t.name == "iterate_watched"]


@pytest.mark.unit
def test_iterate_watched_ends_the_stream_when_the_consumer_fails_while_it_waits():
    """The consumer fails on an item (a write error) while the producer waits for the next one:
    closing the iteration (how bank and D3HR use it) ends the stream, as a give-up does."""
    ended = threading.Event()

    class Watch:
        poll_s = 0.05

        def check(self):
            pass

    def stuck():
        yield 0
        try:
            while True:
                time.sleep(0.01)
        finally:
            ended.set()

    with pytest.raises(OSError, match="disk full"), closing(iterate_watched(stuck(), Watch())) as items:
        for _ in items:
            time.sleep(0.1)  # the producer is inside the stream's wait by now
            raise OSError("disk full")
    assert ended.is_set()
    assert not [t for t in threading.enumerate() if t.name == "iterate_watched"]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_evaluation_that_fits_no_node_says_so_and_gives_up(ray_session, cache_dir, tmp_path, caplog):
    """Trainings that need a GPU on a cluster with none (their GPU node lost, the autoscaler not there):
    the evaluation says what it waits for and stops with a UserError after runtime.placement_timeout_s,
    instead of waiting in Ray forever."""
    from dap_ray.cli import compose
    from dap_ray.config import to_structured
    from dap_ray.data import resolve_dataset
    from dap_ray.eval.run import evaluate_sets

    cfg = to_structured(compose("distill", [f"out_dir={tmp_path}", f"cache_dir={cache_dir}", "eval.epochs=1", "eval.seeds=[0]",
                                            "eval.archs=[convnet]", "eval.max_test=20", "dataset.classes=[0,1]",
                                            "runtime.gpus_per_eval=1", "runtime.placement_timeout_s=3"]))
    ds = resolve_dataset("digits", None, ["0", "1"], cache_dir=str(cache_dir))
    sets = {"few": [r for r in ds.train if r.label == 0][:2] + [r for r in ds.train if r.label == 1][:2]}
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dap_ray.runtime"), pytest.raises(UserError) as err:
        evaluate_sets(cfg, ds, sets, str(tmp_path / "eval"), str(cache_dir), progress=False)
    assert time.monotonic() - t0 < 60
    assert "evaluation: no node of the Ray cluster has CPU=1, GPU=1" in str(err.value)
    assert "runtime.placement_timeout_s=3s" in str(err.value)
    said = [r.getMessage() for r in caplog.records if "waiting for capacity" in r.getMessage()]
    assert said and said[0].startswith("evaluation: waiting for capacity") and "GPU=1" in said[0], said


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bank_whose_actor_fits_no_node_says_so_and_gives_up(tiny_dit_dir, ray_session, cache_dir, tmp_path, caplog):
    """A bank actor that needs a GPU on a cluster with none: the build says what it waits for and stops
    with a UserError after the placement timeout; nothing is committed."""
    from dap_ray.backbones import load_backbone, model_fingerprint
    from dap_ray.bank import BankSpec, build_bank
    from dap_ray.data import resolve_dataset
    from dap_ray.sampling import schedule

    ds = resolve_dataset("digits", None, ["2", "3"], cache_dir=str(cache_dir))
    model = {"type": "dit", "path": str(tiny_dit_dir), "name": "tiny"}
    spec = BankSpec(model=model, model_fingerprint=model_fingerprint(model), layers=("1",), timesteps=tuple(schedule(load_backbone(model), 4)),
                    pooling="tokens", seed=7, resolution=8, batch_size=64)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dap_ray.runtime"), pytest.raises(UserError) as err:
        build_bank(spec, ds, str(tmp_path / "cache"), num_actors=1, gpus_per_actor=1.0, progress=False, placement_timeout_s=3)
    assert time.monotonic() - t0 < 90
    assert "bank: no node of the Ray cluster has CPU=1, GPU=1" in str(err.value), str(err.value)
    said = [r.getMessage() for r in caplog.records if "waiting for capacity" in r.getMessage()]
    assert said and said[0].startswith("bank: waiting for capacity"), said
    assert not list((tmp_path / "cache").rglob("_COMMIT"))
    # the Ray Data stream was ended, not left waiting for its actor: its executor thread would otherwise
    # outlive the run, keep asking for a GPU, and call Ray after ray.shutdown() (a new local Ray at exit)
    left = [t.name for t in threading.enumerate() if t.name.startswith(("StreamingExecutor-", "iterate_watched"))]
    assert not left, left


# ---------------------------------------------------------------------------------------------
# a real multi-node cluster on this machine: a head and two worker raylets of 1 CPU each
# ---------------------------------------------------------------------------------------------

RUN_BOUND_S = 900  # a run that loses nodes finishes by itself within this (a hang fails the test)


def _start_cluster(head_cpus: int):
    """`ray.cluster_utils.Cluster`: a head with `head_cpus` CPUs (where a run's driver attaches) and two
    1-CPU worker raylets."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    _top_up(c)
    return c


@pytest.fixture(scope="module")
def cluster():
    """A head of 1 CPU and two 1-CPU worker raylets. One for the module: tests that remove nodes add new
    ones (`_top_up`)."""
    c = _start_cluster(head_cpus=1)
    yield c
    c.shutdown()


def _top_up(c, workers: int = 2) -> None:
    while len(c.worker_nodes) < workers:
        c.add_node(num_cpus=1)
    c.wait_for_nodes()


def _titles(node) -> list[str]:
    """The `ray::<Class>.<method>` / `ray::<task>` titles of the worker processes a node's raylet started:
    which actors live there and what they run now (a node's processes all descend from its raylet)."""
    try:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        kids = raylet.children(recursive=True)
    except (psutil.NoSuchProcess, KeyError, IndexError):
        return []
    out = []
    for p in kids:
        try:
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title.startswith("ray::"):
            out.append(title)
    return out


# ---------------------------------------------------------------------------------------------
# a Tune sweep that loses the node of a running trial
# ---------------------------------------------------------------------------------------------

SWEEP_BOUND_S = 600  # a sweep that loses a node finishes by itself within this (a hang fails the test)


@pytest.fixture
def trial_cluster():
    """A head with no CPU and two 1-CPU workers: every trial lands on a worker, which the test can take
    away (the head, where the sweep's driver runs, cannot be). Before the module's `cluster` is started
    (file order), so the two clusters never run at once on the 2-core machine."""
    c = _start_cluster(head_cpus=0)
    yield c
    c.shutdown()


def _sweep_overrides(model_dir: Path, out: Path, cache: Path) -> list[str]:
    # Two trials (γ = 2 at t_stop 0 and 600; the layer each draws comes from the sweep's seed), one at a
    # time so that one has finished when the other is lost; FIFO: every trial runs all its epochs (ASHA
    # would stop one or the other by which reported first); 400 epochs, a check every 100: a trial trains
    # for three more checks (~10 s here) after its first, a window wide enough for the test to take its
    # node then on a quiet machine too; no final test (not what is tested here).
    return sweep_overrides(model_dir, out, cache, **{"tune.space.method.gamma.values": "[2.0]", "tune.max_concurrent": "1",
                                                      "tune.scheduler": "fifo", "tune.epochs": "400", "tune.eval_every": "100",
                                                      "tune.test_best": "false"})


def _checks(c, tid: str) -> int:
    """Checks Tune has recorded for a trial so far: rows of its progress.csv in the driver's staging
    folder under the Ray session (Tune writes each result there as it arrives and copies the folder to
    tune.storage_path only later)."""
    found = list(Path(c.head_node.get_session_dir_path()).glob(f"artifacts/*/sweep/driver_artifacts/trial_{tid}/progress.csv"))
    return max(0, len(found[0].read_text().splitlines()) - 1) if found else 0


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*.png"))}


def _trial_files(out: Path) -> dict[str, dict[str, bytes]]:
    """trial id -> {file name: bytes} of the sweep's trial folders (attempt-<k>.json, done.json)."""
    return {d.name: {f.name: f.read_bytes() for f in d.glob("*.json")} for d in sorted((out / "trials").glob("*")) if d.is_dir()}


def _by_knobs(out: Path) -> dict[str, dict]:
    """What a sweep decided, keyed by each trial's knobs (trial ids differ between sweeps): the trial's
    id, its attempts, its checks (epoch, accuracy), and the digest of each image it sampled."""
    got = {}
    for tid, files in _trial_files(out).items():
        done = json.loads(files["done.json"])
        got[json.dumps(done["knobs"], sort_keys=True)] = {
            "id": tid, "attempts": sorted(k for k in files if k.startswith("attempt-")), "history": done["history"],
            "images": _digest(out / "trials" / tid / "dap" / "images")}
    return got


def _table(out: Path):
    """results.csv, one row per knobs, without the columns that name or time a trial."""
    df = pd.read_csv(out / "results.csv", dtype={"method.layer": str, "trial_id": str})
    assert (df["reports"] == 4).all(), df  # epochs 100, 200, 300, 400, once each also for the rerun trial
    return df.drop(columns=["trial_id", "seconds", "error"]).sort_values(["method.gamma", "method.t_stop", "method.layer"]).reset_index(drop=True)


@pytest.mark.integration
@pytest.mark.timeout(SWEEP_BOUND_S + 300)
def test_sweep_reruns_the_trial_of_a_lost_node_and_keeps_the_finished_one(trial_cluster, tiny_dit_dir, cache_dir, ray_session,
                                                                          tmp_path):
    """A 2-trial sweep attached to a multi-node cluster loses the worker node of its running trial
    (`Cluster.remove_node`, no grace) after the first trial finished, once the running one has made a
    check (so Tune holds reports of the lost attempt). The sweep finishes by itself:
    Tune counts the lost trial as failed (tune.max_failures=1) and starts it again on the node left; the
    finished trial is not run again. Trials seed everything from the run seed (images from (seed, class,
    index), training from the seed), so each trial's images, checks and results row equal the same
    sweep's undisturbed on a single-node local Ray."""
    c = trial_cluster
    t0 = time.monotonic()
    # the reference, in this process on the session's Ray; it builds the bank (in the shared cache) that
    # the disturbed sweep then reuses
    assert tune_main(_sweep_overrides(tiny_dit_dir, tmp_path / "ref", cache_dir)) == 0
    ref_s = time.monotonic() - t0

    out = tmp_path / "lost"
    env = {**os.environ, "RAY_ADDRESS": c.address, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = start_logged([sys.executable, "-m", "dap_ray.tune", *_sweep_overrides(tiny_dit_dir, out, cache_dir)], env, tmp_path,
                        tmp_path / "sweep.log")
    t1 = time.monotonic()
    removed: dict = {}
    finished_before: dict[str, dict[str, bytes]] = {}
    sampled: dict[str, tuple[int, int]] = {}
    try:
        while proc.poll() is None and time.monotonic() - t1 < SWEEP_BOUND_S:
            files = _trial_files(out) if not removed and (out / "trials").exists() else {}
            running = [tid for tid, f in files.items() if "attempt-0.json" in f and "done.json" not in f and _checks(c, tid) >= 1]
            if running and any("done.json" in f for f in files.values()):  # the second trial trains, past its first check
                # its trainable actor (reused from the first trial, or a new one) is on one of the workers
                node = next((n for n in c.worker_nodes if any(t.startswith("ray::ImplicitFunc") for t in _titles(n))), None)
                if node is not None:
                    finished_before = {tid: f for tid, f in files.items() if "done.json" in f}
                    c.remove_node(node, allow_graceful=False)
                    removed = {"trial": running[0], "node": node.node_id[:8], "at_s": round(time.monotonic() - t1, 1),
                               "checks_before": _checks(c, running[0])}
                    sampled = _stamps(out / "trials" / running[0])  # all its images: it trains only once they are written
            time.sleep(0.05)
    finally:
        finish_run(proc, kill=proc.poll() is None)  # a hung sweep is killed, with its process group
    log_text = (tmp_path / "sweep.log").read_text()
    print(f"reference sweep {ref_s:.0f}s; node-loss sweep {time.monotonic() - t1:.0f}s; removed: {removed}")
    assert proc.returncode == 0, log_text[-4000:]
    assert removed, ("no trial was seen running on a worker node", log_text[-3000:])

    ref, got = _by_knobs(tmp_path / "ref"), _by_knobs(out)
    assert set(got) == set(ref) and len(got) == 2
    lost = next(k for k, v in got.items() if v["id"] == removed["trial"])
    (kept_id, kept_files), = finished_before.items()
    for knobs, trial in got.items():
        if knobs == lost:  # the lost attempt, then the rerun that finished it
            assert trial["attempts"] == ["attempt-0.json", "attempt-1.json"], trial
            assert len(sampled) == 4 * 2 and _stamps(out / "trials" / trial["id"]) == sampled  # the rerun sampled none again
        else:  # finished before the loss: not run again, its record untouched
            assert trial["id"] == kept_id and trial["attempts"] == ["attempt-0.json"], trial
            assert _trial_files(out)[kept_id] == kept_files
        assert trial["images"] == ref[knobs]["images"] and len(trial["images"]) == 4 * 2, knobs
        assert trial["history"] == ref[knobs]["history"], knobs
    pd.testing.assert_frame_equal(_table(out), _table(tmp_path / "ref"))
    assert set(_table(out)["status"]) == {"completed"}
    best = [OmegaConf.load(p / "best_config.yaml") for p in (out, tmp_path / "ref")]
    assert best[0].knobs == best[1].knobs and best[0].val_acc_best == best[1].val_acc_best


def _distill(c, model_dir: Path, work: Path) -> tuple[subprocess.Popen, Path]:
    """The reference run (tests/conftest.py: the reduced default on 2 classes, every stage on Ray),
    attached to the cluster through RAY_ADDRESS as to any cluster; its output goes to a file (a pipe
    nobody reads while the test watches the nodes would fill up)."""
    # HOME stays the test's: the driver must find the auth token the cluster was started with (Ray's
    # ~/.ray/auth_token; a ray.init earlier in this pytest process turns RAY_AUTH_MODE=token on)
    env = {**os.environ, "RAY_ADDRESS": c.address, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log_path = work / "distill.log"
    proc = start_logged(reference_cmd(model_dir, work / "run", work / "cache"), env, work, log_path)
    return proc, log_path


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def _accuracies(run: Path) -> dict[tuple, float]:
    rows = json.loads((run / "results.json").read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows), rows
    keys = [(r["method"], r["arch"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)), keys  # one row per training: a retried one is not counted twice
    return {k: r["acc"] for k, r in zip(keys, rows)}


@pytest.mark.integration
@pytest.mark.timeout(RUN_BOUND_S + 300)
def test_run_finishes_through_node_loss_in_bank_sampling_and_evaluation(cluster, reference_run, tiny_dit_dir, tmp_path):
    """One run, three nodes lost (`Cluster.remove_node`, no grace: its raylet and every process on it
    killed), each while it does that stage's work: a bank actor featurising a batch, a sampler actor
    rendering an item, an evaluation training. A node added after the first loss is used by the stages
    that start after it joined. The run finishes by itself within the bound, with the bytes and the
    accuracies of the reference run (the same command, undisturbed, on a single-node local Ray)."""
    c = cluster
    _top_up(c)
    # (stage, what must run on the node when it is removed)
    plan = [("bank", ("BankFeaturizer", ".submit")), ("sampling", ("SamplerWorker.render_for",)), ("evaluation", ("_train_one",))]
    removed: list[dict] = []
    seen: dict[str, set[str]] = {}  # node id -> titles seen on it
    added: dict[str, float] = {}  # node id -> when it had joined
    sampling_started: float | None = None

    t0 = time.monotonic()
    proc, log_path = _distill(c, tiny_dit_dir, tmp_path)
    try:
        # Watched from the main thread: Cluster.add_node installs signal handlers, which only it may do.
        while proc.poll() is None and time.monotonic() - t0 < RUN_BOUND_S:
            nodes = sorted(c.worker_nodes, key=lambda n: n.node_id not in added)  # the added node first
            titles = {n.node_id: _titles(n) for n in [*nodes, c.head_node]}
            for node_id, ts in titles.items():
                seen.setdefault(node_id, set()).update(t.split()[0] for t in ts)
            if sampling_started is None and any("SamplerWorker" in t for ts in titles.values() for t in ts):
                sampling_started = time.monotonic()
            if len(removed) < len(plan):
                stage, needles = plan[len(removed)]
                node = next((n for n in nodes if any(all(s in t for s in needles) for t in titles[n.node_id])), None)
                if node is not None:
                    c.remove_node(node, allow_graceful=False)
                    removed.append({"stage": stage, "node": node.node_id[:8], "at_s": round(time.monotonic() - t0, 1)})
                    if stage == "bank":  # a node joins mid-run: the stages that start later must use it
                        new = c.add_node(num_cpus=1)  # returns once the node is registered
                        added[new.node_id] = time.monotonic()
            time.sleep(0.02)  # an item renders for tens of ms: look often
    finally:
        finish_run(proc, kill=proc.poll() is None)  # a hung run is killed, with its process group
    wall = time.monotonic() - t0
    out = log_path.read_text()
    print(f"node-loss run: {wall:.0f}s; removed: {removed}; added: {[k[:8] for k in added]}")
    assert proc.returncode == 0, out[-4000:]
    assert [r["stage"] for r in removed] == [s for s, _ in plan], (removed, seen, out[-3000:])
    (new_id, joined), = added.items()
    assert sampling_started is not None and joined < sampling_started, "the added node joined after sampling had started"
    assert "SamplerWorker" in " ".join(seen.get(new_id, ())), ("the node added mid-bank ran no sampler actor", seen)
    assert "a sampler actor was lost" in out
    run, ref = tmp_path / "run", reference_run[0]
    for m in ("random_real", "vanilla", "dap"):
        assert _digest(run / m / "images") == _digest(ref / m / "images"), m
        assert len(_digest(run / m / "images")) == 2 * REFERENCE_IPC
    assert _accuracies(run) == _accuracies(ref)
    assert len(list((run / "eval").glob("*.json"))) == 3 * 2  # each training's result written once
