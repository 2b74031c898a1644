"""Structured configs: the schema every Hydra YAML under dap_ray/conf/ is validated against.

Read top to bottom, nanoGPT style. Every group of dap_ray/conf/ (dataset/ model/ method/ sampler/ bank/
eval/ tune/ runtime/) has one dataclass here; composing merges the YAMLs into these dataclasses, so
an unknown key is an error (OmegaConf struct mode) and a value of the wrong type is an error. Range
checks live in `validate()`, and every failure is a `ConfigError` naming the key, the value and what
is allowed. Backbone-dependent checks (layer names, t_stop <= T) happen once the model is loaded,
in `validate_against_backbone()`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dap_ray.errors import ConfigError, UserError
from dap_ray.registry import AUGMENT_OPS, AUGMENT_PRESETS, METHODS, NETS

CONFIG_DIR = Path(__file__).resolve().parent / "conf"  # the shipped Hydra configs: package data, in the wheel too

DATASETS = ("digits", "imagefolder")
MODEL_TYPES = ("dit", "sd")
KERNELS = ("linear", "rbf")
POOLINGS = ("tokens", "mean")
PROTOCOLS = ("hard_label", "soft_label")
RECIPES = ("igd", "minimax", "d3hr", "rded")
DTYPES = ("auto", "fp32", "bf16", "fp16")
DIVER_RUN_SOURCES = ("dap", "vanilla", "d3hr", "random_real")  # method.diver_source values meaning "this run's set"


@dataclass
class DatasetConfig:
    name: str = "digits"  # digits | imagefolder
    root: str | None = None  # local path or s3://bucket/prefix (imagefolder)
    classes: Any = None  # null = every class folder; a preset (imagenette, imagewoof, imageidc, imagenet1k) or a list
    train_dir: str = "train"
    test_dir: str = "val"
    test_fraction: float = 0.2  # held out from the training folders when there is no test_dir
    split_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "digits_dit"
    type: str = "dit"  # dit | sd
    path: str | None = None  # local diffusers directory or HF cache dir; null = the packaged digits DiT
    resolution: int = 8  # pixel resolution the model generates
    latent_scale: float | None = None  # null = the VAE's own scaling_factor (DiT-XL/2 was trained with 0.18215)
    prompt_template: str = "a photo of a {name}"  # SD only
    default_layer: str = "2"  # guidance layer when method.layer is null
    gamma_range: list[float] = field(default_factory=lambda: [1.0, 20.0])  # what sweeps explore for this backbone
    gamma_grid: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0])  # tune=grid's γ values, within gamma_range
    cfg_scale: float = 2.0  # this model's classifier-free guidance scale, used when sampler.cfg_scale is null
    tune_layers: list[str] = field(default_factory=lambda: ["1", "2", "3", "4"])  # guidance layers the shipped sweeps search


@dataclass
class MethodConfig:
    """Guidance knobs (DAP) plus the settings of the other methods; `methods` picks what runs."""

    name: str = "dap"
    gamma: float = 10.0
    layer: Any = None  # block index (DiT) or name (SD: down_0..3, mid, up_0..3); null = model.default_layer
    t_stop: int = 400  # guidance only while t > t_stop
    kernel: str = "linear"  # linear | rbf
    sigma: float = 1.0  # RBF bandwidth = sigma x the median pairwise distance of the class's kept real features at t
    pooling: str = "tokens"  # tokens = full feature map, mean = pooled over tokens/space
    # D3HR
    d3hr_groups: int = 100000  # candidate noise groups (released group_sampling.py --m 100000)
    d3hr_inversion_steps: int = 50  # released: 50-step DDIM inversion
    d3hr_stats: list[str] = field(default_factory=lambda: ["mean", "std", "skew"])  # released score terms (kurtosis: ours)
    d3hr_invert_t: int | None = 600  # timestep the inversion stops at, statistics and generation start (released: t=600); null = full inversion (paper)
    d3hr_inversion_cfg: float | None = None  # CFG of the inversion; null = the sampler's (released: the same 4.0 as generation)
    # DIVER
    diver_source: str = "dap"  # the set DIVER refines: a method of this run (dap, vanilla, d3hr, random_real) or an ImageFolder path
    diver_start_t: int = 600
    diver_gamma: float = 2.0
    diver_fusion_t: int = 400


@dataclass
class SamplerConfig:
    steps: int = 50
    eta: float = 0.0
    cfg_scale: float | None = None  # classifier-free guidance scale (1 = off); null = model.cfg_scale (the model's own default)
    batch_size: int = 16  # images per forward
    # auto = bf16 when the model actors get GPUs (runtime.gpus_per_actor > 0), fp32 on CPU (CPU bf16 matmuls
    # are slow); fp32 on CUDA runs with TF32 matmuls. The bank runs in the same precision as the sampler.
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (half precisions only on GPU)


@dataclass
class BankConfig:
    seed: int = 0  # noise seed of the real-feature bank
    batch_size: int = 64
    # per-image features kept per class (float16; the first by image id), for exact-kernel references and
    # tools; the statistics always use every image. Bytes grow with it, not with the class's size.
    keep_per_class: int = 8
    layers: list[str] | None = None  # null = the guidance layer


@dataclass
class TeacherConfig:
    """The soft-label teacher: pretrained weights (RDED's way, PROTOCOLS.md §4.1) or trained here."""

    path: str | None = None  # local/s3 .safetensors of a pretrained `library` `arch`; null = train one here (not comparable to the papers)
    library: str = "torchvision"  # torchvision | timm: whose `arch` the weights belong to (only with path)
    arch: str = "resnet18"  # with path: a torchvision/timm model name; without: one of our eval nets
    classes: list[int] | None = None  # classifier rows of the subset's classes, in class order (RDED pruning_classifier); null = auto
    epochs: int = 50  # a teacher trained here: IGD's surrogate budget (train_ckpt.sh)


TEACHER_LIBRARIES = ("torchvision", "timm")


@dataclass
class EvalConfig:
    name: str = "custom"  # the protocol preset (dap_ray/conf/eval/<name>.yaml), named after its source; shown in report.md
    source: str = ""  # where the preset comes from (a PROTOCOLS.md section), shown in report.md
    comparable: bool = False  # true only for presets that run a paper's protocol, so its numbers sit beside the paper's
    protocol: str = "hard_label"  # hard_label | soft_label
    recipe: str = "igd"  # igd | minimax | d3hr (hard label), rded (soft label): the peers' training recipes
    archs: list[str] = field(default_factory=lambda: ["convnet", "resnetap10"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    resolution: int = 32  # real and distilled images are resized alike to this before training
    test_resize: float = 1.0  # test images: Resize(test_resize * resolution) + CenterCrop(resolution); RDED/D3HR 8/7
    epochs: int | None = None  # null = the recipe's, scaled with IPC (dap_ray.eval.train.epochs_for_ipc)
    batch_size: int | None = None  # null = the recipe's
    lr: float | None = None  # null = the recipe's
    eval_every: int | None = None  # test every k epochs (the best is reported, as the peers do); null = the recipe's
    augment: str | None = None  # null = the recipe's (idc: rrc+flip+jitter+lighting); e.g. "rrc+jitter" for digits
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    temperature: float | None = None  # soft label; null = the recipe's (RDED: 20)
    metrics: bool = True  # representativeness 1/d, Fréchet distance and spread in the teacher's features (dap_ray/metrics.py)
    tsne: bool = True
    max_test: int | None = None  # cap on test images (null = all)


@dataclass
class RuntimeConfig:
    address: str | None = None  # null = attach to a running cluster if there is one, else start local Ray
    num_cpus: int | None = None  # local Ray only
    sampler_actors: int | None = None  # null = auto: one per GPU (GPU actors) or per cpus_per_actor CPUs (at most 4); more than fit shrink
    bank_actors: int | None = None  # null = auto, as sampler_actors (each actor holds its own copy of the model)
    wait_for_nodes_s: float = 0.0  # an autoscaling cluster: wait this long for nodes before sizing the actor pools
    placement_timeout_s: float = 600.0  # sampling with no actor placed and ready, or a bank/evaluation piece that fits on no node, gives up after this
    gpus_per_actor: float = 0.0  # set > 0 on a GPU cluster (conf/runtime/gpu.yaml)
    gpus_per_eval: float = 0.0
    cpus_per_actor: float = 1.0
    cpus_per_eval: float = 1.0
    dashboard_host: str = "127.0.0.1"
    eval_retries: int = 2


@dataclass
class TrackingConfig:
    """Experiment tracking, opt-in (dap_ray/tracking.py). Sweeps always write TensorBoard events per
    trial (Ray Tune's logger, under tune.storage_path); this switches them on for distill/evaluate runs."""

    tensorboard: bool = False  # TensorBoard events under <out_dir>/tensorboard: accuracies, training curves, guidance strength, image grids
    # MLflow (pip install 'dap_ray[mlflow]'): null = off, else a tracking URI (http(s)://server, databricks,
    # sqlite:///mlflow.db, file:///abs/mlruns, ...). A run logs one MLflow run; a sweep one MLflow run per trial.
    mlflow: str | None = None
    mlflow_experiment: str = "dap_ray"  # the MLflow experiment the runs go to (created when missing)
    # Weights & Biases (pip install 'dap_ray[wandb]'): null = off, else the W&B project. WANDB_MODE=offline
    # keeps everything in <out_dir>/wandb (wandb sync uploads it later); online needs WANDB_API_KEY or `wandb login`.
    wandb: str | None = None


@dataclass
class DistillConfig:
    seed: int = 0
    ipc: int = 10
    methods: list[str] = field(default_factory=lambda: ["random_real", "vanilla", "dap"])
    out_dir: str = "runs/default"
    cache_dir: str = "~/.cache/dap_ray"
    stages: list[str] = field(default_factory=lambda: ["bank", "sample", "evaluate", "report"])
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class EvaluateConfig(DistillConfig):
    """python -m dap_ray.evaluate: evaluate any ImageFolder of distilled images (<data>/<class>/*.png)."""

    data: str | None = None  # the distilled set (local or s3://), one folder per class key
    name: str = "distilled"  # the set's name in tables and plots
    subsample: list[int] | None = None  # e.g. [100, 50, 10]: the first k images per class of one set


STAGES = ("bank", "sample", "evaluate", "report")

# Keys that no longer exist -> what replaced them (a one-line error instead of "unknown key").
RENAMED_KEYS = {
    "tune.arch": "tune.arch is now tune.archs, a list of evaluation nets that every trial trains (e.g. tune.archs=[convnet])",
    "bank.max_per_class": "bank.max_per_class is gone: the bank keeps bank.keep_per_class images' per-image features "
                          "per class (float16, default 8) and its statistics always use every image; set bank.keep_per_class",
}


def to_structured(cfg: DictConfig | dict, schema: type = DistillConfig) -> Any:
    """Merge a composed config into its dataclass schema: unknown keys and wrong types are errors."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if str(key) in RENAMED_KEYS:
            raise ConfigError(str(key), OmegaConf.select(cfg, str(key), default="?") if isinstance(cfg, DictConfig) else "?",
                              RENAMED_KEYS[str(key)]) from None
        if "Key '" in msg and "not in" in msg:
            parent = ".".join(str(key).split(".")[:-1])
            node = OmegaConf.select(base, parent) if parent else base
            valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
            raise ConfigError(str(key), "(unknown key)", f"valid keys{' of ' + parent if parent else ''}: {', '.join(valid)}") from None
        value = OmegaConf.select(cfg, str(key), default="?") if isinstance(cfg, DictConfig) else "?"
        raise ConfigError(str(key), value, msg) from None
    OmegaConf.set_struct(merged, True)
    return merged


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _choice(key: str, value: object, allowed: tuple[str, ...] | list[str]) -> None:
    _check(value in allowed, key, value, f"one of {', '.join(allowed)}")


#: Schemes of MLflow tracking URIs (a plain path is a file store too); anything else is a typo, caught
#: before the run rather than when the report is written hours later.
MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
SWITCH_WORDS = ("true", "false", "yes", "no", "on", "off")  # what `tracking.mlflow=true` becomes in a str field


def validate_tracking(t: Any) -> None:
    """tracking.*: a switch that takes a URI or a project says so when given a bare true/false."""
    uri = t.mlflow
    if uri is not None:
        scheme = str(uri).split("://", 1)[0].lower() if "://" in str(uri) else ""
        _check(bool(str(uri).strip()) and str(uri).lower() not in SWITCH_WORDS
               and (scheme in MLFLOW_SCHEMES or "://" not in str(uri)), "tracking.mlflow", uri,
               f"null (off) or an MLflow tracking URI ({', '.join(s + '://...' for s in MLFLOW_SCHEMES[:6])}, databricks, "
               "or a local folder)")
        _check(bool(str(t.mlflow_experiment).strip()), "tracking.mlflow_experiment", t.mlflow_experiment, "a non-empty experiment name")
    if t.wandb is not None:
        _check(bool(str(t.wandb).strip()) and str(t.wandb).lower() not in SWITCH_WORDS and "/" not in str(t.wandb),
               "tracking.wandb", t.wandb, "null (off) or a W&B project name (the entity comes from WANDB_ENTITY)")


def validate(cfg: Any) -> None:
    """Range checks that need no model. Raises ConfigError naming the key, value and allowed range."""
    _check(cfg.ipc >= 1, "ipc", cfg.ipc, "an integer >= 1")
    _check(len(cfg.methods) >= 1, "methods", list(cfg.methods), "a non-empty list")
    for m in cfg.methods:
        _choice("methods", m, METHODS)
    for s in cfg.stages:
        _choice("stages", s, STAGES)
    _choice("dataset.name", cfg.dataset.name, DATASETS)
    if cfg.dataset.name == "imagefolder":
        _check(bool(cfg.dataset.root), "dataset.root", cfg.dataset.root, "a local path or s3:// URI (required for imagefolder)")
    _check(0.0 < cfg.dataset.test_fraction < 1.0, "dataset.test_fraction", cfg.dataset.test_fraction, "0 < x < 1")
    _choice("model.type", cfg.model.type, MODEL_TYPES)
    _check(cfg.model.resolution >= 8, "model.resolution", cfg.model.resolution, "an integer >= 8")
    _check(cfg.model.cfg_scale >= 1.0, "model.cfg_scale", cfg.model.cfg_scale, "a number >= 1 (1 = no classifier-free guidance)")
    gr = [float(g) for g in cfg.model.gamma_range]
    _check(len(gr) == 2 and 0 < gr[0] < gr[1], "model.gamma_range", gr, "[low, high] with 0 < low < high")
    _check(len(cfg.model.gamma_grid) >= 1 and all(float(g) >= 0 for g in cfg.model.gamma_grid), "model.gamma_grid",
           list(cfg.model.gamma_grid), "a non-empty list of numbers >= 0")
    _check(len(cfg.model.tune_layers) >= 1, "model.tune_layers", list(cfg.model.tune_layers), "a non-empty list of layer names")
    _check(cfg.model.latent_scale is None or cfg.model.latent_scale > 0, "model.latent_scale", cfg.model.latent_scale,
           "null (the VAE's scaling_factor) or a number > 0")
    m = cfg.method
    _check(m.gamma >= 0, "method.gamma", m.gamma, "a number >= 0")
    _check(m.t_stop >= 0, "method.t_stop", m.t_stop, "an integer in [0, T] (T = the model's training timesteps)")
    _choice("method.kernel", m.kernel, KERNELS)
    _choice("method.pooling", m.pooling, POOLINGS)
    _check(m.sigma > 0, "method.sigma", m.sigma, "a number > 0")
    _check(m.d3hr_groups >= 1, "method.d3hr_groups", m.d3hr_groups, "an integer >= 1")
    _check(m.d3hr_inversion_steps >= 1, "method.d3hr_inversion_steps", m.d3hr_inversion_steps, "an integer >= 1")
    _check(len(m.d3hr_stats) >= 1, "method.d3hr_stats", list(m.d3hr_stats), "a non-empty list of mean, std, skew, kurtosis")
    for s in m.d3hr_stats:
        _choice("method.d3hr_stats", s, ("mean", "std", "skew", "kurtosis"))
    _check(m.d3hr_invert_t is None or m.d3hr_invert_t >= 0, "method.d3hr_invert_t", m.d3hr_invert_t, "null (full inversion) or an integer in [0, T]")
    _check(m.d3hr_inversion_cfg is None or m.d3hr_inversion_cfg >= 1.0, "method.d3hr_inversion_cfg", m.d3hr_inversion_cfg,
           "null (the sampler's CFG) or a number >= 1 (1 = no classifier-free guidance)")
    _check(bool(str(m.diver_source).strip()) and m.diver_source != "diver", "method.diver_source", m.diver_source,
           f"a method of this run ({', '.join(DIVER_RUN_SOURCES)}) or an ImageFolder of distilled images")
    _check(m.diver_start_t >= 0, "method.diver_start_t", m.diver_start_t, "an integer in [0, T]")
    _check(m.diver_fusion_t >= 0, "method.diver_fusion_t", m.diver_fusion_t, "an integer in [0, T]")
    _check(m.diver_gamma >= 0, "method.diver_gamma", m.diver_gamma, "a number >= 0")
    validate_tracking(cfg.tracking)
    s = cfg.sampler
    _check(1 <= s.steps <= 1000, "sampler.steps", s.steps, "an integer in [1, 1000]")
    _check(0.0 <= s.eta <= 1.0, "sampler.eta", s.eta, "a number in [0, 1]")
    _check(s.cfg_scale is None or s.cfg_scale >= 1.0, "sampler.cfg_scale", s.cfg_scale,
           "null (model.cfg_scale) or a number >= 1 (1 = no classifier-free guidance)")
    _check(s.batch_size >= 1, "sampler.batch_size", s.batch_size, "an integer >= 1")
    _choice("sampler.dtype", s.dtype, DTYPES)
    _check(cfg.bank.batch_size >= 1, "bank.batch_size", cfg.bank.batch_size, "an integer >= 1")
    _check(cfg.bank.keep_per_class >= 0, "bank.keep_per_class", cfg.bank.keep_per_class, "an integer >= 0")
    e = cfg.eval
    _choice("eval.protocol", e.protocol, PROTOCOLS)
    _check(len(e.seeds) >= 1, "eval.seeds", list(e.seeds), "a non-empty list of integers")
    _check(e.resolution >= 8, "eval.resolution", e.resolution, "an integer >= 8")
    _check(1.0 <= e.test_resize <= 2.0, "eval.test_resize", e.test_resize, "a number in [1, 2] (1 = Resize + CenterCrop to eval.resolution; RDED 8/7)")
    _choice("eval.recipe", e.recipe, RECIPES)
    _check(e.epochs is None or e.epochs >= 1, "eval.epochs", e.epochs, "null (scaled with IPC) or an integer >= 1")
    _check(e.batch_size is None or e.batch_size >= 1, "eval.batch_size", e.batch_size, "null or an integer >= 1")
    _check(e.lr is None or e.lr > 0, "eval.lr", e.lr, "null or a number > 0")
    _check(e.eval_every is None or e.eval_every >= 1, "eval.eval_every", e.eval_every, "null or an integer >= 1")
    if e.augment is not None:
        ops = [o for o in str(e.augment).split("+") if o]
        _check(e.augment in AUGMENT_PRESETS or (ops and all(o in AUGMENT_OPS for o in ops)), "eval.augment", e.augment,
               f"a preset ({', '.join(AUGMENT_PRESETS)}) or '+'-joined ops from {', '.join(AUGMENT_OPS)}")
    _check(e.teacher.epochs >= 1, "eval.teacher.epochs", e.teacher.epochs, "an integer >= 1")
    _choice("eval.teacher.library", e.teacher.library, TEACHER_LIBRARIES)
    _check(e.temperature is None or e.temperature > 0, "eval.temperature", e.temperature, "null or a number > 0")
    _check(e.max_test is None or e.max_test >= 1, "eval.max_test", e.max_test, "null or an integer >= 1")
    if e.archs:
        for a in e.archs:
            _choice("eval.archs", a, NETS)
        if not e.teacher.path:
            _choice("eval.teacher.arch", e.teacher.arch, NETS)
    r = cfg.runtime
    _check(r.num_cpus is None or r.num_cpus >= 1, "runtime.num_cpus", r.num_cpus, "null (all of this machine's) or an integer >= 1")
    for key in ("sampler_actors", "bank_actors"):
        _check(r[key] is None or r[key] >= 1, f"runtime.{key}", r[key], "null (auto: as many as the cluster's GPUs, or CPUs up to 4, hold) or an integer >= 1")
    _check(r.wait_for_nodes_s >= 0, "runtime.wait_for_nodes_s", r.wait_for_nodes_s, "a number of seconds >= 0")
    _check(r.placement_timeout_s > 0, "runtime.placement_timeout_s", r.placement_timeout_s, "a number of seconds > 0")
    _check(r.gpus_per_actor >= 0, "runtime.gpus_per_actor", r.gpus_per_actor, "a number >= 0")
    _check(r.gpus_per_eval >= 0, "runtime.gpus_per_eval", r.gpus_per_eval, "a number >= 0")
    _check(r.cpus_per_actor > 0, "runtime.cpus_per_actor", r.cpus_per_actor, "a number > 0")
    _check(r.cpus_per_eval > 0, "runtime.cpus_per_eval", r.cpus_per_eval, "a number > 0")
    _check(r.eval_retries >= 0, "runtime.eval_retries", r.eval_retries, "an integer >= 0")


def resolve_dtype(cfg: Any) -> str:
    """sampler.dtype=auto -> the precision the model actors run in, resolved once on the driver so every
    bank and sampler actor (and the cache keys and method hashes) see the same name: bf16 when the actors
    get GPUs, else fp32. Sets cfg.sampler.dtype in place and returns it."""
    if cfg.sampler.dtype == "auto":
        cfg.sampler.dtype = "bf16" if float(cfg.runtime.gpus_per_actor) > 0 else "fp32"
    return str(cfg.sampler.dtype)


def cfg_scale(cfg: Any) -> float:
    """The CFG scale the sampler (and D3HR's inversion) use: sampler.cfg_scale, or the model's own."""
    return float(cfg.sampler.cfg_scale if cfg.sampler.cfg_scale is not None else cfg.model.cfg_scale)


def resolve_cfg_scale(cfg: Any) -> float:
    """sampler.cfg_scale=null -> model.cfg_scale, set in place once on the driver, so config.yaml, the
    method hashes and every trial see the number that was used. Returns it."""
    cfg.sampler.cfg_scale = cfg_scale(cfg)
    return float(cfg.sampler.cfg_scale)


def diver_run_source(cfg: Any) -> str | None:
    """The method of this run whose set DIVER refines (method.diver_source names one), else None (a folder)."""
    src = str(cfg.method.diver_source).strip()
    return src if src in DIVER_RUN_SOURCES else None


def guidance_layer(cfg: Any) -> str:
    """The layer DAP guides on: method.layer, or the backbone's default."""
    return str(cfg.method.layer if cfg.method.layer is not None else cfg.model.default_layer)


def validate_against_backbone(cfg: Any, backbone: Any) -> None:
    """Checks that need the loaded model: layer names and timestep ranges."""
    T = backbone.num_train_timesteps
    _choice("method.layer", guidance_layer(cfg), backbone.layer_names)
    for layer in [str(x) for x in (cfg.bank.layers or [])]:
        _choice("bank.layers", layer, backbone.layer_names)
    if cfg.method.d3hr_invert_t is not None:
        _check(0 <= cfg.method.d3hr_invert_t <= T, "method.d3hr_invert_t", cfg.method.d3hr_invert_t, f"null (full inversion) or an integer in [0, {T}]")
    for key in ("t_stop", "diver_start_t", "diver_fusion_t"):
        v = getattr(cfg.method, key)
        _check(0 <= v <= T, f"method.{key}", v, f"an integer in [0, {T}] (T = the model's training timesteps)")


def config_hash(obj: Any, n: int = 16) -> str:
    """Stable short hash of a (nested) config or dict."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def require(value: Any, key: str, what: str) -> Any:
    if value is None or value is MISSING:
        raise UserError(f"{key} is required: {what}")
    return value


# ---------------------------------------------------------------------------------------------
# python -m dap_ray.tune: the distill schema plus a `tune` section (validated in dap_ray.tune.space)
# ---------------------------------------------------------------------------------------------

SEARCHERS = ("random", "grid", "optuna")
TUNE_SCHEDULERS = ("asha", "fifo")


@dataclass
class TuneSettings:
    """The sweep: search space, searcher, ASHA, per-trial budget and resources, storage, resume.

    `space` maps a dotted config key to a distribution, nested or flat in YAML, e.g.
    `{method: {gamma: {type: loguniform, low: 0.5, high: 20}}}` or `{"method.gamma": {...}}`;
    types: uniform, loguniform, quniform (q), randint, lograndint (integer bounds inclusive), choice
    (values), grid (values). Checked in dap_ray.tune.space.parse_space (needs the loaded model for layers).
    """

    space: dict[str, Any] = field(default_factory=dict)
    searcher: str = "random"  # random | grid | optuna (falls back to random when optuna is missing)
    num_samples: int = 8  # random: trials per grid point; grid: repeats of the whole grid
    max_concurrent: int = 0  # 0 = as many trials as the cluster's resources allow
    scheduler: str = "asha"  # asha (stops bad trials early) | fifo (every trial runs all epochs)
    grace_period: int = 10  # epochs a trial runs before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps 1/reduction_factor of the trials at each rung
    ipc: int = 2  # images per class each trial samples (small: trials are many)
    # evaluation nets of each trial (and of the final test): every trial trains each on its distilled set,
    # in parallel, one NetTrainer actor per bundle of the trial's placement group, and reports each net's
    # accuracy and their mean; the mean is what ASHA and the searcher compare (DAP claims accuracy that
    # holds across architectures, so a knob is tuned on several, not on one ConvNet)
    archs: list[str] = field(default_factory=lambda: ["convnet"])
    epochs: int = 60  # training epochs of each trial's evaluation net
    eval_every: int = 5  # report val_acc every k epochs (ASHA's rungs are in epochs)
    val_per_class: int = 20  # real training images per class held out for validation (never in the bank)
    val_seed: int = 0  # which images are held out
    test_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seeds of the final test of the best config
    test_best: bool = True  # retrain the best config and evaluate it on the real test split at the end
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU between trials
    cpus_per_net: float = 1.0  # with several tune.archs: the bundle of each net's NetTrainer actor
    gpus_per_net: float | None = None  # with several tune.archs; null = tune.gpus_per_trial
    sampler_actors: int = 0  # 0 = sample inside the trial process; k > 0 = k sampler actors in the trial's placement group
    reuse_actors: bool = True  # keep trial workers alive between trials (saves the torch/diffusers import)
    storage_path: str | None = None  # local path or s3:// URI; null = <out_dir>/ray_results
    name: str = "sweep"  # experiment folder under storage_path
    resume: bool = False  # continue an interrupted sweep (Tuner.restore with resume_errored=True)
    max_failures: int = 1  # retries of a trial that crashed (e.g. its node died)


@dataclass
class TuneConfig(DistillConfig):
    out_dir: str = "runs/tune"
    methods: list[str] = field(default_factory=lambda: ["dap"])
    tune: TuneSettings = field(default_factory=TuneSettings)
