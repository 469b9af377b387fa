"""gpupool: run unmodified PyTorch programs on GPUs pooled across the network.

    import gpupool, torch
    with gpupool.connect("HOST:PORT", token="...") as gpu:
        x = torch.randn(1024, 1024, device=gpu.device)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpupool.errors import (
    AuthError,
    ConnectError,
    ControllerError,
    ControllerUnreachable,
    GpupoolError,
    LeaseError,
    LeaseExpired,
    NoCapacity,
    ProtocolError,
    QuotaExceeded,
    RemoteOpError,
    ServerLost,
    SessionClosed,
    ShareExceeded,
    UnsupportedError,
    VersionMismatch,
)

if TYPE_CHECKING:
    from gpupool.client.session import Session

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "ConnectError",
    "ControllerError",
    "ControllerUnreachable",
    "GpupoolError",
    "LeaseError",
    "LeaseExpired",
    "NoCapacity",
    "QuotaExceeded",
    "ProtocolError",
    "RemoteOpError",
    "ServerLost",
    "SessionClosed",
    "ShareExceeded",
    "UnsupportedError",
    "VersionMismatch",
    "connect",
    "empty_host_cache",
]


def connect(address: str | None = None, token: str | None = None, **kwargs: Any) -> Session:
    """Open a session on a gpupool server; see `gpupool.client.session.connect`."""
    from gpupool.client.session import connect as _connect

    return _connect(address, token, **kwargs)


def empty_host_cache() -> None:
    """Unmap the free blocks cached for large `.cpu()` results (see Note [Host cache] in
    `gpupool.client.hostmem`); memory of results still alive is unaffected."""
    from gpupool.client.hostmem import empty_host_cache as _empty

    _empty()


def __getattr__(name: str) -> Any:
    raise AttributeError(name)
