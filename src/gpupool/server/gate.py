"""How many of the listener's slots one peer, or one credential, may hold: pure counting, no I/O.

Note [Listener limits]: a connection holds a *ticket* from accept until it closes. Until its
`Hello` is read and admitted it is a handshake; then it is established under a credential (a
lease id, or the static token). The gate bounds:

- handshakes in progress, in all (`max_handshakes`) and per peer address
  (`handshakes_per_peer`), each of which must finish within `handshake_timeout` seconds;
- connections per peer address (`connections_per_peer`: handshakes and established ones);
- established connections per credential (`connections_per_credential`: sessions and holds).

A global limit alone lets one peer with many slow connections lock everyone out (issue 10: 200
one-byte connections refused 7 of 8 clients). So when every handshake slot is taken, a newcomer
whose address, with it, would still hold fewer handshakes than the busiest address evicts that
address's oldest handshake: a peer can always get a slot unless the slots are spread over about
`max_handshakes` addresses, each about as busy as it. A botnet of that many addresses each finishing within the
handshake deadline is beyond what a listener alone can stop; it delays, it does not lock out
(slots free every `handshake_timeout` seconds).

Peers are counted by address text; an IPv6 peer by its /64, which is what one host usually
gets. The gate is not thread-safe: the listener calls it under its lock.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GateLimits:
    #: Seconds a connection has, in total, to deliver its `Hello`.
    handshake_timeout: float = 10.0
    max_handshakes: int = 128
    handshakes_per_peer: int = 8
    connections_per_peer: int = 256
    connections_per_credential: int = 64

    def __post_init__(self) -> None:
        for name in ("max_handshakes", "handshakes_per_peer", "connections_per_peer",
                     "connections_per_credential"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.handshake_timeout > 0:
            raise ValueError("handshake_timeout must be positive")


@dataclass(eq=False)
class Ticket:
    """One connection's hold on the gate; `closed` once given back."""

    peer: str
    number: int
    credential: str | None = None  # set when admitted
    closed: bool = False


@dataclass(frozen=True)
class Opened:
    ticket: Ticket
    #: A handshake to end now to make room (Note [Listener limits]), or None.
    evict: Ticket | None = None


@dataclass(frozen=True)
class Shut:
    """Refused at the door; `message` says why, for the `Refused` frame and the log."""

    message: str


def peer_key(address: str) -> str:
    """The address a peer is counted under: itself, or for IPv6 its /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class Gate:
    limits: GateLimits = field(default_factory=GateLimits)

    def __post_init__(self) -> None:
        self._numbers = itertools.count()
        self._handshakes: dict[str, list[Ticket]] = {}  # by peer, oldest first
        self._connections: Counter[str] = Counter()  # by peer: handshakes and established
        self._by_credential: Counter[str] = Counter()

    # ---- what it holds ----------------------------------------------------------------------

    def handshakes(self, peer: str | None = None) -> int:
        if peer is not None:
            return len(self._handshakes.get(peer_key(peer), ()))
        return sum(len(t) for t in self._handshakes.values())

    def connections(self, peer: str) -> int:
        return self._connections[peer_key(peer)]

    def established(self, credential: str) -> int:
        return self._by_credential[credential]

    # ---- transitions ------------------------------------------------------------------------

    def open(self, address: str) -> Opened | Shut:
        """A connection from `address` was accepted: may it start its handshake?"""
        lim, peer = self.limits, peer_key(address)
        mine = len(self._handshakes.get(peer, ()))
        if mine >= lim.handshakes_per_peer:
            return Shut(f"{address} has {mine} connections opening sessions already; finish those first")
        if self._connections[peer] >= lim.connections_per_peer:
            return Shut(f"{address} has {self._connections[peer]} connections open already")
        evict = None
        if self.handshakes() >= lim.max_handshakes:
            busiest = max(self._handshakes, key=lambda p: len(self._handshakes[p]))
            if busiest == peer or len(self._handshakes[busiest]) <= mine + 1:
                return Shut("too many connections are opening sessions; try again")
            evict = self._handshakes[busiest][0]
            self.close(evict)
        ticket = Ticket(peer, next(self._numbers))
        self._handshakes.setdefault(peer, []).append(ticket)
        self._connections[peer] += 1
        return Opened(ticket, evict)

    def admit(self, ticket: Ticket, credential: str) -> Shut | None:
        """The handshake succeeded under `credential`: the connection is established, unless the
        credential holds its limit already (then the ticket is given back)."""
        if ticket.closed:
            return Shut("the connection was closed to make room for others; connect again")
        self._end_handshake(ticket)
        if self._by_credential[credential] >= self.limits.connections_per_credential:
            self.close(ticket)
            return Shut(f"this lease or token has {self._by_credential[credential]} connections to "
                        "this server already; close some first")
        ticket.credential = credential
        self._by_credential[credential] += 1
        return None

    def close(self, ticket: Ticket) -> None:
        """The connection ended (at any stage): give back what it held. Idempotent."""
        if ticket.closed:
            return
        ticket.closed = True
        if ticket.credential is None:
            self._end_handshake(ticket)
        else:
            _decrement(self._by_credential, ticket.credential)
        _decrement(self._connections, ticket.peer)

    def _end_handshake(self, ticket: Ticket) -> None:
        queue = self._handshakes.get(ticket.peer)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._handshakes[ticket.peer]


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
