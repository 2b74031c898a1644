"""Evaluation of distilled sets: the peers' nets (``nets``) and training protocols (``train``).

Pure torch, no Ray: each call of ``train_hard_label`` / ``train_soft_label`` is one training that
the orchestrator runs as a Ray task. See PROTOCOLS.md §2-§4 for the recipes.
"""

from dap_ray.eval.nets import create, embed, list_nets
from dap_ray.eval.train import (
    TrainConfig,
    epochs_for_ipc,
    evaluate,
    rded_batch_size,
    train_hard_label,
    train_soft_label,
    train_teacher,
)

__all__ = [
    "TrainConfig",
    "create",
    "embed",
    "epochs_for_ipc",
    "evaluate",
    "list_nets",
    "rded_batch_size",
    "train_hard_label",
    "train_soft_label",
    "train_teacher",
]
