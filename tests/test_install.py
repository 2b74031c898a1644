"""A regular (non-editable) install works: build the wheel, install it into a fresh venv outside the
checkout, and run the console scripts from there — `--cfg`, `--help` and a reduced distill run.

The venv reuses the test environment's dependencies (a path line to its site-packages, whose .pth
files — the editable install of this checkout among them — are NOT processed), so nothing is
downloaded and only the wheel's dap_ray is importable: a config or zoo file missing from the
package data fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: with the checkout on it, pip would see dap_ray as installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # a copy: setuptools writes build/ and *.egg-info next to the sources, not in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dap_ray", src / "dap_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300, cwd=work, env=_clean_env())
    wheel = next((work / "dist").glob("dap_ray-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dap_ray/conf/distill.yaml" in names and "dap_ray/conf/model/digits_dit.yaml" in names
    assert "dap_ray/zoo/digits_dit/transformer/diffusion_pytorch_model.safetensors" in names
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # install the wheel with the test environment's pip into the new venv (no download: --no-deps --no-index)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300, env=_clean_env())
    site = next(venv.glob("lib/python*/site-packages"))
    assert (site / "dap_ray" / "conf" / "distill.yaml").is_file()
    # then the dependencies: a path line (after the install, so pip never saw the editable dap_ray there)
    (site / "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(venv: Path, script: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([str(venv / "bin" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_installed_package_is_the_wheel(wheel_venv, tmp_path):
    py = wheel_venv / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import dap_ray.config as c; print(c.__file__); print(c.CONFIG_DIR)"], cwd=tmp_path,
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    assert all(str(wheel_venv) in p and str(REPO) not in p for p in out), out


@pytest.mark.parametrize("script", ["dap-ray-distill", "dap-ray-tune", "dap-ray-evaluate"])
def test_console_scripts_print_the_resolved_config(wheel_venv, tmp_path, script):
    proc = _run(wheel_venv, script, ["--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model:" in proc.stdout and "${" not in proc.stdout  # interpolations resolved
    assert _run(wheel_venv, script, ["--help"], tmp_path).returncode == 0


def test_reduced_run_from_the_wheel(wheel_venv, tmp_path):
    """The packaged digits DiT and configs, from a venv that cannot see the checkout."""
    out = tmp_path / "run"
    args = [f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", "methods=[random_real,vanilla]", "ipc=1", "sampler.steps=3",
            "eval.epochs=1", "eval.seeds=[0]", "eval.archs=[convnet]", "eval.tsne=false", "eval.metrics=false", "eval.max_test=50", "runtime.num_cpus=2"]
    proc = _run(wheel_venv, "dap-ray-distill", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["status"]) for r in res["rows"]} == {("random_real", "ok"), ("vanilla", "ok")}
    assert str(out / "report.md") in proc.stdout.strip().splitlines()[-1]  # the last line names the report
