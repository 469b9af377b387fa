"""Talking to a controller: a typed-error HTTP client, a lease renewer (for `gpupool run`), and the
GPU server's side of registration and heartbeats (for `gpupool server --controller`).

Every failure is raised as a `gpupool` error a user can act on: ControllerUnreachable, AuthError,
NoCapacity, QuotaExceeded, NotFound, LeaseExpired, or ControllerError for the rest. Nothing here
retries a request behind the caller's back, except the loops whose job is to keep trying: the
lease renewer, the server agent's heartbeats, and its reports of abandoned leases.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from gpupool import tls as tls_policy
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


def _sentence(error: Json) -> str:
    """One entry of a 422 answer's `errors` as a sentence: `fraction must be a finite number (got nan)`."""
    loc = [str(x) for x in error.get("loc", []) if x != "body"]
    field = ".".join(loc) or "the request body"
    msg = str(error.get("msg", "is invalid"))
    if msg.startswith("Input should be "):
        text = f"{field} must be {msg.removeprefix('Input should be ')}"
    elif msg == "Field required":
        text = f"{field} is required"
    elif msg == "Extra inputs are not permitted":
        text = f"{field} is not something this request takes"
    elif loc and loc[-1] in msg:
        text = msg  # our own validators' messages name the field already
    else:
        text = f"{field}: {msg[:1].lower()}{msg[1:]}"
    shown = error.get("input")
    if isinstance(shown, str) and error.get("type") != "value_error" and shown not in text:
        text += f" (got {shown})"
    return text


def _error_for(status: int, code: str, message: str, errors: object = None) -> GpupoolError:
    """The gpupool error for an error answer. A 422 with pydantic's list of `errors` becomes
    sentences here, once, so every command shows `n must be ... (got 0)`, never the list."""
    if status == 422 and isinstance(errors, list) and errors and all(isinstance(e, dict) for e in errors):
        message = "; ".join(_sentence(e) for e in errors)
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


def _check_finite(body: object, where: str = "") -> None:
    """JSON has no NaN or infinity (httpx refuses to encode them): name the field instead."""
    if isinstance(body, float) and not math.isfinite(body):
        raise ValueError(f"{where or 'the request'} must be a finite number (got {body})")
    if isinstance(body, dict):
        for k, v in body.items():
            _check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(body, list):
        for i, v in enumerate(body):
            _check_finite(v, f"{where}[{i}]")


