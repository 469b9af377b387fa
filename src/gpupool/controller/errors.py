"""Errors of the pool controller and of lease verification: they live in `gpupool.errors`."""

from gpupool.errors import (
    ControllerError,
    ControllerUnreachable,
    LeaseError,
    LeaseExpired,
    LeaseForged,
    LeaseInvalid,
    LeaseWrongServer,
    NoCapacity,
    NotFound,
    QuotaExceeded,
)

__all__ = [
    "ControllerError",
    "ControllerUnreachable",
    "LeaseError",
    "LeaseExpired",
    "LeaseForged",
    "LeaseInvalid",
    "LeaseWrongServer",
    "NoCapacity",
    "NotFound",
    "QuotaExceeded",
]
