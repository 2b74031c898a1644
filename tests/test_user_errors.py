"""A newcomer's mistakes, run as the real command: exit status 2 and one line saying what is wrong
and what to do — never a traceback — and nothing written to out_dir by a refused or failed start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _run(module: str, args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(REPO),
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(cwd / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(cwd / "none"),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _tiny(tiny_dit_dir: Path, tmp: Path, out: Path) -> list[str]:
    return [f"model.path={tiny_dit_dir}", f"out_dir={out}", f"cache_dir={tmp / 'cache'}", "ipc=1", "runtime.num_cpus=1"]


def test_out_dir_an_existing_file(tmp_path, tiny_dit_dir):
    f = tmp_path / "taken"
    f.write_text("x")
    _one_line_error(_run("dap_ray.distill", _tiny(tiny_dit_dir, tmp_path, f), tmp_path), "out_dir", "is an existing file", "choose a folder")
    assert f.read_text() == "x"


def test_out_dir_that_cannot_be_created(tmp_path, tiny_dit_dir):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(_run("dap_ray.distill", _tiny(tiny_dit_dir, tmp_path, f / "run"), tmp_path), "out_dir", "cannot be created", "is a file")


def test_s3_out_dir_without_credentials_names_the_variables(tmp_path, tiny_dit_dir):
    line = _one_line_error(_run("dap_ray.distill", _tiny(tiny_dit_dir, tmp_path, Path("/x")) + ["out_dir=s3://bucket/run"], tmp_path),
                           "out_dir=s3://bucket/run", "no S3 credentials", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert "does not exist" not in line


def test_s3_dataset_root_without_credentials_names_the_variables(tmp_path, tiny_dit_dir):
    args = _tiny(tiny_dit_dir, tmp_path, tmp_path / "run") + ["dataset=imagefolder", "dataset.root=s3://bucket/imagenette"]
    _one_line_error(_run("dap_ray.distill", args, tmp_path), "dataset.root=s3://bucket/imagenette", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL")
    assert not (tmp_path / "run").exists()


def test_tune_group_on_distill_says_which_command_takes_it(tmp_path):
    line = _one_line_error(_run("dap_ray.distill", ["tune=quick"], tmp_path), "tune", "dap_ray.tune")
    assert "did you mean" not in line


def test_comma_sweep_value_is_one_line(tmp_path):
    _one_line_error(_run("dap_ray.distill", ["ipc=1,10"], tmp_path), "ipc", "ipc=[1,10]", "dap_ray.tune")


def test_multirun_says_to_use_tune(tmp_path):
    _one_line_error(_run("dap_ray.distill", ["--multirun", "method.gamma=1,2"], tmp_path), "--multirun", "dap_ray.tune")


def test_unknown_config_dir(tmp_path):
    _one_line_error(_run("dap_ray.distill", ["--config-dir", str(tmp_path / "nope"), "--cfg"], tmp_path), "--config-dir", "not a folder")


def test_failed_start_leaves_out_dir_as_it_was(tmp_path, tiny_dit_dir):
    """A wrong runtime.address stops the run at start-up: no config.yaml, no config_hash.txt, so
    the next run in the same out_dir (another γ) is not refused."""
    out = tmp_path / "run"
    args = _tiny(tiny_dit_dir, tmp_path, out) + ["runtime.address=127.0.0.1:1", "methods=[vanilla,dap]"]
    _one_line_error(_run("dap_ray.distill", args, tmp_path), "runtime.address=127.0.0.1:1", "no Ray cluster answers")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _one_line_error(_run("dap_ray.distill", args + ["method.gamma=3"], tmp_path), "runtime.address")
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt"]


def test_user_config_dir_presets_are_found_and_validated(tmp_path):
    conf = tmp_path / "my_conf" / "model"
    conf.mkdir(parents=True)
    (conf / "my_dit.yaml").write_text("name: my_dit\ntype: dit\nresolution: 16\ndefault_layer: '1'\n")
    (conf / "typo.yaml").write_text("name: typo\nresolutoin: 16\n")
    for args in (["--config-dir", str(tmp_path / "my_conf")], [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"]):
        proc = _run("dap_ray.distill", [*args, "model=my_dit", "--cfg", "job"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "name: my_dit" in proc.stdout and "resolution: 16" in proc.stdout
        _one_line_error(_run("dap_ray.distill", [*args, "model=typo", "--cfg"], tmp_path), "resolutoin", "valid keys")
    help_out = _run("dap_ray.distill", ["--config-dir", str(tmp_path / "my_conf"), "--help"], tmp_path).stdout
    assert "my_dit" in help_out


def test_cfg_prints_resolved_interpolations(tmp_path):
    proc = _run("dap_ray.tune", ["--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "${" not in proc.stdout and "gamma_range" in proc.stdout
    proc = _run("dap_ray.distill", ["--cfg", "all"], tmp_path)
    assert proc.returncode == 0 and "hydra:" in proc.stdout and "seed: 0" in proc.stdout


def test_hub_id_found_in_the_local_cache_without_network(tmp_path, tiny_dit_dir):
    """model.path=org/name resolves to the snapshot in HF_HUB_CACHE (HF_HUB_OFFLINE: no network)."""
    import shutil

    repo = tmp_path / "hub" / "models--tiny-org--tiny-dit"
    shutil.copytree(tiny_dit_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from dap_ray.backbones import load_backbone; b = load_backbone({'type': 'dit', 'path': 'tiny-org/tiny-dit'}); print(len(b.layer_names))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "3"  # the tiny DiT's 3 blocks
    missing = _run("dap_ray.distill", _tiny(tiny_dit_dir, tmp_path, tmp_path / "run")[1:] + ["model.path=facebook/DiT-XL-2-256"],
                   tmp_path, env)
    _one_line_error(missing, "model.path=facebook/DiT-XL-2-256", "not in the Hugging Face cache", "hf download facebook/DiT-XL-2-256")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("switch,value,module", [("mlflow", "http://127.0.0.1:5000", "mlflow"), ("wandb", "dap-ray", "wandb")])
def test_tracking_backend_not_installed_names_the_extra(tmp_path, tiny_dit_dir, switch, value, module):
    """tracking.mlflow / tracking.wandb without its package: exit 2 and one line naming the extra, before
    Ray starts or anything is written. The package is installed in the test venv, so its absence is
    simulated in the child alone: a sitecustomize.py (run by `site` at start-up, before dap_ray) sets
    sys.modules[<name>] = None, which makes every `import <name>` raise ImportError exactly as when the
    package is missing, without touching the installed files."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    out = tmp_path / "run"
    proc = _run("dap_ray.distill", _tiny(tiny_dit_dir, tmp_path, out) + [f"tracking.{switch}={value}"], tmp_path,
                {"PYTHONPATH": f"{site}:{REPO}"}, timeout=120)
    _one_line_error(proc, f"tracking.{switch}={value!r}", f"pip install 'dap_ray[{switch}]'")
    assert not out.exists()
