"""GPU figures: DiT-XL/2-256 (random weights, bf16) — bank and sampling throughput as a fraction of the
GPU's peak, DAP sampling memory vs the number of real images N, DAP overhead vs vanilla.

The model is the published DiT-XL/2-256 configuration (28 blocks, hidden 1152, patch 2 on a 32x32x4
latent, learned sigma, 1000 classes) with an sd-vae-ft-ema-shaped VAE, built in memory with random
weights (nothing is downloaded) and run through our `DiTBackbone`, `featurize`, `sample_latents` and
`DAPGuidance`. Random weights make the images meaningless but the cost is the real model's.

FLOPs: ≈237 GFLOP per DiT-XL/2-256 forward of one image, counted from the shapes by `dit_forward_flops`
(2 FLOPs per multiply-add; the DiT paper's 118.6 "Gflops" are multiply-adds, fvcore's convention). Sampling does 2 forwards per
image per step (CFG); a bank feature is a forward cut after the guidance layer ℓ, i.e. (ℓ+1)/28 of a
forward (the VAE encode, once per image, is not counted). Fraction of peak = achieved FLOP/s divided by
the GPU's dense bf16 peak (table below, or --peak-tflops).

Without a GPU the script says so and writes its rows as "not yet measured: no GPU lent".
`--cpu-dry-run` runs the same code on a tiny DiT on the CPU to check the code path (its figures are
labelled as such and mean nothing).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    base_parser,
    command_line,
    fmt_bytes,
    fmt_ratio,
    interleaved,
    machine_info,
    md_table,
    median,
    paired_ratio,
    provenance,
    verdict,
    write_section,
)

SECTION = "gpu"
NOT_MEASURED = "not yet measured: no GPU lent"


def dit_forward_flops(depth: int, tokens: int, hidden: int, mlp_ratio: int = 4, patch_in: int = 16, patch_out: int = 32) -> float:
    """FLOPs (2 per multiply-add) of one DiT forward of one image, from its shapes.

    Per block: QKV + output projections 4·N·d², MLP 2·r·N·d², attention scores and values 2·N²·d
    multiply-adds, plus adaLN's 6·d² on the conditioning vector; then the patch embedding (N·p_in·d)
    and the final layer (N·d·p_out + 2·d² adaLN). DiT-XL/2-256: 28 blocks, N = 256, d = 1152 → 118.6 G
    multiply-adds, the figure of the DiT paper's Table 1."""
    block = (4 + 2 * mlp_ratio) * tokens * hidden**2 + 2 * tokens**2 * hidden + 6 * hidden**2
    macs = depth * block + tokens * patch_in * hidden + tokens * hidden * patch_out + 2 * hidden**2
    return 2.0 * macs


GFLOPS_PER_FORWARD = dit_forward_flops(28, 256, 1152) / 1e9  # DiT-XL/2-256, one image: ≈237 GFLOP

# The published DiT-XL/2-256 transformer and the sd-vae-ft-ema VAE shapes.
DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
               patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              scaling_factor=0.18215, sample_size=256)
