"""Shared command-line plumbing: Hydra composition, `--help`, and user errors as exit status 2.

We compose with Hydra's compose API (not `@hydra.main`) so that every user mistake — an unknown
override, a bad value, a missing dataset — becomes one clear line and exit status 2, never a
traceback, and so the entry points work from any working directory.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dap_ray.config import CONFIG_DIR, RENAMED_KEYS
from dap_ray.errors import ConfigError, UserError

GROUPS = ("dataset", "model", "method", "sampler", "bank", "eval", "runtime", "tune")


def group_options(config_dir: Path | Sequence[Path] = CONFIG_DIR) -> dict[str, list[str]]:
    """Group -> preset names found in the config dir(s): ours first, then the user's search path."""
    dirs = [config_dir] if isinstance(config_dir, Path) else list(config_dir)
    out: dict[str, list[str]] = {}
    for g in GROUPS:
        names = {p.stem for d in dirs for p in (Path(d) / g).glob("*.yaml")}
        if names:
            out[g] = sorted(names)
    return out


def _levenshtein_close(word: str, options: Sequence[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)


def user_search_dirs(overrides: Sequence[str]) -> tuple[list[str], list[Path]]:
    """The overrides without `hydra.searchpath=[...]`, and the user's config dirs it names.

    Hydra's search path holds `file://DIR` (or a plain path) and `pkg://module` entries; the local
    dirs are checked to exist (a typo is one line, not an empty search) and listed for the group
    pre-check, so a user's own preset (`model=my_dit` from `<dir>/model/my_dit.yaml`) is accepted
    and validated against the same schema as ours."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    rest: list[str] = []
    dirs: list[Path] = []
    for ov in overrides:
        if ov.lstrip("+~").split("=", 1)[0] != "hydra.searchpath":
            rest.append(ov)
            continue
        value = OverridesParser.create().parse_overrides([ov])[0].value()
        for entry in value if isinstance(value, list) else [value]:
            entry = str(entry)
            if entry.startswith("pkg://"):
                import importlib.util

                spec = importlib.util.find_spec(entry[len("pkg://"):].replace("/", "."))
                if spec is None or not spec.submodule_search_locations:
                    raise ConfigError("hydra.searchpath", entry, "pkg://<importable package> or file://<existing folder>")
                dirs.append(Path(next(iter(spec.submodule_search_locations))))
                continue
            path = Path(entry[len("file://"):] if entry.startswith("file://") else entry).expanduser().resolve()
            if not path.is_dir():
                raise ConfigError("hydra.searchpath", entry, "existing folders (file://DIR or DIR) holding <group>/<name>.yaml presets")
            dirs.append(path)
    return rest, dirs


def _commands_with_group(group: str) -> str:
    return "python -m dap_ray.tune (sweeps)" if group == "tune" else "python -m dap_ray.distill"


def compose(config_name: str, overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose `dap_ray/conf/<config_name>.yaml` (plus the user's `hydra.searchpath` dirs) with
    overrides; Hydra's errors become UserErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import (
        ConfigCompositionException,
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )

    try:
        overrides, user_dirs = user_search_dirs(overrides)
    except OverrideParseException as e:
        raise UserError(f"could not parse hydra.searchpath: {str(e).splitlines()[0]}") from None
    options = group_options([config_dir, *user_dirs])
    schema_top = set(_schema_keys(config_name, ""))
    for ov in overrides:  # friendlier messages than Hydra's for the commonest mistakes
        key, _, value = ov.lstrip("+~").partition("=")
        if "=" not in ov:
            raise UserError(f"override {ov!r} is not key=value (see --help)")
        if key in RENAMED_KEYS:
            raise ConfigError(key, value, RENAMED_KEYS[key])
        if key in GROUPS and key not in schema_top:
            raise ConfigError(key, value, f"the {key} group is not part of {config_name}; it belongs to {_commands_with_group(key)}")
        if _is_sweep(value):
            raise ConfigError(key, value, f"one value per run: a list is {key}=[{value}]; a sweep is python -m dap_ray.tune "
                              "(or one command per value, each with its own out_dir)")
        if key in options and value and value not in options[key]:
            raise ConfigError(key, value, f"one of {', '.join(options[key])} (or your own {key}/{value}.yaml in a "
                              "--config-dir / hydra.searchpath folder)")
    register_schemas()
    GlobalHydra.instance().clear()
    if user_dirs:
        overrides = [*overrides, "hydra.searchpath=[" + ",".join(f"file://{d}" for d in user_dirs) + "]"]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except OverrideParseException as e:
        raise UserError(f"could not parse overrides: {str(e).splitlines()[0]}") from None
    except (ConfigCompositionException, MissingConfigException, HydraException) as e:
        msg = str(e).splitlines()[0]
        bad_preset = re.match(r"In '([^']+)': \w+ raised while composing config:\s*Key '([^']+)' not in '(\w+)'\s*full_key: (\S+)", str(e))
        if bad_preset:  # a preset (ours or the user's) with a key the schema lacks
            preset, _, _, full_key = bad_preset.groups()
            parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
            base = _schema_keys(config_name, parent)
            close = _levenshtein_close(full_key.rsplit(".", 1)[-1], base)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(full_key, f"(unknown key in preset {preset}.yaml)",
                              f"valid keys{' of ' + parent if parent else ''}: {', '.join(base)}{hint}") from None
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


def _is_sweep(value: str) -> bool:
    """Hydra's sweep syntax `a,b` (a comma outside brackets and quotes) or range()/choice()."""
    depth, quote = 0, ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return value.startswith(("range(", "choice(", "interval(", "glob("))


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


def help_text(prog: str, doc: str, config_name: str, config_dir: Path = CONFIG_DIR, overrides: Sequence[str] = ()) -> str:
    script = "dap-ray-" + prog.rsplit(".", 1)[-1]
    lines = [f"usage: {script} [key=value ...] [group=option ...]   (or: python -m {prog} ...)", "", doc.strip(), "",
             "Config groups (pick one with group=option):"]
    try:
        user_dirs = user_search_dirs(overrides)[1]
    except UserError:
        user_dirs = []
    schema_top = set(_schema_keys(config_name, ""))
    for g, opts in group_options([config_dir, *user_dirs]).items():
        if g in schema_top:
            lines.append(f"  {g:<9} {', '.join(opts)}")
    lines += ["", "Options (defaults of the composed config; override any with key=value):"]
    try:
        cfg = compose(config_name, list(overrides), config_dir)
        lines += ["  " + ln for ln in OmegaConf.to_yaml(cfg).splitlines()]
    except UserError as e:  # pragma: no cover - the shipped configs compose (tested)
        lines.append(f"  (could not compose: {e})")
    lines += ["", "Flags:",
              "  --help              this text",
              "  --cfg [job|hydra|all]  print the composed config, interpolations resolved, and exit (default: job)",
              "  --config-dir DIR    also look for presets in DIR/<group>/<name>.yaml (as hydra.searchpath=[file://DIR]);",
              "                      they are validated like the shipped ones, e.g. `model=my_dit` from DIR/model/my_dit.yaml",
              "  --multirun, -m      not supported: sweeps are python -m dap_ray.tune",
              "Exit status: 0 ok, 2 user error (bad key/value, missing data), 1 internal error."]
    return "\n".join(lines)


CFG_PARTS = ("job", "hydra", "all")


def parse_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Split Hydra-style flags from key=value overrides. Returns (overrides, flags); flags has
    `help`, `cfg` (None or job|hydra|all). `--config-dir DIR` becomes a hydra.searchpath entry."""
    overrides: list[str] = []
    flags: dict[str, Any] = {"help": False, "cfg": None}
    search: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, inline = a.partition("=") if a.startswith("-") else (a, "", "")
        if name in ("-h", "--help"):
            flags["help"] = True
        elif name in ("-c", "--cfg"):
            part = inline if eq else (args[i + 1] if i + 1 < len(args) and args[i + 1] in CFG_PARTS else "job")
            if part not in CFG_PARTS:
                raise UserError(f"--cfg {part}: print one of {', '.join(CFG_PARTS)}")
            if not eq and i + 1 < len(args) and args[i + 1] == part:
                i += 1
            flags["cfg"] = part
        elif name in ("--resolve",):  # Hydra's flag; --cfg here always resolves
            pass
        elif name in ("-cd", "--config-dir"):
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            if not eq:
                i += 1
            if not value or value.startswith("-") or not Path(value).expanduser().is_dir():
                raise UserError(f"--config-dir {value or '(missing)'}: not a folder; give a folder of <group>/<name>.yaml presets, "
                                "e.g. --config-dir my_conf with my_conf/model/my_dit.yaml")
            search.append(value)
        elif name in ("-m", "--multirun"):
            raise UserError("--multirun is not supported: sweep with python -m dap_ray.tune (tune.space, searcher, ASHA), "
                            "or run one command per configuration, each with its own out_dir")
        elif a.startswith("-"):
            raise UserError(f"unknown flag {a}; flags are --help, --cfg [job|hydra|all], --config-dir DIR; "
                            "everything else is key=value")
        else:
            overrides.append(a)
        i += 1
    if search:
        existing = [ov for ov in overrides if ov.lstrip("+~").split("=", 1)[0] == "hydra.searchpath"]
        overrides = [ov for ov in overrides if ov not in existing]
        _, dirs = user_search_dirs(existing)
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in [*dirs, *(Path(x).expanduser().resolve() for x in search)]) + "]")
    return overrides, flags


def cfg_yaml(config_name: str, overrides: Sequence[str], part: str) -> str:
    """`--cfg job|hydra|all`: the composed config with interpolations resolved (Hydra's own nodes
    that only resolve inside a running job, e.g. hydra.sweep.subdir, are left as written)."""
    job = compose(config_name, overrides)
    text = OmegaConf.to_yaml(job, resolve=True) if part in ("job", "all") else ""
    if part in ("hydra", "all"):
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        rest, dirs = user_search_dirs(overrides)
        extra = ["hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]"] if dirs else []
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            hydra_node = hydra_compose(config_name=config_name, overrides=[*rest, *extra], return_hydra_config=True).hydra
        resolved: dict[str, Any] = {}
        for key in hydra_node:
            try:
                resolved[key] = OmegaConf.to_container(hydra_node[key], resolve=True) if OmegaConf.is_config(hydra_node[key]) else hydra_node[key]
            except Exception:  # noqa: BLE001 - a node Hydra only fills inside a job: shown unresolved
                resolved[key] = OmegaConf.to_container(hydra_node[key], resolve=False)
        text += OmegaConf.to_yaml(OmegaConf.create({"hydra": resolved}))
    return text


def run_main(prog: str, doc: str, config_name: str, body: Callable[[Any], int | None], argv: Sequence[str] | None = None) -> int:
    """Parse argv, compose + validate, run body(cfg); user errors -> one line on stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[dap_ray] %(message)s")
    for noisy in ("ray", "ray.data", "ray.tune", "filelock", "urllib3", "botocore", "aiobotocore", "s3fs", "fsspec", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        overrides, flags = parse_flags(argv)
        if flags["help"]:
            print(help_text(prog, doc, config_name, overrides=overrides))
            return 0
        if flags["cfg"]:
            print(cfg_yaml(config_name, overrides, flags["cfg"]))
            return 0
        cfg = compose(config_name, overrides)
        return int(body(cfg) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
