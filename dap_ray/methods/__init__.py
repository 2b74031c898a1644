"""Method registry (timm style): `get_method(name)`; an unknown name lists the valid ones.

The names are also in dap_ray.registry (which imports no method code), so config validates them
at the bottom layer; tests/test_layers.py checks that both lists agree.
"""

from __future__ import annotations

from dap_ray.errors import ConfigError
from dap_ray.methods.base import Method, RunContext
from dap_ray.methods.d3hr import D3HR
from dap_ray.methods.dap import DAP, Vanilla
from dap_ray.methods.diver import Diver
from dap_ray.methods.random_real import RandomReal

__all__ = ["Method", "RunContext", "get_method", "list_methods", "register"]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (RandomReal, Vanilla, DAP, D3HR, Diver):
    register(_cls)


def list_methods() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ConfigError("methods", name, f"one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()
