"""The controller's API against a real uvicorn server and a real SQLite database: inventory, the
queue, quotas, who sees what, tokens, servers going down, 100 concurrent clients, and a fuzzer
(schemathesis) over the served OpenAPI spec."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from schemathesis import checks as sc

from gpupool.controller import Settings, create_app
from gpupool.controller import leases as L
from gpupool.controller.client import ControllerClient, LeaseRenewer, ServerAgent
from gpupool.controller.errors import (
    ControllerUnreachable,
    LeaseExpired,
    LeaseWrongServer,
    NoCapacity,
    NotFound,
    QuotaExceeded,
    SigningKeyError,
)
from gpupool.controller.runner import ControllerThread
from gpupool.controller.store import Store
from gpupool.controller.testing import ADMIN_TOKEN, GiB, Pool
from gpupool.errors import AuthError


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    with Pool(tmp_path) as p:
        yield p


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll until `pred()` is truthy. The deadline only stops a hung test; nothing asserts timing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def gpus(pool: Pool) -> list[dict[str, Any]]:
    r = pool.admin.get("/v1/gpus")
    assert r.status_code == 200
    return list(r.json()["gpus"])


# -- inventory and placement --------------------------------------------------------------------


def test_two_halves_share_a_gpu_a_third_is_refused_at_once(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice = pool.user("alice")
    a = alice.post("/v1/leases", json={"fraction": 0.5})
    b = alice.post("/v1/leases", json={"fraction": 0.5})
    assert a.status_code == b.status_code == 201
    (g,) = gpus(pool)
    assert (g["memory_bytes"], g["allocated_bytes"], g["free_bytes"], g["leases"], g["kind"]) == (
        8 * GiB, 8 * GiB, 0, 2, "cpu")
    pool.admin.post("/v1/servers/gpu1/heartbeat", json={"gpus": [
        {"index": 0, "used_bytes": 123, "utilization": 50.0, "sessions": 2}]})
    (g,) = gpus(pool)
    assert (g["used_bytes"], g["utilization"], g["sessions"]) == (123, 50.0, 2)
    c = alice.post("/v1/leases", json={"fraction": 0.5, "wait_s": 0})
    assert c.status_code == 409, c.text
    assert c.json()["code"] == "no_capacity" and "busy" in c.json()["message"]
    assert alice.get("/v1/queue").json()["entries"] == [], "a refused request must not stay queued"
    for r in (a, b):
        assert alice.delete(f"/v1/leases/{r.json()['id']}").status_code == 200
    assert [g["allocated_bytes"] for g in gpus(pool)] == [0]


def test_request_that_can_never_fit_is_refused_with_the_reason(pool: Pool) -> None:
    alice = pool.user("alice")
    r = alice.post("/v1/leases", json={"wait_s": 30})
    assert r.status_code == 409 and r.json()["code"] == "unsatisfiable"
    assert "no GPU servers are registered" in r.json()["message"]
    pool.register("gpu1", 8 * GiB, model="NVIDIA L4", kind="cuda")
    for body, words in [({"n": 2, "wait_s": 30}, "no matching server has more than 1"),
                        ({"memory_bytes": 9 * GiB, "wait_s": 30}, "largest matching GPU has 8.0 GiB"),
                        ({"model": "H200", "wait_s": 30}, "the pool has: NVIDIA L4"),
                        ({"server": "elsewhere", "wait_s": 30}, "no server is named 'elsewhere'")]:
        r = alice.post("/v1/leases", json=body)
        assert r.status_code == 409 and r.json()["code"] == "unsatisfiable", r.text
        assert words in r.json()["message"]
    r = alice.post("/v1/leases", json={"model": "l4", "kind": "cuda", "min_memory_bytes": 8 * GiB})
    assert r.status_code == 201


def test_gpus_of_a_request_on_one_server_packing_and_spread(pool: Pool) -> None:
    pool.register("a", 100 * GiB, 100 * GiB)
    pool.register("b", 100 * GiB, 100 * GiB)
    alice = pool.user("alice")
    first = alice.post("/v1/leases", json={"fraction": 0.25}).json()
    packed = alice.post("/v1/leases", json={"fraction": 0.25}).json()
    assert packed["gpus"][0]["gpu_id"] == first["gpus"][0]["gpu_id"], "packing fills a partly used GPU first"
    spread = alice.post("/v1/leases", json={"fraction": 0.25, "spread": True}).json()
    assert spread["server_id"] != first["server_id"], "spread goes to the idle server"
    two = alice.post("/v1/leases", json={"n": 2, "memory_bytes": GiB}).json()
    assert len({g["gpu_id"] for g in two["gpus"]}) == 2 and two["bytes_per_gpu"] == [GiB, GiB]
    assert all(g["gpu_id"].startswith(two["server_id"]) for g in two["gpus"])


def test_waiting_request_is_granted_when_capacity_frees(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice, bob = pool.user("alice"), pool.user("bob")
    held = alice.post("/v1/leases", json={}).json()
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", bob.post("/v1/leases", json={"fraction": 0.5, "wait_s": 120})))
    t.start()
    entry = wait_until(lambda: bob.get("/v1/queue").json()["entries"], "bob's request to queue")[0]
    assert entry["position"] == 1 and entry["state"] == "waiting" and entry["user"] == "bob"
    assert alice.get("/v1/queue").json()["entries"] == [], "alice does not see bob's queue entries"
    assert alice.delete(f"/v1/leases/{held['id']}").status_code == 200
    t.join(120)
    r = result["r"]
    assert r.status_code == 201 and r.json()["user"] == "bob", r.text
    assert bob.get(f"/v1/queue/{entry['id']}").json()["lease"]["id"] == r.json()["id"]


def test_queue_is_fifo_with_positions_and_cancel(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice, bob = pool.user("alice"), pool.user("bob")
    held = alice.post("/v1/leases", json={}).json()
    e1 = bob.post("/v1/queue", json={"wait_s": 600}).json()
    e2 = alice.post("/v1/queue", json={"fraction": 0.1, "wait_s": 600}).json()
    assert (e1["state"], e1["position"], e2["position"]) == ("waiting", 1, 2)
    # e2 would fit beside nothing else, but FIFO: e1 (a whole GPU) is served first.
    assert alice.delete(f"/v1/leases/{held['id']}").status_code == 200
    got1 = bob.get(f"/v1/queue/{e1['id']}", params={"wait_s": 30}).json()
    assert got1["state"] == "granted" and got1["lease"]["exclusive"]
    got2 = alice.get(f"/v1/queue/{e2['id']}").json()
    assert (got2["state"], got2["position"]) == ("waiting", 1)
    assert bob.get(f"/v1/queue/{e2['id']}").status_code == 404, "another user's entry is not visible"
    r = alice.delete(f"/v1/queue/{e2['id']}")
    assert r.json()["state"] == "cancelled"
    assert alice.get("/v1/queue").json()["entries"] == []


def test_wait_times_out_with_a_clear_error(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice = pool.user("alice")
    alice.post("/v1/leases", json={})
    r = alice.post("/v1/leases", json={"fraction": 0.5, "wait_s": 0.5})
    assert r.status_code == 409 and r.json()["code"] == "no_capacity"
    assert "waiting 0.5 s" in r.json()["message"] and "busy" in r.json()["message"]
    assert alice.get("/v1/queue").json()["entries"] == []


def test_quota_in_gpus_worth_of_memory(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB, 8 * GiB, 8 * GiB)
    alice, bob = pool.user("alice"), pool.user("bob")
    assert pool.admin.put("/v1/users/alice/quota", json={"quota_gpus": 1}).json()["quota_gpus"] == 1
    a1 = alice.post("/v1/leases", json={"fraction": 0.5})
    a2 = alice.post("/v1/leases", json={"memory_bytes": 4 * GiB})
    assert a1.status_code == a2.status_code == 201
    r = alice.post("/v1/leases", json={"fraction": 0.25})
    assert r.status_code == 403 and r.json()["code"] == "quota_exceeded", r.text
    assert "quota is 1" in r.json()["message"]
    r = alice.post("/v1/leases", json={"n": 2, "wait_s": 30})
    assert r.status_code == 403 and "needs at least 2" in r.json()["message"], "more than the quota alone: at once"
    assert bob.post("/v1/leases", json={"n": 2}).status_code == 201, "alice's quota does not limit bob"
    users = {u["name"]: u for u in pool.admin.get("/v1/users").json()["users"]}
    assert users["alice"]["usage_gpus"] == 1 and users["bob"]["usage_gpus"] == 2
    assert alice.delete(f"/v1/leases/{a1.json()['id']}").status_code == 200
    assert alice.post("/v1/leases", json={"fraction": 0.25}).status_code == 201


def test_users_see_and_release_only_their_own_leases(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice, bob = pool.user("alice"), pool.user("bob")
    la = alice.post("/v1/leases", json={"fraction": 0.25}).json()
    lb = bob.post("/v1/leases", json={"fraction": 0.25}).json()
    assert [x["id"] for x in alice.get("/v1/leases").json()["leases"]] == [la["id"]]
    assert [x["id"] for x in bob.get("/v1/leases").json()["leases"]] == [lb["id"]]
    for r in (alice.get(f"/v1/leases/{lb['id']}"), alice.delete(f"/v1/leases/{lb['id']}"),
              alice.post(f"/v1/leases/{lb['id']}/renew")):
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert {x["id"] for x in pool.admin.get("/v1/leases").json()["leases"]} == {la["id"], lb["id"]}
    assert pool.admin.delete(f"/v1/leases/{lb['id']}").status_code == 200, "an admin may release any lease"
    assert bob.get(f"/v1/leases/{lb['id']}").json()["state"] == "released"


# -- tokens and authentication ------------------------------------------------------------------


def test_every_call_needs_a_valid_token(pool: Pool) -> None:
    paths = ["/v1/gpus", "/v1/leases", "/v1/status", "/v1/servers", "/v1/queue", "/v1/whoami", "/v1/public-key"]
    for token in (None, "not-a-token", ADMIN_TOKEN + "x"):
        c = pool.client(token)
        for path in paths:
            r = c.get(path)
            assert r.status_code == 401, (token, path)
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["code"] == "unauthorized"
    for header in ("Bearer", "Basic YWRtaW46YWRtaW4=", ADMIN_TOKEN):
        r = httpx.get(pool.url + "/v1/gpus", headers={"Authorization": header})
        assert r.status_code == 401 and "missing bearer token" in r.json()["message"], header
    assert pool.client(None).post("/v1/leases", json={}).status_code == 401
    assert "invalid token" in pool.client("nope").get("/v1/gpus").json()["message"]


def test_revoked_and_expired_tokens_are_refused(pool: Pool) -> None:
    created = pool.admin.post("/v1/tokens", json={"user": "carol", "note": "laptop"}).json()
    carol = pool.client(created["token"])
    assert carol.get("/v1/whoami").json() == {"user": "carol", "role": "user", "token_id": created["id"]}
    r = pool.admin.delete(f"/v1/tokens/{created['id']}")
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = carol.get("/v1/gpus")
    assert r.status_code == 401 and "revoked" in r.json()["message"]

    short = pool.client(pool.token("dave", ttl_s=1))
    assert short.get("/v1/gpus").status_code == 200
    r = wait_until(lambda: (x := short.get("/v1/gpus")).status_code == 401 and x, "the token to expire")
    assert "expired" in r.json()["message"]
    assert pool.admin.delete("/v1/tokens/t-nosuch").status_code == 404


def test_roles(pool: Pool) -> None:
    user = pool.user("alice")
    server = pool.client(pool.token("rack1", role="server"))
    pool.register("gpu1", 8 * GiB, client=server)
    assert pool.heartbeat("gpu1", client=server)["server"]["owner"] == "rack1"
    for r in (user.post("/v1/tokens", json={"user": "x"}), user.get("/v1/tokens"), user.get("/v1/users"),
              user.post("/v1/servers/gpu1/drain"), user.put("/v1/users/alice/quota", json={"quota_gpus": 9}),
              user.post("/v1/servers", json={"name": "x", "address": "h:1", "gpus": [{"index": 0, "model": "m", "memory_bytes": 1}]}),
              server.post("/v1/leases", json={}), user.post("/v1/leases", json={"priority": 5})):
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.request.url
    other = pool.client(pool.token("rack2", role="server"))
    r = other.post("/v1/servers/gpu1/heartbeat", json={})
    assert r.status_code == 403 and "another user" in r.json()["message"]


def test_tokens_are_listed_without_secrets_and_stored_hashed(pool: Pool) -> None:
    secret = pool.token("erin")
    listing = pool.admin.get("/v1/tokens")
    assert listing.status_code == 200 and secret not in listing.text and ADMIN_TOKEN not in listing.text
    assert {t["user"] for t in listing.json()["tokens"]} == {"admin", "erin"}
    assert all("token" not in t for t in listing.json()["tokens"])
    db = Path(pool.db_url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    assert secret not in dump and ADMIN_TOKEN not in dump


# -- servers: heartbeats, down, drain -----------------------------------------------------------


def test_server_missing_heartbeats_is_marked_down_and_its_leases_end(tmp_path: Path) -> None:
    with Pool(tmp_path, heartbeat_interval_s=0.2) as pool:
        reg = pool.register("gpu1", 8 * GiB)
        assert reg["heartbeat_interval_s"] == 0.2 and reg["missed_heartbeats"] == 3
        alice = pool.user("alice")
        lease = alice.post("/v1/leases", json={"fraction": 0.5, "ttl_s": 3600}).json()
        # No more heartbeats from gpu1.
        wait_until(lambda: alice.get(f"/v1/leases/{lease['id']}").json()["state"] == "server_down",
                   "the lease to end with its server")
        assert [s["state"] for s in pool.admin.get("/v1/servers").json()["servers"]] == ["down"]
        r = alice.post(f"/v1/leases/{lease['id']}/renew")
        assert r.status_code == 410 and "server stopped answering" in r.json()["message"]
        r = alice.post("/v1/leases", json={"wait_s": 0})
        assert r.status_code == 409 and "no server is up" in r.json()["message"]
        assert gpus(pool)[0]["allocated_bytes"] == 0 and gpus(pool)[0]["server_state"] == "down"
        status = pool.admin.get("/v1/status").json()
        assert (status["servers_down"], status["leases_active"]) == (1, 0)
        # It comes back: placed on again.
        hb = pool.heartbeat("gpu1")
        assert hb["server"]["state"] == "up" and hb["leases"] == []
        assert alice.post("/v1/leases", json={"fraction": 0.5}).status_code == 201


def test_drain_places_nothing_new_and_keeps_running_leases(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice = pool.user("alice")
    held = alice.post("/v1/leases", json={"fraction": 0.5}).json()
    r = pool.admin.post("/v1/servers/gpu1/drain")
    assert r.status_code == 200 and r.json()["draining"]
    r = alice.post("/v1/leases", json={"fraction": 0.25})
    assert r.status_code == 409 and "draining" in r.json()["message"]
    assert alice.post(f"/v1/leases/{held['id']}/renew").status_code == 200
    assert pool.admin.post("/v1/servers/nosuch/drain").status_code == 404
    assert pool.admin.post("/v1/servers/gpu1/resume").json()["draining"] is False
    assert alice.post("/v1/leases", json={"fraction": 0.25}).status_code == 201


def test_reregistering_keeps_leases_on_unchanged_gpus(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB, 8 * GiB)
    alice = pool.user("alice")
    l0 = alice.post("/v1/leases", json={"server": "gpu1"}).json()
    l1 = alice.post("/v1/leases", json={"server": "gpu1"}).json()
    assert {l0["gpus"][0]["index"], l1["gpus"][0]["index"]} == {0, 1}
    lost = l0 if l0["gpus"][0]["index"] == 1 else l1
    kept = l1 if lost is l0 else l0
    pool.register("gpu1", 8 * GiB)  # GPU 1 is gone after a restart of the server
    assert alice.get(f"/v1/leases/{kept['id']}").json()["state"] == "active"
    assert alice.get(f"/v1/leases/{lost['id']}").json()["state"] == "gpu_gone"
    assert len(gpus(pool)) == 1


def test_an_address_belongs_to_one_live_server(pool: Pool) -> None:
    """Note [One server per address]: a server that is up keeps its address; re-registering
    under its own name still works."""
    pool.register("gpu1", 8 * GiB, address="10.0.0.1:7777")
    rack = pool.client(pool.token("mallory", role="server"))
    r = rack.post("/v1/servers", json={"name": "gpu2", "address": "10.0.0.1:7777", "gpus": [
        {"index": 0, "uuid": "x", "model": "m", "memory_bytes": GiB}]})
    assert r.status_code == 409 and r.json()["code"] == "address_in_use", r.text
    assert "'gpu1'" in r.json()["message"] and "--advertise" in r.json()["message"]
    assert pool.register("gpu1", 8 * GiB, address="10.0.0.1:7777")["server"]["address"] == "10.0.0.1:7777"
    assert [s["name"] for s in pool.admin.get("/v1/servers").json()["servers"]] == ["gpu1"]


def test_a_server_reports_an_abandoned_lease(pool: Pool) -> None:
    """`POST /v1/servers/{server}/leases/{lease}/abandon`: the server's own token ends a lease on
    it at once; nobody else's does."""
    owner = pool.client(pool.token("rack", role="server"))
    pool.register("gpu1", 8 * GiB, client=owner)
    pool.register("gpu2", 8 * GiB)
    alice = pool.user("alice")
    lease = alice.post("/v1/leases", json={"fraction": 0.5, "server": "gpu1"}).json()
    other = alice.post("/v1/leases", json={"fraction": 0.5, "server": "gpu2"}).json()
    url = f"/v1/servers/gpu1/leases/{lease['id']}/abandon"
    assert pool.client(pool.token("mallory", role="server")).post(url).status_code == 403
    assert alice.post(url).status_code == 403  # a user token, even the lease's own
    assert owner.post(f"/v1/servers/gpu1/leases/{other['id']}/abandon").status_code == 404  # not on gpu1
    assert owner.post("/v1/servers/gpu1/leases/l-nosuch/abandon").status_code == 404
    r = owner.post(url)
    assert r.status_code == 200 and r.json()["state"] == "abandoned", r.text
    assert {g["server"]: g["allocated_bytes"] for g in gpus(pool)} == {"gpu1": 0, "gpu2": 4 * GiB}
    for again in (owner.post(url), alice.post(f"/v1/leases/{lease['id']}/renew")):
        assert again.status_code == 410 and "abandoned" in again.json()["message"]
    assert pool.heartbeat("gpu1", client=owner)["leases"] == []


