"""Guided DDIM sampling: the loop (pure torch) and the Ray actor pool that runs it batch by batch.

The loop is DDIM with classifier-free guidance; a `Guidance` (DAP's energy, DIVER's semantic term)
may add γ·√(1−ᾱ_t)·∇_{x_t}E to the predicted noise on the steps it applies to. Initial noise for
image (class c, index i) comes from a generator seeded by (run seed, c, i), so images do not depend
on batch composition, the number of actors or the order they finish in.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from dap_ray import ddim
from dap_ray.ddim import final_alpha, schedule
from dap_ray.errors import UserError
from dap_ray.guidance import energy_gradient, guided_eps
from dap_ray.runtime import actor_count

log = logging.getLogger(__name__)

PNG_WRITERS = 2  # threads per sampler actor that encode and write PNGs while the next batch samples


class Guidance(Protocol):
    """A training-free guidance term: an energy to descend on the steps where it applies."""

    gamma: float

    def applies(self, t: int) -> bool: ...

    def energy(self, backbone, x_t: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        """(B,) energies of the noisy latents x_t (differentiable w.r.t. x_t)."""
        ...


class LayerGuidance(Guidance, Protocol):
    """A guidance whose energy reads one layer of the conditional forward: the sampler takes that layer
    from the CFG forward itself (`Backbone.eps_with_features`) instead of a second forward."""

    layer: str

    def energy_of_features(self, backbone, feats: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        """(B,) energies of the layer's outputs feats (B, tokens, dim) (differentiable w.r.t. feats)."""
        ...


def guided_step_eps(backbone, guidance: Guidance, x: torch.Tensor, t: int, y: torch.Tensor, cfg_scale: float,
                    share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eps (B,C,h,w), ∇_x E (B,C,h,w), E (B,)) of one guided step.

    share_prefix: a LayerGuidance's features come from the CFG forward, whose blocks up to the layer are
    taped once (exact; the conditional branch's prefix is not run a second time). Otherwise, or for a
    guidance that needs a forward of its own, the CFG forward and the guidance pass run separately."""
    if share_prefix and hasattr(guidance, "energy_of_features"):
        out: dict[str, torch.Tensor] = {}

        def energy_fn(z: torch.Tensor) -> torch.Tensor:
            out["eps"], feats = backbone.eps_with_features(z, t, y, cfg_scale, guidance.layer)
            return guidance.energy_of_features(backbone, feats, t, y)

        grad, energy = energy_gradient(energy_fn, x)
        return out["eps"], grad, energy
    with torch.no_grad():
        eps = backbone.eps(x, t, y, cfg_scale)
    grad, energy = energy_gradient(lambda z: guidance.energy(backbone, z, t, y), x)
    return eps, grad, energy


def seed_for(*parts: object) -> int:
    """A 63-bit seed from a tuple such as (run seed, stage, class key, index): stable across runs."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def initial_noise(shape: Sequence[int], *seed_parts: object) -> torch.Tensor:
    """One image's starting noise (C,h,w), from its own generator (CPU, so identical on any device)."""
    g = torch.Generator().manual_seed(seed_for(*seed_parts))
    return torch.randn(tuple(shape), generator=g)


@dataclass
class StepInfo:
    t: int
    energy: torch.Tensor | None  # (B,) energy before the guided update, when guided
    strength: torch.Tensor | None = None  # (B,) |eps_hat - eps| / |eps| of the guided update, when guided


def sample_latents(
    backbone,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    guidance: Guidance | None = None,
    eta_generator: torch.Generator | None = None,
    start_t: int | None = None,
    trace: list[StepInfo] | None = None,
    share_prefix: bool = True,
) -> torch.Tensor:
    """DDIM from x_T = noise (B,C,h,w) for dataset labels y (B,) -> x_0 latents (B,C,h,w).

    start_t: begin at the first schedule step <= start_t (DIVER/img2img start from a noised latent).
    share_prefix: guided steps take the guidance layer from the CFG forward (`guided_step_eps`).
    """
    x = noise.to(backbone.device, torch.float32)
    y = y.to(backbone.device)
    ts = schedule(backbone, steps)
    if start_t is not None:
        ts = [t for t in ts if t <= start_t]
    ab = backbone.alphas_cumprod
    fa = final_alpha(backbone)
    sc = backbone.scheduler_config
    clip = float(sc.get("clip_sample_range", 1.0)) if sc.get("clip_sample", False) else None
    for i, t in enumerate(ts):
        a_t = ddim.alpha_bar(ab, t)
        a_prev = ddim.alpha_bar(ab, ts[i + 1] if i + 1 < len(ts) else -1, fa)
        energy = strength = None
        if guidance is not None and guidance.gamma > 0 and guidance.applies(t):
            # ∇E through the backbone's conditional forward up to the guidance layer
            eps, grad, energy = guided_step_eps(backbone, guidance, x, t, y, cfg_scale, share_prefix)
            guided = guided_eps(eps, grad, guidance.gamma, a_t)
            # the guidance strength users compare across layers, poolings and kernels (results.json)
            strength = (guided - eps).flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1).clamp_min(1e-12)
            eps = guided
        else:
            with torch.no_grad():
                eps = backbone.eps(x, t, y, cfg_scale)
        if trace is not None:
            trace.append(StepInfo(t, energy, strength))
        z = None
        if eta > 0:
            z = torch.randn(x.shape, generator=eta_generator).to(x.device)
        x = ddim.ddim_step(x, eps, a_t, a_prev, eta, z, clip_x0=clip)
    return x


