"""random_real: IPC real training images per class, drawn with a seeded generator (the baseline)."""

from __future__ import annotations

import numpy as np

from dap_ray.data import BadImageError, load_image
from dap_ray.methods.base import Method, RunContext
from dap_ray.sampling import existing_indices, image_path, seed_for, write_png_atomic


class RandomReal(Method):
    name = "random_real"
    uses_model = False

    def run(self, ctx: RunContext) -> list[dict]:
        cfg, out = ctx.cfg, ctx.method_dir(self.name)
        res = int(ctx.backbone_info.resolution) if ctx.backbone_info is not None else int(cfg.model.resolution)
        rows = []
        for c in ctx.dataset.classes:
            recs = sorted((r for r in ctx.dataset.train if r.label == c.index), key=lambda r: r.id)
            rng = np.random.default_rng(seed_for(cfg.seed, "random_real", c.key) % 2**32)
            order = rng.permutation(len(recs))
            have = existing_indices(out, c.key)
            i = 0
            for j in order:  # unreadable files are passed over; the next draw takes their place
                if i >= cfg.ipc:
                    break
                r = recs[j]
                if i not in have:
                    try:
                        img = load_image(r.path, res)
                    except BadImageError:
                        continue
                    write_png_atomic(image_path(out, c.key, i), img)
                rows.append({"class": c.key, "label": c.index, "index": i, "seed": int(j), "source": r.id})
                i += 1
        return rows
