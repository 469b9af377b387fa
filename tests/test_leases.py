"""Leases: signing and verification (pure), and their life through a real controller: grant,
renew, release, expiry after the TTL, and a controller restart that loses none of them."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.controller import leases as L
from gpupool.controller.errors import (
    LeaseError,
    LeaseExpired,
    LeaseForged,
    LeaseInvalid,
    LeaseWrongServer,
)
from gpupool.controller.store import Principal, Store
from gpupool.controller.testing import GiB, Pool
from gpupool.errors import GpupoolError

KEY = L.generate_key()
PUB = KEY.public_key()
NOW = 1_700_000_000.0


def claims(**kw: object) -> L.LeaseClaims:
    base = L.LeaseClaims("l-1", "alice", "10.0.0.1:7777", "s-1", (L.LeaseGpu(0, "GPU-abc", 4 * GiB),), False,
                         int(NOW * 1000), int((NOW + 60) * 1000))
    return replace(base, **kw)  # type: ignore[arg-type]


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


# -- pure: sign and verify ----------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    text = L.sign_lease(claims(), KEY)
    got = L.verify_lease(text, PUB, NOW + 1, server_id="s-1")
    assert got == replace(claims(), kid=L.key_id(PUB))
    assert got.gpus[0].bytes == 4 * GiB and got.expires_at == NOW + 60
    assert L.decode_lease(text) == got
    assert L.public_key_from_text(L.public_key_to_text(PUB)).public_bytes_raw() == PUB.public_bytes_raw()
    assert L.private_key_from_pem(L.private_key_to_pem(KEY)).public_key().public_bytes_raw() == PUB.public_bytes_raw()


def test_canonical_encoding_is_stable() -> None:
    a = L.canonical(claims())
    assert a == L.canonical(L.LeaseClaims.from_dict(json.loads(a)))
    assert b" " not in a and a.index(b'"exclusive"') < a.index(b'"gpus"')


def test_expired_lease_is_refused() -> None:
    text = L.sign_lease(claims(), KEY)
    with pytest.raises(LeaseExpired, match="expired"):
        L.verify_lease(text, PUB, NOW + 60)
    assert L.verify_lease(text, PUB, NOW + 60, leeway_s=1).id == "l-1"


def test_lease_for_another_server_is_refused() -> None:
    """A lease binds to its server's id, not its address: another server at the same address
    (Note [One server per address]) refuses it."""
    with pytest.raises(LeaseWrongServer, match="s-1"):
        L.verify_lease(L.sign_lease(claims(), KEY), PUB, NOW, server_id="s-2")


def test_altered_lease_is_forged() -> None:
    prefix, payload, sig = L.sign_lease(claims(), KEY).split(".")
    raw = json.loads(base64.urlsafe_b64decode(payload + "=="))
    raw["gpus"][0]["bytes"] *= 2  # ask for more memory than granted
    altered = f"{prefix}.{b64(json.dumps(raw, sort_keys=True, separators=(',', ':')).encode())}.{sig}"
    with pytest.raises(LeaseForged, match="invalid signature"):
        L.verify_lease(altered, PUB, NOW)


def test_lease_signed_by_another_key_is_forged() -> None:
    other = L.generate_key()
    with pytest.raises(LeaseForged, match="not signed by this controller"):
        L.verify_lease(L.sign_lease(claims(), other), PUB, NOW)


def test_non_canonical_payload_is_refused_even_when_signed() -> None:
    d = replace(claims(), kid=L.key_id(PUB)).to_dict()
    payload = json.dumps(d, indent=1).encode()  # same claims, other bytes
    text = f"{L.PREFIX}.{b64(payload)}.{b64(KEY.sign(payload))}"
    with pytest.raises(LeaseForged, match="canonical"):
        L.verify_lease(text, PUB, NOW)


@pytest.mark.parametrize("text", [
    "", "gpl1", "gpl1..", "gpl2.e30.e30", "gpl1.e30.e30", "gpl1.!!!.e30", "gpl1.bm90IGpzb24.e30",
    "x" * (L.MAX_LEASE_TEXT + 1), "gpl1." + b64(b'{"v":2}') + ".e30",
])
def test_malformed_leases_are_invalid(text: str) -> None:
    with pytest.raises(LeaseInvalid):
        L.verify_lease(text, PUB, NOW)


def test_missing_or_mistyped_fields_are_invalid() -> None:
    good = replace(claims(), kid="k").to_dict()
    for field, value in [("gpus", []), ("gpus", [{"index": 0}]), ("expires_at_ms", "soon"), ("exclusive", 1),
                         ("user", ""), ("id", 5)]:
        bad = {**good, field: value}
        payload = json.dumps(bad, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(LeaseInvalid):
            L.verify_lease(f"gpl1.{b64(payload)}.{b64(KEY.sign(payload))}", PUB, NOW)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300),
                 st.builds(lambda a, b: f"gpl1.{a}.{b}", st.text("ABCxyz019-_", max_size=80),
                           st.text("ABCxyz019-_", max_size=90)),
                 st.binary(max_size=200).map(lambda b: f"gpl1.{b64(b)}.{b64(b[::-1])}")))
def test_arbitrary_text_only_raises_lease_errors(text: str) -> None:
    with pytest.raises(LeaseError):
        L.verify_lease(text, PUB, NOW)


def test_lease_errors_are_gpupool_errors() -> None:
    for cls in (LeaseInvalid, LeaseForged, LeaseExpired, LeaseWrongServer):
        assert issubclass(cls, GpupoolError)


# -- through a real controller ------------------------------------------------------------------


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    with Pool(tmp_path) as p:
        yield p


def public_key(pool: Pool) -> L.Ed25519PublicKey:
    return L.public_key_from_text(pool.admin.get("/v1/public-key").json()["public_key"])


def test_grant_renew_release(pool: Pool) -> None:
    reg = pool.register("gpu1", 8 * GiB)
    alice = pool.user("alice")
    r = alice.post("/v1/leases", json={"n": 1, "fraction": 0.5, "ttl_s": 60})
    assert r.status_code == 201, r.text
    lease = r.json()
    assert lease["user"] == "alice" and lease["state"] == "active" and lease["bytes_per_gpu"] == [4 * GiB]
    assert lease["address"] == "127.0.0.1:7004" and not lease["exclusive"]
    pub = public_key(pool)
    assert L.public_key_to_text(pub) == reg["public_key"]
    c = L.verify_lease(lease["signed"], pub, time.time(), server_id=reg["server"]["id"])
    assert (c.id, c.user, c.server_id, [(g.index, g.uuid, g.bytes) for g in c.gpus]) == (
        lease["id"], "alice", reg["server"]["id"], [(0, "gpu1-uuid-0", 4 * GiB)])
    assert c.expires_at == pytest.approx(lease["expires_at"], abs=0.001)

    gpu = pool.admin.get("/v1/gpus").json()["gpus"][0]
    assert (gpu["memory_bytes"], gpu["allocated_bytes"], gpu["leases"]) == (8 * GiB, 4 * GiB, 1)

    r = alice.post(f"/v1/leases/{lease['id']}/renew", json={"ttl_s": 3600})
    assert r.status_code == 200, r.text
    renewed = r.json()
    assert renewed["expires_at"] > lease["expires_at"] + 3000
    c2 = L.verify_lease(renewed["signed"], pub, time.time())
    assert c2.id == c.id and c2.expires_at == pytest.approx(renewed["expires_at"], abs=0.001)
    assert alice.post(f"/v1/leases/{lease['id']}/renew").status_code == 200  # the lease's own TTL

    hb = pool.heartbeat("gpu1")
    assert [x["id"] for x in hb["leases"]] == [lease["id"]]

    r = alice.delete(f"/v1/leases/{lease['id']}")
    assert r.status_code == 200 and r.json()["state"] == "released"
    assert pool.admin.get("/v1/gpus").json()["gpus"][0]["allocated_bytes"] == 0
    assert pool.heartbeat("gpu1")["leases"] == [], "a released lease must leave the server's list"
    for again in (alice.delete(f"/v1/leases/{lease['id']}"), alice.post(f"/v1/leases/{lease['id']}/renew")):
        assert again.status_code == 410 and again.json()["code"] == "lease_ended"
        assert "released" in again.json()["message"]
    assert alice.get("/v1/leases").json()["leases"] == []
    assert [x["state"] for x in alice.get("/v1/leases", params={"ended": True}).json()["leases"]] == ["released"]


def wait_until(pred, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    """Poll until `pred()` is truthy. The deadline only stops a hung test; nothing asserts timing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def test_lease_expires_after_ttl_when_not_renewed(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice = pool.user("alice")
    lease = alice.post("/v1/leases", json={"ttl_s": 1}).json()
    assert lease["exclusive"] and lease["bytes_per_gpu"] == [8 * GiB]
    wait_until(lambda: alice.get(f"/v1/leases/{lease['id']}").json()["state"] == "expired", "the lease to expire")
    assert pool.admin.get("/v1/gpus").json()["gpus"][0]["allocated_bytes"] == 0
    r = alice.post(f"/v1/leases/{lease['id']}/renew")
    assert r.status_code == 410 and "not renewed in time" in r.json()["message"]
    with pytest.raises(LeaseExpired):
        L.verify_lease(lease["signed"], public_key(pool), time.time())
    assert alice.post("/v1/leases", json={}).status_code == 201, "the expired lease's GPU is free again"


def test_controller_restart_keeps_leases_and_key(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB, 8 * GiB)
    alice = pool.user("alice")
    held = alice.post("/v1/leases", json={"n": 2, "fraction": 0.25, "ttl_s": 600}).json()
    key_before = pool.admin.get("/v1/public-key").json()

    # The server's last heartbeat is long past when the controller comes back: the start-up grace
    # must keep it up (and its lease alive) instead of marking it down at the first sweep.
    store = Store(pool.db_url)
    store.heartbeat(Principal("admin", "admin", ""), "gpu1", [], time.time() - 3600)
    store.close()
    pool.restart(heartbeat_interval_s=30.0)

    assert pool.admin.get("/v1/public-key").json() == key_before
    assert [s["state"] for s in pool.admin.get("/v1/servers").json()["servers"]] == ["up"]
    leases = alice.get("/v1/leases").json()["leases"]
    assert [x["id"] for x in leases] == [held["id"]] and leases[0]["state"] == "active"
    assert [g["allocated_bytes"] for g in pool.admin.get("/v1/gpus").json()["gpus"]] == [2 * GiB, 2 * GiB]
    r = alice.post(f"/v1/leases/{held['id']}/renew")
    assert r.status_code == 200
    L.verify_lease(held["signed"], public_key(pool), time.time())  # the old text still verifies
    L.verify_lease(r.json()["signed"], public_key(pool), time.time())
    assert alice.delete(f"/v1/leases/{held['id']}").status_code == 200