# ---------------------------------------------------------------------------------------------
# The actor pool: work items (class, index range) -> images/<class>/<index>.png
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassRange:
    """Image indices [start, stop) of one class."""

    label: int
    start: int
    stop: int


@dataclass(frozen=True)
class WorkItem:
    """One sampler batch: index ranges of one or more classes, rendered together (at most
    `sampler.batch_size` images). Items are cut from the run's config alone (`pack_items`), so the
    batch an image is rendered in, and hence its bytes, never depend on the pool or on resumes."""

    method: str
    parts: tuple[ClassRange, ...]

    @classmethod
    def of_class(cls, method: str, label: int, start: int, stop: int) -> WorkItem:
        return cls(method, (ClassRange(label, start, stop),))

    @property
    def labels(self) -> list[int]:
        """The class label of each image, in batch order."""
        return [p.label for p in self.parts for _ in range(p.start, p.stop)]

    def images(self) -> list[tuple[int, int]]:
        """(label, index) of each image, in batch order."""
        return [(p.label, i) for p in self.parts for i in range(p.start, p.stop)]


def pack_items(method: str, counts: Sequence[int], batch_size: int) -> list[WorkItem]:
    """Batches of `batch_size` images over all classes in (label, index) order: counts[label] images of
    each class, a batch spanning class boundaries (IPC 1 at batch 16 renders 16 classes at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flat = [(label, i) for label, n in enumerate(counts) for i in range(int(n))]
    items = []
    for b in range(0, len(flat), batch_size):
        chunk = flat[b : b + batch_size]
        parts: list[ClassRange] = []
        for label, i in chunk:
            if parts and parts[-1].label == label:
                parts[-1] = ClassRange(label, parts[-1].start, i + 1)
            else:
                parts.append(ClassRange(label, i, i + 1))
        items.append(WorkItem(method, tuple(parts)))
    return items


@dataclass(frozen=True)
class SamplerJob:
    """Everything a sampler actor needs, picklable: model, classes, sampler knobs, the guidance recipe."""

    model: dict
    classes: tuple  # tuple[ClassInfo, ...]
    out_dir: str  # <run>/<method>
    seed: int
    steps: int
    cfg_scale: float
    eta: float
    dtype: str
    guidance: object | None = None  # a picklable factory: guidance.build(backbone) -> Guidance
    start: object | None = None  # a picklable factory of start latents (DIVER): start.latents(backbone, item) -> (x, start_t)


def image_path(out_dir: str, class_key: str, index: int) -> str:
    return f"{out_dir.rstrip('/')}/images/{class_key}/{index:05d}.png"


def write_png_atomic(path: str, image) -> None:
    """PNG bytes to a temp name, then rename (local) — a half-written image is never taken as done."""
    import io

    import fsspec
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        import os

        tmp = f"{p}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, p)
    else:  # an S3 PUT is atomic: the object appears whole or not at all
        fs.pipe_file(p, buf.getvalue())


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def png_complete(fs, path: str, size: int | None = None) -> bool:
    """Is `path` a whole PNG (signature first, IEND chunk last)? A truncated or zero-byte file under a
    final name (a copy cut short, a disk that filled up, a writer that was not ours) is not finished
    work: the sampler regenerates it instead of shipping a broken image."""
    try:
        size = fs.size(path) if size is None else size
        if size is None or size < len(PNG_SIGNATURE) + len(PNG_END):
            return False
        with fs.open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(size - len(PNG_END))
            tail = f.read(len(PNG_END))
    except (OSError, ValueError):
        return False
    return head == PNG_SIGNATURE and tail == PNG_END


def existing_indices(out_dir: str, class_key: str) -> set[int]:
    """Indices of this class's finished images: `<index>.png` files that are whole PNGs.

    Temp files (`*.png.tmp-<pid>`) never count. Local files are checked for a complete PNG; on object
    stores a PUT is atomic (an object appears whole or not at all), so a non-empty object counts."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(f"{out_dir.rstrip('/')}/images/{class_key}")
    if not fs.exists(p):
        return set()
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    local = "file" in protocols or "local" in protocols
    out = set()
    for info in fs.ls(p, detail=True):
        name = info["name"].rsplit("/", 1)[-1]
        if not (name.endswith(".png") and name[:-4].isdigit()):
            continue
        ok = png_complete(fs, info["name"], info.get("size")) if local else bool(info.get("size"))
        if ok:
            out.add(int(name[:-4]))
        else:
            log.warning("%s is not a complete PNG (truncated or empty); it will be regenerated", info["name"])
    return out


