"""224-px evaluation trainings per hour on this machine (IGD hard-label protocol, PROTOCOLS.md §3.2).

Times, per net of the preset (ConvNet-6, ResNetAP-10, ResNet-18 with instance norm), one training
epoch of `dap_ray.eval.train.train_hard_label` on an IPC-10, 10-class set at 224 px (100 images,
batch 64: IDC augmentation, CutMix, AdamW, on the device the script runs on) and one test pass over
`--test` images, then extrapolates to the protocol's budget: 2000 epochs and a test every 20 epochs
on 500 images (50 per class). Random pixels: the cost does not depend on what the images show.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import base_parser, command_line, machine_info, md_table, provenance, write_section  # noqa: E402

SECTION = "eval_throughput"
ARCHS = ("convnet6", "resnetap10", "resnet18_in")


def main(argv: list[str] | None = None) -> int:
    from dap_ray.eval.train import TrainConfig, build_model, evaluate, train_hard_label

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--test", type=int, default=128, help="test images timed (the estimate scales to 500)")
    args = p.parse_args(argv)
    info = machine_info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res, n_train, n_test = (16, 8, 4) if args.quick else (224, 100, args.test)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train, 3, res, res), dtype=torch.uint8, generator=g)
    y = torch.arange(n_train) % 10
    xt = torch.randint(0, 256, (n_test, 3, res, res), dtype=torch.uint8, generator=g)
    yt = torch.arange(n_test) % 10
    epochs, test_every, test_n = 2000, 20, 500  # IGD at IPC 10: 2000 epochs, tested every E/100 on 50 x 10 images
    rows = []
    for arch in ARCHS:
        cfg = TrainConfig.igd(ipc=10, nclass=10).with_(epochs=1, num_classes=10)
        t0 = time.perf_counter()
        out = train_hard_label(x, y, xt[:2], yt[:2], arch, cfg, seed=0, device=device)
        epoch_s = float(out["train_seconds"])  # one epoch, includes the first step's warm-up
        model = build_model(arch, 10, x[:2], cfg).to(device)
        evaluate(model, xt[:2], yt[:2], device, 64)  # warm-up
        t_eval = time.perf_counter()
        evaluate(model, xt, yt, device, 64)
        test_s = (time.perf_counter() - t_eval) * test_n / n_test
        total = epochs * epoch_s + (epochs // test_every) * test_s
        rows.append((arch, f"{epoch_s:.2f}", f"{test_s:.2f}", f"{total / 3600:.1f}", f"{3600 / total:.3f}"))
        print(arch, rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    body = "\n".join([
        "## Evaluation trainings at 224 px (`benchmarks/eval_throughput.py`)",
        "",
        provenance(info, command_line("eval_throughput.py", argv if argv is not None else sys.argv[1:])),
        f"- **Device:** {device}{' (--quick: 16 px, figures meaningless)' if args.quick else ''}",
        "- **What:** one epoch of the IGD hard-label recipe on an IPC-10 x 10-class set (100 images, batch 64, IDC "
        "augmentation + CutMix, AdamW), one test pass (scaled to 500 images); the estimate is 2000 epochs + 100 tests.",
        "",
        md_table(["net", "s / epoch (100 images)", "s / test pass (500 images)", "hours / training", "trainings / hour"], rows),
    ])
    write_section(args.out, SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
