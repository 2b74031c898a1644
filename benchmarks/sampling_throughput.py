"""Sampling throughput: vanilla vs DAP with our sampler, and our vanilla sampler vs diffusers' DiTPipeline.

All three run the digits DiT in this process, on the same batch (one class, as a work item is), with
the default run's knobs (dap_ray/conf/: DDIM steps, CFG scale, batch size, γ, t_stop, layer):

* **vanilla**: `dap_ray.sampling.sample_latents` without guidance, then `backbone.decode`;
* **DAP**: the same call with `DAPGuidance` on a real bank (`build_bank` over the digits training set,
  the default run's bank spec, built once — or reused from the cache, as the default run would);
* **DAP, separate guidance forward**: the same with `share_prefix=False`, the guidance pass running its
  own conditional forward up to the layer instead of taping the CFG forward's (the gain of sharing);
* **DiTPipeline**: diffusers' own `DiTPipeline` with a `DDIMScheduler` from the same scheduler config.

Then the sampler actor's own work loop (`SamplerWorker.render`, PNGs written), vanilla, at IPC 1 over
every class, which is where batching matters most:

* **one class per batch**: a work item per class (1 image each), what the sampler did before batches
  spanned classes;
* **batches across classes**: `work_items` (`sampler.batch_size` images over several classes);
* **pipelined writes**: the same items with the PNGs encoded and written on the writer threads while the
  next batch samples (`render(wait=False)`, what the pool does) instead of between batches;

and the cost of encoding and writing one 256 x 256 RGB PNG, the time pipelining takes off the loop per
image at DiT-XL/2's resolution.

DiTPipeline cannot take the pixel-space digits DiT as it is, for two reasons it hard-codes: the null
(unconditional) class id is 1000 (ImageNet's), and it always decodes through `vae.decode(latents /
vae.config.scaling_factor)`. Two zero-cost shims make it run the *same* transformer: `NullLabelShim`
maps label 1000 to this model's null id (one `torch.where` per forward) and `IdentityVAE` returns the
latents (our backbone's `decode` is the identity for a pixel-space model too). Everything else —
the CFG batching, the scheduler step, the loop — is diffusers' code.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._common import (  # noqa: E402
    base_parser,
    command_line,
    default_config,
    digits_setup,
    fmt_ratio,
    interleaved,
    machine_info,
    md_table,
    median,
    paired_ratio,
    provenance,
    quiet_ray_data,
    subset_per_class,
    verdict,
    write_section,
)

SECTION = "sampling_throughput"
PIPELINE_NULL_ID = 1000  # DiTPipeline's hard-coded unconditional class


class NullLabelShim(nn.Module):
    """The transformer, with DiTPipeline's null label 1000 mapped to the model's own null id."""

    def __init__(self, transformer: nn.Module, null_id: int):
        super().__init__()
        self.inner, self.null_id = transformer, null_id
        self.config = transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict: bool = True):
        labels = torch.where(class_labels == PIPELINE_NULL_ID, torch.full_like(class_labels, self.null_id), class_labels)
        return self.inner(hidden_states, timestep=timestep, class_labels=labels, return_dict=return_dict)


class IdentityVAE(nn.Module):
    """A pixel-space model has no VAE: decode(z) = z (3 channels, as our backbone's decode gives)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def decode(self, z: torch.Tensor):
        return SimpleNamespace(sample=z.expand(-1, 3, -1, -1) if z.shape[1] == 1 else z)


def make_pipeline(bb):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=NullLabelShim(bb.transformer, bb.num_model_classes), vae=IdentityVAE(),
                       scheduler=DDIMScheduler.from_config(bb.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_bank(cfg, bb, ds, cache_dir: str, per_class: int | None):
    """The default run's bank (reused from cache_dir when it is there), or one over a per-class subset."""
    import ray

    from dap_ray.bank import build_bank, make_spec
    from dap_ray.config import guidance_layer
    from dap_ray.data.types import DatasetSplits
    from dap_ray.runtime import actor_count

    data = ds if per_class is None else DatasetSplits(ds.name, ds.root, ds.classes, subset_per_class(ds.train, per_class), [])
    spec = make_spec(cfg, bb, [guidance_layer(cfg)])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    quiet_ray_data()
    try:
        t0 = time.perf_counter()
        r = cfg.runtime  # the default run's actor count (null: auto, from the Ray running now)
        actors = actor_count(r.bank_actors, float(r.gpus_per_actor), float(r.cpus_per_actor))
        bank = build_bank(spec, data, cache_dir, num_actors=actors, progress=False)
        return bank, time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--label", type=int, default=0, help="the class sampled (dataset label)")
    p.add_argument("--model", default=None, help="diffusers DiT directory (default: the packaged digits DiT)")
    p.add_argument("--cache-dir", default=None, help="dap_ray cache holding the digits data and the bank (default: the run's, ~/.cache/dap_ray)")
    p.add_argument("--bank-per-class", type=int, default=None, help="build the bank over this many images per class (default: all)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: dap_ray/conf/sampler)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: dap_ray/conf/sampler)")
    args = p.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 7)

    info = machine_info()
    from dap_ray.config import cfg_scale as resolved_cfg_scale
    from dap_ray.config import guidance_layer, to_structured
    from dap_ray.methods.dap import DAPGuidance
    from dap_ray.sampling import initial_noise, sample_latents, schedule

    overrides_cfg = default_config(args.model)
    cfg = to_structured(overrides_cfg)
    steps = args.steps or (5 if quick else int(cfg.sampler.steps))
    batch = args.batch or (2 if quick else int(cfg.sampler.batch_size))
    cfg.sampler.steps = steps
    cache_dir = args.cache_dir or os.path.expanduser(str(cfg.cache_dir))
    bank_per_class = args.bank_per_class if args.bank_per_class is not None else (1 if quick else None)
    bb, ds, _ = digits_setup(args.model, cache_dir)
    bank, bank_s = get_bank(cfg, bb, ds, cache_dir, bank_per_class)
    m = cfg.method
    layer = guidance_layer(cfg)
    guidance = DAPGuidance(bank, layer, str(m.kernel), float(m.gamma), int(m.t_stop), str(m.pooling))
    ts = schedule(bb, steps)
    guided = sum(1 for t in ts if guidance.applies(t))
    cfg_scale = resolved_cfg_scale(cfg)  # sampler.cfg_scale null = the model's own

    label = int(args.label)
    noise = torch.stack([initial_noise(bb.latent_shape, "bench", i) for i in range(batch)])  # (B, C, h, w)
    y = torch.full((batch,), label, dtype=torch.long)
    pipe = make_pipeline(bb)
    model_label = int(bb.model_labels(torch.tensor([label]))[0])

    def vanilla():
        with torch.no_grad():
            return bb.decode(sample_latents(bb, noise, y, steps, cfg_scale))

    def dap():
        lat = sample_latents(bb, noise, y, steps, cfg_scale, guidance=guidance)
        with torch.no_grad():
            return bb.decode(lat)

    def dap_separate():  # the guidance pass runs its own conditional forward up to the layer
        lat = sample_latents(bb, noise, y, steps, cfg_scale, guidance=guidance, share_prefix=False)
        with torch.no_grad():
            return bb.decode(lat)

    def pipeline():
        return pipe(class_labels=[model_label] * batch, guidance_scale=cfg_scale, generator=torch.Generator().manual_seed(0),
                    num_inference_steps=steps, output_type="pt").images

    # Same noise for both vanilla samplers: the pipeline draws randn(shape, generator(0)).
    same_noise = torch.randn((batch, *bb.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bb.decode(sample_latents(bb, same_noise, y, steps, cfg_scale))  # (B, 3, R, R) in [-1, 1]
    theirs = pipeline() * 2 - 1  # the pipeline returns (x / 2 + 0.5).clamp(0, 1)
    agree = float((ours.clamp(-1, 1) - theirs).abs().max())
    clip = bool(bb.scheduler_config.get("clip_sample", False))
    agree_noclip = None
    if clip:  # the one known difference (see the section): compare once more with clipping off in both
        bb.scheduler_config["clip_sample"] = False
        try:
            pipe_nc = make_pipeline(bb)
            with torch.no_grad():
                ours_nc = bb.decode(sample_latents(bb, same_noise, y, steps, cfg_scale)).clamp(-1, 1)
            theirs_nc = pipe_nc(class_labels=[model_label] * batch, guidance_scale=cfg_scale, generator=torch.Generator().manual_seed(0),
                                num_inference_steps=steps, output_type="pt").images * 2 - 1
            agree_noclip = float((ours_nc - theirs_nc).abs().max())
        finally:
            bb.scheduler_config["clip_sample"] = True

    print(f"[{SECTION}] batch {batch}, {steps} steps ({guided} guided), {repeats} rounds", flush=True)
    cpu: dict[str, list[float]] = {}
    times = interleaved({"vanilla": vanilla, "dap": dap, "dap_separate": dap_separate, "pipeline": pipeline}, repeats, cpu_out=cpu,
                        on_round=lambda r: print(f"  round {r + 1}/{repeats}", flush=True))
    dap_ratio = (paired_ratio(times["dap"], times["vanilla"]), paired_ratio(cpu["dap"], cpu["vanilla"]))
    pipe_ratio = (paired_ratio(times["pipeline"], times["vanilla"]), paired_ratio(cpu["pipeline"], cpu["vanilla"]))
    sep_ratio = (paired_ratio(times["dap_separate"], times["vanilla"]), paired_ratio(cpu["dap_separate"], cpu["vanilla"]))
    share_ratio = (paired_ratio(times["dap"], times["dap_separate"]), paired_ratio(cpu["dap"], cpu["dap_separate"]))
    rows = [[name, f"{median(times[k]):.2f} / {median(cpu[k]):.2f}", f"{batch / median(times[k]):.2f} / {batch / median(cpu[k]):.2f}",
             r if isinstance(r, str) else f"{fmt_ratio(r[0])} / {fmt_ratio(r[1])}"] for name, k, r in (
        ("ours, vanilla (`sample_latents`)", "vanilla", "1.00"),
        (f"ours, DAP (γ {m.gamma}, t_stop {m.t_stop}, layer {layer})", "dap", dap_ratio),
        ("ours, DAP with a separate guidance forward (`share_prefix=False`)", "dap_separate", sep_ratio),
        ("diffusers `DiTPipeline` + DDIMScheduler", "pipeline", pipe_ratio),
    )]

    def target_row(what: str, r, target: str, ok) -> list[str]:
        return [what, fmt_ratio(r[0]), fmt_ratio(r[1]), target, f"{verdict(ok(r[0][0]))} / {verdict(ok(r[1][0]))}"]

    targets = [
        target_row("DAP time / vanilla time", dap_ratio, "<= 1.5", lambda v: v <= 1.5),
        target_row("DiTPipeline time / our vanilla time", pipe_ratio, ">= 1.0", lambda v: v >= 1.0),
        target_row(f"DAP time / DAP with a separate guidance forward (blocks 0..{layer} taped once)", share_ratio, "< 1.0",
                   lambda v: v < 1.0),
    ]
    bank_line = (f"reused from the cache ({bank.path}, built earlier in {bank.meta.get('build_seconds', '?')} s)" if bank.meta.get("reused")
                 else f"built in {bank_s:.0f} s ({bank.path})")
    body = "\n".join([
        "## Sampling throughput (`benchmarks/sampling_throughput.py`)",
        "",
        provenance(info, command_line("sampling_throughput.py", argv)),
        f"- **Setup:** digits DiT ({args.model or 'dap_ray/zoo/digits_dit'}), batch {batch} of class {ds.classes[label].key!r}, "
        f"{steps} DDIM steps, CFG {cfg_scale}, fp32 on CPU, decode included. DAP: γ {m.gamma}, {m.kernel} kernel, layer {layer}, "
        f"`{m.pooling}` pooling, t_stop {m.t_stop} (the default) = {guided} of {steps} steps guided. {repeats} interleaved "
        "rounds, median; ratio = time / our vanilla time per round (median, IQR). Times are given as wall clock and as "
        "this process's CPU time (`time.process_time`; all three samplers run single-threaded in this process, so CPU "
        "time is their cost without the waits for a core that dominate the noise on this shared machine).",
        f"- **Bank:** {bank.meta.get('images')} real images x {len(bank.spec.timesteps)} timesteps, {bank_line}.",
        "- **DiTPipeline shims** (so it runs this pixel-space model at all): label 1000 → the model's null id, identity VAE. "
        f"**Check:** from the same initial noise the two vanilla samplers' images differ by at most {agree:.2e}"
        + (f" with this model's `clip_sample=True`, and by {agree_noclip:.1e} with clipping off in both: diffusers' DDIM keeps "
           "the unclipped ε in the direction term after clipping x̂₀ (`use_clipped_model_output=False`, what DiTPipeline "
           "calls), ours re-derives ε from the clipped x̂₀, so trajectories that hit the clip differ; the cost is the same."
           if clip else "."),
        "",
        "| figure | wall-time ratio (median, IQR) | CPU-time ratio (median, IQR) | target | result (wall / CPU) |",
        "|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in targets],
        "",
        md_table(["sampler", "s per batch (wall / CPU)", "images/s (wall / CPU)", "time / our vanilla (wall / CPU)"], rows),
    ])
    body += "\n\n" + worker_figures(bb, ds, cfg, steps, cfg_scale, batch, repeats, quick)
    write_section(args.out, SECTION, body)
    print(body)
    return 0


def worker_figures(bb, ds, cfg, steps: int, cfg_scale: float, batch: int, repeats: int, quick: bool) -> str:
    """The sampler actor's loop at IPC 1 over every class: one class per batch vs batches across classes,
    and writes between batches vs on the writer threads; plus one 256-px PNG's encode-and-write time."""
    import tempfile

    import numpy as np

    from dap_ray.sampling import SamplerJob, SamplerWorker, WorkItem, work_items, write_png_atomic

    classes = tuple(ds.classes)
    job = SamplerJob(model=dict(cfg.model), classes=classes, out_dir="", seed=0, steps=steps, cfg_scale=cfg_scale,
                     eta=0.0, dtype="fp32")
    worker = SamplerWorker(job, "cpu")
    per_class = [WorkItem.of_class("vanilla", c, 0, 1) for c in range(len(classes))]
    packed = work_items("vanilla", len(classes), 1, batch)
    tmp = tempfile.mkdtemp(prefix="bench_worker_")
    counter = iter(range(10**9))

    def render(items, wait: bool):
        def go():
            worker.job = SamplerJob(**{**job.__dict__, "out_dir": f"{tmp}/{next(counter)}"})  # fresh: nothing to skip
            for it in items:
                worker.render(it, wait=wait)
            worker.flush()
        return go

    cpu: dict[str, list[float]] = {}
    variants = {"per_class": render(per_class, True), "packed": render(packed, True), "pipelined": render(packed, False)}
    times = interleaved(variants, repeats, cpu_out=cpu)
    n = len(classes)
    packed_ratio = paired_ratio(times["packed"], times["per_class"])
    pipe_ratio = paired_ratio(times["pipelined"], times["packed"])
    rows = [[name, f"{len(items)} x {label}", f"{median(times[k]):.2f}", f"{n / median(times[k]):.1f}", r] for name, k, items, label, r in (
        ("one class per batch, writes between batches", "per_class", per_class, "1 image", "1.00"),
        (f"batches across classes ({batch}), writes between batches", "packed", packed, f"<= {batch} images", fmt_ratio(packed_ratio)),
        (f"batches across classes ({batch}), pipelined writes", "pipelined", packed, f"<= {batch} images",
         fmt_ratio(paired_ratio(times["pipelined"], times["per_class"]))),
    )]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)  # a gradient: compresses like a photo's sky
    noisy = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # incompressible: the worst case
    png_ms = {}
    for name, img in (("gradient", smooth), ("noise", noisy)):
        reps = 3 if quick else 20
        t0 = time.perf_counter()
        for i in range(reps):
            write_png_atomic(f"{tmp}/png/{name}_{i}.png", img)
        png_ms[name] = 1000 * (time.perf_counter() - t0) / reps
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return "\n".join([
        "### The sampler actor's loop: batches across classes, pipelined PNG writes",
        "",
        f"- **Setup:** `SamplerWorker.render` (vanilla, PNGs written to local disk), IPC 1 over the {n} classes, {steps} DDIM steps, "
        f"batch {batch}; {repeats} interleaved rounds, median; ratio per round (median, IQR).",
        f"- **Encoding and writing one 256 x 256 RGB PNG** (`write_png_atomic`): {png_ms['gradient']:.1f} ms for a smooth image, "
        f"{png_ms['noise']:.1f} ms for noise: with pipelining that time runs on the writer threads beside the next batch, "
        "off the GPU's loop. The digits images here are 8 px, so their writes cost little and the pipelining gain on this "
        "CPU is small; the batching gain is what one forward over many images buys.",
        "",
        md_table(["variant", "items", "s for all classes", "images/s", "time / one class per batch"], rows),
        "",
        f"- Batches across classes take {fmt_ratio(packed_ratio)} of the time of one class per batch; pipelined writes "
        f"{fmt_ratio(pipe_ratio)} of the time of writes between batches.",
    ])


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
