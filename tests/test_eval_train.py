"""Training protocols on real scikit-learn digits (hard label, teacher, soft label) and their parts."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dap_ray.errors import ConfigError, UserError
from dap_ray.eval import (
    TrainConfig,
    epochs_for_ipc,
    evaluate,
    rded_batch_size,
    train,
    train_hard_label,
    train_soft_label,
    train_teacher,
)
from dap_ray.eval.augment import Augmenter, parse_pipeline
from dap_ray.eval.train import soft_label_loss

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine this is about 2x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """sklearn digits (8x8, 0..16) -> (N, 3, 32, 32) in [0, 1], shuffled once with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"x_train": x[:200], "y_train": y[:200], "x_test": x[1000:1200], "y_test": y[1000:1200]}


def test_hard_label_digits_beats_chance(digits: dict[str, torch.Tensor]):
    """200 real digits, 3 epochs of ConvNet-3 @32 px: far above the 10 % chance level."""
    cfg = TrainConfig(epochs=3, batch_size=32, augment="rrc", mix="none", schedule="cosine", eval_every=2)
    calls: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    out = train_hard_label(
        **digits, arch="convnet", cfg=cfg, seed=0, report=lambda e, a: calls.append((e, a))
    )
    wall = time.perf_counter() - t0
    print(f"digits hard-label training: {wall:.1f} s wall, acc {out['acc']:.3f}")
    assert out["acc"] > 0.6
    assert out["epochs"] == 3 and out["train_seconds"] > 0
    assert [e for e, _ in out["history"]] == [2, 3]  # every 2 epochs and at the end
    assert calls == out["history"]
    assert out["acc"] == out["acc_best"] == max(a for _, a in out["history"])
    assert out["acc_last"] == out["history"][-1][1]


def test_same_seed_same_result(digits: dict[str, torch.Tensor]):
    """The default pipeline (IDC aug + CutMix, IGD AdamW, MultiStep) is deterministic for a seed."""
    small = {k: v[:48] for k, v in digits.items()}
    cfg = TrainConfig(epochs=2, batch_size=16, eval_every=1)
    rng_before = torch.get_rng_state()
    a = train_hard_label(**small, arch="convnet", cfg=cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    b = train_hard_label(**small, arch="convnet", cfg=cfg, seed=3)
    assert a["history"] == b["history"] and a["acc"] == b["acc"]
    assert 0.0 <= a["acc"] <= 1.0


def test_report_called_every_eval_every(digits: dict[str, torch.Tensor]):
    small = {k: v[:32] for k, v in digits.items()}
    epochs: list[int] = []
    cfg = TrainConfig(epochs=3, batch_size=16, augment="none", mix="none", eval_every=1)
    out = train_hard_label(**small, arch="convnet", cfg=cfg, seed=0, report=lambda e, a: epochs.append(e))
    assert epochs == [1, 2, 3] == [e for e, _ in out["history"]]


EPOCHS_SOFT = 15


def test_soft_label_with_teacher(digits: dict[str, torch.Tensor]):
    """RDED path: a small teacher trained on real digits, a student on a 'distilled' subset. The student
    learns from the teacher's soft labels alone (y_train only sets the class count): one taught by the
    trained teacher beats, by a wide margin, one taught by an untrained net of the same architecture."""
    tcfg = TrainConfig.teacher(epochs=2, batch_size=32, augment="rrc", net_kwargs={"width": 32})
    teacher = train_teacher(
        digits["x_train"],
        digits["y_train"],
        arch="convnet",
        cfg=tcfg,
        seed=0,
        x_val=digits["x_test"],
        y_val=digits["y_test"],
    )
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.val_acc > 0.5  # 10 classes: chance is 0.1
    distilled = {"x_train": digits["x_train"][:100], "y_train": digits["y_train"][:100]}
    held_out = {"x_test": digits["x_test"][:200], "y_test": digits["y_test"][:200]}
    cfg = TrainConfig.rded(ipc=10, nclass=10, epochs=EPOCHS_SOFT, eval_every=1, eval_after=0.0, net_kwargs={"width": 32})
    calls: list[int] = []
    out = train_soft_label(**distilled, **held_out, arch="convnet", teacher=teacher, cfg=cfg, seed=0,
                           report=lambda e, a: calls.append(e))
    assert out["protocol"] == "soft_label"
    assert calls == list(range(1, EPOCHS_SOFT + 1))
    untrained = train.build_model("convnet", 10, digits["x_train"][:2], tcfg).eval().requires_grad_(False)
    blind = train_soft_label(**distilled, **held_out, arch="convnet", teacher=untrained, cfg=cfg, seed=0)
    assert out["acc"] > 0.4 and out["acc"] > blind["acc"] + 0.2
    again = train_soft_label(**distilled, **held_out, arch="convnet", teacher=teacher, cfg=cfg, seed=0)
    assert again["history"] == out["history"]


def test_soft_label_rejects_teacher_with_other_classes(digits: dict[str, torch.Tensor]):
    teacher = train.build_model("convnet", 5, digits["x_train"][:2], TrainConfig()).eval()
    cfg = TrainConfig.rded(epochs=1)
    with pytest.raises(UserError, match="teacher predicts 5 classes"):
        train_soft_label(
            **{k: v[:16] for k, v in digits.items()}, arch="convnet", teacher=teacher, cfg=cfg, seed=0
        )


def test_soft_label_loss_is_rded_kl():
    """dap_ray's loss is KL(teacher/T || student/T), batchmean, no T^2 (RDED validation/main.py),
    checked against a float64 NumPy reference at ImageNet size (B = 64 images, K = 1000 classes)."""
    g = torch.Generator().manual_seed(0)
    s, t, temp = 8 * torch.randn(64, 1000, generator=g), 8 * torch.randn(64, 1000, generator=g), 20.0

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(t.double().numpy() / temp), softmax(s.double().numpy() / temp)
    reference = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))  # mean over images of sum over classes
    ours = soft_label_loss(s, t, temp)
    assert ours.shape == () and reference > 1e-3
    assert float(ours) == pytest.approx(reference, rel=1e-4)
    assert float(soft_label_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)  # student = teacher: no loss


