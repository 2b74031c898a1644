"""Every shipped config composes; every validation error is a one-line message with exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dap_ray.cli import compose, group_options
from dap_ray.config import CONFIG_DIR, DistillConfig, to_structured, validate, validate_against_backbone
from dap_ray.distill import main
from dap_ray.errors import ConfigError, UserError

pytestmark = pytest.mark.unit


def _options():
    return [(g, o) for g, opts in group_options().items() if g != "tune" for o in opts]


@pytest.mark.parametrize("group,option", _options())
def test_every_group_option_composes(group, option):
    extra = {"dataset": {"imagefolder": ["dataset.root=/data"]}, "model": {"dit_xl2_256": ["model.path=/m"], "sd15": ["model.path=/m"]}}
    cfg = compose("distill", [f"{group}={option}"] + extra.get(group, {}).get(option, []))
    structured = to_structured(cfg)
    validate(structured)


def test_every_yaml_file_is_reachable():
    files = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")}
    covered = {"distill.yaml", "tune.yaml", "evaluate.yaml"} | {f"{g}/{o}.yaml" for g, opts in group_options().items() for o in opts}
    assert files <= covered, files - covered


def test_default_is_the_embedded_default():
    cfg = to_structured(compose("distill", []))
    assert cfg.dataset.name == "digits" and cfg.model.name == "digits_dit" and cfg.ipc == 10
    assert list(cfg.methods) == ["random_real", "vanilla", "dap"]
    assert OmegaConf.get_type(cfg) is DistillConfig
    assert cfg.runtime.bank_actors is None and cfg.runtime.sampler_actors is None  # auto (runtime.actor_count)
    validate(cfg)
    gpu = to_structured(compose("distill", ["runtime=gpu"]))
    assert gpu.runtime.bank_actors is None and gpu.runtime.sampler_actors is None  # one per GPU the cluster has


@pytest.mark.parametrize(
    "override,key,needle",
    [
        (["method.gamma=-1"], "method.gamma", ">= 0"),
        (["ipc=0"], "ipc", ">= 1"),
        (["methods=[dap,nope]"], "methods", "random_real"),
        (["sampler.eta=2"], "sampler.eta", "[0, 1]"),
        (["sampler.cfg_scale=0.5"], "sampler.cfg_scale", ">= 1"),
        (["method.kernel=cosine"], "method.kernel", "linear, rbf"),
        (["method.pooling=max"], "method.pooling", "tokens, mean"),
        (["eval.archs=[convnet,vgg99]"], "eval.archs", "resnetap10"),
        (["eval.protocol=zero_shot"], "eval.protocol", "hard_label"),
        (["dataset=imagefolder", "dataset.root=null"], "dataset.root", "required"),
        (["runtime.sampler_actors=0"], "runtime.sampler_actors", ">= 1"),
        (["sampler.dtype=fp8"], "sampler.dtype", "bf16"),
    ],
)
def test_value_errors_name_key_value_and_range(override, key, needle):
    cfg = to_structured(compose("distill", override))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == key
    assert needle in str(e.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        compose("distill", ["method.gamm=3"])
    msg = str(e.value)
    assert "method.gamm" in msg and "gamma" in msg and "t_stop" in msg


def test_unknown_group_option_lists_options():
    with pytest.raises(ConfigError) as e:
        compose("distill", ["model=dit_xxl"])
    assert "digits_dit" in str(e.value) and "sd15" in str(e.value)


def test_unknown_key_in_a_yaml_file_is_an_error(tmp_path):
    cfg = compose("distill", [])
    raw = OmegaConf.to_container(cfg)
    raw["method"]["gammma"] = 1.0
    with pytest.raises(ConfigError) as e:
        to_structured(OmegaConf.create(raw))
    assert "gammma" in str(e.value) and "gamma" in str(e.value)


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError) as e:
        to_structured(compose("distill", ["ipc=ten"]))
    assert e.value.key == "ipc" and "ten" in str(e.value)


class _FakeBackbone:
    num_train_timesteps = 1000
    layer_names = ["0", "1", "2"]


@pytest.mark.parametrize(
    "override,key",
    [(["method.layer=7"], "method.layer"), (["method.t_stop=1001"], "method.t_stop"), (["method.diver_start_t=-3"], "method.diver_start_t")],
)
def test_backbone_dependent_errors(override, key):
    cfg = to_structured(compose("distill", override))
    with pytest.raises(ConfigError) as e:
        validate_against_backbone(cfg, _FakeBackbone())
    assert e.value.key == key
    if key == "method.layer":
        assert "0, 1, 2" in str(e.value)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["method.gamma=-1"], "method.gamma"),
        (["method.t_stop=5000"], "method.t_stop"),
        (["method.layer=99"], "method.layer"),
        (["ipc=0"], "ipc"),
        (["model=nope"], "model"),
        (["methods=[nope]"], "methods"),
        (["dataset=nope"], "dataset"),
        (["foo=1"], "foo"),
        (["--bogus"], "--bogus"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv + ["stages=[sample]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_help_lists_groups_and_options(tmp_path):
    """`python -m dap_ray.distill --help` from another working directory (not the repo root)."""
    out = subprocess.run([sys.executable, "-m", "dap_ray.distill", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("dataset", "model", "method", "runtime", "digits_dit", "sd15", "imagefolder", "gamma", "t_stop", "ipc"):
        assert needle in out.stdout


def test_missing_dataset_root_is_exit_2(tmp_path, capsys):
    assert main(["dataset=imagefolder", f"dataset.root={tmp_path / 'nope'}", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_user_error_class_hierarchy():
    assert issubclass(ConfigError, UserError) and UserError.exit_code == 2
    assert Path(CONFIG_DIR, "distill.yaml").is_file()


def test_auto_actor_counts_follow_the_cluster(ray_session):
    """null actor counts: as many as the running Ray's nodes hold (CPU actors at most 4); a number
    larger than what fits shrinks; an actor that fits nowhere is a UserError naming the resource."""
    from dap_ray.runtime import MAX_AUTO_ACTORS, actor_count, resolve_actor_counts

    cpus = int(ray_session.cluster_resources()["CPU"])
    assert actor_count(1, 0.0, 1.0) == 1  # an explicit number that fits is kept
    assert actor_count(cpus + 3, 0.0, 1.0) == cpus  # more than fit: shrinks to what fits
    assert actor_count(None, 0.0, 1.0) == min(MAX_AUTO_ACTORS, cpus)
    assert actor_count(None, 0.0, 0.5) == min(MAX_AUTO_ACTORS, 2 * cpus)
    with pytest.raises(UserError, match=r"runtime.bank_actors: one actor needs CPU=64 .*largest: CPU=2"):
        actor_count(None, 0.0, 64.0, "runtime.bank_actors")
    if not ray_session.cluster_resources().get("GPU"):
        with pytest.raises(UserError, match=r"runtime.sampler_actors: one actor needs CPU=1, GPU=1 .*GPU=0"):
            actor_count(2, 1.0, 1.0)
    cfg = to_structured(compose("distill", ["runtime.sampler_actors=1"]))
    resolve_actor_counts(cfg.runtime)
    assert cfg.runtime.sampler_actors == 1 and cfg.runtime.bank_actors == min(MAX_AUTO_ACTORS, cpus)


def test_actors_fit_node_by_node():
    """Two 1-GPU nodes hold two 1-GPU actors but no 2-GPU actor; dead nodes hold nothing."""
    from dap_ray.runtime import actors_that_fit

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 4.0}}]
    assert actors_that_fit({"CPU": 2.0, "GPU": 1.0}, nodes) == 2
    assert actors_that_fit({"CPU": 2.0, "GPU": 2.0}, nodes) == 0
    assert actors_that_fit({"CPU": 2.0, "GPU": 0.5}, nodes) == 4
    assert actors_that_fit({"CPU": 2.0}, nodes) == 10


def test_sampler_dtype_auto_is_bf16_on_gpu_actors_and_fp32_on_cpu():
    """sampler.dtype=auto (the default) resolves once on the driver: bf16 for GPU actors, fp32 on CPU;
    the bank spec carries the sampler's precision; a bad value names the allowed ones."""
    import torch

    from dap_ray.backbones import torch_dtype
    from dap_ray.config import resolve_dtype

    assert torch_dtype("auto", "cuda") == torch.bfloat16 and torch_dtype("auto", "cpu") == torch.float32
    assert torch_dtype("bf16", "cpu") == torch.float32 and torch_dtype("fp32", "cuda:0") == torch.float32
    with pytest.raises(ConfigError, match="sampler.dtype='fp8'.*one of auto, fp32, bf16, fp16"):
        torch_dtype("fp8", "cpu")
    cpu = to_structured(compose("distill", []))
    gpu = to_structured(compose("distill", ["runtime=gpu"]))
    assert cpu.sampler.dtype == gpu.sampler.dtype == "auto"
    assert resolve_dtype(cpu) == "fp32" and resolve_dtype(gpu) == "bf16" and gpu.sampler.dtype == "bf16"
    assert resolve_dtype(to_structured(compose("distill", ["runtime=gpu", "sampler.dtype=fp32"]))) == "fp32"
    with pytest.raises(ConfigError, match="sampler.dtype.*one of auto, fp32, bf16, fp16"):
        validate(to_structured(compose("distill", ["sampler.dtype=half"])))


