"""Errors of the pool controller and of lease verification, as part of gpupool's one error tree.

Note: these belong in `gpupool.errors` next to the data-plane errors; they live here only until the
controller lands, and `gpupool.errors` should re-export (or absorb) them then.
"""

from __future__ import annotations

from gpupool.errors import ConnectError, GpupoolError


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
