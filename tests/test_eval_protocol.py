"""Evaluation as the papers run it: results keyed by every setting, every unusable file listed
(test split included), the papers' presets at 224 px."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def _cfg(tmp_path, cache_dir, *extra: str):
    from dap_ray.cli import compose
    from dap_ray.config import to_structured, validate

    cfg = to_structured(compose("distill", [f"out_dir={tmp_path}", f"cache_dir={cache_dir}", "eval.epochs=1", "eval.seeds=[0]",
                                            "eval.archs=[convnet]", "eval.max_test=20", "eval.resolution=16", "dataset.classes=[0,1]", *extra]))
    validate(cfg)
    return cfg


def _results(d) -> dict[str, int]:
    return {os.path.basename(p): os.stat(p).st_mtime_ns for p in glob.glob(f"{d}/*.json")}


def test_every_evaluation_setting_keys_the_result(ray_session, cache_dir, tmp_path):
    """An unchanged re-run reuses the stored accuracy; changing any evaluation key (resolution, lr,
    augmentation, epochs, batch size, recipe) or the distilled images' content trains again."""
    from dap_ray.data import resolve_dataset
    from dap_ray.eval.run import evaluate_sets

    ds = resolve_dataset("digits", None, ["0", "1"], cache_dir=str(cache_dir))
    imgs = tmp_path / "set"
    for c in ("0", "1"):
        (imgs / c).mkdir(parents=True)
        for i, r in enumerate([r for r in ds.train if r.label == int(c)][:2]):
            (imgs / c / f"{i}.png").write_bytes(open(r.path, "rb").read())
    from dap_ray.data import distilled_records

    sets = {"few": distilled_records(str(imgs), ds.classes)}
    out = tmp_path / "eval"
    rows = evaluate_sets(_cfg(tmp_path, cache_dir), ds, sets, str(out), str(cache_dir), progress=False)
    first = _results(out)
    assert len(first) == 1 and rows[0]["status"] == "ok"
    row = rows[0]
    assert row["config"]["resolution"] == 16 and row["config"]["train_cfg"]["epochs"] == 1 and row["config"]["recipe"] == "igd"
    assert row["n_test"] == 20 and sum(row["test_per_class"].values()) == 20

    again = evaluate_sets(_cfg(tmp_path, cache_dir), ds, sets, str(out), str(cache_dir), progress=False)
    assert _results(out) == first and again[0]["acc"] == row["acc"]  # reused, not retrained

    seen = set(first)
    for change in ("eval.resolution=24", "eval.lr=0.5", "eval.augment=none", "eval.epochs=2", "eval.batch_size=2", "eval.recipe=minimax"):
        r = evaluate_sets(_cfg(tmp_path, cache_dir, change), ds, sets, str(out), str(cache_dir), progress=False)[0]
        now = _results(out)
        new = set(now) - seen
        assert len(new) == 1, change  # trained again, under a new key
        assert r["key"] in next(iter(new)) and r["key"] != row["key"]
        seen |= new
    # same names, other pixels: the distilled set's content is part of the key
    Image.new("RGB", (8, 8), (255, 0, 0)).save(imgs / "0" / "0.png")
    r = evaluate_sets(_cfg(tmp_path, cache_dir), ds, {"few": distilled_records(str(imgs), ds.classes)}, str(out), str(cache_dir),
                      progress=False)[0]
    assert r["key"] != row["key"] and len(_results(out)) == len(seen) + 1


