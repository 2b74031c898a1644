"""The search space of a sweep: `tune.space` parsed into `Dim`s, checked like distill's config."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dap_ray.config import SEARCHERS, TUNE_SCHEDULERS, TuneConfig, validate, validate_against_backbone
from dap_ray.errors import ConfigError
from dap_ray.registry import NETS

SPACE_TYPES = ("uniform", "loguniform", "quniform", "randint", "lograndint", "choice", "grid")
RANGE_TYPES = ("uniform", "loguniform", "quniform", "randint", "lograndint")
SWEEPABLE_PREFIXES = ("method.", "sampler.")
SWEEPABLE_KEYS = ("seed", "bank.seed")
# one bank per value combination, so they must take finitely many values.
BANK_KEYS = ("method.pooling", "sampler.steps", "bank.seed")


@dataclass(frozen=True)
class Dim:
    """One swept config key and its distribution."""

    key: str  # dotted config key, e.g. method.gamma
    type: str  # one of SPACE_TYPES
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: tuple = ()

    @property
    def discrete(self) -> bool:
        return self.type in ("choice", "grid")

    @property
    def log(self) -> bool:
        return self.type in ("loguniform", "lograndint")

    def candidates(self) -> list:
        """The values a trial can take (discrete) or the range's end points (validated on the driver)."""
        return list(self.values) if self.discrete else [self.low, self.high]

    def to_ray(self, searcher: str) -> Any:
        """The Ray Tune domain: grid values become grid_search (cross product), the rest are sampled.

        searcher=grid turns `choice` into a grid too; model-based searchers cannot take grid_search,
        so there `grid` becomes a `choice`.
        """
        from ray import tune

        values = list(self.values)
        if self.type == "grid" or (self.type == "choice" and searcher == "grid"):
            return tune.choice(values) if searcher == "optuna" else tune.grid_search(values)
        if self.type == "choice":
            return tune.choice(values)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        if self.type == "randint":  # Ray's upper bound is exclusive; ours is inclusive
            return tune.randint(int(self.low), int(self.high) + 1)
        return tune.lograndint(int(self.low), int(self.high) + 1)


def flatten_space(space: Mapping, prefix: str = "") -> dict[str, dict]:
    """Nested ({method: {gamma: {type: ...}}}) or flat ({"method.gamma": {type: ...}}) -> {dotted key: spec}."""
    out: dict[str, dict] = {}
    for k, v in space.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and "type" in v:
            out[key] = dict(v)
        elif isinstance(v, Mapping) and v:
            out.update(flatten_space(v, key))
        else:
            raise ConfigError(f"tune.space.{key}", v, "a distribution such as {type: loguniform, low: 0.5, high: 20} or {type: grid, values: [0, 400]}")
    return out


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_dim(key: str, spec: Mapping, searcher: str) -> Dim:
    """Check one entry of tune.space (no model needed); ConfigError names the key, value and what is allowed."""
    where = f"tune.space.{key}"
    if not (key.startswith(SWEEPABLE_PREFIXES) or key in SWEEPABLE_KEYS):
        raise ConfigError(where, "(not sweepable)", "keys under method. or sampler., or seed, bank.seed (the model, dataset and evaluation stay fixed in a sweep)")
    schema = OmegaConf.structured(TuneConfig)
    sentinel = object()
    default = OmegaConf.select(schema, key, default=sentinel)
    if default is sentinel or isinstance(default, DictConfig):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "a dotted config key"
        raise ConfigError(where, "(unknown key)", f"a config key; valid keys{' of ' + parent if parent else ''}: {valid}")
    t = spec.get("type")
    if t not in SPACE_TYPES:
        raise ConfigError(f"{where}.type", t, f"one of {', '.join(SPACE_TYPES)}")
    allowed_fields = {"type", "values"} if t in ("choice", "grid") else {"type", "low", "high"} | ({"q"} if t == "quniform" else set())
    extra = sorted(set(spec) - allowed_fields)
    if extra:
        raise ConfigError(f"{where}.{extra[0]}", spec[extra[0]], f"fields of a {t} distribution: {', '.join(sorted(allowed_fields))}")
    if t in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
            raise ConfigError(f"{where}.values", values, "a non-empty list of values")
        return Dim(key, t, values=tuple(values))
    low, high = spec.get("low"), spec.get("high")
    if not (is_number(low) and is_number(high)):
        raise ConfigError(f"{where}.low/high", (low, high), "two numbers")
    if searcher == "grid":
        raise ConfigError(f"{where}.type", t, "grid or choice (with values) when tune.searcher=grid")
    if key in BANK_KEYS:
        raise ConfigError(f"{where}.type", t, f"grid or choice: {key} changes the feature bank, which is built once per value before the sweep")
    is_int = t in ("randint", "lograndint")
    if is_number(default) and isinstance(default, int) and not is_int:
        raise ConfigError(f"{where}.type", t, f"randint, lograndint, choice or grid ({key} is an integer)")
    if is_int and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}.low/high", (low, high), "integers (bounds inclusive)")
    if (low > high) if is_int else (low >= high):
        raise ConfigError(f"{where}.low/high", (low, high), "low < high")
    if t in ("loguniform", "lograndint") and low <= 0:
        raise ConfigError(f"{where}.low", low, "a number > 0 (log scale)")
    q = None
    if t == "quniform":
        q = spec.get("q")
        if not (is_number(q) and q > 0):
            raise ConfigError(f"{where}.q", q, "a number > 0 (the quantisation step)")
    return Dim(key, t, float(low), float(high), None if q is None else float(q))


