"""Shared plumbing for the benchmark scripts: machine description, interleaved timing, ratios, and
rewriting one marked section of BENCHMARKS.md.

Why ratios measured side by side: the machines these run on are shared (2 cores, several developers),
so an absolute time says little about the code. Every figure a target is checked against is a ratio of
two variants timed in the same process, interleaved round by round (A, B, A, B, ...; the order flips
every other round so a slow drift in load does not favour one variant), and summarised by the median
over rounds of the per-round ratio. Each section records the load average before and after.

Scripts import this as `from benchmarks._common import ...` (run them from the repository root as
`python benchmarks/NAME.py`; `ensure_repo_on_path()` makes that work without installing anything).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dap_ray.report import md_table  # noqa: F401  (the benchmarks' tables are the reports' tables)
from dap_ray.runtime import cpu_model, gpu_name

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "BENCHMARKS.md"


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress logging would drown the benchmark's own output."""
    import logging

    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_repo_on_path() -> None:
    """`python benchmarks/x.py` puts benchmarks/ (not the repo) on sys.path; add the repo root."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, str]:
    """What a reader needs to judge a figure: hardware, load, threads, library versions, date."""
    import psutil
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - ray is a hard dependency
        ray_version = "not installed"
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # pragma: no cover
        diffusers_version = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "ray": ray_version,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": load_average(),
    }


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run, with the thread setting it ran under."""
    omp = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={omp} " if omp else ""
    return f"{prefix}python benchmarks/{script} {shlex.join(list(argv))}".rstrip()


def provenance(info: dict[str, str], command: str) -> str:
    """The 'how, where, when' block that heads every section."""
    info = {**info, "load_end": load_average()}
    return "\n".join([
        f"- **Command:** `{command}`",
        f"- **Machine:** {info['cpu']}, {info['cores']}, {info['ram']} RAM, {info['gpu']}",
        f"- **Software:** torch {info['torch']} ({info['torch_threads']} thread(s), OMP_NUM_THREADS={info['OMP_NUM_THREADS']}), "
        f"ray {info['ray']}, diffusers {info['diffusers']}, Python {info['python']}",
        f"- **Date:** {info['date']}; load average (1/5/15 min) {info['load_start']} at start, {info['load_end']} at end",
    ])


# ---------------------------------------------------------------------------------------------
# arguments and output locations
# ---------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs (seconds), figures meaningless")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the BENCHMARKS.md whose section is rewritten")
    return p


def figures_dir(out: Path) -> Path:
    """Plots live beside the markdown file they belong to: <dir of out>/benchmarks/figures."""
    d = Path(out).resolve().parent / "benchmarks" / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def rel_link(path: Path, out: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(out).resolve().parent).replace(os.sep, "/")


# ---------------------------------------------------------------------------------------------
# BENCHMARKS.md sections
# ---------------------------------------------------------------------------------------------


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"section name {name!r}: letters, digits, '_' and '-' only")
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in `path` by `body`.

    Everything outside the markers is left byte for byte. A file without the markers gets the section
    appended; a missing file is created. The write goes to a temp file renamed into place, so a
    benchmark killed mid-write never leaves a truncated BENCHMARKS.md.
    """
    path = Path(path)
    start, end = _markers(name)
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body.strip()}\n{end}"
    i = text.find(start)
    if i >= 0:
        j = text.find(end, i)
        if j < 0:
            raise ValueError(f"{path}: {start} has no closing {end}")
        text = text[:i] + block + text[j + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_section(path: Path, name: str) -> str | None:
    """The body of a section (None when the markers are absent)."""
    start, end = _markers(name)
    text = Path(path).read_text()
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i)
    return text[i + len(start): j].strip()


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**PASS**" if ok else "**FAIL**")


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (perf_counter; CUDA work is synchronised by the caller's fn)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                on_round: Callable[[int], None] | None = None,
                cpu_out: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Time every variant once per round, `repeats` rounds; the order is reversed every other round.

    Returns {name: [wall seconds per round]}: round r of every variant ran back to back, so the
    per-round ratios (`paired_ratio`) cancel load that changes slower than one round. If `cpu_out`
    is given it is filled with the same for this process's CPU time (`time.process_time`): for a
    single-threaded variant that runs in this process it is the cost without the time spent waiting
    for a core, which on a shared machine is most of the noise. (Meaningless for work done in other
    processes, e.g. Ray workers.)
    """
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu_out is not None:
        cpu_out.clear()
        cpu_out.update({n: [] for n in names})
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            c0 = time.process_time()
            times[n].append(time_call(variants[n]))
            if cpu_out is not None:
                cpu_out[n].append(time.process_time() - c0)
        if on_round is not None:
            on_round(r)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentile; with fewer than 4 values, (min, max)."""
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median and interquartile range of num[r] / den[r] over rounds r."""
    if len(num) != len(den) or not num:
        raise ValueError("paired_ratio needs two equally long, non-empty series")
    rs = [a / b for a, b in zip(num, den)]
    lo, hi = quartiles(rs)
    return median(rs), lo, hi


def fmt_ratio(r: tuple[float, float, float], digits: int = 2) -> str:
    m, lo, hi = r
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------
# the digits setup most scripts share
# ---------------------------------------------------------------------------------------------


def default_config(model_path: str | None = None):
    """The embedded default run's composed config (dap_ray/conf/distill.yaml), optionally with another model
    path: benchmarks take their knobs (steps, CFG, γ, t_stop, layer, batch sizes) from it."""
    ensure_repo_on_path()
    from dap_ray.cli import compose

    return compose("distill", [] if model_path is None else [f"model.path={model_path}"])


def digits_model_cfg(model_path: str | None) -> dict:
    """The default run's model config as a plain dict (the packaged digits DiT unless a path is given);
    identical to what `python -m dap_ray.distill` uses, so bank cache keys match the default run's."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(default_config(model_path).model, resolve=True)


def digits_setup(model_path: str | None, cache_dir: str | None, device: str = "cpu"):
    """(backbone bound to the digits classes, DatasetSplits, model cfg): the real data and the real model."""
    ensure_repo_on_path()
    from dap_ray.backbones import load_backbone
    from dap_ray.data import resolve_dataset

    cfg = digits_model_cfg(model_path)
    ds = resolve_dataset("digits", None, None, cache_dir=cache_dir)
    bb = load_backbone(cfg, device)
    bb.bind_classes(ds.classes)
    return bb, ds, cfg


def subset_per_class(records: Sequence, per_class: int) -> list:
    """The first `per_class` records of every class (sorted by id): a deterministic, balanced subset."""
    by: dict[int, list] = {}
    for r in sorted(records, key=lambda r: r.id):
        by.setdefault(r.label, []).append(r)
    return [r for label in sorted(by) for r in by[label][:per_class]]


# ---------------------------------------------------------------------------------------------
# CPU peak memory
# ---------------------------------------------------------------------------------------------


def cpu_peak_alloc_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of torch tensor memory allocated *during* fn, above what was live before it.

    Why this method: tracemalloc does not see torch's CPU allocator, and RSS deltas on a shared
    machine are blurred by the allocator's caching and by page reuse. torch.profiler with
    profile_memory=True records every tensor allocation and free (bytes, timestamp); the running sum
    of those events, in time order, is the live-tensor total relative to the start, and its maximum
    is the transient peak of the call — exact and independent of other processes. It covers torch
    tensors only (not Python objects or numpy arrays), which is where a sampling step's memory is.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            if str(getattr(e, "device_type", lambda: "cpu")()).lower().endswith("cuda"):
                continue
            events.append((e.start_ns(), int(e.nbytes())))
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
