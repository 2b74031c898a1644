"""Shared command-line plumbing: Hydra composition, `--help`, and user errors as exit status 2.

We compose with Hydra's compose API (not `@hydra.main`) so that every user mistake — an unknown
override, a bad value, a missing dataset — becomes one clear line and exit status 2, never a
traceback, and so the entry points work from any working directory.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dap_ray.config import CONFIG_DIR
from dap_ray.errors import ConfigError, UserError

GROUPS = ("dataset", "model", "method", "sampler", "bank", "eval", "runtime", "tune")


def group_options(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    return {g: sorted(p.stem for p in (config_dir / g).glob("*.yaml")) for g in GROUPS if (config_dir / g).is_dir()}


def _levenshtein_close(word: str, options: Sequence[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)


def compose(config_name: str, overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with overrides; Hydra's errors become UserErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import (
        ConfigCompositionException,
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )

    options = group_options(config_dir)
    for ov in overrides:  # friendlier messages than Hydra's for the two commonest mistakes
        key, _, value = ov.lstrip("+~").partition("=")
        if key in options and value and value not in options[key] and "," not in value:
            raise ConfigError(key, value, f"one of {', '.join(options[key])}")
        if "=" not in ov:
            raise UserError(f"override {ov!r} is not key=value (see --help)")
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except OverrideParseException as e:
        raise UserError(f"could not parse overrides: {str(e).splitlines()[0]}") from None
    except (ConfigCompositionException, MissingConfigException, HydraException) as e:
        msg = str(e).splitlines()[0]
        cause = e.__cause__
        full_key = getattr(cause, "full_key", None)
        if full_key and "Could not override" not in msg and "not in struct" not in str(cause).lower():
            value = next((ov.split("=", 1)[1] for ov in overrides if ov.lstrip("+~").split("=", 1)[0] == full_key), "?")
            raise ConfigError(str(full_key), value, str(cause).splitlines()[0]) from None
        if cause is not None and "not in struct" in str(cause).lower() or "Could not override" in msg:
            key = msg.split("'")[1] if "'" in msg else "?"
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            base = _schema_keys(config_name, parent)
            close = _levenshtein_close(key.rsplit(".", 1)[-1], base)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(key, "(unknown key)", f"valid keys{' of ' + parent if parent else ''}: {', '.join(base)}{hint}") from None
        raise UserError(msg) from None


def register_schemas() -> None:
    """Put the dataclass schemas in Hydra's ConfigStore: the primary configs list them first in their
    defaults, so every key the schema has can be overridden and any other key is an error."""
    from hydra.core.config_store import ConfigStore

    from dap_ray import config as C

    cs = ConfigStore.instance()
    cs.store(name="distill_schema", node=C.DistillConfig)
    cs.store(name="evaluate_schema", node=C.EvaluateConfig)
    if hasattr(C, "TuneConfig"):
        cs.store(name="tune_schema", node=C.TuneConfig)


def _schema_keys(config_name: str, parent: str) -> list[str]:
    from dap_ray import config as C

    schema = {"tune": getattr(C, "TuneConfig", C.DistillConfig), "evaluate": C.EvaluateConfig}.get(config_name, C.DistillConfig)
    node = OmegaConf.structured(schema)
    if parent:
        node = OmegaConf.select(node, parent)
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def help_text(prog: str, doc: str, config_name: str, config_dir: Path = CONFIG_DIR) -> str:
    lines = [f"usage: python -m {prog} [key=value ...] [group=option ...]", "", doc.strip(), "", "Config groups (pick one with group=option):"]
    for g, opts in group_options(config_dir).items():
        lines.append(f"  {g:<9} {', '.join(opts)}")
    lines += ["", "Options (defaults of the composed config; override any with key=value):"]
    try:
        cfg = compose(config_name, [], config_dir)
        lines += ["  " + ln for ln in OmegaConf.to_yaml(cfg).splitlines()]
    except UserError as e:  # pragma: no cover - the shipped configs compose (tested)
        lines.append(f"  (could not compose: {e})")
    lines += ["", "Other flags: --help, --cfg (print the resolved config and exit)", "Exit status: 0 ok, 2 user error (bad key/value, missing data), 1 internal error."]
    return "\n".join(lines)


def run_main(prog: str, doc: str, config_name: str, body: Callable[[Any], int | None], argv: Sequence[str] | None = None) -> int:
    """Parse argv, compose + validate, run body(cfg); user errors -> one line on stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(prog, doc, config_name))
        return 0
    print_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    logging.basicConfig(level=logging.INFO, format="[dap_ray] %(message)s")
    for noisy in ("ray", "ray.data", "ray.tune", "filelock", "urllib3", "botocore", "aiobotocore", "s3fs", "fsspec", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        unknown_flags = [a for a in argv if a.startswith("-")]
        if unknown_flags:
            raise UserError(f"unknown flag(s) {', '.join(unknown_flags)}; flags are --help and --cfg, everything else is key=value")
        cfg = compose(config_name, argv)
        if print_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        return int(body(cfg) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