# -- running a controller -----------------------------------------------------------------------


def test_default_database_is_under_gpupool_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPOOL_HOME", str(tmp_path / "home"))
    store = Store()
    store.init()
    store.close()
    assert store.url == f"sqlite:///{tmp_path / 'home' / 'controller.db'}"
    assert (tmp_path / "home" / "controller.db").is_file()
    assert store.key_file == tmp_path / "home" / "controller.key.pem" and store.key_file.is_file()
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700


# -- the signing key (Note [Signing key file] in keyfile.py) -------------------------------------


def _no_key_in_db(db: Path) -> None:
    for f in db.parent.glob(db.name + "*"):
        assert b"PRIVATE KEY" not in f.read_bytes(), f"{f} holds a private key"
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from meta where key = 'signing_key'").fetchone() == (0,)


def test_signing_key_moves_out_of_an_old_database(tmp_path: Path) -> None:
    """A database from before keeps its key in `meta` (and was created 0644): the controller
    moves the key to a 0600 file, deletes the row, leaves no copy in the file, and signs on
    with the same key (the servers know its public half)."""
    db = tmp_path / "old.db"
    store = Store(f"sqlite:///{db}")
    store.init()
    store.close()
    old = L.generate_key()
    store.key_file.unlink()  # type: ignore[union-attr]
    with sqlite3.connect(db) as c:
        c.execute("delete from meta where key = 'public_key'")
        c.execute("insert into meta (key, value) values ('signing_key', ?)", (L.private_key_to_pem(old).decode(),))
    db.chmod(0o644)
    assert b"PRIVATE KEY" in db.read_bytes() + (tmp_path / "old.db-wal").read_bytes()

    with Pool(tmp_path, db_name="old.db") as pool:
        assert pool.admin.get("/v1/public-key").json()["public_key"] == L.public_key_to_text(old.public_key())
    key_file = tmp_path / "old.key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600 and db.stat().st_mode & 0o777 == 0o600
    assert L.public_key_to_text(L.private_key_from_pem(key_file.read_bytes()).public_key()) == \
        L.public_key_to_text(old.public_key())
    _no_key_in_db(db)


