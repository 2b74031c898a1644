"""Training protocols of the peer papers, as pure torch (one call = one Ray task for the lead).

* :func:`train_hard_label`: IDC/Minimax/IGD hard-label evaluation (PROTOCOLS.md §3): train a
  fresh net on the distilled images with one-hot labels (CutMix-mixed cross entropy), test on the
  real held-out split, report the best test top-1 seen at the evaluation points (as every peer
  codebase does, PROTOCOLS.md §7 Q5) and the last one.
* :func:`train_teacher`: the teacher for soft labels, trained on the full real training split.
* :func:`train_soft_label`: RDED ``validation/main.py`` (PROTOCOLS.md §4.1): the same CutMix-ed,
  augmented batch goes to the frozen teacher and the student; loss = KL(student log-softmax(z/T) ||
  softmax(teacher/T)), ``batchmean``, no T^2 factor.

Inputs are float tensors (N, C, R, R) in [0, 1] at the evaluation resolution and integer labels
(N,). Images are not resized here (the peers' Resize + CenterCrop happens when the tensors are made).
Normalisation is part of the net (:class:`dap_ray.eval.nets.Normalized`), so a teacher keeps its
own statistics. Deterministic on CPU for a seed: model init and dropout use the seeded global RNG
inside ``torch.random.fork_rng`` (the caller's RNG state is left untouched), data order and
augmentation use their own seeded generators.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dap_ray.errors import ConfigError, UserError
from dap_ray.eval import nets
from dap_ray.eval.augment import MIXES, Augmenter, parse_pipeline

log = logging.getLogger(__name__)

Report = Callable[[int, float], None]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "half_cosine", "cosine", "constant")
NORMALIZE = ("imagenet", "train", "none")
METRICS = ("best", "last")

#: RDED ``argument.py`` AdamW learning rates per student (others: 1e-3).
RDED_LR: dict[str, float] = {"mobilenetv2": 2.5e-3, "efficientnet_b0": 2e-3, "resnet101": 1e-3, "swin": 1e-4}


@dataclass
class TrainConfig:
    """Knobs of one evaluation training. Defaults = IGD hard label (IGD ``train.py``), which DAP follows.

    Use the presets for the other recipes: :meth:`igd`, :meth:`minimax` (= IDC), :meth:`rded`,
    :meth:`teacher`.
    """

    epochs: int = 2000  # IDC/MMX ``ipc_epoch`` at IPC 10 (see epochs_for_ipc)
    batch_size: int = 64  # MMX ``argument.py``; capped at the training-set size
    lr: float = 1e-3  # IGD AdamW
    weight_decay: float = 0.01  # IGD AdamW
    momentum: float = 0.9  # SGD only (MMX/IDC)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only (IGD, RDED)
    optimizer: str = "adamw"  # "adamw" (IGD, RDED) | "sgd" (IDC, Minimax)
    schedule: str = "multistep"  # MMX: x gamma at 2/3 and 5/6 of the epochs | "half_cosine" (RDED) | ...
    milestones: tuple[float, ...] = (2 / 3, 5 / 6)  # fractions of epochs (MMX ``train.py``)
    gamma: float = 0.2  # MMX ``train.py``
    no_decay_norm_bias: bool = False  # RDED ``get_parameters``: no weight decay on 1-d params
    augment: str = "idc"  # augment.PRESETS name or "+"-joined ops (rrc, flip, jitter, lighting, shuffle)
    rrc_scale: tuple[float, float] = (0.5, 1.0)  # IDC/MMX and RDED (1/factor); D3HR (0.08, 1)
    shuffle_factor: int = 2  # RDED ``--factor`` (only used when "shuffle" is in the pipeline)
    mix: str = "cutmix"  # "cutmix" (IDC/MMX/IGD/RDED) | "mixup" (D3HR hard label) | "none"
    mix_p: float = 1.0  # IDC ImageNet ``mix_p``
    mix_beta: float = 1.0  # Beta(1, 1)
    temperature: float = 20.0  # soft label only: RDED T = 20 with CutMix (4 with mixup)
    eval_every: int = 0  # evaluate (and report) every k epochs; 0 -> max(1, epochs // 100) (IDC/MMX)
    eval_after: float = 0.0  # evaluate only after this fraction of epochs (RDED: 0.8)
    metric: str = "best"  # what "acc" holds: "best" over evaluations (all peers) | "last"
    normalize: str = "imagenet"  # "imagenet" mean/std (all peers) | "train" (from x_train) | "none"
    eval_batch_size: int = 256
    num_classes: int | None = None  # None -> max label + 1 over train and test
    net_kwargs: dict[str, object] = field(default_factory=dict)  # passed to nets.create

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("mix", self.mix, MIXES),
            ("normalize", self.normalize, NORMALIZE),
            ("metric", self.metric, METRICS),
        ):
            if value not in allowed:
                raise ConfigError(key, value, "one of " + ", ".join(allowed))
        parse_pipeline(self.augment)
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs/batch_size", (self.epochs, self.batch_size), "positive integers")

    # -- presets ---------------------------------------------------------------------------------

    @classmethod
    def igd(cls, ipc: int = 10, nclass: int = 10, **kw: object) -> TrainConfig:
        """IGD ``train.py``: Minimax loop (CutMix, MultiStep, best acc) with AdamW 1e-3, wd 0.01."""
        base = {"epochs": epochs_for_ipc(ipc, "idc", nclass)}
        return cls(**{**base, **kw})  # type: ignore[arg-type]

    @classmethod
    def minimax(cls, ipc: int = 10, nclass: int = 10, **kw: object) -> TrainConfig:
        """IDC/MMX ``train.py``: SGD 0.01, momentum 0.9, wd 5e-4 (lr 0.1, wd 1e-4, batch >= 128 above 100 classes)."""
        base: dict[str, object] = {
            "epochs": epochs_for_ipc(ipc, "idc", nclass),
            "optimizer": "sgd",
            "lr": 0.01,
            "weight_decay": 5e-4,
        }
        if nclass > 100:
            base.update(lr=0.1, weight_decay=1e-4, batch_size=128)
        return cls(**{**base, **kw})  # type: ignore[arg-type]

    @classmethod
    def d3hr(cls, ipc: int = 10, nclass: int = 10, **kw: object) -> TrainConfig:
        """D3HR ``validate_hardlabel.py`` (PROTOCOLS.md §3.3): AdamW 1e-3 wd 0.01, half cosine per
        epoch, RRC(0.08, 1) + flip, mixup (alpha 1) on every batch, epochs 2000/1500/1000 by IPC,
        batch 50 (IPC 10) or 100; best accuracy over the last ~100 epochs (tested every epoch there)."""
        epochs = int(kw.get("epochs", epochs_for_ipc(ipc, "d3hr", nclass)))  # type: ignore[call-overload]
        base: dict[str, object] = {
            "epochs": epochs,
            "batch_size": 50 if ipc <= 10 else 100,
            "schedule": "half_cosine",
            "augment": "rrc_flip",
            "rrc_scale": (0.08, 1.0),
            "mix": "mixup",
            "eval_every": 1,
            "eval_after": max(0.0, 1.0 - 100 / epochs),
        }
        return cls(**{**base, **kw})  # type: ignore[arg-type]

    @classmethod
    def rded(cls, ipc: int = 10, nclass: int = 10, arch: str = "resnet18", **kw: object) -> TrainConfig:
        """RDED ``validation/main.py`` soft label: 300 epochs, AdamW (lr per student), wd 0.01 off
        norms/biases, half cosine, ShufflePatches + RRC(0.5, 1) + flip, CutMix, T = 20, evaluate
        every 10 epochs after 80 %.

        ShufflePatches is off here (``augment="rrc_flip"``): RDED's images are 2x2 mosaics of real
        crops, generated images are not; use ``augment="rded"`` to switch it on.
        """
        base: dict[str, object] = {
            "epochs": 300,
            "batch_size": rded_batch_size(ipc, nclass),
            "lr": RDED_LR.get(arch, 1e-3),
            "weight_decay": 0.01,
            "optimizer": "adamw",
            "schedule": "half_cosine",
            "no_decay_norm_bias": True,
            "augment": "rrc_flip",
            "mix": "cutmix",
            "temperature": 20.0,
            "eval_every": 10,
            "eval_after": 0.8,
        }
        return cls(**{**base, **kw})  # type: ignore[arg-type]

    @classmethod
    def teacher(cls, **kw: object) -> TrainConfig:
        """Teacher on full real data: IGD ``train_ckpt.sh`` surrogate budget (50 epochs, no CutMix),
        AdamW 1e-3 wd 0.01 (IGD), cosine decay, RRC + flip, evaluated once at the end."""
        base: dict[str, object] = {
            "epochs": 50,
            "batch_size": 64,
            "schedule": "cosine",
            "augment": "rrc_flip",
            "mix": "none",
            "metric": "last",
        }
        base["eval_every"] = int(kw.get("epochs", base["epochs"]))  # type: ignore[call-overload]
        return cls(**{**base, **kw})  # type: ignore[arg-type]

    def with_(self, **kw: object) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **kw)  # type: ignore[arg-type]


def epochs_for_ipc(ipc: int, base: str = "idc", nclass: int = 10, scale: float = 1.0) -> int:
    """Training epochs for a distilled set of ``ipc`` images per class.

    ``base="idc"`` (also Minimax and, by assumption, IGD; PROTOCOLS.md §3.1/§7 Q3): IDC
    ``argument.py`` ``ipc_epoch`` (factor 1): IPC 1 -> 3000, <= 10 -> 2000, <= 50 -> 1500,
    <= 200 -> 1000, <= 500 -> 500, else 300; for 100 classes x 2/3 rounded down to a multiple of 100
    (IDC applies this only at exactly 100 classes).
    ``base="d3hr"``: D3HR ``validate_hardlabel.py``: IPC <= 10 -> 2000, <= 50 -> 1500, else 1000.
    ``base="rded"``: 300 whatever the IPC (RDED ``--re-epochs`` in every script).
    ``scale`` shrinks the budget for quick runs (result rounded, at least 1).
    """
    if ipc < 1:
        raise ConfigError("ipc", ipc, "a positive integer")
    if base == "idc":
        table = ((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500))
        epochs = next((e for bound, e in table if ipc <= bound), 300)
        if nclass == 100:
            epochs = int(2 / 3 * epochs)
            epochs -= epochs % 100
    elif base == "d3hr":
        epochs = 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000
    elif base == "rded":
        epochs = 300
    else:
        raise ConfigError("base", base, "one of idc, d3hr, rded")
    return max(1, round(epochs * scale))


def rded_batch_size(ipc: int, nclass: int) -> int:
    """RDED scripts: IPC 1 -> 10, IPC <= 10 -> 50, larger -> 100; x2 for >= 100 classes; <= IPC*nclass."""
    bs = 10 if ipc <= 1 else 50 if ipc <= 10 else 100
    if nclass >= 100:
        bs *= 2
    return max(1, min(bs, ipc * nclass))


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


def as_unit(x: Tensor) -> Tensor:
    """Images as float in [0, 1]: uint8 tensors (kept so on the device: 4x less memory) are scaled."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _fast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores; fp32 weights and optimizer state); nothing on CPU, where
    results stay bit-reproducible."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _layout(x: Tensor, device: str | torch.device) -> Tensor:
    """channels_last on CUDA (the convs' fast layout with bf16); unchanged on CPU."""
    return x.contiguous(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else x


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """The model on `device`; on CUDA in channels_last, matching :func:`_layout`."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else model


def _num_classes(cfg: TrainConfig, *ys: Tensor) -> int:
    if cfg.num_classes is not None:
        return cfg.num_classes
    return int(max(int(y.max()) for y in ys if y.numel())) + 1


def _stats(cfg: TrainConfig, x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std per channel: ImageNet constants, the training tensors' own, or identity."""
    c = x.shape[1]
    x = as_unit(x)
    if cfg.normalize == "imagenet" and c == 3:
        return nets.IMAGENET_MEAN, nets.IMAGENET_STD
    if cfg.normalize in ("train", "imagenet"):  # "imagenet" with C != 3 falls back to data stats
        mean = x.float().mean(dim=(0, 2, 3))
        std = x.float().std(dim=(0, 2, 3)).clamp_min(1e-3)
        return tuple(mean.tolist()), tuple(std.tolist())
    return (0.0,) * c, (1.0,) * c


def build_model(arch: str, num_classes: int, x_train: Tensor, cfg: TrainConfig) -> nets.Normalized:
    """``nets.create`` for the shape of ``x_train`` (N, C, R, R), wrapped with input normalisation."""
    mean, std = _stats(cfg, x_train)
    net = nets.create(
        arch, num_classes, int(x_train.shape[-1]), channels=int(x_train.shape[1]), **cfg.net_kwargs
    )
    return nets.Normalized(net, mean, std)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (IDC/MMX) or AdamW (IGD/RDED); RDED ``get_parameters`` puts 1-d params in a no-decay group."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, object]]
    if cfg.no_decay_norm_bias:
        groups = [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """LR multiplier for 0-based ``epoch`` (stepped once per epoch, as all peers do).

    multistep: MMX ``MultiStepLR(milestones=[2E//3, 5E//6], gamma=0.2)``; half_cosine: RDED
    ``0.5 * (1 + cos(pi * e / E / 2))`` (ends at 0.5x); cosine: full decay to 0; constant: 1.
    """
    e_total = cfg.epochs
    if cfg.schedule == "multistep":
        marks = [int(m * e_total) for m in cfg.milestones]
        return cfg.gamma ** sum(epoch >= m for m in marks)
    if cfg.schedule == "half_cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / e_total / 2))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / e_total))
    return 1.0


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: str = "cpu", batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on (x, y); restores the train/eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, x.shape[0], batch_size):
        xb = as_unit(x[s : s + batch_size].to(device, non_blocking=True))
        yb = y[s : s + batch_size].to(device)
        with _fast(device):
            correct += int((model(_layout(xb, device)).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def _batches(n: int, batch_size: int, g: torch.Generator) -> list[Tensor]:
    """Shuffled index batches; a trailing batch of one image is dropped (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=g)
    out = [perm[s : s + batch_size] for s in range(0, n, batch_size)]
    if len(out) > 1 and out[-1].numel() < 2:
        out.pop()
    return out


def _fit(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor, Tensor | None, float, Tensor], Tensor],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor | None,
    y_test: Tensor | None,
    cfg: TrainConfig,
    seed: int,
    device: str,
    report: Report | None,
) -> dict[str, object]:
    """The shared epoch loop: shuffle, augment, mix, loss, step, per-epoch LR, periodic test.

    ``loss_fn(logits, y, partner_index, lam, mixed_x)`` returns the scalar loss of one batch.
    """
    n = x_train.shape[0]
    bs = min(cfg.batch_size, n)
    eval_every = cfg.eval_every if cfg.eval_every > 0 else max(1, cfg.epochs // 100)
    aug = Augmenter(
        parse_pipeline(cfg.augment), seed=seed + 1, rrc_scale=cfg.rrc_scale, shuffle_factor=cfg.shuffle_factor
    )
    g_order = torch.Generator().manual_seed(seed + 2)
    x_dev = x_train.to(device)  # (N, C, R, R): uint8, or float in [0, 1]; decoded once, kept on the device
    y_dev = y_train.to(device).long()  # (N,)
    opt = _optimizer(model, cfg)
    base_lrs = [grp["lr"] for grp in opt.param_groups]
    history: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        factor = _lr_factor(cfg, epoch)
        for grp, lr0 in zip(opt.param_groups, base_lrs):
            grp["lr"] = lr0 * factor
        for idx in _batches(n, bs, g_order):
            idx = idx.to(device)
            xb = aug(as_unit(x_dev.index_select(0, idx)))  # (B, C, R, R) float in [0, 1]
            yb = y_dev.index_select(0, idx)  # (B,)
            xb, partner, lam = aug.mix(xb, cfg.mix, beta=cfg.mix_beta, p=cfg.mix_p)
            with _fast(device):
                logits = model(_layout(xb, device))  # (B, K)
                loss = loss_fn(logits.float(), yb, partner, lam, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        done = epoch + 1
        due = done % eval_every == 0 or done == cfg.epochs
        if x_test is not None and y_test is not None and due and done > cfg.eval_after * cfg.epochs:
            acc = evaluate(model, x_test, y_test, device, cfg.eval_batch_size)
            history.append((done, acc))
            log.debug("epoch %d/%d: test top-1 %.4f", done, cfg.epochs, acc)
            if report is not None:
                report(done, acc)
    seconds = time.perf_counter() - t0
    last = history[-1][1] if history else float("nan")
    best = max((a for _, a in history), default=float("nan"))
    return {
        "acc": best if cfg.metric == "best" else last,
        "acc_best": best,
        "acc_last": last,
        "epochs": cfg.epochs,
        "train_seconds": seconds,
        "history": history,
    }


@contextlib.contextmanager
def _seeded(seed: int, device: str) -> Iterator[None]:
    """Fork the global RNG (CPU and the used CUDA device) and seed it, so that init and dropout are
    reproducible and the caller's RNG state is restored afterwards."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _mixed_ce(logits: Tensor, y: Tensor, partner: Tensor | None, lam: float, _x: Tensor) -> Tensor:
    """IDC/MMX ``train.py``: CE(y) * ratio + CE(y[partner]) * (1 - ratio)."""
    loss = F.cross_entropy(logits, y)
    if partner is not None and lam < 1.0:
        loss = loss * lam + F.cross_entropy(logits, y[partner]) * (1.0 - lam)
    return loss


# ---------------------------------------------------------------------------------------------
# public protocols
# ---------------------------------------------------------------------------------------------


def train_hard_label(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    arch: str,
    cfg: TrainConfig,
    seed: int,
    device: str = "cpu",
    report: Report | None = None,
) -> dict[str, object]:
    """Hard-label evaluation (IDC/MMX ``train.py``; IGD ``train.py`` with its AdamW default).

    Train ``arch`` from scratch on (x_train (N, C, R, R) in [0, 1], y_train (N,)) with one-hot
    CutMix cross entropy and the ``cfg`` augmentation, optimiser and schedule; test every
    ``eval_every`` epochs on (x_test, y_test) and call ``report(epoch, acc)`` each time.

    Returns ``{"acc", "acc_best", "acc_last", "epochs", "train_seconds", "history"}``: accuracies in
    [0, 1]; ``acc`` is ``acc_best`` (the peers' statistic) unless ``cfg.metric == "last"``;
    ``history`` is [(epoch, acc), ...].
    """
    k = _num_classes(cfg, y_train, y_test)
    with _seeded(seed, device):
        model = on_device(build_model(arch, k, x_train, cfg), device)
        out = _fit(model, _mixed_ce, x_train, y_train, x_test, y_test, cfg, seed, device, report)
    out.update(arch=arch, seed=seed, protocol="hard_label", num_classes=k)
    return out


def train_teacher(
    x_real: Tensor,
    y_real: Tensor,
    arch: str = "resnet18",
    cfg: TrainConfig | None = None,
    seed: int = 0,
    device: str = "cpu",
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
) -> nn.Module:
    """Teacher for soft labels, trained on the full real training split (default :meth:`TrainConfig.teacher`).

    RDED loads pre-trained subset observers (ResNet-18 reaches 90.0 on ImageNette, PROTOCOLS.md
    §4.1); their recipe is not published, so we train with IGD's surrogate budget (``train_ckpt.sh``:
    50 epochs, no CutMix). Returns the frozen net in eval mode, normalisation included (takes [0, 1]
    images). With (x_val, y_val) the final accuracy is logged and stored as ``teacher.val_acc``.
    """
    cfg = cfg or TrainConfig.teacher()
    k = _num_classes(cfg, y_real) if y_val is None else _num_classes(cfg, y_real, y_val)
    with _seeded(seed, device):
        model = on_device(build_model(arch, k, x_real, cfg), device)
        out = _fit(model, _mixed_ce, x_real, y_real, x_val, y_val, cfg, seed, device, None)
    model.eval().requires_grad_(False)
    if x_val is not None:
        model.val_acc = out["acc_last"]  # type: ignore[assignment]
        log.info("teacher %s: val top-1 %.4f after %d epochs", arch, out["acc_last"], cfg.epochs)
    return model


def soft_label_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """RDED's soft-label loss: KL(softmax(teacher / T) || softmax(student / T)) summed over the K
    classes and averaged over the B images (``batchmean``), without a T^2 factor. (B, K) x 2 -> ()."""
    target = F.softmax(teacher_logits / temperature, dim=1)  # (B, K)
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), target, reduction="batchmean")


def train_soft_label(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    arch: str,
    teacher: nn.Module,
    cfg: TrainConfig,
    seed: int,
    device: str = "cpu",
    report: Report | None = None,
) -> dict[str, object]:
    """Soft-label evaluation, RDED ``validation/main.py`` ``train``.

    Each step: augment the distilled batch, CutMix it, score the *same* mixed batch with the frozen
    ``teacher`` (eval mode, no grad; it takes [0, 1] images, e.g. from :func:`train_teacher`) and
    train the student on KL(log_softmax(student / T) || softmax(teacher / T)), ``batchmean``, without
    a T^2 factor. ``y_train`` only sets the class count (and is unused by the loss), as in RDED.
    Returns the same dict as :func:`train_hard_label`.
    """
    k = _num_classes(cfg, y_train, y_test)
    teacher = on_device(teacher, device).eval()
    temp = cfg.temperature
    with torch.no_grad():
        k_teacher = int(teacher(as_unit(x_train[:2].to(device))).shape[1])
    if k_teacher != k:
        raise UserError(f"the teacher predicts {k_teacher} classes but the data has {k}")

    def kl_loss(logits: Tensor, _y: Tensor, _partner: Tensor | None, _lam: float, xb: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(xb)  # (B, K)
        return soft_label_loss(logits, teacher_logits, temp)

    with _seeded(seed, device):
        model = on_device(build_model(arch, k, x_train, cfg), device)
        out = _fit(model, kl_loss, x_train, y_train, x_test, y_test, cfg, seed, device, report)
    out.update(arch=arch, seed=seed, protocol="soft_label", num_classes=k, temperature=temp)
    return out