class SamplerWorker:
    """Holds the backbone (and guidance) once; renders work items. Wrapped as a Ray actor by the pool."""

    def __init__(self, job: SamplerJob, device: str | None = None, job_ref: str | None = None):
        from dap_ray.backbones import load_backbone, torch_dtype

        self.job = job
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = load_backbone(job.model, self.device, torch_dtype(job.dtype, self.device))
        self.backbone.bind_classes(list(job.classes))
        self.guidance = job.guidance.build(self.backbone) if job.guidance is not None else None
        self._job_ref = job_ref  # the ObjectRef (hex) of the pool's job this actor holds, if any
        # PNG encoding (zlib, which releases the GIL) and writing run beside the sampling loop
        self._writer = ThreadPoolExecutor(max_workers=PNG_WRITERS, thread_name_prefix="png-writer")
        self._writes: list[Future] = []

    def ready(self) -> str:
        """The pool's probe: answers once the actor is placed and its model loaded (the node's id)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def switch(self, job: SamplerJob) -> None:
        """Render another job's items (another method of the same run) with the model already loaded."""
        if model_key(job) != model_key(self.job):
            raise ValueError("a sampler worker only switches between jobs on the same model, dtype and classes")
        self.job = job
        self.guidance = job.guidance.build(self.backbone) if job.guidance is not None else None

    def render_for(self, job_box: list, item: WorkItem) -> list[dict]:
        """Pipelined `render` (wait=False) for the job whose ObjectRef is job_box[0] (boxed so Ray does not
        resolve it on every call: the job, with its guidance recipe, is fetched and built once per job)."""
        import ray

        ref = job_box[0]
        if ref.hex() != self._job_ref:
            self.switch(ray.get(ref))
            self._job_ref = ref.hex()
        return self.render(item, wait=False)

    def render(self, item: WorkItem, wait: bool = True) -> list[dict]:
        """Render the item's images (the whole batch, always: a fixed batch composition gives identical
        bytes) and write the ones not on disk yet. One row per image of the item.

        wait=False pipelines the writes: this item's PNGs are encoded and written on background threads
        while the next item samples, and are on disk when the next `render` or `flush` returns (the pool
        calls `flush` before it counts the last item done). The GPU does not wait for zlib."""
        keys = [self.job.classes[p.label].key for p in item.parts]
        have = {p.label: existing_indices(self.job.out_dir, k) for p, k in zip(item.parts, keys)}
        images_of = item.images()
        if all(i in have[label] for label, i in images_of):
            self.flush()
            return []
        seeds = [seed_for(self.job.seed, "sample", self.job.classes[label].key, i) for label, i in images_of]
        y = torch.tensor(item.labels, dtype=torch.long)  # (B,)
        start_t = None
        if self.job.start is not None:
            x, start_t = self.job.start.latents(self.backbone, item, seeds)
        else:
            x = torch.stack([initial_noise(self.backbone.latent_shape, s) for s in seeds])  # (B, C, h, w)
        guidance = self.guidance
        if guidance is not None and hasattr(guidance, "for_item"):  # per-item state (DIVER's targets, DAP's class means)
            guidance = guidance.for_item(self.backbone, item, seeds)
        trace: list[StepInfo] = []
        lat = sample_latents(self.backbone, x, y, self.job.steps, self.job.cfg_scale, self.job.eta, guidance,
                             eta_generator=torch.Generator().manual_seed(seeds[0]), start_t=start_t, trace=trace)
        guided = [s for s in trace if s.strength is not None]
        with torch.no_grad():
            images = self.backbone.tensor_to_images(self.backbone.decode(lat))  # (B, H, W, 3) uint8
        self.flush()  # the previous item's writes, which ran while this item sampled
        out = []
        for j, (label, i) in enumerate(images_of):
            key = self.job.classes[label].key
            if i not in have[label]:
                self._writes.append(self._writer.submit(write_png_atomic, image_path(self.job.out_dir, key, i), images[j]))
            row = {"class": key, "label": label, "index": i, "seed": seeds[j]}
            if guided:  # {t: |Δε|/|ε|} of this image's guided steps
                row["guidance_strength"] = {int(s.t): float(s.strength[j]) for s in guided}
            out.append(row)
        if wait:
            self.flush()
        return out

    def flush(self) -> int:
        """Wait for the PNG writes in flight (re-raising a failed one); how many there were."""
        writes, self._writes = self._writes, []
        for f in writes:
            f.result()
        return len(writes)


