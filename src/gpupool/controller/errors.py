"""Errors of the pool controller and of lease verification: most live in `gpupool.errors`."""

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


class SigningKeyError(ControllerError):
    """The controller's signing key file is missing, unreadable, readable by others, or not the key
    this database's leases are signed with: the controller does not start."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "signing_key", 500)


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
    "SigningKeyError",
]
