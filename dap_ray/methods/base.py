"""The method interface: every distillation method fills <run>/<method>/images/<class>/<index>.png.

The distill run, the evaluation and Tune treat methods alike through `Method.run(ctx)`; sampler-based
methods share the sampler actors (dap_ray.sampling.SamplerPool, one per run) and differ only in their
guidance recipe and start latents.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dap_ray.data.types import DatasetSplits


@dataclass
class RunContext:
    cfg: Any  # the validated DistillConfig
    dataset: DatasetSplits
    backbone_info: Any  # a loaded Backbone on the driver (schedule, shapes, layer names)
    run_dir: str
    bank: Any | None = None  # dap_ray.bank.Bank when a method needs it
    progress: bool = True
    extra: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable inputs (path, reason) in <run>/skipped.csv
    sampler_pool: Any | None = None  # dap_ray.sampling.SamplerPool shared by the run's sampler methods (None: one per method)

    def method_dir(self, name: str) -> str:
        return f"{self.run_dir.rstrip('/')}/{name}"

    def render(self, job: Any, items: list, desc: str) -> list[dict]:
        """Render a sampler job's work items on the run's sampler pool (or a pool for this call alone)."""
        from dap_ray.sampling import run_pool

        if self.sampler_pool is not None:
            return self.sampler_pool.run(job, items, self.progress, desc)
        r = self.cfg.runtime  # the pool sizes itself against the nodes alive now (null = auto)
        return run_pool(job, items, r.sampler_actors, float(r.gpus_per_actor), float(r.cpus_per_actor), self.progress, desc,
                        float(r.placement_timeout_s))

    def report_skipped(self, rows: Iterable[tuple[str, str]]) -> None:
        """Add unreadable inputs a method passed over to the run's bad-file report: `skipped`, and
        <run>/skipped.csv rewritten with all of them (each path once)."""
        from dap_ray.data import write_skipped_csv

        known = {r[0] for r in self.skipped}
        new = []
        for path, reason in rows:
            if str(path) not in known:
                known.add(str(path))
                new.append((str(path), str(reason)))
        if new:
            self.skipped.extend(new)
            write_skipped_csv(self.run_dir, self.skipped)


class Method:
    name: str = ""
    uses_bank: bool = False  # needs the real-feature bank (DAP)
    uses_model: bool = True  # needs the diffusion model
    # runs Ray work of its own besides the sampler pool (D3HR's inversion): the run's idle sampler
    # actors are stopped first, or on a small machine their CPUs would starve that work
    own_ray_stage: bool = False

    def run(self, ctx: RunContext) -> list[dict]:
        """Produce IPC images per class under ctx.method_dir(self.name); return manifest rows."""
        raise NotImplementedError
