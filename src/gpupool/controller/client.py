"""Talking to a controller: a typed-error HTTP client, a lease renewer (for `gpupool run`), and the
GPU server's side of registration and heartbeats (for `gpupool server --controller`).

Every failure is raised as a `gpupool` error a user can act on: ControllerUnreachable, AuthError,
NoCapacity, QuotaExceeded, NotFound, LeaseExpired, or ControllerError for the rest. Nothing here
retries a request behind the caller's back, except the server agent's heartbeat loop, whose job
is to keep trying.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from gpupool.controller import leases as leasing
from gpupool.controller.errors import (
    ControllerError,
    ControllerUnreachable,
    LeaseExpired,
    NoCapacity,
    NotFound,
    QuotaExceeded,
)
from gpupool.errors import AuthError, GpupoolError

log = logging.getLogger("gpupool.controller.client")

Json = dict[str, Any]


def _error_for(status: int, code: str, message: str) -> GpupoolError:
    if status == 401 or code in ("unauthorized", "forbidden"):
        return AuthError(message)
    if code == "quota_exceeded":
        return QuotaExceeded(message, code, status)
    if code in ("no_capacity", "unsatisfiable"):
        return NoCapacity(message, code, status)
    if status == 404:
        return NotFound(message, code, status)
    if status == 410 or code == "lease_ended":
        return LeaseExpired(message)
    return ControllerError(message, code, status)


class ControllerClient:
    """The controller's REST API as methods returning its JSON, raising gpupool errors."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, timeout: float | None = None, **kw: Any) -> Any:
        """One API call. `timeout` (seconds) overrides the client's, for calls that wait."""
        if timeout is not None:
            kw["timeout"] = timeout
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TimeoutException as e:
            raise ControllerUnreachable(f"the controller at {self.url} did not answer in time ({method} {path})") from e
        except httpx.TransportError as e:
            raise ControllerUnreachable(f"cannot reach the controller at {self.url}: {e}") from e
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code < 400:
            return body
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            raise _error_for(r.status_code, str(body.get("code", "error")), body["message"])
        raise ControllerError(f"the controller answered {r.status_code}: {r.text[:300]}", "error", r.status_code)

    # -- servers ---------------------------------------------------------------------------------

    def register_server(self, name: str, address: str, gpus: Sequence[Json], labels: dict[str, str] | None = None) -> Json:
        """`gpus`: [{"index", "uuid", "model", "memory_bytes", "kind", "labels"}, ...]."""
        return self.call("POST", "/v1/servers", json={"name": name, "address": address, "gpus": list(gpus),
                                                      "labels": labels or {}})

    def heartbeat(self, server: str, gpus: Sequence[Json] = ()) -> Json:
        return self.call("POST", f"/v1/servers/{server}/heartbeat", json={"gpus": list(gpus)})

    def servers(self) -> list[Json]:
        return self.call("GET", "/v1/servers")["servers"]

    def drain(self, server: str) -> Json:
        return self.call("POST", f"/v1/servers/{server}/drain")

    def resume(self, server: str) -> Json:
        return self.call("POST", f"/v1/servers/{server}/resume")

    def gpus(self) -> list[Json]:
        return self.call("GET", "/v1/gpus")["gpus"]

    def status(self) -> Json:
        return self.call("GET", "/v1/status")

    def whoami(self) -> Json:
        return self.call("GET", "/v1/whoami")

    def public_key(self) -> leasing.Ed25519PublicKey:
        return leasing.public_key_from_text(self.call("GET", "/v1/public-key")["public_key"])

    # -- leases ----------------------------------------------------------------------------------

    def request(self, wait_s: float = 0, on_position: Callable[[int], None] | None = None, **body: Any) -> Json:
        """Request GPUs (body: n, fraction | memory_bytes, ttl_s, model, kind, min_memory_bytes,
        server, labels, spread, priority) and return the lease, waiting up to `wait_s` in the queue.

        With `on_position`, the request is queued and polled, and `on_position(place)` is called as
        its place in the queue changes (for a progress display). If the wait is interrupted
        (Ctrl-C), the entry is cancelled, and a lease granted meanwhile is released.
        """
        if on_position is None or wait_s <= 0:
            return self.call("POST", "/v1/leases", json={**body, "wait_s": wait_s},
                             timeout=wait_s + 30)
        entry = self.call("POST", "/v1/queue", json={**body, "wait_s": wait_s})
        deadline = time.monotonic() + wait_s
        last = None
        try:
            while entry["state"] == "waiting" and time.monotonic() < deadline:
                if entry["position"] != last:
                    last = entry["position"]
                    on_position(last)
                left = min(2.0, max(0.0, deadline - time.monotonic()))
                entry = self.call("GET", f"/v1/queue/{entry['id']}", params={"wait_s": left}, timeout=left + 30)
        except BaseException:
            self._abandon(entry["id"])
            raise
        if entry["state"] == "waiting":
            entry = self.call("DELETE", f"/v1/queue/{entry['id']}")
        if entry["state"] == "granted":
            return entry["lease"]
        raise _error_for(403 if entry["code"] == "quota_exceeded" else 409, entry["code"] or "no_capacity",
                         entry["reason"] or "no capacity")

    def _abandon(self, entry_id: str) -> None:
        try:
            entry = self.call("DELETE", f"/v1/queue/{entry_id}")
            if entry["state"] == "granted":
                self.release(entry["lease"]["id"])
        except GpupoolError as e:
            log.warning("could not cancel queue entry %s: %s", entry_id, e)

    def renew(self, lease_id: str, ttl_s: float | None = None) -> Json:
        return self.call("POST", f"/v1/leases/{lease_id}/renew",
                         json={} if ttl_s is None else {"ttl_s": ttl_s})

    def release(self, lease_id: str) -> Json:
        return self.call("DELETE", f"/v1/leases/{lease_id}")

    def lease(self, lease_id: str) -> Json:
        return self.call("GET", f"/v1/leases/{lease_id}")

    def leases(self, ended: bool = False) -> list[Json]:
        return self.call("GET", "/v1/leases", params={"ended": ended})["leases"]

    def queue(self) -> list[Json]:
        return self.call("GET", "/v1/queue")["entries"]

    # -- users and tokens ------------------------------------------------------------------------

    def create_token(self, user: str, role: str = "user", note: str = "", ttl_s: float | None = None) -> Json:
        body: Json = {"user": user, "role": role, "note": note}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self.call("POST", "/v1/tokens", json=body)

    def tokens(self) -> list[Json]:
        return self.call("GET", "/v1/tokens")["tokens"]

    def revoke_token(self, token_id: str) -> Json:
        return self.call("DELETE", f"/v1/tokens/{token_id}")

    def set_quota(self, user: str, quota_gpus: float | None) -> Json:
        return self.call("PUT", f"/v1/users/{user}/quota", json={"quota_gpus": quota_gpus})

    def users(self) -> list[Json]:
        return self.call("GET", "/v1/users")["users"]


