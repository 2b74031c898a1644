"""Method registry (timm style): `get_method(name)`; an unknown name lists the valid ones."""

from __future__ import annotations

from dap_ray.errors import ConfigError
from dap_ray.methods.base import Method, RunContext

__all__ = ["Method", "RunContext", "get_method", "list_methods", "register"]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    if _REGISTRY:
        return
    from dap_ray.methods.dap import DAP, Vanilla
    from dap_ray.methods.random_real import RandomReal

    for cls in (RandomReal, Vanilla, DAP):
        register(cls)
    try:  # the other seed methods (D3HR, DIVER)
        from dap_ray.methods.d3hr import D3HR
        from dap_ray.methods.diver import Diver

        register(D3HR)
        register(Diver)
    except ImportError:
        pass


def list_methods() -> list[str]:
    _load()
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    _load()
    if name not in _REGISTRY:
        raise ConfigError("methods", name, f"one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()