def test_controller_without_its_key_file_refuses_to_start(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    store = Store(f"sqlite:///{db}")
    store.init()
    store.close()
    key_file = tmp_path / "c.key.pem"
    assert db.stat().st_mode & 0o777 == 0o600 and key_file.stat().st_mode & 0o777 == 0o600
    _no_key_in_db(db)
    pem = key_file.read_bytes()

    key_file.chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        Store(f"sqlite:///{db}").init()
    key_file.unlink()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, L.private_key_to_pem(L.generate_key()))
    os.close(fd)
    with pytest.raises(SigningKeyError, match="not the one this database's leases are signed with"):
        Store(f"sqlite:///{db}").init()
    key_file.unlink()
    r = subprocess.run([sys.executable, "-m", "gpupool.controller", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{db}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "signing key file" in r.stderr and "is missing" in r.stderr, r.stderr
    assert not key_file.exists(), "a missing key is never replaced by a new one"

    moved = tmp_path / "keys" / "pool.pem"  # --key-file: anywhere
    moved.parent.mkdir()
    fd = os.open(moved, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    store = Store(f"sqlite:///{db}", key_file=moved)
    store.init()
    store.close()


def test_python_m_gpupool_controller_init_and_serve(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gpupool.controller", "--listen", "127.0.0.1:0", "--init",
                             "--db", f"sqlite:///{tmp_path / 'c.db'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        token = url = ""
        for line in proc.stdout:
            if line.startswith("admin token: "):
                token = line.split(": ", 1)[1].strip()
            if "listening on" in line:
                url = line.rsplit(" ", 1)[1].strip()
                break
        assert token.startswith("gpp_") and url.startswith("http://127.0.0.1:")
        r = wait_until(lambda: _try_get(url + "/v1/whoami", token), "the controller to answer")
        assert r.json()["role"] == "admin"
    finally:
        proc.terminate()
        proc.wait(30)


def _try_get(url: str, token: str) -> httpx.Response | None:
    try:
        return httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    except httpx.TransportError:
        return None


# -- the Python client, the lease renewer, the server agent -------------------------------------


def test_client_renewer_and_server_agent(tmp_path: Path) -> None:
    with Pool(tmp_path, heartbeat_interval_s=1.0) as pool:
        agent = ServerAgent(ControllerClient(pool.url, pool.token("rack", role="server")), "gpu1", "127.0.0.1:7001",
                            [{"index": 0, "uuid": "GPU-0", "model": "NVIDIA L4", "memory_bytes": 8 * GiB, "kind": "cuda"}])
        agent.start()
        alice = ControllerClient(pool.url, pool.token("alice"))
        try:
            lease = alice.request(fraction=0.5, ttl_s=600)
            assert agent.verify(lease["signed"]).id == lease["id"]
            wait_until(lambda: lease["id"] in agent.active, "the agent to see the lease")
            renewer = LeaseRenewer(alice, lease, interval=0.1).start()
            wait_until(lambda: renewer.lease["expires_at"] > lease["expires_at"], "a renewal")
            renewer.stop()  # releases
            assert renewer.lost is None and alice.lease(lease["id"])["state"] == "released"
            wait_until(lambda: lease["id"] in agent.ended, "the agent to learn that the lease ended")
            with pytest.raises(LeaseExpired, match="has ended"):
                agent.verify(renewer.lease["signed"])
            with pytest.raises(LeaseExpired, match="released"):
                alice.release(lease["id"])

            with pytest.raises(NoCapacity) as never:
                alice.request(n=2)
            assert never.value.code == "unsatisfiable"
            hold = alice.request()
            with pytest.raises(NoCapacity) as busy:
                alice.request(fraction=0.5)
            assert busy.value.code == "no_capacity" and busy.value.status == 409

            positions: list[int] = []
            got: dict[str, Any] = {}
            bob = ControllerClient(pool.url, pool.token("bob"))
            t = threading.Thread(target=lambda: got.setdefault(
                "lease", bob.request(wait_s=120, on_position=positions.append, fraction=0.5)))
            t.start()
            wait_until(lambda: positions, "bob's place in the queue")
            alice.release(hold["id"])
            t.join(120)
            assert positions == [1] and got["lease"]["user"] == "bob"
            bob.close()

            with pytest.raises(AuthError):
                ControllerClient(pool.url, "wrong").gpus()
            with pytest.raises(NotFound):
                alice.lease("l-nosuch")
            pool.admin.put("/v1/users/alice/quota", json={"quota_gpus": 0.25})
            with pytest.raises(QuotaExceeded):
                alice.request(fraction=0.5)
        finally:
            agent.stop()
            alice.close()
    with pytest.raises(ControllerUnreachable):
        ControllerClient(pool.url, "x", timeout=5).gpus()


def test_server_agent_knows_which_leases_live_between_heartbeats(tmp_path: Path) -> None:
    """Note [Lease expiry]: the agent takes a lease granted after its last heartbeat at once, refuses
    one released before it (without waiting for the lease to have been seen), refuses another
    server's, and refuses an abandoned one at once while it tells the controller."""
    with Pool(tmp_path, heartbeat_interval_s=3600.0) as pool:  # no heartbeat but those made here
        seen: list[dict[str, Any]] = []
        agent = ServerAgent(ControllerClient(pool.url, pool.token("rack", role="server")), "gpu1", "127.0.0.1:7001",
                            [{"index": 0, "uuid": "GPU-0", "model": "NVIDIA L4", "memory_bytes": 8 * GiB, "kind": "cuda"}],
                            on_leases=seen.append)
        agent.start()
        pool.register("gpu2", 8 * GiB)
        alice = ControllerClient(pool.url, pool.token("alice"))
        try:
            fresh = alice.request(fraction=0.25, server="gpu1", ttl_s=600)
            assert agent.verify(fresh["signed"]).id == fresh["id"]
            released = alice.request(fraction=0.25, server="gpu1", ttl_s=600)
            alice.release(released["id"])
            agent.beat()
            assert set(seen[-1]) == {fresh["id"]}
            with pytest.raises(LeaseExpired, match="not active"):
                agent.verify(released["signed"])
            elsewhere = alice.request(fraction=0.25, server="gpu2", ttl_s=600)
            with pytest.raises(LeaseWrongServer, match="is for server"):
                agent.verify(elsewhere["signed"])
            late = alice.request(fraction=0.25, server="gpu1", ttl_s=600)
            agent.verify(late["signed"])
            agent.abandon(late["id"])
            with pytest.raises(LeaseExpired, match="has ended"):
                agent.verify(late["signed"])
            wait_until(lambda: alice.lease(late["id"])["state"] == "abandoned", "the controller to hear of it")
            agent.beat()
            assert set(seen[-1]) == {fresh["id"]}
        finally:
            agent.stop()
            alice.close()


# -- bad input ----------------------------------------------------------------------------------


def test_bad_input_gets_4xx_with_clear_messages(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice = pool.user("alice")
    cases: list[tuple[httpx.Response, int, str]] = [
        (alice.post("/v1/leases", json={"fraction": 0.5, "memory_bytes": 5}), 422, "fraction or memory_bytes, not both"),
        (alice.post("/v1/leases", json={"n": 0}), 422, "n: Input should be greater than or equal to 1"),
        (alice.post("/v1/leases", json={"fraction": 1.5}), 422, "fraction"),
        (alice.post("/v1/leases", json={"gpus": 1}), 422, "gpus: Extra inputs are not permitted"),
        (alice.post("/v1/leases", json={"wait_s": -1}), 422, "wait_s"),
        (alice.post("/v1/leases", json={"ttl_s": 0}), 422, "ttl_s"),
        (alice.post("/v1/leases", content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON"),
        (alice.post("/v1/leases", json=[1, 2]), 422, "invalid request"),
        (alice.post("/v1/leases", content=b"x" * (2 * 1024 * 1024)), 413, "limited to"),
        (alice.get("/v1/leases/l-nosuch"), 404, "no lease 'l-nosuch'"),
        (alice.get("/v1/queue/q-nosuch"), 404, "no queue entry"),
        (alice.get("/v1/nowhere"), 404, "Not Found"),
        (alice.put("/v1/gpus"), 405, "Method Not Allowed"),
        (pool.admin.post("/v1/servers", json={"name": "x", "address": "h:1", "gpus": [
            {"index": 0, "model": "m", "memory_bytes": 1}, {"index": 0, "model": "m", "memory_bytes": 1}]}),
         422, "GPU indices must be unique"),
        (pool.admin.post("/v1/servers", json={"name": "x", "address": "h:99999", "gpus": [
            {"index": 0, "model": "m", "memory_bytes": 1}]}), 422, "port must be 1..65535"),
        (pool.admin.post("/v1/servers", json={"name": "x", "address": "nohost", "gpus": []}), 422, "address"),
        (pool.admin.post("/v1/servers", json={"name": "x", "address": "h:1", "gpus": [
            {"index": 0, "model": "m", "memory_bytes": 2**70}]}), 422, "memory_bytes"),
        (pool.admin.post("/v1/servers", json={"name": "x", "address": "h:1", "gpus": [
            {"index": 0, "model": "m", "memory_bytes": 1, "kind": "tpu"}]}), 422, "kind"),
        (pool.admin.post("/v1/tokens", json={"user": "bad name!"}), 422, "user"),
        (pool.admin.post("/v1/tokens", json={"user": "x", "role": "root"}), 422, "role"),
        (pool.admin.post("/v1/servers/nosuch/heartbeat", json={}), 404, "no server 'nosuch'"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.request.method, r.request.url, r.text)
        body = r.json()
        assert set(body) >= {"code", "message"} and words in body["message"], body


# -- concurrency --------------------------------------------------------------------------------


def test_100_clients_request_and_release_at_once(tmp_path: Path) -> None:
    """100 clients request and release at once against 4 servers: at no time does any GPU hold
    more than its memory, no lease is granted twice, and none is lost."""
    with Pool(tmp_path) as pool:
        for s in range(4):
            pool.register(f"srv{s}", 8 * GiB, 8 * GiB)
        gpu_memory = {g["id"]: g["memory_bytes"] for g in gpus(pool)}
        tokens = [pool.token(f"user{i % 10}") for i in range(100)]
        start = threading.Barrier(100)
        events: list[tuple[float, float, dict[str, Any]]] = []  # (granted seen at, release sent at, lease)
        problems: list[str] = []
        stop = threading.Event()

        def monitor() -> None:
            while not stop.wait(0.02):
                for g in gpus(pool):
                    if g["allocated_bytes"] > g["memory_bytes"]:
                        problems.append(f"over-committed: {g}")

        def client(i: int) -> None:
            try:
                rounds(i)
            except Exception as e:  # collected: the assertion below names every failing client
                problems.append(f"client {i}: {e!r}")

        def rounds(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(base_url=pool.url, headers={"Authorization": f"Bearer {tokens[i]}"}, timeout=300) as c:
                start.wait()
                for _ in range(2):
                    body: dict[str, Any] = rng.choice([{}, {"fraction": 0.5}, {"fraction": 0.25}, {"memory_bytes": 3 * GiB},
                                       {"n": 2, "fraction": 0.5}])
                    r = c.post("/v1/leases", json={**body, "wait_s": 240, "ttl_s": 600})
                    if r.status_code != 201:
                        problems.append(f"client {i}: {r.status_code} {r.text}")
                        return
                    got = time.monotonic()
                    lease = r.json()
                    time.sleep(rng.random() * 0.02)
                    released_at = time.monotonic()
                    r = c.delete(f"/v1/leases/{lease['id']}")
                    if r.status_code != 200 or r.json()["state"] != "released":
                        problems.append(f"client {i}: release {r.status_code} {r.text}")
                    events.append((got, released_at, lease))

        watcher = threading.Thread(target=monitor)
        watcher.start()
        with ThreadPoolExecutor(100) as ex:
            list(ex.map(client, range(100)))
        stop.set()
        watcher.join()

        assert problems == []
        ids = [lease["id"] for _, _, lease in events]
        assert len(ids) == 200 and len(set(ids)) == 200, "a lease id was granted twice"
        everything = pool.admin.get("/v1/leases", params={"ended": True}).json()["leases"]
        assert sorted(x["id"] for x in everything) == sorted(ids), "a lease was lost or invented"
        assert all(x["state"] == "released" for x in everything)
        assert all(g["allocated_bytes"] == 0 and g["leases"] == 0 for g in gpus(pool))
        # What clients held overlapped in time (each held at least from the grant they saw until
        # the release they sent) never exceeded a GPU's memory, nor shared a whole GPU.
        points = sorted([(t0, 1, lease) for t0, _, lease in events] + [(t1, 0, lease) for _, t1, lease in events],
                        key=lambda p: (p[0], p[1]))
        held: dict[str, int] = {}
        whole: dict[str, int] = {}
        for _, is_start, lease in points:
            sign = 1 if is_start else -1
            for g in lease["gpus"]:
                held[g["gpu_id"]] = held.get(g["gpu_id"], 0) + sign * g["bytes"]
                if lease["exclusive"]:
                    whole[g["gpu_id"]] = whole.get(g["gpu_id"], 0) + sign
                assert held[g["gpu_id"]] <= gpu_memory[g["gpu_id"]], f"GPU {g['gpu_id']} over-committed"
                assert whole.get(g["gpu_id"], 0) == 0 or held[g["gpu_id"]] == gpu_memory[g["gpu_id"]]


def test_replicas_on_one_database_see_each_others_grants_and_releases(tmp_path: Path) -> None:
    """Two controllers on one database (replicas) each keep the pool in memory between requests
    (Note [Pool cache] in store.py): what one grants or releases, the other's next decision sees."""
    with Pool(tmp_path) as a:
        a.register("srv", 8 * GiB)
        b_thread = ControllerThread(a.settings).start()
        try:
            b = a.client(ADMIN_TOKEN)
            b.base_url = httpx.URL(b_thread.url)
            half = {"fraction": 0.5, "wait_s": 0}
            for c in (a.admin, b):  # both replicas have decided once: their snapshots are warm
                r = c.post("/v1/leases", json=half)
                assert r.status_code == 201, r.text
                assert c.delete(f"/v1/leases/{r.json()['id']}").status_code == 200
            first = a.admin.post("/v1/leases", json=half)
            second = b.post("/v1/leases", json=half)
            assert first.status_code == 201 and second.status_code == 201, (first.text, second.text)
            third = a.admin.post("/v1/leases", json=half)
            assert third.status_code == 409 and third.json()["code"] == "no_capacity", third.text
            assert b.delete(f"/v1/leases/{first.json()['id']}").status_code == 200  # released on the other
            again = a.admin.post("/v1/leases", json=half)
            assert again.status_code == 201, again.text
            assert gpus(a)[0]["allocated_bytes"] == 8 * GiB
            assert b.post("/v1/leases", json=half).status_code == 409
            a.register("srv2", 8 * GiB)  # inventory added on one replica is placed on by the other
            r = b.post("/v1/leases", json=half)
            assert r.status_code == 201 and r.json()["server"] == "srv2", r.text
        finally:
            b_thread.stop()


# -- fuzzing the API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    # max_wait_s: generated requests may ask to wait an hour; cut that so the fuzzer keeps moving.
    with Pool(tmp_path_factory.mktemp("fuzz"), max_wait_s=0.2) as p:
        p.register("gpu1", 8 * GiB, 8 * GiB)
        yield p


# The spec comes from an app built here (in memory); the cases run against the real server.
api = schemathesis.openapi.from_dict(create_app(Settings(db_url="sqlite://")).openapi())


@api.parametrize()
@hsettings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzz_api_answers_4xx_never_5xx(case: Any, fuzz_pool: Pool) -> None:
    """Every operation of the OpenAPI spec, fed generated input (with an admin token, so it gets
    past authentication), answers without a 5xx, with a documented status and body."""
    case.call_and_validate(
        base_url=fuzz_pool.url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        checks=[sc.not_a_server_error, sc.status_code_conformance, sc.content_type_conformance,
                sc.response_schema_conformance])


def test_served_spec_is_the_fuzzed_spec(fuzz_pool: Pool) -> None:
    served = httpx.get(fuzz_pool.url + "/openapi.json").json()
    assert served["paths"] == api.raw_schema["paths"] and len(served["paths"]) >= 15