def guidance_strength(rows: Sequence[dict]) -> dict | None:
    """Mean |Δε| / |ε| of the guided steps over the images rendered (rows of SamplerWorker.render):
    {"mean": over every (image, guided step), "per_step": {t: mean over images}, "images": n};
    None when no row was guided (vanilla, γ = 0, or every image already on disk)."""
    per_step: dict[int, list[float]] = {}
    for r in rows:
        for t, v in (r.get("guidance_strength") or {}).items():
            per_step.setdefault(int(t), []).append(float(v))
    if not per_step:
        return None
    values = [v for vs in per_step.values() for v in vs]
    return {"mean": sum(values) / len(values),
            "per_step": {t: sum(vs) / len(vs) for t, vs in sorted(per_step.items(), reverse=True)},
            "images": sum(1 for r in rows if r.get("guidance_strength"))}


def work_items(method: str, num_classes: int, ipc: int, batch_size: int) -> list[WorkItem]:
    """`ipc` images of each class in batches of `batch_size` (`pack_items`): the same items whatever the
    pool size."""
    return pack_items(method, [ipc] * num_classes, batch_size)


def split_finished(job: SamplerJob, items: Sequence[WorkItem]) -> tuple[list[WorkItem], list[WorkItem]]:
    """(items with an image still missing, items whose every image is on disk as a whole PNG)."""
    have = {label: existing_indices(job.out_dir, job.classes[label].key)  # one listing per class, not per item
            for label in sorted({label for it in items for label, _ in it.images()})}
    pending, finished = [], []
    for it in items:
        (finished if all(i in have[label] for label, i in it.images()) else pending).append(it)
    return pending, finished


def model_key(job: SamplerJob) -> tuple:
    """What a sampler actor loads: jobs with equal keys can share actors."""
    import json

    return (json.dumps(job.model, sort_keys=True, default=str), job.dtype, tuple(c.key for c in job.classes))


