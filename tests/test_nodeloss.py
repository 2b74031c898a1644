"""Node loss (issue 22): resource plans that fit each node, and a real multi-node Ray cluster on one
machine (`ray.cluster_utils.Cluster`: a head and two worker raylets of 1 CPU each) that the reduced
default run attaches to through RAY_ADDRESS, as to any cluster.

The planning function is pure and tested on made-up clusters; the cluster tests are real Ray."""

from __future__ import annotations

import itertools
import logging

import pytest

from dap_ray.data.types import ClassInfo
from dap_ray.errors import UserError
from dap_ray.runtime import plan_pool
from dap_ray.sampling import SamplerJob, SamplerPool, existing_indices, work_items

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

