"""random_real: IPC real training images per class, drawn with a seeded generator (the baseline).

An unreadable file the draw lands on is passed over (the next draw of its class takes its place)
and listed in the run's skipped.csv with its reason. Every drawn file is decoded, also on a re-run
whose images already exist: which files are unreadable decides which image each index holds, so a
resumed run fills its missing indices exactly as an uninterrupted one would, and reports them again.
"""

from __future__ import annotations

import logging

import numpy as np

from dap_ray.data import BadImageError, load_image
from dap_ray.methods.base import Method, RunContext
from dap_ray.sampling import existing_indices, image_path, seed_for, write_png_atomic

log = logging.getLogger(__name__)


class RandomReal(Method):
    name = "random_real"
    uses_model = False

    def run(self, ctx: RunContext) -> list[dict]:
        cfg, out = ctx.cfg, ctx.method_dir(self.name)
        res = int(ctx.backbone_info.resolution) if ctx.backbone_info is not None else int(cfg.model.resolution)
        rows: list[dict] = []
        skipped: list[tuple[str, str]] = []
        short: list[str] = []
        for c in ctx.dataset.classes:
            recs = sorted((r for r in ctx.dataset.train if r.label == c.index), key=lambda r: r.id)
            rng = np.random.default_rng(seed_for(cfg.seed, "random_real", c.key) % 2**32)
            order = rng.permutation(len(recs))
            have = existing_indices(out, c.key)
            i = 0
            for j in order:
                if i >= cfg.ipc:
                    break
                r = recs[j]
                try:
                    img = load_image(r.path, res)
                except BadImageError as e:
                    skipped.append((r.path, e.reason))
                    continue
                if i not in have:
                    write_png_atomic(image_path(out, c.key, i), img)
                rows.append({"class": c.key, "label": c.index, "index": i, "seed": int(j), "source": r.id})
                i += 1
            if i < cfg.ipc:
                short.append(c.key)
        ctx.report_skipped(skipped)  # the distill run logs how many, and where they are listed
        if short:
            log.warning("random_real: %d class(es) have fewer than ipc=%d readable training images (e.g. %s)", len(short), cfg.ipc, short[0])
        return rows
