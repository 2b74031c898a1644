"""Train the embedded default's diffusion model: a tiny class-conditional DiT on scikit-learn's digits.

    python -m dap_ray.zoo.train_digits_dit            # ~minutes on 2 CPUs, seeded
    python -m dap_ray.zoo.train_digits_dit --steps 200 --out /tmp/dit   # a quick smoke run

Real handwritten 8x8 digits (the *training* split of dap_ray's fixed digits split only), pixel space
(1 channel, no VAE), patch 2 -> 16 tokens, 6 blocks of 4 heads x 32. DDPM with 1000 cosine steps,
epsilon prediction, AdamW, EMA. Saved in diffusers format (transformer/ + scheduler/ + classes.json),
safetensors only, then checked: a classifier trained on the real digits labels DDIM-50 samples.

Two diffusers details matter (see DESIGN.md §8): each block has its own label embedder with its own
label dropout, so we set all dropout to 0 and drop labels to the null id ourselves, once per sample,
for the whole network; and diffusers does not zero-initialise adaLN-Zero, so we do.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel

OUT = Path(__file__).resolve().parent / "digits_dit"
CLASSES = [str(i) for i in range(10)]


def digits_train_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The train split as the data layer stores it: uint8 0..255 (B,8,8) and labels."""
    from dap_ray.data.digits import digits_split

    x, y, _ = digits_split()["train"]
    return x, y


def to_model_space(x_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (B,8,8) -> float (B,1,8,8) in [-1,1], the same map the backbone's encode applies."""
    return torch.from_numpy(x_uint8).float().div(127.5).sub(1.0).unsqueeze(1)


def build_model(seed: int) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=1,
        out_channels=1,
        num_layers=6,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=10,  # number of classes; the label table gets a null row (id 10)
    )
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
        nn_zero(block.norm1.linear)
    nn_zero(model.proj_out_1)
    nn_zero(model.proj_out_2)
    return model


def nn_zero(layer: torch.nn.Module) -> None:
    torch.nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        torch.nn.init.zeros_(layer.bias)


def train(steps: int, batch: int, lr: float, seed: int, p_uncond: float = 0.1, log_every: int = 100):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_np, y_np = digits_train_arrays()
    x_all, y_all = to_model_space(x_np), torch.from_numpy(y_np).long()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)
    ab = sched.alphas_cumprod.float()
    model = build_model(seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=gen) < p_uncond] = 10  # null class, once per sample
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(x_t, timestep=t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # EMA with warm-up: early (random) weights must not dominate a short run
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    return ema, sched, time.time() - t0


def save(model: DiTTransformer2DModel, sched: DDPMScheduler, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    (out / "classes.json").write_text(json.dumps({"classes": CLASSES, "names": [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]}, indent=1))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "_diffusers_version": "0.42.1",
                                                      "scheduler": ["diffusers", "DDPMScheduler"],
                                                      "transformer": ["diffusers", "DiTTransformer2DModel"]}, indent=1))
    (out / "training.json").write_text(json.dumps(meta, indent=1))


def recognition_rate(model_dir: Path, per_class: int = 50, cfg_scale: float = 2.0, seed: int = 0) -> tuple[float, np.ndarray]:
    """Sample `per_class` DDIM-50 images per class; the share a real-digits classifier labels right."""
    from sklearn.linear_model import LogisticRegression

    from dap_ray.backbones.dit import DiTBackbone
    from dap_ray.data.digits import digits_split
    from dap_ray.data.types import ClassInfo
    from dap_ray.sampling import sample_latents

    split = digits_split()
    (xtr, ytr, _), (xte, yte, _) = split["train"], split["test"]
    clf = LogisticRegression(max_iter=5000).fit(xtr.reshape(len(xtr), -1) / 255.0, ytr)
    real_acc = clf.score(xte.reshape(len(xte), -1) / 255.0, yte)
    bb = DiTBackbone.from_pretrained(str(model_dir))
    bb.bind_classes([ClassInfo(i, str(i), str(i)) for i in range(10)])
    y = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn((len(y), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        lat = sample_latents(bb, noise, y, steps=50, cfg_scale=cfg_scale)
    imgs = Backbone_to_uint8(bb.decode(lat))  # (B,8,8)
    pred = clf.predict(imgs.reshape(len(imgs), -1) / 255.0)
    print(f"classifier accuracy on real test digits: {real_acc:.3f}")
    return float((pred == y.numpy()).mean()), imgs


def Backbone_to_uint8(x: torch.Tensor) -> np.ndarray:  # noqa: N802
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def save_grid(imgs: np.ndarray, per_class: int, path: Path, cols: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(10, cols, figsize=(cols * 0.6, 6.2))
    for c in range(10):
        for j in range(cols):
            ax = axes[c, j]
            ax.imshow(imgs[c * per_class + j], cmap="gray_r", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[c, 0].set_ylabel(str(c), rotation=0, labelpad=8)
    fig.suptitle("digits DiT: class-conditional DDIM-50 samples (CFG 2), one row per class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ema, sched, secs = train(args.steps, args.batch, args.lr, args.seed)
    meta = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "ema": "0.999 with warm-up min(0.999, (1+step)/(10+step))",
            "train_seconds": round(secs, 1), "torch": torch.__version__}
    save(ema, sched, args.out, meta)
    rate, imgs = recognition_rate(args.out)
    meta["recognition_rate_cfg2_ddim50"] = round(rate, 4)
    (args.out / "training.json").write_text(json.dumps(meta, indent=1))
    save_grid(imgs, 50, args.out / "samples.png")
    print(f"recognition rate of class-conditional samples: {rate:.3f}; saved to {args.out}")


if __name__ == "__main__":
    main()