class SamplerPool:
    """Sampler actors kept for a whole run, so every sampler method of the run (vanilla, dap, d3hr,
    diver, ...) reuses them: the model is loaded once per actor, not once per method.

    Sized when a stage first needs it (`runtime.actor_count` over the nodes alive then, so nodes
    that joined earlier in the run are counted), at most `num_actors` and never more than there are
    items. The pool follows the cluster: an item goes only to an actor that has answered a ready
    probe (placed, model loaded), never to one that is dead or still waits for a node. When an actor
    dies (its process killed, its node lost) its item goes back to the queue and is redone by any
    ready actor (same seeds => same bytes, same names => no duplicates; its rows are taken once,
    from the attempt that finished), and a replacement is asked for; if no node has room for the
    replacement the pool goes on with the actors that remain, and a node that joins later gets it.
    Actors write an item's PNGs while they sample the next (`render_for`): an item counts as done once
    its actor has answered the next render or the final flush, and one whose actor died before that is
    redone like a lost item (only its missing files are written; its rows are not taken twice).
    With no actor ready and items left, the pool says which resources it waits for and raises a
    UserError after `placement_timeout_s`. Use as a context manager, or call `close()`."""

    def __init__(self, num_actors: int | None = 1, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                 placement_timeout_s: float = 600.0):
        self.requested = None if num_actors is None else int(num_actors)  # None: as many as the nodes hold (auto)
        self.num_actors = 1 if num_actors is None else int(num_actors)
        self.gpus_per_actor, self.cpus_per_actor = float(gpus_per_actor), float(cpus_per_actor)
        self.placement_timeout_s = float(placement_timeout_s)
        self.actors: list = []
        self.replaced = 0  # actors that died and were asked for again (node loss, killed process)
        self._key: tuple | None = None

    def __enter__(self) -> SamplerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)  # a pending actor's placement request is withdrawn too
        self.actors, self._key = [], None

    def _need(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in (("CPU", self.cpus_per_actor), ("GPU", self.gpus_per_actor)) if v > 0)

    def _free(self) -> str:
        """What the cluster has free now, for the waiting message (summed over nodes, as Ray reports it)."""
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        keys = [k for k, v in (("CPU", self.cpus_per_actor), ("GPU", self.gpus_per_actor)) if v > 0]
        return "free now: " + ", ".join(f"{k}={free.get(k, 0.0):g} of {total.get(k, 0.0):g}" for k in keys)

    def run(self, job: SamplerJob, items: list[WorkItem], progress: bool = True, desc: str = "sampling") -> list[dict]:
        """Render `items` of `job`; finished items are skipped. Returns one row per image of `items`."""
        import collections
        import time

        import ray
        from ray.exceptions import RayActorError
        from tqdm.auto import tqdm

        pending, finished = split_finished(job, items)
        records = [
            {"class": job.classes[label].key, "label": label, "index": i, "seed": seed_for(job.seed, "sample", job.classes[label].key, i)}
            for it in finished for label, i in it.images()
        ]
        if not pending:
            return records
        if self._key is not None and self._key != model_key(job):
            self.close()  # another model: these actors cannot render it
        self._key = model_key(job)
        if not self.actors:  # sized now, against the nodes alive now: never more than they can place
            self.num_actors = actor_count(self.requested, self.gpus_per_actor, self.cpus_per_actor, "runtime.sampler_actors")
        # No Ray restarts or task retries: a dead actor's item is handed to a live actor here, instead of
        # waiting (forever, when its node is gone and no other has room) for that actor to come back.
        Actor = ray.remote(SamplerWorker).options(num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor,
                                                  max_restarts=0, max_task_retries=0)
        job_ref = ray.put(job)
        job_box = [job_ref]
        while len(self.actors) < min(self.num_actors, len(pending)):
            self.actors.append(Actor.remote(job_ref, None, job_ref.hex()))
        probes = {a.ready.remote(): a for a in self.actors}  # an item goes only to an actor that answered
        running: dict = {}  # task ref -> (actor, item); item None for a flush
        idle: list = []
        # Items an actor returned whose PNGs may still be in flight on its writer threads (render_for
        # pipelines them): they are done once that actor answers its next render or a flush. If it dies
        # first they are redone (same bytes; only missing files are written), their rows already taken.
        unflushed: dict = {}  # actor -> its last returned item
        taken: set[WorkItem] = set()
        queue = collections.deque(pending)
        bar = tqdm(total=len(pending), desc=desc, unit="item", disable=not progress)
        waiting_since: float | None = None
        last_said = 0.0

        def replace(actor, why: str) -> None:
            ray.kill(actor)  # an unreachable actor may still be busy: its item is redone elsewhere
            self.actors.remove(actor)
            if actor in unflushed:
                queue.appendleft(unflushed.pop(actor))
            self.replaced += 1
            new = Actor.remote(job_ref, None, job_ref.hex())
            self.actors.append(new)
            probes[new.ready.remote()] = new
            log.warning("%s: a sampler actor was lost (%s); its work goes to the %d other actor(s), a replacement is "
                        "placed when a node has room (%s)", desc, why, len(self.actors) - 1, self._need())

        while queue or running or unflushed:
            while queue and idle:
                actor, item = idle.pop(), queue.popleft()
                running[actor.render_for.remote(job_box, item)] = (actor, item)
            if not queue:  # nothing left to hand out: the idle actors finish their writes
                for actor in [a for a in idle if a in unflushed]:
                    idle.remove(actor)
                    running[actor.flush.remote()] = (actor, None)
            if not running:  # items left and no actor ready: the run waits for capacity (or for model loads)
                now = time.monotonic()
                if waiting_since is None:
                    waiting_since = last_said = now
                waited = now - waiting_since
                if waited > self.placement_timeout_s:
                    raise UserError(f"{desc}: no sampler actor ({self._need()} each) was placed and ready within "
                                    f"runtime.placement_timeout_s={self.placement_timeout_s:g}s ({self._free()}); add nodes with those "
                                    "resources, lower runtime.cpus_per_actor / gpus_per_actor, or raise runtime.placement_timeout_s")
                # the first seconds are a normal start (placing, loading the model): say nothing before
                if now - last_said >= min(30.0, self.placement_timeout_s / 2):
                    log.warning("%s: waiting for capacity: %d sampler actor(s) of %s each not ready after %.0fs (waiting for "
                                "a node with room, or loading the model; %s); %d item(s) left; giving up after "
                                "runtime.placement_timeout_s=%gs", desc, len(probes), self._need(), waited, self._free(),
                                len(queue), self.placement_timeout_s)
                    last_said = now
                timeout = max(0.1, min(30.0, self.placement_timeout_s / 2, self.placement_timeout_s - waited + 0.1))
            else:
                waiting_since, timeout = None, 30.0
            done, _ = ray.wait([*running, *probes], num_returns=1, timeout=timeout)
            if not done:
                continue
            ref = done[0]
            if ref in probes:
                actor = probes.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    if e.actor_init_failed:  # the model does not load: no replacement would do better
                        raise
                    replace(actor, type(e).__name__)
                    continue
                idle.append(actor)
                continue
            actor, item = running.pop(ref)
            try:
                rows = ray.get(ref)
            except RayActorError as e:
                if item is not None:
                    queue.appendleft(item)
                replace(actor, type(e).__name__)
                continue
            idle.append(actor)
            if item is None:  # a flush: every item this actor returned is on disk
                unflushed.pop(actor, None)
                continue
            unflushed[actor] = item  # the item before it was flushed by this render
            if item not in taken:
                taken.add(item)
                records.extend(rows)
                bar.update(1)
        bar.close()
        return records


def run_pool(job: SamplerJob, items: list[WorkItem], num_actors: int | None = 1, gpus_per_actor: float = 0.0,
             cpus_per_actor: float = 1.0, progress: bool = True, desc: str = "sampling",
             placement_timeout_s: float = 600.0) -> list[dict]:
    """Render `items` on a pool of sampler actors started for this call alone (`SamplerPool` keeps them
    for a run); skips finished items; a lost actor's item is redone by the others."""
    with SamplerPool(num_actors, gpus_per_actor, cpus_per_actor, placement_timeout_s) as pool:
        return pool.run(job, items, progress, desc)
