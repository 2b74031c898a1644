"""End to end: wall time of the embedded default run (`python -m dap_ray.distill`) and of each stage.

The run is a subprocess with a fresh `out_dir`, exactly as a user starts it, plus `runtime.address=local`
so that it measures its own private Ray even if another developer's `ray start` node is up on this
machine (without it the default run would attach to that node). Two cache states:

* **cached**: the user's cache dir (configs' `cache_dir`, `~/.cache/dap_ray`): the digits tree and,
  if an earlier default run built it, the feature bank are reused — the second run of a user;
* **fresh**: an empty temporary cache dir: the digits tree is materialised and the bank built — the
  very first run.

Stage times come from the run's own `results.json` (`timings_s`); the wall time also counts the
interpreter start, imports and Ray start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    REPO,
    base_parser,
    command_line,
    machine_info,
    md_table,
    provenance,
    write_section,
)

SECTION = "end_to_end"
# A reduced run for --quick (the smoke test): the shape of tests/conftest.py's small_overrides.
QUICK = ["ipc=2", "sampler.steps=5", "sampler.batch_size=2", "eval.epochs=2", "eval.seeds=[0]", "eval.archs=[convnet]",
         "eval.tsne=false", "eval.max_test=100"]


def run_distill(out_dir: Path, cache_dir: str | None, overrides: Sequence[str], log: Path, timeout: float) -> dict:
    """Run the distill CLI once; returns wall seconds, exit status and its results.json (if any)."""
    args = [f"out_dir={out_dir}", "runtime.address=local", *([f"cache_dir={cache_dir}"] if cache_dir else []), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "dap_ray.distill", *args], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    res_path = out_dir / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    return {"wall": wall, "rc": proc.returncode, "results": results, "args": args}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", choices=["cached", "fresh"], default=None,
                   help="cache states to run (default: cached fresh; --quick: fresh)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the run (repeatable)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = p.parse_args(argv)
    modes = args.modes or (["fresh"] if args.quick else ["cached", "fresh"])
    overrides = (QUICK if args.quick else []) + list(args.overrides)

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="dap_ray_bench_e2e_"))
    runs: dict[str, dict] = {}
    try:
        for mode in modes:
            cache = None if mode == "cached" else str(work / "fresh-cache")
            out_dir = work / f"run-{mode}"
            print(f"[{SECTION}] {mode}: python -m dap_ray.distill {' '.join(overrides)} (log {work / f'{mode}.log'})", flush=True)
            r = run_distill(out_dir, cache, overrides, work / f"{mode}.log", args.timeout)
            if r["rc"] != 0:
                tail = (work / f"{mode}.log").read_text()[-3000:]
                raise RuntimeError(f"the {mode} run exited {r['rc']}; log tail:\n{tail}")
            runs[mode] = r
            print(f"  {mode}: {r['wall']:.0f} s wall, timings {r['results'].get('timings_s')}", flush=True)
    finally:
        if args.keep:
            print(f"[{SECTION}] run directories kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    stages: list[str] = []
    for r in runs.values():
        for k in r["results"].get("timings_s", {}):
            if k not in stages and k != "total":
                stages.append(k)
    rows = []
    for st in stages + ["total"]:
        label = {"total": "total (in-process, `timings_s.total`)"}.get(st, f"`{st}`")
        rows.append([label] + [f"{r['results'].get('timings_s', {}).get(st, float('nan')):.1f}" for r in runs.values()])
    rows.append(["other (`total` minus the stages: config, dataset, model load, Ray start, metrics, report)"]
                + [f"{r['results'].get('timings_s', {}).get('total', 0.0) - sum(v for k, v in r['results'].get('timings_s', {}).items() if k != 'total'):.1f}"
                   for r in runs.values()])
    rows.append(["wall (subprocess: interpreter, imports, Ray start, run)"] + [f"{r['wall']:.1f}" for r in runs.values()])
    bank_rows = []
    for mode, r in runs.items():
        b = r["results"].get("bank") or {}
        state = "reused from cache" if b.get("reused") else f"built: {b.get('images')} images, {b.get('images_per_second')} img/s, " \
                                                         f"{b.get('image_timesteps_per_second')} image x timesteps/s"
        bank_rows.append(f"- **{mode}:** bank {state}")
    acc_rows = []
    first = next(iter(runs.values()))["results"].get("summary", {})
    for key, s in first.items():
        acc_rows.append([f"`{key}`", f"{s.get('mean', float('nan')):.1f} ± {s.get('std', float('nan')):.1f}", str(s.get("n"))])
    cmd = "python -m dap_ray.distill " + " ".join(["out_dir=<fresh tmp>", "runtime.address=local"] + overrides)
    body = "\n".join([
        "## End to end (`benchmarks/end_to_end.py`)",
        "",
        provenance(info, command_line("end_to_end.py", argv)),
        f"- **Run:** `{cmd}` in a subprocess (`fresh` adds `cache_dir=<empty tmp>`). "
        + ("**Reduced run (--quick): not the embedded default.**" if args.quick or args.overrides else
           "The embedded default: digits, the packaged digits DiT, IPC 10, random_real / vanilla / dap, hard-label evaluation."),
        "- **Cache states:** `cached` = the user's cache dir (digits tree and, when an earlier default run built it, the bank "
        "are reused); `fresh` = an empty cache dir (first run ever).",
        *bank_rows,
        "- No target: DESIGN §4 asks only that the default run finish in minutes on a 2-core CPU machine.",
        "",
        md_table(["stage (seconds)"] + list(runs), rows),
        "",
        f"Accuracy from the `{next(iter(runs))}` run (hard-label, mean ± std over seeds; a sanity check, not a benchmark):",
        "",
        md_table(["method/arch", "accuracy (%)", "seeds"], acc_rows),
    ])
    write_section(args.out, SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