# -- recipe tables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ipc", "nclass", "epochs"),
    [
        (1, 10, 3000),
        (10, 10, 2000),
        (20, 10, 1500),
        (50, 10, 1500),
        (100, 10, 1000),
        (300, 10, 500),
        (1000, 10, 300),
        (10, 100, 1300),
        (50, 100, 1000),
    ],
)
def test_epochs_for_ipc_idc(ipc: int, nclass: int, epochs: int):
    assert epochs_for_ipc(ipc, "idc", nclass) == epochs


def test_epochs_for_ipc_other_bases():
    assert [epochs_for_ipc(i, "d3hr") for i in (10, 50, 100)] == [2000, 1500, 1000]
    assert epochs_for_ipc(50, "rded") == 300
    assert epochs_for_ipc(10, "idc", scale=0.01) == 20
    with pytest.raises(ConfigError):
        epochs_for_ipc(10, "nope")


def test_rded_batch_size():
    assert [rded_batch_size(i, 10) for i in (1, 10, 50)] == [10, 50, 100]
    assert rded_batch_size(10, 100) == 100 and rded_batch_size(50, 1000) == 200
    assert rded_batch_size(2, 10) == 20  # capped at IPC x nclass


def test_presets_and_validation():
    assert TrainConfig().optimizer == "adamw" and TrainConfig().lr == 1e-3  # IGD
    mm = TrainConfig.minimax(ipc=50)
    assert (mm.optimizer, mm.lr, mm.weight_decay, mm.epochs) == ("sgd", 0.01, 5e-4, 1500)
    r = TrainConfig.rded(ipc=10, arch="mobilenetv2")
    assert (r.lr, r.schedule, r.temperature, r.epochs, r.batch_size) == (2.5e-3, "half_cosine", 20.0, 300, 50)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig(augment="rrc+blur")
    with pytest.raises(ConfigError):
        TrainConfig().with_(schedule="step")


def test_lr_schedules():
    ms = TrainConfig(epochs=60)
    assert [train._lr_factor(ms, e) for e in (0, 39, 40, 49, 50)] == pytest.approx([1, 1, 0.2, 0.2, 0.04])
    hc = TrainConfig(epochs=300, schedule="half_cosine")
    assert train._lr_factor(hc, 0) == 1.0
    assert train._lr_factor(hc, 300) == pytest.approx(0.5)  # RDED half cosine ends at 0.5x
    assert train._lr_factor(TrainConfig(epochs=10, schedule="cosine"), 5) == pytest.approx(0.5)


def test_evaluate_perfect_and_chance():
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return F.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.zeros(6, 3, 4, 4)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert evaluate(Oracle(), x, y, batch_size=4) == 1.0
    assert evaluate(Oracle(), x, (y + 1) % 3) == 0.0


# -- augmentation ---------------------------------------------------------------------------------


def test_augmenter_is_seeded_and_keeps_shape():
    x = torch.rand(8, 3, 32, 32)
    a = Augmenter(parse_pipeline("idc"), seed=5)(x)
    b = Augmenter(parse_pipeline("idc"), seed=5)(x)
    c = Augmenter(parse_pipeline("idc"), seed=6)(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert Augmenter(parse_pipeline("rded"), seed=0)(x).shape == x.shape
    assert torch.equal(Augmenter((), seed=0)(x), x)


def test_flip_only_is_exact():
    x = torch.rand(16, 3, 8, 8)
    out = Augmenter(("flip",), seed=0)(x)
    same = [
        (torch.allclose(o, i, atol=1e-5), torch.allclose(o, i.flip(-1), atol=1e-5)) for o, i in zip(out, x)
    ]
    assert all(s or f for s, f in same)
    assert any(f and not s for s, f in same) and any(s and not f for s, f in same)


def test_rrc_full_scale_without_aspect_change_is_identity():
    x = torch.rand(4, 3, 16, 16)
    aug = Augmenter(("rrc",), seed=0, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0))
    assert torch.allclose(aug(x), x, atol=1e-5)


def test_cutmix_box_and_ratio():
    aug = Augmenter((), seed=1)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    mixed, perm, kept = aug.mix(x, "cutmix")
    assert perm is not None and 0.0 <= kept <= 1.0
    own = (mixed == x).all(dim=1).float().mean(dim=(1, 2))  # fraction of pixels that kept their image
    moved = perm != torch.arange(4)
    assert torch.allclose(own[moved], torch.full_like(own[moved], kept))
    assert aug.mix(x, "none") == (x, None, 1.0)


def test_shuffle_patches_permutes_strips():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    out = Augmenter(("shuffle",), seed=0, shuffle_factor=2)(x)
    assert sorted(out.flatten().tolist()) == list(range(16))
    quads = {tuple(out[0, 0, r : r + 2, c : c + 2].flatten().tolist()) for r in (0, 2) for c in (0, 2)}
    assert quads == {(0, 1, 4, 5), (2, 3, 6, 7), (8, 9, 12, 13), (10, 11, 14, 15)}


def test_color_jitter_and_lighting_stay_close():
    x = torch.rand(8, 3, 16, 16)
    out = Augmenter(("jitter", "lighting"), seed=0)(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, x) and (out - x).abs().max() < 1.5
    assert math.isfinite(float(out.mean()))
