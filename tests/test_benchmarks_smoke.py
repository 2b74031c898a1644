"""Benchmarks are scripts, not timed tests: these check that each script runs end to end at --quick
sizes and writes its own section of a temp copy of BENCHMARKS.md (and nothing else), plus the shared
plumbing (section rewriting, interleaved timing, CPU peak memory). No wall time is ever asserted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import _common
from tests.conftest import REPO

SCRIPTS = ("guidance_scaling", "bank_throughput", "sampling_throughput", "end_to_end", "gpu")


@pytest.fixture
def bench_md(tmp_path) -> Path:
    """A temp copy of the repository's BENCHMARKS.md (or a file with every section's markers)."""
    out = tmp_path / "BENCHMARKS.md"
    src = REPO / "BENCHMARKS.md"
    if src.exists():
        shutil.copy(src, out)
    else:
        out.write_text("# Benchmarks\n\n" + "\n\n".join(f"<!-- bench:{s} -->\nold\n<!-- /bench:{s} -->" for s in SCRIPTS) + "\n\ntail\n")
    return out


def _outside(text: str, name: str) -> str:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    i, j = text.find(start), text.find(end)
    assert 0 <= i < j, f"section {name} missing"
    return text[:i] + text[j + len(end):]


def _check_written(out: Path, before: str, name: str, *needles: str) -> str:
    after = out.read_text()
    assert _outside(after, name) == _outside(before, name), "text outside the section changed"
    body = _common.read_section(out, name)
    assert body is not None
    for needle in ("**Command:**", "**Machine:**", "**Date:**", "load average", *needles):
        assert needle in body, f"{needle!r} not in the {name} section"
    return body


# ---------------------------------------------------------------------------------------------
# the shared plumbing
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_write_section_replaces_only_its_markers(tmp_path):
    f = tmp_path / "B.md"
    f.write_text("intro\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\nmiddle\n<!-- bench:b -->\nold b\n<!-- /bench:b -->\nend\n")
    _common.write_section(f, "a", "new a\nline 2")
    text = f.read_text()
    assert text == "intro\n<!-- bench:a -->\nnew a\nline 2\n<!-- /bench:a -->\nmiddle\n<!-- bench:b -->\nold b\n<!-- /bench:b -->\nend\n"
    assert _common.read_section(f, "b") == "old b"
    _common.write_section(f, "c", "appended")  # a section without markers is appended
    assert f.read_text().startswith(text.rstrip("\n")) and _common.read_section(f, "c") == "appended"
    g = tmp_path / "new.md"
    _common.write_section(g, "x", "created")  # a missing file is created
    assert _common.read_section(g, "x") == "created"
    f.write_text("<!-- bench:a -->\nunclosed\n")
    with pytest.raises(ValueError, match="closing"):
        _common.write_section(f, "a", "x")
    with pytest.raises(ValueError):
        _common.write_section(f, "bad name", "x")


@pytest.mark.unit
def test_interleaved_alternates_order_and_paired_ratio():
    calls: list[str] = []
    times = _common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a/b, b/a, a/b
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    med, lo, hi = _common.paired_ratio([2.0, 4.0, 6.0, 100.0], [1.0, 2.0, 3.0, 10.0])
    assert med == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(4.0)
    with pytest.raises(ValueError):
        _common.paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.unit
def test_cpu_peak_alloc_bytes_sees_transient_tensors():
    def fn():
        a = torch.ones(1_000_000)  # 4 MB, freed before the 8 MB one
        del a
        b = torch.ones(2_000_000)
        return b.sum()

    peak = _common.cpu_peak_alloc_bytes(fn)
    assert 8_000_000 <= peak < 12_100_000  # the larger live tensor, not the sum of both


@pytest.mark.unit
def test_machine_info_and_command():
    info = _common.machine_info()
    for key in ("cpu", "cores", "ram", "gpu", "torch", "ray", "date", "load_start"):
        assert info[key]
    assert info["gpu"] == ("no GPU" if not torch.cuda.is_available() else info["gpu"])
    assert "benchmarks/x.py --quick" in _common.command_line("x.py", ["--quick"])


# ---------------------------------------------------------------------------------------------
# the scripts, at --quick sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_guidance_scaling_quick(bench_md, tiny_dit_dir, cache_dir):
    from benchmarks import guidance_scaling

    before = bench_md.read_text()
    assert guidance_scaling.main(["--quick", "--out", str(bench_md), "--model", str(tiny_dit_dir), "--cache-dir", str(cache_dir)]) == 0
    body = _check_written(bench_md, before, "guidance_scaling", "mean form: time(N=100) / time(N=10)", "exact (cached features)",
                          "| 10 |", "| 100 |", "guidance_scaling.png")
    assert "PASS" in body or "FAIL" in body
    assert (bench_md.parent / "benchmarks" / "figures" / "guidance_scaling.png").stat().st_size > 0
    # The mean and exact forms must agree on the guided step (the check the section prints).
    agree = float(body.split("max |Δ| = ")[1].split(" ")[0])
    assert agree < 1e-4


@pytest.mark.unit
def test_guidance_scaling_exact_guidance_matches_dap_energy(tiny_dit_dir):
    """The benchmark's exact-form guidance gives DAPGuidance's gradient (it times the same quantity)."""
    import numpy as np

    from benchmarks.guidance_scaling import ExactGuidance
    from dap_ray.backbones import load_backbone
    from dap_ray.bank import Bank, BankSpec, StatsAccumulator
    from dap_ray.data.types import ClassInfo
    from dap_ray.guidance import energy_gradient
    from dap_ray.methods.dap import DAPGuidance

    bb = load_backbone({"type": "dit", "path": str(tiny_dit_dir)})
    classes = [ClassInfo(i, str(i), str(i)) for i in range(10)]
    bb.bind_classes(classes)
    spec = BankSpec(model={}, model_fingerprint="t", layers=("1",), timesteps=(500,), pooling="tokens", seed=0, resolution=8)
    real = torch.randn(7, 16 * 16)  # (N, D): 16 tokens x hidden 16
    acc = StatsAccumulator(10, spec)
    acc.add(np.full(7, 3), {"1": real[:, None, :].numpy()})
    mean_g = DAPGuidance(Bank("mem://", spec, classes, acc, [], {}), "1", "linear", 5.0, 0, "tokens")
    exact_g = ExactGuidance({3: real}, "1", 5.0, 0, "tokens")
    x, y = torch.randn(2, 1, 8, 8), torch.full((2,), 3)
    g_mean, e_mean = energy_gradient(lambda z: mean_g.energy(bb, z, 500, y), x)
    g_exact, e_exact = energy_gradient(lambda z: exact_g.energy(bb, z, 500, y), x)
    torch.testing.assert_close(g_mean, g_exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e_mean, e_exact, rtol=1e-4, atol=1e-6)


@pytest.mark.unit
def test_gpu_without_gpu_says_not_measured(bench_md):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU rows are not written")
    from benchmarks import gpu

    before = bench_md.read_text()
    assert gpu.main(["--quick", "--out", str(bench_md)]) == 0
    body = _check_written(bench_md, before, "gpu", gpu.NOT_MEASURED)
    assert body.count(gpu.NOT_MEASURED) >= 5  # the headline and every row
    assert "PASS" not in body and "FAIL" not in body


@pytest.mark.unit
def test_gpu_cpu_dry_run_exercises_the_code_path(bench_md):
    from benchmarks import gpu

    before = bench_md.read_text()
    assert gpu.main(["--quick", "--cpu-dry-run", "--out", str(bench_md)]) == 0
    body = _check_written(bench_md, before, "gpu", "CPU dry run", "DAP time / vanilla time")
    assert "PASS" not in body and "FAIL" not in body  # a dry run never claims a result
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3", None) == pytest.approx(989.4)
    assert gpu.peak_tflops("NVIDIA H100 PCIe", None) == pytest.approx(756.0)
    assert gpu.peak_tflops("Mystery GPU", None) is None and gpu.peak_tflops("Mystery GPU", 100.0) == 100.0


@pytest.mark.integration
def test_bank_throughput_quick(bench_md, tiny_dit_dir, cache_dir, ray_session):
    from benchmarks import bank_throughput

    before = bench_md.read_text()
    assert bank_throughput.main(["--quick", "--out", str(bench_md), "--model", str(tiny_dit_dir), "--cache-dir", str(cache_dir)]) == 0
    body = _check_written(bench_md, before, "bank_throughput", "plain torch loop", "Ray Data bank, 1 actor(s)",
                          "Ray Data bank, 2 actor(s)", "image x timesteps/s", "**attached Ray**", "actor start-up")
    rel = float(body.split("max relative difference ")[1].split(")")[0])
    assert rel < 1e-5  # every Ray build computed the loop's statistics


@pytest.mark.integration
def test_sampling_throughput_quick(bench_md, tiny_dit_dir, tmp_path, ray_session):
    from benchmarks import sampling_throughput

    before = bench_md.read_text()
    cache = tmp_path / "cache"
    assert sampling_throughput.main(["--quick", "--out", str(bench_md), "--model", str(tiny_dit_dir), "--cache-dir", str(cache)]) == 0
    body = _check_written(bench_md, before, "sampling_throughput", "DAP time / vanilla time", "DiTPipeline time / our vanilla time",
                          "batches across classes", "pipelined writes", "256 x 256 RGB PNG")
    agree = float(body.split("differ by at most ")[1].split()[0].rstrip("."))
    assert agree < 1e-4  # the tiny DiT does not clip: diffusers' DDIM and ours must give the same images
    assert (cache / "banks").is_dir()  # a real bank was built


@pytest.mark.integration
@pytest.mark.slow
def test_end_to_end_quick(bench_md, tiny_dit_dir):
    from benchmarks import end_to_end

    before = bench_md.read_text()
    assert end_to_end.main(["--quick", "--out", str(bench_md), "--set", f"model.path={tiny_dit_dir}"]) == 0
    body = _check_written(bench_md, before, "end_to_end", "`bank`", "`sample/dap`", "`evaluate`", "wall (subprocess",
                          "Reduced run")
    assert "bank built" in body  # the fresh cache had no bank


def test_eval_throughput_quick(bench_md):
    from benchmarks import eval_throughput

    before = bench_md.read_text()
    if "<!-- bench:eval_throughput -->" not in before:  # a BENCHMARKS.md from before this script
        before += "\n<!-- bench:eval_throughput -->\nold\n<!-- /bench:eval_throughput -->\n"
        bench_md.write_text(before)
    assert eval_throughput.main(["--quick", "--out", str(bench_md)]) == 0
    _check_written(bench_md, before, "eval_throughput", "| convnet6 |", "| resnetap10 |", "| resnet18_in |", "trainings / hour")


@pytest.mark.unit
def test_dit_xl2_flops_are_twice_the_papers_multiply_adds():
    """The DiT paper's 118.6 Gflops (Table 1, DiT-XL/2-256) are multiply-adds: a forward is ≈237 GFLOP."""
    from benchmarks import gpu

    assert gpu.dit_forward_flops(28, 256, 1152) / 2e9 == pytest.approx(118.6, rel=0.005)
    assert gpu.GFLOPS_PER_FORWARD == pytest.approx(237.2, rel=0.005)
    # DiT-B/2 (12 blocks, 768 wide): the paper's 23.0 Gflops
    assert gpu.dit_forward_flops(12, 256, 768, patch_out=32) / 2e9 == pytest.approx(23.0, rel=0.02)