# --cpu-dry-run: the same layout, tiny.
TINY_DIT = dict(DIT_XL2, num_attention_heads=2, attention_head_dim=8, num_layers=4, sample_size=8)
TINY_VAE = dict(SD_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets; first match wins.
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0)]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return float(override)
    for key, value in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def build_backbone(device: str, dtype: torch.dtype, tiny: bool):
    """DiT-XL/2-256 (or the tiny dry-run twin) with random weights as a DiTBackbone, classes bound."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    from dap_ray.backbones.dit import DiTBackbone
    from dap_ray.data import get_class_list
    from dap_ray.data.types import ClassInfo

    torch.manual_seed(0)
    with torch.device(device):  # initialising 675M parameters is far faster on the GPU
        transformer = DiTTransformer2DModel(**(TINY_DIT if tiny else DIT_XL2))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
    with torch.no_grad():  # adaLN-Zero leaves zeros: randomise so outputs depend on inputs
        for p in transformer.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    bb = DiTBackbone(transformer, sched, vae, latent_scale=0.18215, name="dit_xl2_256", device=device, dtype=dtype)
    classes = [ClassInfo(i, wnid, name) for i, (wnid, name) in enumerate(get_class_list("imagenette")[:2])]
    bb.bind_classes(classes)
    return bb, classes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(device: str, dtype: torch.dtype, tiny: bool, quick: bool, repeats: int, peak: float | None, layer: str) -> dict:
    from dap_ray.bank import Bank, BankSpec, StatsAccumulator, featurize, reduce_chunk
    from dap_ray.methods.dap import DAPGuidance
    from dap_ray.sampling import initial_noise, sample_latents, schedule

    cuda = device.startswith("cuda")
    bb, classes = build_backbone(device, dtype, tiny)
    depth = len(bb.layer_names)
    steps = 5 if quick else 50
    bank_bs = 4 if quick else 64
    sample_bs = 2 if quick else 16
    ns = [10, 100] if quick else [100, 1000, 10000]
    ts = schedule(bb, steps)
    res = {"depth": depth, "layer": layer, "steps": steps, "bank_bs": bank_bs, "sample_bs": sample_bs, "ns": ns}

    # 1. bank throughput: what a bank actor runs per chunk, `reduce_chunk` (VAE encode once, then every
    # timestep's truncated forward, reduced to per-class sums on the device), beside the plain-loop
    # reference `featurize`, which copies every (B, D) feature map to the host.
    spec = BankSpec(model={"type": "dit"}, model_fingerprint="gpu-bench", layers=(layer,), timesteps=tuple(ts), pooling="tokens",
                    seed=0, resolution=bb.resolution, batch_size=bank_bs)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (bank_bs, bb.resolution, bb.resolution, 3), dtype=np.uint8)
    labels = np.arange(bank_bs) % len(classes)
    ids = [str(i) for i in range(bank_bs)]

    ok = np.ones(bank_bs, bool)
    keep = np.zeros(bank_bs, bool)

    def bank_batch():
        reduce_chunk(bb, spec, images, labels, ids, ok, keep)
        sync(device)

    def loop_batch():
        featurize(bb, spec, images, labels, ids)
        sync(device)

    times = interleaved({"bank": bank_batch, "loop": loop_batch}, repeats)
    frac = (int(layer) + 1) / depth
    for key, name in (("bank", "bank"), ("loop", "bank_loop")):
        its = bank_bs * len(ts) / median(times[key])  # image x timesteps / s
        res[f"{name}_its"] = its
        res[f"{name}_frac_peak"] = its * GFLOPS_PER_FORWARD * frac * 1e9 / (peak * 1e12) if peak else None

    # 2./4. sampling: vanilla vs DAP (default t_stop 400, γ 5) on one class, interleaved.
    with torch.no_grad():
        dim = bb.features(torch.zeros((1, *bb.latent_shape), device=bb.device), ts[0], torch.zeros(1, dtype=torch.long), [layer])[layer]
    D = int(dim.shape[1] * dim.shape[2])  # tokens x hidden

    def make_bank(n: int) -> Bank:
        """A bank whose statistics summarise n real features per class. The mean form's guidance data is
        (count, Σφ, Σ‖φ‖²) per (class, timestep) whatever n, so the sums are drawn directly (random
        weights: feature values do not change the cost); featurising n x T DiT-XL token maps on the
        host would need n x T x D floats for nothing."""
        acc = StatsAccumulator(len(classes), spec, {layer: D})
        g = np.random.default_rng(n)
        mean = g.standard_normal((len(classes), len(ts), D))  # (C, T, D) float64
        acc.count[:] = n
        acc.sum[layer] = mean * n
        acc.sum_sq[layer] = ((mean**2).sum(-1) + D) * n  # E||φ||² = ||μ||² + D for unit-variance features
        return Bank("memory://gpu-bench", spec, list(classes), acc, [], {})

    noise = torch.stack([initial_noise(bb.latent_shape, 0, "gpu", i) for i in range(sample_bs)])
    y = torch.zeros(sample_bs, dtype=torch.long)
    bank0 = make_bank(ns[0])
    dap_g = DAPGuidance(bank0, layer, "linear", 5.0, 400, "tokens")

    def vanilla():
        sample_latents(bb, noise, y, steps, cfg_scale=2.0)
        sync(device)

    def dap():
        sample_latents(bb, noise, y, steps, cfg_scale=2.0, guidance=dap_g)
        sync(device)

    def dap_separate():  # the guidance pass runs its own conditional forward up to the layer
        sample_latents(bb, noise, y, steps, cfg_scale=2.0, guidance=dap_g, share_prefix=False)
        sync(device)

    st = interleaved({"vanilla": vanilla, "dap": dap, "dap_separate": dap_separate}, repeats)
    ips = sample_bs / median(st["vanilla"])
    res["vanilla_ips"] = ips
    res["dap_ips"] = sample_bs / median(st["dap"])
    res["vanilla_frac_peak"] = ips * steps * 2 * GFLOPS_PER_FORWARD * 1e9 / (peak * 1e12) if peak else None
    res["dap_ratio"] = paired_ratio(st["dap"], st["vanilla"])
    res["share_ratio"] = paired_ratio(st["dap"], st["dap_separate"])
    res["guided_steps"] = sum(1 for t in ts if dap_g.applies(t))

    # 3. memory of DAP sampling vs N (every step guided: t_stop 0): our mean form, and for contrast the
    # exact form over N resident real features of the sampled class (guidance_scaling.ExactGuidance).
    from benchmarks.guidance_scaling import ExactGuidance

    def peak_of(fn) -> int | None:
        if not cuda:
            fn()
            return None
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated())

    mem, mem_exact = {}, {}
    mem_steps = min(steps, 5)
    for n in ns:
        g = DAPGuidance(make_bank(n), layer, "linear", 5.0, 0, "tokens")
        mem[n] = peak_of(lambda g=g: sample_latents(bb, noise, y, mem_steps, cfg_scale=2.0, guidance=g))
        del g
        try:
            real = torch.randn((n, D), generator=torch.Generator(device=bb.device).manual_seed(n), device=bb.device)  # (N, D)
            ge = ExactGuidance({0: real}, layer, 5.0, 0, "tokens")
            mem_exact[n] = peak_of(lambda ge=ge: sample_latents(bb, noise, y, mem_steps, cfg_scale=2.0, guidance=ge))
            del ge, real
        except torch.cuda.OutOfMemoryError:
            mem_exact[n] = "out of memory"
        if cuda:
            torch.cuda.empty_cache()
    res["mem"], res["mem_exact"], res["mem_steps"] = mem, mem_exact, mem_steps
    res["weights"] = int(torch.cuda.memory_allocated()) if cuda else None
    res["D"] = D
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="run the code path on a tiny DiT on the CPU (figures meaningless)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the built-in table")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--layer", default="8", help="guidance layer (dap_ray/conf/model/dit_xl2_256: 8)")
    args = p.parse_args(argv)
    info = machine_info()
    cmd = command_line("gpu.py", argv)
    has_gpu = torch.cuda.is_available()
    head = ["## GPU: DiT-XL/2-256, bf16 (`benchmarks/gpu.py`)", "", provenance(info, cmd)]

    if not has_gpu and not args.cpu_dry_run:
        print(f"[{SECTION}] no CUDA device on this machine: {NOT_MEASURED}", flush=True)
        rows = [[what, NOT_MEASURED, target, verdict(None)] for what, target in (
            ("bank throughput (image x timesteps/s) and fraction of peak", "informative"),
            ("sampling images/s (vanilla, CFG) and fraction of peak", "informative"),
            ("GPU memory of DAP sampling vs N = 100 / 1,000 / 10,000", "flat"),
            ("DAP time / vanilla time (default t_stop)", "<= 1.5"),
            ("DAP time / DAP with a separate guidance forward (prefix taped once)", "< 1.0"),
        )]
        body = "\n".join(head + [
            f"- **{NOT_MEASURED}.** This machine has no CUDA device (`torch.cuda.is_available()` is False); run "
            "`python benchmarks/gpu.py` on a GPU machine to fill this section. (`tests/test_gpu.py` checks the same path "
            "for correctness there.)",
            "",
            md_table(["figure", "measured", "target", "result"], rows),
        ])
        write_section(args.out, SECTION, body)
        print(body)
        return 0

    device = "cuda" if has_gpu and not args.cpu_dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tiny = device == "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU dry run"
    peak = peak_tflops(name, args.peak_tflops) if device == "cuda" else None
    repeats = args.repeats or (1 if args.quick else 5)
    layer = "1" if tiny else str(args.layer)
    t0 = time.perf_counter()
    r = measure(device, dtype, tiny, args.quick or tiny, repeats, peak, layer)
    elapsed = time.perf_counter() - t0

    def pct(x: float | None) -> str:
        return "n/a (unknown peak: --peak-tflops)" if x is None else f"{100 * x:.1f} %"

    mems = r["mem"]
    flat = None
    if all(v is not None for v in mems.values()):
        flat = max(mems.values()) / min(mems.values())
    def check(ok: bool | None) -> str:
        return verdict(ok) if device == "cuda" else "dry run"

    rows = [
        [f"bank (`reduce_chunk`, the actors' path): image x timesteps/s (batch {r['bank_bs']}, {r['steps']} timesteps, cut after block {r['layer']})",
         f"{r['bank_its']:.1f}", "informative", "—"],
        [f"bank: fraction of peak ({(int(r['layer']) + 1)}/{r['depth']} of {GFLOPS_PER_FORWARD:.0f} GFLOP per image x timestep)", pct(r["bank_frac_peak"]),
         "informative", "—"],
        ["for contrast: the plain-loop `featurize` (every (B, D) map copied to the host): image x timesteps/s, fraction of peak",
         f"{r['bank_loop_its']:.1f}, {pct(r['bank_loop_frac_peak'])}", "—", "—"],
        [f"sampling vanilla: images/s (batch {r['sample_bs']}, {r['steps']} DDIM steps, CFG 2)", f"{r['vanilla_ips']:.3f}", "informative", "—"],
        [f"sampling vanilla: fraction of peak (2 x {GFLOPS_PER_FORWARD:.0f} GFLOP per image x step)", pct(r["vanilla_frac_peak"]), "informative", "—"],
        [f"sampling DAP: images/s (t_stop 400: {r['guided_steps']} of {r['steps']} steps guided)", f"{r['dap_ips']:.3f}", "informative", "—"],
        ["DAP time / vanilla time", fmt_ratio(r["dap_ratio"]), "<= 1.5", check(r["dap_ratio"][0] <= 1.5)],
        ["DAP time / DAP with a separate guidance forward (prefix taped once)", fmt_ratio(r["share_ratio"]), "< 1.0",
         check(r["share_ratio"][0] < 1.0)],
        [f"DAP peak memory (mean form, ours), N = {' / '.join(f'{n:,}' for n in mems)} real/class",
         " / ".join(fmt_bytes(v) for v in mems.values()), "flat",
         check(None if flat is None else flat <= 1.01) + ("" if flat is None else f" (max/min {flat:.3f})")],
        [f"for contrast: exact form over N resident features, N = {' / '.join(f'{n:,}' for n in r['mem_exact'])}",
         " / ".join(v if isinstance(v, str) else fmt_bytes(v) for v in r["mem_exact"].values()), "—", "—"],
    ]
    label = f"{name}, peak {peak} TFLOP/s bf16 dense" if device == "cuda" else "**CPU dry run of the code path (tiny DiT, fp32): not GPU figures**"
    body = "\n".join(head + [
        f"- **Device:** {label}; weights resident {fmt_bytes(r['weights'])}; feature D = {r['D']:,}; {elapsed:.0f} s in all.",
        f"- **Setup:** DiT-XL/2-256 layout, random weights, {dtype}; DAP γ 5, linear kernel, layer {r['layer']}, tokens pooling. "
        f"Memory vs N: a few DAP steps with every step guided, banks of N synthetic real features per class "
        "(random weights: the values do not change the cost).",
        "",
        md_table(["figure", "measured", "target", "result"], rows),
    ])
    write_section(args.out, SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
