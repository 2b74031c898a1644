"""The names a config may use for methods, evaluation nets and augmentations — and no code of theirs.

Layer 1 (tests/test_layers.py): `config` validates names against these tuples without importing
the method or net modules, which sit layers above it. The method and net names are the registries of
dap_ray.methods and dap_ray.eval.nets spelled out once more; tests/test_layers.py checks that they
agree, so a new method or net is added in both places or the suite fails. The augmentation names are
defined only here (dap_ray.eval.augment uses them).
"""

from __future__ import annotations

#: dap_ray.methods.get_method names, in the order they run and are listed in error messages.
METHODS: tuple[str, ...] = ("random_real", "vanilla", "dap", "d3hr", "diver")

#: dap_ray.eval.nets.list_nets() (sorted); nets.create also builds convnet1..convnet8.
NETS: tuple[str, ...] = (
    "convnet", "convnet3", "convnet4", "convnet5", "convnet6", "efficientnet_b0", "mobilenetv2",
    "resnet101", "resnet18", "resnet18_in", "resnetap10", "swin",
)

#: Augmentation presets of dap_ray.eval.augment and the ops a "+"-joined pipeline may use.
AUGMENT_PRESETS: dict[str, tuple[str, ...]] = {
    "idc": ("rrc", "flip", "jitter", "lighting"),  # IDC/MMX ImageNet train transform (hard label)
    "rded": ("shuffle", "rrc", "flip"),  # RDED validation/main.py (soft label)
    "rrc_flip": ("rrc", "flip"),  # D3HR / plain
    "none": (),
}
AUGMENT_OPS: tuple[str, ...] = ("shuffle", "rrc", "flip", "jitter", "lighting")
