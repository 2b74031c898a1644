"""Ray init/attach: join the cluster we are in (ray job submit, `ray start` node, KubeRay) or start
local Ray; never initialise twice (Hydra multirun, Tune trials, tests calling main() repeatedly).

Token authentication: Ray reads its token from the environment (`RAY_AUTH_TOKEN` /
`RAY_AUTH_TOKEN_PATH` with `RAY_AUTH_MODE=token`), so nothing here handles or logs credentials.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Environment a worker needs to reach S3 (moto/MinIO endpoints included) — forwarded by *name* only.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HOME", "DAP_RAY_CACHE")


def _existing_cluster_address(cfg_address: str | None) -> str | None:
    """Where to attach: explicit config, RAY_ADDRESS (set by `ray job submit` and KubeRay), or a local
    `ray start` node (its address file in the temp dir); None = start a private local Ray."""
    if cfg_address:
        return cfg_address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import get_ray_address_from_environment  # noqa: F401
        from ray._private.utils import read_ray_address

        addr = read_ray_address()
        if addr:
            return "auto"
    except Exception:  # noqa: BLE001 - private API; absence just means "no local node"
        pass
    return None


def init_ray(runtime: Any | None = None, *, quiet: bool = True) -> dict:
    """Initialise Ray once; returns a short description of what we attached to."""
    import ray

    if ray.is_initialized():
        return {"mode": "already-initialized"}
    address = _existing_cluster_address(getattr(runtime, "address", None) if runtime is not None else None)
    env_vars = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, **kwargs)
            log.info("attached to Ray cluster at %s", address)
            return {"mode": "attached", "address": address}
        except ConnectionError:
            if getattr(runtime, "address", None):  # the user asked for this cluster explicitly
                raise
            log.warning("no Ray cluster reachable at %s; starting local Ray", address)
    num_cpus = getattr(runtime, "num_cpus", None) if runtime is not None else None
    host = getattr(runtime, "dashboard_host", "127.0.0.1") if runtime is not None else "127.0.0.1"
    # A private local Ray: dashboard bound to localhost only, workers inherit the S3 environment.
    ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host=host, runtime_env=runtime_env, **kwargs)
    return {"mode": "local", "num_cpus": num_cpus}


def device_for(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
