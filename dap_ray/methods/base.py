"""The method interface: every distillation method fills <run>/<method>/images/<class>/<index>.png.

The distill run, the evaluation and Tune treat methods alike through `Method.run(ctx)`; sampler-based
methods share the actor pool (dap_ray.sampling.run_pool) and differ only in their guidance recipe.
"""

from __future__ import annotations

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

    def method_dir(self, name: str) -> str:
        return f"{self.run_dir.rstrip('/')}/{name}"


class Method:
    name: str = ""
    uses_bank: bool = False  # needs the real-feature bank (DAP)
    uses_model: bool = True  # needs the diffusion model

    def run(self, ctx: RunContext) -> list[dict]:
        """Produce IPC images per class under ctx.method_dir(self.name); return manifest rows."""
        raise NotImplementedError