def _tiny_imagefolder(root, n_good: int = 6, size: int = 20) -> None:
    """2 classes of small JPEGs, plus per class a truncated JPEG and a text file named .png."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        d = root / c
        d.mkdir(parents=True)
        for i in range(n_good):
            base = (200, 30, 30) if c == "cat" else (30, 30, 200)
            arr = np.clip(np.array(base) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img{i}.jpg", quality=90)
        good = (d / "img0.jpg").read_bytes()
        (d / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
        (d / "zz_text.png").write_text("this is not an image\n")


def test_unusable_test_files_are_listed_with_their_split(ray_session, cache_dir, tmp_path):
    """A truncated JPEG and a text file named .png that fall in the carved test split are listed in
    skipped.csv with split `test`; the report gives the test-set size per class."""
    from dap_ray.data import read_skipped_csv, resolve_dataset, write_skipped_csv
    from dap_ray.eval.run import evaluate_sets
    from dap_ray.report import write_report

    root = tmp_path / "data"
    _tiny_imagefolder(root)
    bad = {"cat/zz_truncated.jpg", "cat/zz_text.png", "dog/zz_truncated.jpg", "dog/zz_text.png"}
    for seed in range(200):  # a split seed that carves every bad file into the test split
        ds = resolve_dataset("imagefolder", str(root), None, test_fraction=0.5, seed=seed)
        if bad <= {r.id for r in ds.test}:
            break
    else:
        pytest.fail("no split seed puts the bad files in the test split")
    sets = {"real4": [r for r in ds.train if r.id not in bad][:4]}
    cfg = _cfg(tmp_path, cache_dir, "dataset=imagefolder", f"dataset.root={root}", "dataset.classes=null", f"dataset.split_seed={seed}",
               "dataset.test_fraction=0.5", "eval.max_test=null")
    skipped: list = []
    rows = evaluate_sets(cfg, ds, sets, str(tmp_path / "eval"), str(cache_dir), progress=False, skipped=skipped)
    n_good_test = len(ds.test) - 4
    assert rows[0]["status"] == "ok" and rows[0]["n_test"] == n_good_test
    assert sum(rows[0]["test_per_class"].values()) == n_good_test
    write_skipped_csv(str(tmp_path), skipped)
    listed = read_skipped_csv(str(tmp_path / "skipped.csv"), with_split=True)
    assert {(p.split("/data/", 1)[1], split) for p, _, split in listed} == {(b, "test") for b in bad}
    reasons = {p.rsplit("/", 1)[1]: why for p, why, _ in listed}
    assert reasons["zz_truncated.jpg"].startswith("truncated") and reasons["zz_text.png"].startswith("not an image")
    write_report(cfg, str(tmp_path), {"rows": rows, "classes": list(ds.classes)})
    md = (tmp_path / "report.md").read_text()
    per = rows[0]["test_per_class"]
    assert f"Test set: {n_good_test} real images" in md and f"cat: {per['cat']}" in md and f"dog: {per['dog']}" in md
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["rows"][0]["config"]["train_cfg"]["lr"] == 1e-3


@pytest.mark.unit
@pytest.mark.parametrize(("arch", "params_m"), [("convnet6", 0.755), ("resnetap10", 4.91), ("resnet18_in", 11.2)])
def test_224px_nets_have_the_parameter_counts_of_protocols_section_2(arch: str, params_m: float):
    from dap_ray.eval.nets import create

    n = sum(p.numel() for p in create(arch, 10, 224).parameters())
    decimals = len(str(params_m).split(".")[1])
    assert abs(n / 1e6 - params_m) <= 0.5 * 10**-decimals, n  # equal at the precision PROTOCOLS states


@pytest.mark.unit
def test_presets_are_the_papers_protocols():
    """dataset=imagefolder evaluates with the IGD protocol unless told otherwise; digits keeps its CPU
    preset; every preset names itself and its PROTOCOLS section."""
    from dap_ray.cli import compose
    from dap_ray.config import to_structured, validate
    from dap_ray.eval.run import test_resize, train_config

    digits = to_structured(compose("distill", []))
    assert (digits.eval.name, digits.eval.resolution, digits.eval.epochs, digits.eval.comparable) == ("digits_cpu", 16, 40, False)
    real = to_structured(compose("distill", ["dataset=imagefolder", "dataset.root=/data/imagenette"]))
    e = real.eval
    assert (e.name, e.recipe, e.resolution, list(e.archs), list(e.seeds)) == (
        "igd_hard_label", "igd", 224, ["convnet6", "resnetap10", "resnet18_in"], [0, 1, 2, 3, 4])
    assert "§3.2" in e.source and e.comparable
    tc = train_config(real, 10, 10, "convnet6")
    assert (tc.optimizer, tc.lr, tc.weight_decay, tc.schedule, tc.milestones, tc.gamma) == ("adamw", 1e-3, 0.01, "multistep", (2 / 3, 5 / 6), 0.2)
    assert (tc.augment, tc.mix, tc.epochs, tc.eval_every) == ("idc", "cutmix", 2000, 0)  # 0: every epochs // 100
    mm = train_config(to_structured(compose("distill", ["eval=minimax_hard_label"])), 50, 10, "resnetap10")
    assert (mm.optimizer, mm.lr, mm.epochs) == ("sgd", 0.01, 1500)
    d3 = to_structured(compose("distill", ["eval=d3hr_hard_label"]))
    t3 = train_config(d3, 10, 10, "resnet18")
    assert (t3.schedule, t3.mix, t3.rrc_scale, t3.batch_size, t3.epochs, t3.eval_after) == ("half_cosine", "mixup", (0.08, 1.0), 50, 2000, 0.95)
    assert test_resize(d3) == 256
    sl = to_structured(compose("distill", ["dataset=imagefolder", "dataset.root=/x", "eval=soft_label"]))
    assert (sl.eval.name, list(sl.eval.archs), test_resize(sl)) == ("rded_soft_label", ["resnet18"], 256)
    for cfg in (digits, real, d3, sl):
        validate(cfg)


def test_reduced_224px_hard_label_run_on_a_tiny_imagefolder(ray_session, cache_dir, tmp_path):
    """The IGD preset end to end on CPU, reduced to 1 epoch and 1 seed: tiny 20-px JPEGs are resized
    to 224 px and train ConvNet-6, ResNetAP-10 and ResNet-18 (instance norm); the report names it."""
    from dap_ray.cli import compose
    from dap_ray.config import to_structured, validate
    from dap_ray.data import resolve_dataset
    from dap_ray.eval.run import evaluate_sets
    from dap_ray.report import write_report

    root = tmp_path / "data"
    _tiny_imagefolder(root, n_good=4)
    for bad in root.rglob("zz_*"):
        bad.unlink()
    cfg = to_structured(compose("distill", ["dataset=imagefolder", f"dataset.root={root}", "dataset.test_fraction=0.5", f"out_dir={tmp_path}",
                                            f"cache_dir={cache_dir}", "eval.epochs=1", "eval.seeds=[0]", "eval.tsne=false"]))
    validate(cfg)
    ds = resolve_dataset("imagefolder", str(root), None, test_fraction=0.5)
    rows = evaluate_sets(cfg, ds, {"real2": ds.train[:2] + ds.train[-2:]}, str(tmp_path / "eval"), str(cache_dir), progress=False)
    assert [(r["arch"], r["status"]) for r in rows] == [("convnet6", "ok"), ("resnet18_in", "ok"), ("resnetap10", "ok")]
    assert all(r["config"]["resolution"] == 224 and r["config"]["train_cfg"]["optimizer"] == "adamw" for r in rows)
    assert all(0.0 <= r["acc"] <= 1.0 and r["n_test"] == 4 for r in rows)
    table = write_report(cfg, str(tmp_path), {"rows": rows, "classes": list(ds.classes)})
    assert "protocol igd_hard_label" in table
    md = (tmp_path / "report.md").read_text()
    assert "Protocol: `igd_hard_label` (PROTOCOLS.md §3.2" in md and "Not comparable" not in md


def test_soft_label_with_a_saved_pretrained_teacher_sliced_to_two_classes(ray_session, cache_dir, tmp_path):
    """eval.teacher.path: a torchvision ResNet-18 saved as safetensors (5 classes) is loaded, its
    classifier cut to rows [3, 1] for the 2-class subset (RDED's pruning_classifier), and students
    train on its soft labels; its content is part of every training's key; the report does not call
    the numbers non-comparable."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    from dap_ray.cli import compose
    from dap_ray.config import to_structured, validate
    from dap_ray.data import resolve_dataset
    from dap_ray.eval.run import evaluate_sets, get_pretrained_teacher
    from dap_ray.report import write_report

    torch.manual_seed(0)
    full = torchvision.models.resnet18(num_classes=5).eval()
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(weights))
    root = tmp_path / "data"
    _tiny_imagefolder(root, n_good=4)
    for bad in root.rglob("zz_*"):
        bad.unlink()
    ov = ["dataset=imagefolder", f"dataset.root={root}", "dataset.test_fraction=0.5", f"out_dir={tmp_path}", f"cache_dir={cache_dir}",
          "eval=rded_soft_label", "eval.resolution=32", "eval.epochs=1", "eval.seeds=[0]", f"eval.teacher.path={weights}",
          "eval.teacher.classes=[3,1]"]
    cfg = to_structured(compose("distill", ov))
    validate(cfg)
    ds = resolve_dataset("imagefolder", str(root), None, test_fraction=0.5)
    ref = get_pretrained_teacher(cfg, ds)
    x = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(ref()(x), full((x - mean) / std)[:, [3, 1]], atol=1e-5)  # the subset's rows, in class order

    rows = evaluate_sets(cfg, ds, {"real2": ds.train[:2] + ds.train[-2:]}, str(tmp_path / "eval"), str(cache_dir), progress=False)
    assert [(r["arch"], r["status"], r["protocol"]) for r in rows] == [("resnet18", "ok", "soft_label")]
    assert rows[0]["config"]["teacher"] == ref.key and ref.key.startswith("pretrained:torchvision:resnet18:")
    write_report(cfg, str(tmp_path), {"rows": rows, "classes": list(ds.classes)})
    md = (tmp_path / "report.md").read_text()
    assert "Protocol: `rded_soft_label`" in md and "Not comparable" not in md

    # a teacher trained here (no path) is possible, but the report says its numbers are not the papers'
    cfg_here = to_structured(compose("distill", [o for o in ov if not o.startswith("eval.teacher")]))
    write_report(cfg_here, str(tmp_path), {"rows": rows, "classes": list(ds.classes)})
    assert "Not comparable to the papers' tables**: its teacher was trained here" in (tmp_path / "report.md").read_text()

    # rows that do not fit are exit-2 config errors naming the key
    from dap_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.teacher.classes"):
        get_pretrained_teacher(to_structured(compose("distill", [*ov, "eval.teacher.classes=[7,1]"])), ds)
