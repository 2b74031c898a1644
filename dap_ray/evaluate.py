"""python -m dap_ray.evaluate data=DIR — evaluate any ImageFolder of distilled images.

The set may come from dap_ray or from another tool: one folder per class key (the dataset's folder
names / wnids, or 0..9 for digits), images in any readable format. `subsample=[100,50,10]` evaluates
the first k images per class of the one set (sorted by file name). Output: results.json, report.md
and plots/ in out_dir, and the accuracy table on stdout; `stages=[report]` draws that report again
from out_dir without training anything.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import fsspec
from omegaconf import OmegaConf

from dap_ray.cli import run_main
from dap_ray.config import EvaluateConfig, to_structured, validate
from dap_ray.errors import ConfigError, UserError
from dap_ray.storage import expand
from dap_ray.tracking import check_tracking

log = logging.getLogger("dap_ray.evaluate")


def run(cfg_raw: Any) -> int:
    from dap_ray.data import distilled_records, resolve_dataset, write_skipped_csv
    from dap_ray.eval.run import evaluate_sets
    from dap_ray.metrics import measure_sets
    from dap_ray.report import rebuild_report, write_report
    from dap_ray.runtime import init_ray

    cfg = to_structured(cfg_raw, EvaluateConfig)
    validate(cfg)
    check_tracking(cfg.tracking)  # a tracking switch without its package: exit 2 now, not after the trainings
    if list(cfg.stages) == ["report"]:  # the report of an earlier evaluation in out_dir, drawn again; nothing trained
        print(rebuild_report(expand(cfg.out_dir)))
        print(f"report: {expand(cfg.out_dir)}/report.md")  # the last line: where to look
        return 0
    if not cfg.data:
        raise ConfigError("data", cfg.data, "the folder of distilled images (<data>/<class>/*.png)")
    fs, p = fsspec.core.url_to_fs(cfg.data)
    if not fs.isdir(p):
        raise UserError(f"data={cfg.data!r} is not a folder")
    for k in cfg.subsample or []:
        if k < 1:
            raise ConfigError("subsample", list(cfg.subsample), "positive integers, e.g. [100,50,10]")
    ds = cfg.dataset
    dataset = resolve_dataset(ds.name, ds.root, OmegaConf.to_container(ds.classes) if OmegaConf.is_config(ds.classes) else ds.classes,
                              train_dir=ds.train_dir, test_dir=ds.test_dir, test_fraction=ds.test_fraction, seed=ds.split_seed,
                              cache_dir=expand(cfg.cache_dir))
    full = distilled_records(cfg.data, dataset.classes)
    if not full:
        raise UserError(f"no images under {cfg.data}/<class>/ for classes {[c.key for c in dataset.classes][:5]}...")
    missing = [c.key for c in dataset.classes if not any(r.label == c.index for r in full)]
    if missing:
        log.warning("no distilled images for class(es) %s", ", ".join(missing))
    sets = {}
    for k in cfg.subsample or [None]:
        sets[cfg.name if k is None else f"{cfg.name}@ipc{k}"] = distilled_records(cfg.data, dataset.classes, k)
    run_dir = expand(cfg.out_dir)
    init_ray(cfg.runtime)
    skipped: list[tuple[str, str, str]] = []
    rows = evaluate_sets(cfg, dataset, sets, f"{run_dir}/eval", expand(cfg.cache_dir), skipped=skipped)
    write_skipped_csv(run_dir, skipped)
    results: dict[str, Any] = {"rows": rows, "classes": list(dataset.classes), "skipped": skipped}
    if cfg.eval.metrics:
        try:
            results["metrics"] = measure_sets(cfg, dataset, sets, expand(cfg.cache_dir), tsne=bool(cfg.eval.tsne))
        except Exception as e:  # noqa: BLE001 - a metric failure must not lose the accuracy table
            log.warning("representativeness metrics failed: %s", e)
    fsr, rp = fsspec.core.url_to_fs(run_dir)
    fsr.makedirs(rp, exist_ok=True)
    fsr.pipe_file(f"{rp}/config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    print(write_report(cfg, run_dir, results, {"data": cfg.data, "skipped": len(skipped)}, image_root=cfg.data))
    print(f"report: {run_dir}/report.md")  # the last line: where to look
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("dap_ray.evaluate", __doc__, "evaluate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
