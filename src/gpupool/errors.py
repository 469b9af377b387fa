"""The exceptions gpupool raises, as one tree a user can catch.

Grouped by what the user can do about them: fix the connection or credentials, fix the program,
ask for a bigger share, or report a bug.
"""

from __future__ import annotations


class GpupoolError(Exception):
    """Base of every error gpupool raises."""


class ConnectError(GpupoolError):
    """Could not reach or open a session on a gpupool server: check the address and that it runs."""


class AuthError(ConnectError):
    """The server refused the token: check --token / GPUPOOL_TOKEN."""


class ProtocolError(GpupoolError):
    """The peer sent bytes that are not valid gpupool protocol (malformed, oversize, wrong version)."""


class VersionMismatch(ProtocolError):
    """Client and server speak different protocol versions: install the same gpupool on both."""


class ServerLost(GpupoolError):
    """The connection to the server broke mid-session; tensors on it are gone."""


class SessionClosed(GpupoolError):
    """The session was closed; tensors that lived on it can no longer be used."""


class RemoteOpError(GpupoolError, RuntimeError):
    """An operation failed on the server. The message names the op and the line that issued it."""

    def __init__(self, message: str, op: str = "", location: str = "") -> None:
        super().__init__(message)
        self.op = op
        self.location = location


class ShareExceeded(RemoteOpError, MemoryError):
    """The session's memory share on the GPU is used up: free tensors or ask for a bigger share."""


class UnsupportedError(GpupoolError, NotImplementedError):
    """A CUDA feature that cannot work on a remote GPU (streams, events, graphs, extensions, NCCL)."""


# ---- the pool controller and leases ---------------------------------------------------------


class ControllerError(GpupoolError):
    """The controller refused a request; `code` names why (see docs/controller.md), `status` is the HTTP status."""

    def __init__(self, message: str, code: str = "error", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ControllerUnreachable(ConnectError):
    """Could not reach the pool controller: check its URL (--controller / GPUPOOL_CONTROLLER) and that it runs."""


class NoCapacity(ControllerError):
    """No GPU in the pool can take the request now (or ever, when `code` is "unsatisfiable"): wait longer,
    ask for less, or loosen the filters."""


class QuotaExceeded(ControllerError):
    """The request would take the user past their quota of GPUs' worth of memory: release a lease first."""


class NotFound(ControllerError):
    """No such lease, server, token or queue entry (or it is not yours to see)."""


class LeaseError(GpupoolError):
    """A lease could not be used: base of the lease verification errors."""


class LeaseInvalid(LeaseError):
    """The lease text is malformed: not a gpupool lease, truncated, or with missing fields."""


class LeaseForged(LeaseError):
    """The lease's signature does not verify with the controller's public key: forged, altered, or
    signed by another controller."""


class LeaseExpired(LeaseError):
    """The lease expired (not renewed in time) or was ended (released, or its server went down):
    request a new one."""


class LeaseWrongServer(LeaseError):
    """The lease was granted for another server than the one it was presented to."""