def parse_space(cfg: Any) -> list[Dim]:
    space = OmegaConf.to_container(cfg.tune.space, resolve=True) if OmegaConf.is_config(cfg.tune.space) else dict(cfg.tune.space)
    flat = flatten_space(space)
    if not flat:
        raise ConfigError("tune.space", "{}", "at least one swept key, e.g. tune.space.method.gamma={type: loguniform, low: 0.5, high: 20}")
    return [parse_dim(k, v, str(cfg.tune.searcher)) for k, v in flat.items()]


def validate_tune(cfg: Any) -> list[Dim]:
    """Range checks of the tune section and the space's structure; returns the parsed space."""
    t = cfg.tune

    def check(ok: bool, key: str, value: object, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"tune.{key}", value, allowed)

    check(t.searcher in SEARCHERS, "searcher", t.searcher, f"one of {', '.join(SEARCHERS)}")
    check(t.scheduler in TUNE_SCHEDULERS, "scheduler", t.scheduler, f"one of {', '.join(TUNE_SCHEDULERS)}")
    check(t.num_samples >= 1, "num_samples", t.num_samples, "an integer >= 1")
    check(t.max_concurrent >= 0, "max_concurrent", t.max_concurrent, "an integer >= 0 (0 = as many as resources allow)")
    check(t.ipc >= 1, "ipc", t.ipc, "an integer >= 1")
    archs = [str(a) for a in t.archs]
    check(len(archs) >= 1 and len(set(archs)) == len(archs), "archs", archs, "a non-empty list of distinct net names")
    for a in archs:
        check(a in NETS, "archs", a, f"one of {', '.join(NETS)}")
    check(t.epochs >= 1, "epochs", t.epochs, "an integer >= 1")
    check(1 <= t.eval_every <= t.epochs, "eval_every", t.eval_every, f"an integer in [1, tune.epochs={t.epochs}]")
    check(1 <= t.grace_period <= t.epochs, "grace_period", t.grace_period, f"an integer in [1, tune.epochs={t.epochs}]")
    check(t.reduction_factor >= 2, "reduction_factor", t.reduction_factor, "an integer >= 2")
    check(t.val_per_class >= 1, "val_per_class", t.val_per_class, "an integer >= 1")
    check(len(t.test_seeds) >= 1, "test_seeds", list(t.test_seeds), "a non-empty list of integers")
    check(t.cpus_per_trial > 0, "cpus_per_trial", t.cpus_per_trial, "a number > 0")
    check(t.gpus_per_trial >= 0, "gpus_per_trial", t.gpus_per_trial, "a number >= 0 (fractions share a GPU)")
    check(t.cpus_per_net > 0, "cpus_per_net", t.cpus_per_net, "a number > 0")
    check(t.gpus_per_net is None or t.gpus_per_net >= 0, "gpus_per_net", t.gpus_per_net, "null (tune.gpus_per_trial) or a number >= 0")
    check(t.sampler_actors >= 0, "sampler_actors", t.sampler_actors, "an integer >= 0 (0 = sample inside the trial)")
    check(t.max_failures >= 0, "max_failures", t.max_failures, "an integer >= 0")
    check(bool(t.name) and "/" not in t.name, "name", t.name, "a non-empty folder name without '/'")
    return parse_space(cfg)


def plain(v: Any) -> Any:
    """numpy scalars (Ray samples them) -> Python values, so configs and JSON take them."""
    return v.item() if isinstance(v, np.generic) else v


def apply_knobs(cfg: Any, knobs: Mapping[str, Any]) -> Any:
    """A copy of the structured cfg with the trial's values set (types checked by the schema)."""
    out = copy.deepcopy(cfg)
    for key, value in knobs.items():
        try:
            OmegaConf.update(out, key, plain(value), merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"tune.space.{key}", value, str(e).splitlines()[0]) from None
    return out


def check_candidates(cfg: Any, dims: Sequence[Dim], backbone: Any) -> None:
    """Every value a trial can take must pass the same checks as a distill run (layers need the model)."""
    for d in dims:
        for v in d.candidates():
            if d.type in ("randint", "lograndint"):
                v = int(v)
            try:
                c = apply_knobs(cfg, {d.key: v})
                validate(c)
                validate_against_backbone(c, backbone)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{d.key}", v, e.allowed) from None