class LeaseRenewer:
    """Renews a lease in the background while a command runs; releases it on `stop()`.

    Renews every third of the TTL, so two renewals may fail (a controller restart) before the lease
    lapses. When the controller says the lease has ended, renewing stops and `lost` holds why
    (the caller surfaces it: the server ends the sessions of an ended lease).
    """

    def __init__(self, client: ControllerClient, lease: Json, on_lost: Callable[[GpupoolError], None] | None = None,
                 interval: float | None = None) -> None:
        self.client = client
        self.lease = lease
        self.on_lost = on_lost
        self.lost: GpupoolError | None = None
        self._stop = threading.Event()
        ttl = max(1.0, lease["expires_at"] - lease["created_at"])
        self.interval = interval if interval is not None else max(0.2, ttl / 3)
        self._thread = threading.Thread(target=self._run, name=f"gpupool-renew-{lease['id']}", daemon=True)

    def start(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lease = self.client.renew(self.lease["id"])
            except LeaseExpired as e:
                self.lost = e
                if self.on_lost is not None:
                    self.on_lost(e)
                return
            except GpupoolError as e:  # the controller may be restarting: try again next time
                log.warning("could not renew lease %s (will retry): %s", self.lease["id"], e)

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if release and self.lost is None:
            try:
                self.client.release(self.lease["id"])
            except LeaseExpired:
                pass  # it ended already: nothing to give back


class ServerAgent:
    """A GPU server's side of the controller: register, then heartbeat in the background.

    It keeps the controller's public key (to verify leases on its own, Note [Lease expiry] in
    leases.py) and the ids of the leases the controller holds active for this server;
    `on_leases(active)` is called after every heartbeat so the server can end the sessions of
    leases no longer listed. If the controller is unreachable, the last known state stays and the
    agent keeps trying; signed leases keep working meanwhile.
    """

    def __init__(self, client: ControllerClient, name: str, address: str, gpus: Sequence[Json],
                 labels: dict[str, str] | None = None,
                 usage: Callable[[], Sequence[Json]] | None = None,
                 on_leases: Callable[[dict[str, Json]], None] | None = None) -> None:
        self.client, self.name, self.address = client, name, address
        self.gpus, self.labels = list(gpus), labels or {}
        self.usage = usage
        self.on_leases = on_leases
        self.active: dict[str, Json] = {}
        self.ended: set[str] = set()  # leases seen active here that the controller no longer lists
        self.interval = 5.0
        self.public_key: leasing.Ed25519PublicKey | None = None
        self.server_id = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gpupool-heartbeat-{name}", daemon=True)

    def register(self) -> Json:
        reg = self.client.register_server(self.name, self.address, self.gpus, self.labels)
        self.public_key = leasing.public_key_from_text(reg["public_key"])
        self.interval = float(reg["heartbeat_interval_s"])
        self.server_id = reg["server"]["id"]
        return reg

    def start(self) -> ServerAgent:
        """Register (raising if that fails: a wrong URL or token should stop the server at start)
        and start heartbeating."""
        self.register()
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            answer = self.client.heartbeat(self.server_id, list(self.usage()) if self.usage else [])
        except NotFound:
            self.register()  # the controller lost us (a new database): register again
            return
        active = {x["id"]: x for x in answer["leases"]}
        self.ended |= set(self.active) - set(active)
        self.active = active
        if self.on_leases is not None:
            self.on_leases(dict(self.active))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except GpupoolError as e:
                log.warning("heartbeat to %s failed (will retry): %s", self.client.url, e)

    def verify(self, lease_text: str, now: float | None = None) -> leasing.LeaseClaims:
        """Check a lease a client presents: signed by the controller, for this server, not expired,
        and not ended early as far as the last heartbeat knows."""
        if self.public_key is None:
            raise RuntimeError("register() first: the controller's public key is not known yet")
        claims = leasing.verify_lease(lease_text, self.public_key, time.time() if now is None else now,
                                      server=self.address)
        if claims.id in self.ended:
            raise LeaseExpired(f"lease {claims.id} has ended (released, or ended by the controller)")
        return claims

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
