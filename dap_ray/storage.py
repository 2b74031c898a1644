"""Low-level storage: fsspec filesystems for local paths and ``s3://`` URIs, atomic writes, path expansion.

Layer 1 (see tests/test_layers.py): imports nothing of dap_ray, so every stage can use it. S3
endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...),
never from files.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec


def storage_options_for(path: str, storage_options: dict | None = None) -> dict:
    """fsspec options for ``path``: for S3, take the endpoint from the environment if not given.

    Recent botocore reads ``AWS_ENDPOINT_URL`` itself; passing it explicitly also covers older
    versions and s3fs' own client construction.
    """
    opts = dict(storage_options or {})
    if path.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = dict(opts.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
            opts["endpoint_url"] = endpoint
    return opts


def filesystem(path: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path without protocol) for a local path or URI."""
    return fsspec.core.url_to_fs(path, **storage_options_for(path, storage_options))


def is_local(fs: Any) -> bool:
    """Is ``fs`` the local filesystem (where a rename is atomic and a PUT is not a thing)?"""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write atomically where the filesystem can (local: temp + rename); S3 puts are atomic already,
    so a reader never sees a half-written file under its final name."""
    if is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def expand(path: str) -> str:
    """A user-given location as the stages use it: URIs unchanged, local paths absolute with ``~`` expanded."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
