"""The best configuration of a sweep: its final test, best_overrides.txt and best_config.yaml."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from omegaconf import OmegaConf

from dap_ray.cli import compose
from dap_ray.config import DistillConfig, to_structured
from dap_ray.data import distilled_records
from dap_ray.data.types import DatasetSplits
from dap_ray.eval.run import evaluate_sets
from dap_ray.report import summarize
from dap_ray.tune.space import Dim, apply_knobs, plain
from dap_ray.tune.trial import METHOD, SweepSetup, sample_set, trial_bank, trial_config

log = logging.getLogger("dap_ray.tune")


def _hydra_parse(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={text}").value()


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types (2 != "2" here: a quoted layer name must stay a string)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _override_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_text(plain(v)) for v in value) + "]"
    text = str(value)
    try:
        if _same(_hydra_parse(text), text):
            return text
    except Exception:  # noqa: BLE001 - the grammar rejects it unquoted: quote it
        pass
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_override(key: str, value: Any) -> str | None:
    """`key=value` that Hydra parses back to the same value and type (strings that look like numbers,
    booleans or hold grammar characters are quoted); None when that is impossible in a file read with
    `$(cat best_overrides.txt)`: the shell splits words at whitespace and keeps quotes literal."""
    value = plain(value)
    if isinstance(value, tuple):
        value = list(value)
    text = _override_text(value)
    if any(ch.isspace() for ch in text):
        return None
    try:
        ok = _same(_hydra_parse(text), value)
    except Exception:  # noqa: BLE001
        ok = False
    return f"{key}={text}" if ok else None


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_leaves(v, key))
        else:
            out[key] = v
    return out


def context_overrides(cfg: Any) -> dict[str, Any]:
    """Settings of the sweep that differ from distill's defaults in the sections that shape the images
    (model, dataset, method, sampler, bank, seed): the knobs were best *in this context*."""
    default = OmegaConf.to_container(to_structured(compose("distill", []), DistillConfig), resolve=True)
    mine = OmegaConf.to_container(cfg, resolve=True)
    out = {}
    for section in ("seed", "model", "dataset", "method", "sampler", "bank"):
        a = _leaves({section: mine[section]})
        b = _leaves({section: default[section]})
        out.update({k: v for k, v in a.items() if b.get(k, object()) != v})
    return out


def write_best(cfg: Any, row: Mapping[str, Any], dims: Sequence[Dim], out_dir: str, test: dict | None) -> list[str]:
    """best_overrides.txt (one key=value a line, for `python -m dap_ray.distill $(cat best_overrides.txt)`)
    and best_config.yaml. The swept knobs come last, so they win over any context line."""
    knobs = {d.key: plain(row[d.key]) for d in dims}
    best_cfg = apply_knobs(cfg, knobs)
    context = {k: v for k, v in context_overrides(best_cfg).items() if k not in knobs}
    lines, unformattable = [], {}
    for k, v in list(context.items()) + list(knobs.items()):
        text = format_override(k, v)
        if text is None:
            unformattable[k] = v
        else:
            lines.append(text)
    if unformattable:
        log.warning("best_overrides.txt leaves out %s (values with spaces); they are in best_config.yaml", ", ".join(unformattable))
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.pipe_file(f"{root}/best_overrides.txt", ("\n".join(lines) + "\n").encode())
    doc = {"knobs": knobs, "context": context, "not_in_overrides_file": unformattable, "trial_id": row["trial_id"],
           "val_acc_best": float(row["val_acc_best"]), "status": row["status"], "test": test,
           "usage": "python -m dap_ray.distill $(cat best_overrides.txt)"}
    fs.pipe_file(f"{root}/best_config.yaml", OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(doc, default=str)))).encode())
    return lines


def evaluate_best(cfg: Any, setup: SweepSetup, full: DatasetSplits, knobs: Mapping[str, Any], trial_id: str, out_dir: str, cache_dir: str) -> dict:
    """Retrain the best configuration's images (tune.test_seeds) and evaluate on the real test split:
    the only time the sweep touches it. Images come from the best trial's folder (re-sampled, with the
    same seeds and bytes, if that folder is not reachable from here)."""
    t = cfg.tune
    best_cfg = trial_config(setup, knobs)
    tdir = f"{setup.trials_dir}/{trial_id}"
    img_dir = sample_set(best_cfg, setup.dataset, trial_bank(setup, knobs), tdir, 0)
    recs = distilled_records(f"{img_dir}/images", full.classes)
    ev = copy.deepcopy(best_cfg)
    ev.eval.protocol = "hard_label"
    archs = [str(a) for a in t.archs]
    ev.eval.archs = archs
    ev.eval.seeds = [int(s) for s in t.test_seeds]
    ev.eval.epochs = int(t.epochs)
    rows = evaluate_sets(ev, full, {METHOD: recs}, f"{out_dir}/best_test/{trial_id}", cache_dir, progress=False)
    cells = summarize(rows)
    per_arch = {a: {"acc_mean": round(c["mean"], 2), "acc_std": round(c["std"], 2), "accs": [round(x, 2) for x in c["accs"]],
                    "failed": c["failed"]} for a, c in ((a, cells[(METHOD, a)]) for a in archs)}
    # the objective on the test split: per seed, the mean over the nets (a seed with a failed net is left out)
    by_seed: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("acc") is not None:
            by_seed.setdefault(int(r["seed"]), {})[str(r["arch"])] = 100.0 * float(r["acc"])
    accs = [float(np.mean([v[a] for a in archs])) for _, v in sorted(by_seed.items()) if set(v) == set(archs)]
    return {"archs": archs, "seeds": list(ev.eval.seeds), "epochs": int(t.epochs), "ipc": int(best_cfg.ipc),
            "acc_mean": round(float(np.mean(accs)), 2) if accs else None, "acc_std": round(float(np.std(accs)), 2) if accs else None,
            "accs": [round(a, 2) for a in accs], "failed": sum(c["failed"] for c in per_arch.values()), "per_arch": per_arch,
            "images": img_dir}