@pytest.mark.unit
@pytest.mark.parametrize("override,key,allowed", [
    ("tracking.mlflow=true", "tracking.mlflow", "MLflow tracking URI"),
    ("tracking.mlflow=s3://bucket/mlruns", "tracking.mlflow", "null (off)"),
    ("tracking.mlflow_experiment=''", "tracking.mlflow_experiment", "non-empty"),
    ("tracking.wandb=false", "tracking.wandb", "W&B project name"),
    ("tracking.wandb=team/project", "tracking.wandb", "WANDB_ENTITY"),
])
def test_tracking_switches_name_key_value_and_allowed(override, key, allowed):
    extra = ["tracking.mlflow=http://localhost:5000"] if "experiment" in override else []
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        validate(to_structured(compose("distill", [override, *extra])))
    assert e.value.key == key and allowed in e.value.allowed


@pytest.mark.unit
def test_tracking_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="tracking.mlflw") as e:
        compose("distill", ["tracking.mlflw=http://x"])
    assert "mlflow, mlflow_experiment, tensorboard, wandb" in e.value.allowed


@pytest.mark.unit
@pytest.mark.parametrize("uri", ["http://mlflow.internal:5000", "file:///data/mlruns", "sqlite:///mlflow.db", "databricks", "mlruns"])
def test_tracking_mlflow_accepts_tracking_uris(uri):
    cfg = to_structured(compose("distill", [f"tracking.mlflow={uri}", "tracking.wandb=dap-ray"]))
    validate(cfg)
    assert cfg.tracking.mlflow == uri and cfg.tracking.wandb == "dap-ray"
