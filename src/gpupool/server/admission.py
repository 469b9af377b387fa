"""Who may open what on this server: one pure function from a `Hello` to a grant or a refusal.

`admit` sees the client's `Hello`, a way to verify a lease (the server agent's: signature,
this server's id, not ended; Note [Lease expiry] in controller/leases.py), and what the server
holds now. It does no I/O, so the tests call it directly; the listener acts on its answer.

Note [Lease binding]: a lease names the server by id and each GPU by index and uuid, and is
honoured only for the device whose uuid it names: a lease for another server whose address
this one shares, or for a GPU this server does not have, is refused.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpupool.errors import LeaseError
from gpupool.protocol import messages as m
from gpupool.server.device import DeviceInfo


@dataclass(frozen=True)
class Grant:
    """Open a session (or, with `hold`, keep a lease's hold connection) on `device`."""

    device: DeviceInfo | None  # None: the listener picks one (static-token mode)
    limit: int | None  # the lease's bytes on the device; None: the server's per-session limit
    lease_id: str = ""
    expires_at: float = float("inf")
    hold: bool = False


@dataclass(frozen=True)
class Refusal:
    code: str  # a `Refused.code`: "auth", "lease", "version", "busy", "protocol"
    message: str


@dataclass(frozen=True)
class Holdings:
    """What the server holds when a client asks: counts the limits are checked against."""

    sessions: int = 0  # running or being started
    holds: int = 0
    ended_leases: frozenset[str] = field(default_factory=frozenset)  # ended here (a hold closed)


@dataclass(frozen=True)
class Limits:
    protocol: int
    max_sessions: int
    max_holds: int = 256


def admit(
    hello: m.Hello,
    devices: Sequence[DeviceInfo],
    static_token: str,
    verify_lease: Callable[[str], Any] | None,
    holdings: Holdings,
    limits: Limits,
) -> Grant | Refusal:
    """Decide on one connection's `Hello`."""
    if hello.protocol != limits.protocol:
        return Refusal(
            "version",
            f"client speaks protocol {hello.protocol}, this server {limits.protocol}: "
            "install the same gpupool version on both",
        )
    if hello.lease and verify_lease is not None:
        grant = _lease_grant(hello, devices, verify_lease, holdings)
    elif hello.hold:
        return Refusal("lease", "a hold connection needs a lease")
    elif static_token and hmac.compare_digest(hello.token.encode(), static_token.encode()):
        grant = Grant(None, None)
    else:
        what = "no lease and no valid token" if verify_lease is not None else "invalid token"
        return Refusal("auth", f"{what}: check --token or GPUPOOL_TOKEN")
    if isinstance(grant, Refusal):
        return grant
    if grant.hold:
        if holdings.holds >= limits.max_holds:
            return Refusal("busy", f"server at its limit of {limits.max_holds} hold connections")
    elif holdings.sessions >= limits.max_sessions:
        return Refusal("busy", f"server at its limit of {limits.max_sessions} sessions")
    return grant


def _lease_grant(hello: m.Hello, devices: Sequence[DeviceInfo], verify_lease: Callable[[str], Any],
                 holdings: Holdings) -> Grant | Refusal:
    try:
        claims = verify_lease(hello.lease)
    except LeaseError as e:
        return Refusal("lease", str(e))
    if claims.id in holdings.ended_leases:
        return Refusal("lease", f"lease {claims.id} has ended (its holder went away); request a new one")
    if not 0 <= hello.gpu < len(claims.gpus):
        return Refusal("lease", f"lease {claims.id} holds {len(claims.gpus)} GPU(s); GPU {hello.gpu} asked for")
    g = claims.gpus[hello.gpu]
    dev = next((d for d in devices if d.uuid and d.uuid == g.uuid and d.index == g.index), None)
    if dev is None:
        return Refusal("lease", f"lease {claims.id} names GPU {g.index} ({g.uuid}), which this server does not have")
    return Grant(dev, min(g.bytes, dev.memory_total), claims.id, claims.expires_at, hello.hold)