def _check_url(url: str) -> None:
    """Never send a token in clear off loopback (Note [When TLS is required] in gpupool/tls.py)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "http" and parsed.hostname:
        tls_policy.client_wants_tls(parsed.hostname, False, "the controller")


class ControllerClient:
    """The controller's REST API as methods returning its JSON, raising gpupool errors."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        _check_url(self.url)
        # Note: https is verified against the pool's CA (gpupool/tls.py), as the data plane is.
        verify = tls_policy.client_context() if self.url.startswith("https://") else True
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                  transport=transport, verify=verify)

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
        _check_finite(kw.get("json"))
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
            raise _error_for(r.status_code, str(body.get("code", "error")), body["message"], body.get("errors"))
        # Not the controller's error shape (a proxy's page, say): the status and a line of it, not the raw body.
        first = " ".join(r.text.split())[:120]
        raise ControllerError(f"the controller at {self.url} answered HTTP {r.status_code}"
                              + (f": {first}" if first else ""), "error", r.status_code)

    # -- servers ---------------------------------------------------------------------------------

    def register_server(self, name: str, address: str, gpus: Sequence[Json], labels: dict[str, str] | None = None) -> Json:
        """`gpus`: [{"index", "uuid", "model", "memory_bytes", "kind", "labels"}, ...]."""
        return self.call("POST", "/v1/servers", json={"name": name, "address": address, "gpus": list(gpus),
                                                      "labels": labels or {}})

    def heartbeat(self, server: str, gpus: Sequence[Json] = (), timeout: float | None = None) -> Json:
        return self.call("POST", f"/v1/servers/{server}/heartbeat", json={"gpus": list(gpus)}, timeout=timeout)

    def abandon(self, server: str, lease_id: str) -> Json:
        """Report that the holder of lease `lease_id` on `server` went away: the lease ends."""
        return self.call("POST", f"/v1/servers/{server}/leases/{lease_id}/abandon")

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

    def renew(self, lease_id: str, ttl_s: float | None = None, timeout: float | None = None) -> Json:
        return self.call("POST", f"/v1/leases/{lease_id}/renew",
                         json={} if ttl_s is None else {"ttl_s": ttl_s}, timeout=timeout)

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

    Note [Renewal]: renews every third of the TTL; after a failed renewal (the controller is
    restarting, or the network blinked) it tries again every `retry_s` (a second at most) until one
    succeeds, so a lease outlives any controller outage shorter than its TTL minus a few seconds
    (the time the GPU server needs to hear the new expiry from its own heartbeat, which retries as
    quickly). When the controller says the lease has ended, or its expiry passes (by this host's
    clock) without a renewal, renewing stops and `lost` holds why; `on_lost` is called once.
    """

    def __init__(self, client: ControllerClient, lease: Json, on_lost: Callable[[GpupoolError], None] | None = None,
                 interval: float | None = None, retry_s: float = 1.0) -> None:
        self.client = client
        self.lease = lease
        self.on_lost = on_lost
        self.lost: GpupoolError | None = None
        self._stop = threading.Event()
        ttl = max(1.0, lease.get("ttl_s") or lease["expires_at"] - lease["created_at"])
        self.interval = interval if interval is not None else max(0.2, ttl / 3)
        self.retry_s = min(retry_s, self.interval)
        self._thread = threading.Thread(target=self._run, name=f"gpupool-renew-{lease['id']}", daemon=True)

    def start(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def _run(self) -> None:
        wait = self.interval
        failures = 0
        while not self._stop.wait(wait):
            try:
                # A call that hangs must not outlast the retries: give each at most the interval.
                self.lease = self.client.renew(self.lease["id"], timeout=max(1.0, min(self.interval, 10.0)))
            except LeaseExpired as e:
                self._lose(e)
                return
            except GpupoolError as e:  # the controller may be restarting: try again soon
                failures += 1
                left = self.lease["expires_at"] - time.time()
                if left <= 0:
                    self._lose(LeaseExpired(
                        f"lease {self.lease['id']} expired: the controller at {self.client.url} could not be "
                        f"reached to renew it ({failures} tries; last: {e})"))
                    return
                if failures == 1:
                    log.warning("could not renew lease %s (retrying every %g s for up to %.0f s): %s",
                                self.lease["id"], self.retry_s, left, e)
                wait = min(self.retry_s, left)
                continue
            if failures:
                log.warning("renewed lease %s after %d failed tries", self.lease["id"], failures)
            failures, wait = 0, self.interval

    def _lose(self, e: GpupoolError) -> None:
        self.lost = e
        if self.on_lost is not None:
            self.on_lost(e)

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if release and self.lost is None:
            try:
                self.client.release(self.lease["id"])
            except LeaseExpired:
                pass  # it ended already: nothing to give back
            except ControllerUnreachable as e:
                # Note: the command is over either way; its GPU is freed when the server sees the
                # hold connection close (Note [Hold connection] in launcher/hold.py) and reports
                # it, or when the lease expires.
                log.warning("could not release lease %s (%s); the server frees its GPU once it sees this "
                            "command gone, the controller when the lease expires", self.lease["id"], e)


class ServerAgent:
    """A GPU server's side of the controller: register, heartbeat in the background, verify the
    leases clients present (Note [Lease expiry] in leases.py), report abandoned ones.

    It keeps the controller's public key, the leases the last heartbeat answer listed as active
    for this server (with the controller's clock at that answer, `as_of`), the leases verified
    since that were granted after it (`fresh`), and the leases it has seen end (`ended`).
    `on_leases(live)` is called after every heartbeat with the active and fresh leases, so the
    server can end the sessions of the others. If the controller is unreachable, the last known
    state stays and the agent retries every `retry_s`; signed leases keep working meanwhile.
    """

    def __init__(self, client: ControllerClient, name: str, address: str, gpus: Sequence[Json],
                 labels: dict[str, str] | None = None,
                 usage: Callable[[], Sequence[Json]] | None = None,
                 on_leases: Callable[[dict[str, Json]], None] | None = None,
                 retry_s: float = 1.0) -> None:
        self.client, self.name, self.address = client, name, address
        self.gpus, self.labels = list(gpus), labels or {}
        self.usage = usage
        self.on_leases = on_leases
        self.retry_s = retry_s
        self.active: dict[str, Json] = {}
        self.as_of_ms: int | None = None  # the controller's clock when `active` was read
        self.fresh: dict[str, leasing.LeaseClaims] = {}  # verified, granted after `as_of_ms`
        self.ended: dict[str, float] = {}  # lease id -> its last known expiry (kept until then)
        self.interval = 5.0
        self.public_key: leasing.Ed25519PublicKey | None = None
        self.server_id = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gpupool-heartbeat-{name}", daemon=True)

    def register(self) -> Json:
        reg = self.client.register_server(self.name, self.address, self.gpus, self.labels)
        self.public_key = leasing.public_key_from_text(reg["public_key"])
        self.interval = float(reg["heartbeat_interval_s"])
        self.server_id = reg["server"]["id"]
        return reg

    def start(self) -> ServerAgent:
        """Register and heartbeat once (raising if that fails: a wrong URL or token should stop the
        server at start), then heartbeat in the background."""
        self.register()
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        usage = list(self.usage()) if self.usage else []
        try:
            answer = self.client.heartbeat(self.server_id, usage, timeout=max(1.0, min(self.interval, 10.0)))
        except NotFound:
            self.register()  # the controller lost us (a new database): register again
            answer = self.client.heartbeat(self.server_id, usage)
        live = self._learn(answer)
        if self.on_leases is not None:
            self.on_leases(live)

    def _learn(self, answer: Json) -> dict[str, Json]:
        """Take in a heartbeat answer; returns the leases sessions may hold on to (active and fresh)."""
        active = {x["id"]: x for x in answer["leases"]}
        now = float(answer["now"])
        as_of = int(now * 1000)
        with self._lock:
            for lease_id, x in self.active.items():
                if lease_id not in active:
                    self.ended[lease_id] = float(x["expires_at"])
            for lease_id, c in self.fresh.items():
                if lease_id not in active and c.issued_at_ms < as_of:
                    self.ended[lease_id] = c.expires_at  # granted and ended between two heartbeats
            self.fresh = {i: c for i, c in self.fresh.items() if i not in active and c.issued_at_ms >= as_of}
            self.ended = {i: e for i, e in self.ended.items() if e > now or i in active}
            self.active, self.as_of_ms = active, as_of
            return self._live()

    def _live(self, outage: bool = False) -> dict[str, Json]:
        """The live leases by id, each with the expiry sessions may run to; with `outage`, pushed
        by the renewal this server may have missed (Note [Outage grace])."""
        live: dict[str, Json] = {}
        for i, x in self.active.items():
            if i not in self.ended:
                grace = self._grace(float(x.get("ttl_s") or 0.0)) if outage else 0.0
                live[i] = {**x, "expires_at": float(x["expires_at"]) + grace}
        for i, c in self.fresh.items():
            if i not in self.ended:
                grace = self._grace((c.expires_at_ms - c.issued_at_ms) / 1000) if outage else 0.0
                live[i] = {"id": i, "expires_at": c.expires_at + grace}
        return live

    def _grace(self, ttl_s: float) -> float:
        """Note [Outage grace]: this server hears of a renewal only from its next heartbeat, so
        when the controller goes away just after one, the expiry known here is up to a renewal
        interval (a third of the TTL, Note [Renewal]) plus a heartbeat interval older than the
        client's. While heartbeats fail, sessions may run that much longer (and two retries: the
        time to hear the renewal once the controller is back), so a program survives an outage
        shorter than its TTL minus a few seconds. Nothing is released or granted while the
        controller is away; the cost is that a holder that stopped renewing keeps its GPU this
        much longer, only during an outage: the first answered heartbeat restores the real expiry."""
        return ttl_s / 3 + self.interval + 2 * self.retry_s

    def _run(self) -> None:
        wait, failing = self.interval, False
        while not self._stop.wait(wait):
            try:
                self.beat()
            except GpupoolError as e:
                if not failing:
                    log.warning("heartbeat to %s failed (retrying every %g s): %s", self.client.url,
                                min(self.retry_s, self.interval), e)
                    self._outage()
                failing, wait = True, min(self.retry_s, self.interval)
                continue
            if failing:
                log.warning("heartbeat to %s answered again", self.client.url)
            failing, wait = False, self.interval

    def _outage(self) -> None:
        """The controller stopped answering: give sessions the grace of Note [Outage grace]."""
        with self._lock:
            live = self._live(outage=True)
        if self.on_leases is not None:
            self.on_leases(live)

    def verify(self, lease_text: str, now: float | None = None) -> leasing.LeaseClaims:
        """Check a lease a client presents: signed by the controller, for this server (by id), not
        expired, and live as far as this agent knows (Note [Lease expiry] in leases.py)."""
        if self.public_key is None:
            raise RuntimeError("register() first: the controller's public key is not known yet")
        claims = leasing.verify_lease(lease_text, self.public_key, time.time() if now is None else now,
                                      server_id=self.server_id)
        with self._lock:
            if claims.id in self.ended:
                raise LeaseExpired(f"lease {claims.id} has ended (released, abandoned, or ended by the controller): "
                                   "request a new one")
            if claims.id in self.active:
                return claims
            if self.as_of_ms is None or claims.issued_at_ms < self.as_of_ms:
                raise LeaseExpired(f"lease {claims.id} is not active: the controller no longer lists it for this "
                                   "server (released, or ended): request a new one")
            known = self.fresh.get(claims.id)
            if known is None or known.expires_at_ms < claims.expires_at_ms:
                self.fresh[claims.id] = claims
        return claims

    def abandon(self, lease_id: str) -> None:
        """The holder of `lease_id` went away (its hold connection closed while the lease was
        active): refuse the lease from now on, and tell the controller (in the background,
        retrying until it hears it), so the GPU is free again at once. Does not block."""
        with self._lock:
            known = self.active.get(lease_id, {}).get("expires_at")
            fresh = self.fresh.pop(lease_id, None)
            expires = float(known) if known is not None else (fresh.expires_at if fresh else time.time() + 86400)
            self.ended[lease_id] = expires
        threading.Thread(target=self._report_abandoned, args=(lease_id, expires),
                         name=f"gpupool-abandon-{lease_id}", daemon=True).start()

    def _report_abandoned(self, lease_id: str, expires: float) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self.client.abandon(self.server_id, lease_id)
                log.info("lease %s abandoned by its holder: reported to the controller", lease_id)
                return
            except (LeaseExpired, NotFound):
                return  # it ended already (released first, or expired): nothing to report
            except GpupoolError as e:
                if time.time() > expires:
                    return  # expired by now: the controller ends it without being told
                log.warning("could not report abandoned lease %s (retrying in %g s): %s", lease_id, delay, e)
            self._stop.wait(delay)
            delay = min(delay * 2, self.retry_s * 5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
