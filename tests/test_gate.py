"""The listener's limits (Note [Listener limits] in server/gate.py), driven directly."""

from __future__ import annotations

import pytest

from gpupool.server.gate import Gate, GateLimits, Opened, Shut, peer_key


def opened(r: Opened | Shut) -> Opened:
    assert isinstance(r, Opened), r
    return r


def test_one_address_cannot_take_more_than_its_handshakes() -> None:
    g = Gate(GateLimits(max_handshakes=100, handshakes_per_peer=3))
    for _ in range(3):
        opened(g.open("10.0.0.9"))
    r = g.open("10.0.0.9")
    assert isinstance(r, Shut) and "10.0.0.9 has 3 connections opening sessions" in r.message
    opened(g.open("10.0.0.1"))  # others are not affected


def test_a_full_table_evicts_the_busiest_address_for_a_quieter_one() -> None:
    g = Gate(GateLimits(max_handshakes=4, handshakes_per_peer=4))
    slow = [opened(g.open("10.0.0.9")).ticket for _ in range(4)]
    assert isinstance(g.open("10.0.0.9"), Shut)  # its own fifth: no
    r = opened(g.open("10.0.0.1"))
    assert r.evict is slow[0] and slow[0].closed  # its oldest handshake made room
    assert g.handshakes() == 4 and g.handshakes("10.0.0.9") == 3
    # Spread evenly, nobody is busier than a newcomer would be: the newcomer waits.
    g2 = Gate(GateLimits(max_handshakes=2, handshakes_per_peer=2))
    opened(g2.open("10.0.0.1"))
    opened(g2.open("10.0.0.2"))
    r2 = g2.open("10.0.0.3")
    assert isinstance(r2, Shut) and "try again" in r2.message


def test_an_evicted_handshake_cannot_be_admitted() -> None:
    g = Gate(GateLimits(max_handshakes=2, handshakes_per_peer=2))
    t = opened(g.open("10.0.0.9")).ticket
    opened(g.open("10.0.0.9"))
    assert opened(g.open("10.0.0.1")).evict is t
    r = g.admit(t, "lease-a")
    assert isinstance(r, Shut) and "make room" in r.message
    assert g.established("lease-a") == 0


def test_connections_per_address_and_per_credential() -> None:
    g = Gate(GateLimits(handshakes_per_peer=8, connections_per_peer=3, connections_per_credential=2))
    a = [opened(g.open("10.0.0.1")).ticket for _ in range(3)]
    assert isinstance(g.open("10.0.0.1"), Shut)  # established or not, 3 is this address's all
    assert g.admit(a[0], "lease-a") is None and g.admit(a[1], "lease-a") is None
    r = g.admit(a[2], "lease-a")
    assert isinstance(r, Shut) and "2 connections to this server already" in r.message
    assert a[2].closed and g.connections("10.0.0.1") == 2  # the refused one gave its slot back
    b = opened(g.open("10.0.0.2")).ticket  # another address, another lease: fine
    assert g.admit(b, "lease-b") is None
    g.close(a[0])
    g.close(a[0])  # idempotent
    assert g.established("lease-a") == 1 and g.connections("10.0.0.1") == 1
    t = opened(g.open("10.0.0.1")).ticket
    assert g.admit(t, "lease-a") is None


def test_everything_given_back_leaves_the_gate_empty() -> None:
    g = Gate(GateLimits(max_handshakes=3, handshakes_per_peer=2, connections_per_credential=5))
    tickets = []
    for i in range(20):
        r = g.open(f"10.0.0.{i % 4}")
        if isinstance(r, Opened):
            tickets.append(r.ticket)
            if i % 3 == 0:
                g.admit(r.ticket, f"lease-{i % 2}")
    for t in tickets:
        g.close(t)
    assert g.handshakes() == 0
    assert all(g.connections(f"10.0.0.{i}") == 0 for i in range(4))
    assert g.established("lease-0") == g.established("lease-1") == 0


def test_ipv6_peers_count_by_their_64_and_mapped_v4_as_v4() -> None:
    assert peer_key("2001:db8:1:2::7") == peer_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert peer_key("2001:db8:1:3::7") != peer_key("2001:db8:1:2::7")
    assert peer_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert peer_key("10.0.0.1") == "10.0.0.1"


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        GateLimits(handshakes_per_peer=0)
    with pytest.raises(ValueError):
        GateLimits(handshake_timeout=0)
