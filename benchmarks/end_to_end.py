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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    median,
    provenance,
    write_section,
)

SECTION = "end_to_end"
# A reduced run for --quick (the smoke test): the shape of tests/conftest.py's small_overrides.
# Two classes: the stages, their order and the section are what --quick checks, not the bank's size.
QUICK = ["ipc=2", "sampler.steps=5", "sampler.batch_size=2", "eval.epochs=2", "eval.seeds=[0]", "eval.archs=[convnet]",
         "eval.tsne=false", "eval.metrics=false", "eval.max_test=100", "dataset.classes=[0,1]"]


def run_distill(out_dir: Path, cache_dir: str | None, overrides: Sequence[str], log: Path, timeout: float,
                niceness: int | None = None) -> dict:
    """Run the distill CLI once, streaming its log with the elapsed time of every line.

    On timeout the run is interrupted with SIGINT, then SIGTERM (both let the driver stop the private
    Ray it started; SIGKILL, the last resort, would orphan Ray's processes).
    Returns wall seconds, exit status, whether it timed out, the timed log lines and results.json.
    """
    args = [f"out_dir={out_dir}", "runtime.address=local", *([f"cache_dir={cache_dir}"] if cache_dir else []), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("TQDM_DISABLE", "1")
    if niceness is not None:
        env["RAY_worker_niceness"] = str(niceness)
    events: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dap_ray.distill", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)

    def reader() -> None:
        with open(log, "w") as f:
            for line in proc.stdout:  # type: ignore[union-attr]
                f.write(line)
                f.flush()
                events.append((time.perf_counter() - t0, line.rstrip("\n")))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for stop, grace in ((lambda: proc.send_signal(signal.SIGINT), 30), (proc.terminate, 60), (proc.kill, 30)):
            stop()
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    wall = time.perf_counter() - t0
    th.join(timeout=10)
    res_path = out_dir / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() and not timed_out else {}
    return {"wall": wall, "rc": proc.returncode, "timed_out": timed_out, "results": results, "args": args, "events": events,
            "out_dir": out_dir}


_BANK = re.compile(r"\[dap_ray\] bank: (\S+) \((\d+) images, ([^,]+),")
_METHOD = re.compile(r"\[dap_ray\] (\w+): (\d+) images in \S+ \(([\d.]+)s\)")
_RAY = re.compile(r"\[dap_ray\] ray: ")


def partial_timings(run: dict) -> tuple[dict[str, float], dict]:
    """Stage times of a run that did not finish, from its timed log and its finished evaluation files.

    bank: from the `ray:` line to the `bank:` line; sample/<method>: the seconds the run logged;
    evaluation: the finished trainings (<out_dir>/eval/*.json, each with its own `seconds`)."""
    from omegaconf import OmegaConf

    t: dict[str, float] = {}
    ray_at = next((e for e, line in run["events"] if _RAY.search(line)), None)
    for e, line in run["events"]:
        if (m := _BANK.search(line)) and ray_at is not None:
            t["bank"] = e - ray_at
        if m := _METHOD.search(line):
            t[f"sample/{m.group(1)}"] = float(m.group(3))
    ev: dict = {"done": 0, "expected": None, "by_arch": {}, "per_arch": None}
    cfg_path = run["out_dir"] / "config.yaml"
    if cfg_path.exists():
        cfg = OmegaConf.load(cfg_path)
        ev["expected"] = len(cfg.methods) * len(cfg.eval.archs) * len(cfg.eval.seeds)
        ev["per_arch"] = {str(a): len(cfg.methods) * len(cfg.eval.seeds) for a in cfg.eval.archs}
        ev["stages"] = ["bank"] + [f"sample/{m}" for m in cfg.methods] + ["evaluate"]
        ev["parallel"] = max(1, int((cfg.runtime.num_cpus or os.cpu_count() or 1) // max(cfg.runtime.cpus_per_eval, 1)))
    for f in sorted((run["out_dir"] / "eval").glob("*.json")) if (run["out_dir"] / "eval").is_dir() else []:
        row = json.loads(f.read_text())
        if row.get("status") == "ok":
            ev["done"] += 1
            ev["by_arch"].setdefault(str(row.get("arch")), []).append(float(row.get("seconds", float("nan"))))
            ev.setdefault("epochs", row.get("epochs"))
    return t, ev


def _fmt_eval(ev: dict) -> str:
    """An unfinished evaluation stage: trainings done per architecture, their median time, and a
    projection (labelled as such) from the per-architecture medians, when every architecture has one."""
    if not ev["done"]:
        return f"not finished: 0 of {ev['expected']} trainings done"
    per = "; ".join(f"{arch}: {len(ts)} done, median {median(ts):.0f} s" for arch, ts in sorted(ev["by_arch"].items()))
    out = f"not finished: {ev['done']} of {ev['expected']} trainings done ({ev.get('epochs')} epochs each; {per})"
    per_arch = ev.get("per_arch") or {}
    if per_arch and all(a in ev["by_arch"] for a in per_arch):
        total = sum(k * median(ev["by_arch"][a]) for a, k in per_arch.items())
        par = ev.get("parallel", 1)
        terms = " + ".join(f"{k} x {median(ev['by_arch'][a]):.0f} s" for a, k in per_arch.items())
        out += f"; projection: ({terms}) / {par} in parallel ≈ {total / par / 60:.0f} min"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", choices=["cached", "fresh"], default=None,
                   help="cache states to run (default: cached fresh; --quick: fresh)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the run (repeatable)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds before a run is interrupted; the stages it finished are still reported")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    p.add_argument("--worker-niceness", type=int, default=0,
                   help="RAY_worker_niceness for the run's private Ray (Ray's own default is 15; -1 = leave Ray's default)")
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
            r = run_distill(out_dir, cache, overrides, work / f"{mode}.log", args.timeout,
                            None if args.worker_niceness < 0 else args.worker_niceness)
            if r["rc"] != 0 and not r["timed_out"]:
                tail = (work / f"{mode}.log").read_text()[-3000:]
                raise RuntimeError(f"the {mode} run exited {r['rc']}; log tail:\n{tail}")
            if r["timed_out"]:
                r["partial"], r["eval"] = partial_timings(r)
            runs[mode] = r
            print(f"  {mode}: {r['wall']:.0f} s wall, " + ("timed out" if r["timed_out"] else f"timings {r['results'].get('timings_s')}"),
                  flush=True)
    finally:
        if args.keep:
            print(f"[{SECTION}] run directories kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    def timings(r: dict) -> dict[str, float]:
        return r["partial"] if r["timed_out"] else r["results"].get("timings_s", {})

    stages: list[str] = []
    for r in runs.values():
        for k in list(timings(r)) + (r["eval"].get("stages", ["evaluate"]) if r["timed_out"] else []):
            if k not in stages and k != "total":
                stages.append(k)
    rows = []
    for st in stages:
        cells = []
        for r in runs.values():
            t = timings(r)
            if st in t:
                cells.append(f"{t[st]:.1f}")
            elif r["timed_out"] and st == "evaluate":
                cells.append(_fmt_eval(r["eval"]))
            else:
                cells.append("—" if not r["timed_out"] else "not reached")
        rows.append([f"`{st}`"] + cells)
    rows.append(["total (in-process, `timings_s.total`)"]
                + [f"{r['results']['timings_s']['total']:.1f}" if not r["timed_out"] else "—" for r in runs.values()])
    rows.append(["other (`total` minus the stages: config, dataset, model load, Ray start, metrics, report)"]
                + [f"{r['results']['timings_s']['total'] - sum(v for k, v in r['results']['timings_s'].items() if k != 'total'):.1f}"
                   if not r["timed_out"] else "—" for r in runs.values()])
    rows.append(["wall (subprocess: interpreter, imports, Ray start, run)"]
                + [f"{r['wall']:.1f}" + (" (**interrupted at the timeout**)" if r["timed_out"] else "") for r in runs.values()])
    notes = []
    for mode, r in runs.items():
        if r["timed_out"]:
            bank_line = next((line for _, line in r["events"] if _BANK.search(line)), None)
            state = "not reached" if bank_line is None else bank_line.split("] ", 1)[1]
            notes.append(f"- **{mode}:** did not finish within the {args.timeout:.0f} s timeout (then interrupted); "
                         f"{state}. Stage times are from its log (`bank`: from the Ray start to the bank line) and "
                         "its finished evaluation files.")
        else:
            b = r["results"].get("bank") or {}
            state = "reused from cache" if b.get("reused") else f"built: {b.get('images')} images, {b.get('images_per_second')} img/s, " \
                                                             f"{b.get('image_timesteps_per_second')} image x timesteps/s"
            notes.append(f"- **{mode}:** finished; bank {state}")
    finished = [m for m, r in runs.items() if not r["timed_out"]]
    acc = []
    if finished:
        acc_rows = [[f"`{key}`", f"{s.get('mean', float('nan')):.1f} ± {s.get('std', float('nan')):.1f}", str(s.get("n"))]
                    for key, s in runs[finished[0]]["results"].get("summary", {}).items()]
        acc = ["", f"Accuracy from the `{finished[0]}` run (hard-label, mean ± std over seeds; a sanity check, not a benchmark):",
               "", md_table(["method/arch", "accuracy (%)", "seeds"], acc_rows)]
    cmd = "python -m dap_ray.distill " + " ".join(["out_dir=<fresh tmp>", "runtime.address=local"] + overrides)
    body = "\n".join([
        "## End to end (`benchmarks/end_to_end.py`)",
        "",
        provenance(info, command_line("end_to_end.py", argv)),
        f"- **Run:** `{cmd}` in a subprocess (`fresh` adds `cache_dir=<empty tmp>`). "
        + ("**Reduced run: not the embedded default.**" if args.quick or args.overrides else
           "The embedded default: digits, the packaged digits DiT, IPC 10, random_real / vanilla / dap, hard-label evaluation."),
        ("- **Ray worker priority:** Ray's own default (`worker_niceness` 15)." if args.worker_niceness < 0 else
         f"- **Ray worker priority:** `RAY_worker_niceness={args.worker_niceness}` (Ray's default is 15: its workers yield "
         "to every normal-priority process, which on this shared machine means to the other developers' jobs, and the run "
         "then measures their load rather than dap_ray; at the driver's own priority it behaves as on a dedicated machine)."),
        "- **Cache states:** `cached` = the user's cache dir (digits tree and, when an earlier default run built it, the bank "
        "are reused); `fresh` = an empty cache dir (first run ever).",
        *notes,
        "- No target: DESIGN §4 asks only that the default run finish in minutes on a 2-core CPU machine.",
        "",
        md_table(["stage (seconds)"] + list(runs), rows),
        *acc,
    ])
    write_section(args.out, SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
