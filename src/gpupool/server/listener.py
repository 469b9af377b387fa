"""The server's front door: accepts connections, checks the token, hands sessions to workers.

Note [What the listener trusts]: nothing a client sends. A connection gets one `Hello` frame of
at most 64 KiB (after its TLS handshake, where TLS is on) within the handshake deadline in total
(however slowly its bytes arrive; the watchdog cuts it off), how many connections one address or
one credential may hold is bounded by the `Gate` (Note [Listener limits] in gate.py), and
everything after the handshake happens in the session's worker process (one per lease and
device, Note [One budget per lease] in memory.py), so no session can block the accept loop,
another handshake, or another lease's session. Who is admitted is decided by `admission.admit`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpupool.errors import GpupoolError, ProtocolError
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter, Limits
from gpupool.protocol.version import PROTOCOL_VERSION
from gpupool.server.admission import Grant, Holdings, Refusal, admit
from gpupool.server.admission import Limits as AdmitLimits
from gpupool.server.device import DeviceInfo
from gpupool.server.gate import Gate, GateLimits, Opened, Ticket
from gpupool.server.holds import Holds
from gpupool.server.relay import Relay
from gpupool.server.workers import Spare, Worker, hand_off, read_worker_messages

log = logging.getLogger("gpupool.server")


#: Seconds past the handshake deadline after which the watchdog cuts a connection.
_WATCHDOG_GRACE = 2.0


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class ServerConfig:
    host: str
    port: int
    token: str
    devices: list[DeviceInfo]
    memory_limit: int | None = None  # per session; default: the device's memory
    max_sessions: int = 32
    #: Handshake deadline and per-peer / per-credential limits (Note [Listener limits]).
    limits: GateLimits = field(default_factory=lambda: GateLimits(
        handshake_timeout=_env_float("GPUPOOL_HANDSHAKE_TIMEOUT", 10.0)))
    #: Seconds a session may send nothing before the server ends it (0: never). Time spent
    #: running its own ops, however long, is not idle (Note [Idle sessions] in worker.py).
    idle_timeout: float = field(default_factory=lambda: _env_float("GPUPOOL_IDLE_TIMEOUT", 1800.0))
    #: TLS: returns the context to wrap each new connection in (it may reload the certificate:
    #: Note [Certificate rotation] in tls.py); None: plain TCP, for loopback only.
    tls: Callable[[], ssl.SSLContext] | None = None
    #: Pool mode: checks a client's signed lease (raises a `LeaseError`) and returns its claims.
    verify_lease: Callable[[str], Any] | None = None
    #: Pool mode: called (from a listener thread; must not block for long) with a lease id when
    #: the lease's hold connection closed while the lease was active: its holder died.
    on_lease_abandoned: Callable[[str], None] | None = None


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._sock = socket.create_server((config.host, config.port), backlog=128)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._spare: Spare | None = None
        self._refilling = False
        self._workers: dict[tuple[str, int], Worker] = {}  # lease workers, by (lease, device)
        self._sessions: dict[str, Worker] = {}  # every running session, by id
        self._reserved = 0  # sessions admitted whose worker is being handed the connection
        self._ended_leases: set[str] = set()  # leases whose holder hung up (Note in holds.py)
        self._holds = Holds(self._holder_gone)
        self._gate = Gate(config.limits)  # under _lock
        self._opening: dict[Ticket, tuple[socket.socket, float]] = {}  # handshakes: conn, deadline
        self._tickets: dict[str, Ticket] = {}  # established sessions' tickets, by session id
        self._stopping = threading.Event()
        self._next_device = 0

    # ---- spares -----------------------------------------------------------------------------

    def _take_spare(self) -> Spare:
        """The warm spare if there is one, else a new worker (slower: it imports torch)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.proc.poll() is not None:
            spare.discard()
            spare = None
        if spare is None:
            spare = Spare()
        self._start_refill()
        return spare

    def _start_refill(self) -> None:
        # Note: at most one refill runs at a time, so a burst of connections starts one spare,
        # not one per connection (each burst connection without a spare starts its own worker).
        with self._lock:
            if self._refilling or self._spare is not None or self._stopping.is_set():
                return
            self._refilling = True
        threading.Thread(target=self._refill, name="gpupool-refill", daemon=True).start()

    def _refill(self) -> None:
        fresh: Spare | None = None
        try:
            fresh = Spare()
        except OSError as e:
            log.error("cannot start a spare worker: %s", e)
        finally:
            with self._lock:
                self._refilling = False
                if fresh is not None and self._spare is None and not self._stopping.is_set():
                    self._spare, fresh = fresh, None
        if fresh is not None:
            fresh.discard()

    # ---- what runs --------------------------------------------------------------------------

    def session_count(self) -> int:
        """Sessions whose worker is still running."""
        with self._lock:
            return len(self._sessions)

    def session_pids(self) -> dict[str, int]:
        """Worker process id of each running session, by session id."""
        with self._lock:
            return {sid: w.proc.pid for sid, w in self._sessions.items()}

    def usage(self) -> list[dict[str, Any]]:
        """Sessions per device, for the controller's heartbeat."""
        with self._lock:
            counts = {d.index: 0 for d in self.config.devices}
            for w in self._sessions.values():
                counts[w.device.index] = counts.get(w.device.index, 0) + 1
        return [{"index": i, "sessions": n} for i, n in counts.items()]

    def _live_workers(self) -> list[Worker]:
        with self._lock:
            return list({id(w): w for w in self._sessions.values()}.values()) + [
                w for w in self._workers.values() if not w.sessions
            ]

    # ---- leases -----------------------------------------------------------------------------

    def sync_leases(self, active: dict[str, Any]) -> None:
        """The controller's view after a heartbeat: `active` maps lease id -> lease (with
        `expires_at`). Sessions and holds of leases no longer listed end now; the others get the
        renewed expiry. Between heartbeats (or while the controller is away) the last known
        expiry rules, so a session never outlives an unrenewed lease (Note [Lease expiry] in
        controller/leases.py)."""
        for w in self._live_workers():
            if not w.lease_id:
                continue
            lease = active.get(w.lease_id)
            w.expires_at = 0.0 if lease is None else float(lease.get("expires_at", w.expires_at))
        for lease_id in self._holds.leases() - set(active):
            self._holds.end(lease_id, m.Refused("lease", f"lease {lease_id} ended"))
        with self._lock:
            # Note: once the controller no longer lists it, the server agent refuses it itself.
            self._ended_leases &= set(active)
        self.enforce_leases()

    def enforce_leases(self, now: float | None = None) -> int:
        """End the workers whose lease expired or ended; returns how many were told to end."""
        now = time.time() if now is None else now
        ended = 0
        for w in self._live_workers():
            if w.proc.poll() is None and w.expires_at <= now:
                if w.tell_lease_ended():
                    log.info("lease %s ended; ending its sessions (worker %d)", w.lease_id, w.proc.pid)
                    ended += 1
        return ended

    def _holder_gone(self, lease_id: str) -> None:
        """A lease's last hold closed while the lease was active: end it here and tell the pool."""
        with self._lock:
            self._ended_leases.add(lease_id)
        for w in self._live_workers():
            if w.lease_id == lease_id:
                w.expires_at = 0.0
        self.enforce_leases()
        if self.config.on_lease_abandoned is not None:
            threading.Thread(target=self.config.on_lease_abandoned, args=(lease_id,),
                             name="gpupool-abandon", daemon=True).start()

    def _lease_watchdog(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                self._cut_late_handshakes(time.monotonic())
                self.enforce_leases()
            except Exception:  # noqa: BLE001 - the watchdog must keep running
                log.exception("lease watchdog")

    # ---- connections ------------------------------------------------------------------------

    def serve_forever(self) -> None:
        self._start_refill()
        threading.Thread(target=self._lease_watchdog, name="gpupool-leases", daemon=True).start()
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: keep serving the sessions we have and
                    # try again shortly, rather than end the server.
                    log.error("accept failed: %s; retrying", e)
                    time.sleep(0.1)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            with self._lock:
                door = self._gate.open(str(peer[0]))
                if isinstance(door, Opened):
                    # Note: the watchdog is the backstop (a TLS handshake has no deadline of its
                    # own); a hello's reader stops at the deadline itself and says why, so the
                    # watchdog waits a little longer, not to cut that answer off.
                    self._opening[door.ticket] = (conn, time.monotonic() + self.config.limits.handshake_timeout
                                                  + _WATCHDOG_GRACE)
                    if door.evict is not None and door.evict in self._opening:
                        log.warning("ended a handshake from %s to make room for %s", door.evict.peer, peer)
                        _cut(self._opening.pop(door.evict)[0])
            if not isinstance(door, Opened):
                log.warning("refused %s: %s", peer, door.message)
                self._refuse_now(conn, "busy", door.message)
                continue
            try:
                threading.Thread(target=self._handshake, args=(conn, peer, door.ticket),
                                 name="gpupool-handshake", daemon=True).start()
            except RuntimeError as e:  # cannot start a thread
                self._give_back(door.ticket)
                log.error("cannot start a handshake thread: %s", e)
                self._refuse_now(conn, "busy", "server overloaded; try again")

    def _give_back(self, ticket: Ticket) -> None:
        with self._lock:
            self._opening.pop(ticket, None)
            self._gate.close(ticket)

    def _cut_late_handshakes(self, now: float) -> None:
        """Cut off the handshakes past their deadline, however slowly their bytes still come
        (a TLS handshake has no deadline of its own)."""
        with self._lock:  # Note: under the lock, so no handshake closes its socket meanwhile
            for conn, deadline in self._opening.values():
                if deadline <= now:
                    _cut(conn)

    def _refuse_now(self, conn: socket.socket, code: str, message: str) -> None:
        """Refuse from the accept loop: never waits on the peer."""
        try:
            conn.setblocking(False)
            FrameWriter(conn).send(m.plain_encoder.encode(m.Refused(code=code, message=message)))
        except GpupoolError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _refuse(conn: socket.socket, code: str, message: str) -> None:
        try:
            conn.settimeout(2.0)
            FrameWriter(conn).send(m.plain_encoder.encode(m.Refused(code=code, message=message)))
        except (GpupoolError, OSError):
            pass

    def _handshake(self, conn: socket.socket, peer: tuple[Any, ...], ticket: Ticket) -> None:
        kept = False  # whether a session or hold now owns `conn` itself (TLS: no copy exists)
        established = False
        try:
            established, kept = self._admit(conn, peer, ticket)
        except Exception:  # noqa: BLE001 - one bad connection must not end anything else
            log.exception("handshake with %s failed", peer)
        finally:
            with self._lock:
                self._opening.pop(ticket, None)
                if not established:
                    self._gate.close(ticket)
            if not kept:
                conn.close()  # a worker or the holds hold their own copy of the descriptor

    def _read_hello(self, conn: socket.socket, peer: tuple[Any, ...]) -> m.Hello | None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        timeout = self.config.limits.handshake_timeout
        deadline = time.monotonic() + timeout
        # Note: no read-ahead: the connection goes to a worker, whose reader starts afresh.
        reader = FrameReader(conn, Limits(max_message=64 * 1024, max_buffers=0, max_buffer_bytes=0), deadline=deadline, readahead=0)
        try:
            raw, _ = reader.read_message()
            hello: m.Hello = m.decode(m.hello_decoder, raw, "handshake")
            return hello
        except ProtocolError as e:
            log.info("handshake from %s failed: %s", peer, e)
            self._refuse(conn, "protocol", f"bad handshake: {e}")
        except GpupoolError as e:  # ServerLost: closed, reset or too slow
            log.info("handshake from %s failed: %s", peer, e)
            self._refuse(conn, "protocol", f"no valid handshake within {timeout:g} s: {e}")
        return None

    def _admit(self, conn: socket.socket, peer: tuple[Any, ...], ticket: Ticket) -> tuple[bool, bool]:
        """Read the hello and start what it asks for; returns (established, conn kept)."""
        secure = self._secure(conn, peer, ticket)
        if secure is None:
            return False, False
        established, kept = False, False
        try:
            established, kept = self._admit_secure(conn, secure, peer, ticket)
        finally:
            if not kept and secure is not conn:
                secure.close()
        return established, kept

    def _admit_secure(self, conn: socket.socket, secure: socket.socket, peer: tuple[Any, ...],
                      ticket: Ticket) -> tuple[bool, bool]:
        hello = self._read_hello(secure, peer)
        with self._lock:  # the handshake is over: its deadline no longer applies (starting a
            self._opening.pop(ticket, None)  # worker may take longer than it)
        if hello is None:
            return False, False
        with self._lock:
            holdings = Holdings(len(self._sessions) + self._reserved, len(self._holds), frozenset(self._ended_leases))
        cfg = self.config
        decision = admit(hello, cfg.devices, cfg.token, cfg.verify_lease, holdings,
                         AdmitLimits(PROTOCOL_VERSION, cfg.max_sessions))
        if isinstance(decision, Refusal):
            log.warning("refused %s: %s", peer, decision.message)
            self._refuse(secure, decision.code, decision.message)
            return False, False
        with self._lock:
            shut = self._gate.admit(ticket, decision.lease_id or "static-token")
        if shut is not None:
            log.warning("refused %s: %s", peer, shut.message)
            self._refuse(secure, "busy", shut.message)
            return False, False
        tls = secure is not conn
        if decision.hold:
            dev = decision.device
            assert dev is not None
            self._holds.add(secure if tls else conn.dup(), decision.lease_id, m.Welcome(
                protocol=PROTOCOL_VERSION, session=f"hold-{uuid.uuid4().hex[:12]}", device_kind=dev.kind,
                device_name=dev.name, memory_limit=decision.limit or 0, memory_total=dev.memory_total,
                torch_version=""), on_closed=lambda: self._give_back(ticket))
            return True, tls
        with self._lock:
            self._reserved += 1
        try:
            started = self._start_session(secure, peer, decision, ticket)
        finally:
            with self._lock:
                self._reserved -= 1
        if not started:
            return False, False
        return True, tls

    def _secure(self, conn: socket.socket, peer: tuple[Any, ...], ticket: Ticket) -> socket.socket | None:
        """`conn` itself, or with TLS on, `conn` wrapped after a TLS handshake (None if it failed).

        The handshake's deadline is the watchdog's (`_cut_late_handshakes`)."""
        if self.config.tls is None:
            return conn
        try:
            conn.settimeout(self.config.limits.handshake_timeout)
            with self._lock:  # wrapping detaches `conn`: the watchdog must cut the new socket
                tls = self.config.tls().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                if ticket in self._opening:
                    self._opening[ticket] = (tls, self._opening[ticket][1])
            tls.do_handshake()
            return tls
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.info("TLS handshake from %s failed: %s", peer, e)
            return None

    def _start_session(self, conn: socket.socket, peer: tuple[Any, ...], grant: Grant, ticket: Ticket) -> bool:
        """Hand `conn` to a worker for `grant`; False (and the client told why) if none took it.

        Over TLS the worker gets one end of a socket pair and a relay here carries the bytes
        (Note [TLS relay] in relay.py): the worker never holds the server's key."""
        dev = grant.device or self._pick_device()
        limit = grant.limit
        if limit is None:
            limit = min(self.config.memory_limit or dev.memory_total, dev.memory_total)
        sid = uuid.uuid4().hex[:12]
        info = {"session": sid, "kind": dev.kind, "index": dev.index, "name": dev.name,
                "memory_total": dev.memory_total, "memory_limit": limit,
                "idle_timeout": self.config.idle_timeout}
        relay = Relay(conn) if isinstance(conn, ssl.SSLSocket) else None
        handed_conn = relay.worker_end if relay is not None else conn
        with self._lock:
            self._tickets[sid] = ticket
        try:
            worker = self._hand_to_worker(handed_conn, sid, grant, dev, info)
        finally:
            if relay is not None:
                relay.worker_end.close()  # the worker has its own copy, or none was made
        if worker is None:
            with self._lock:
                self._tickets.pop(sid, None)
            self._refuse(conn, "busy", "could not start a session worker")
            return False
        if relay is not None:
            relay.start()
        log.info("session %s for %s on %s:%d (limit %d bytes, worker pid %d%s)", sid, peer, dev.kind,
                 dev.index, limit, worker.proc.pid, ", TLS" if relay is not None else "")
        return True

    def _hand_to_worker(self, conn: socket.socket, sid: str, grant: Grant, dev: DeviceInfo,
                        info: dict[str, Any]) -> Worker | None:
        """The lease's worker on `dev` (or a new one), now serving session `sid` on `conn`."""
        if grant.lease_id:
            joined = self._join(conn, sid, (grant.lease_id, dev.index), info)
            if joined is not None:
                return joined
        try:
            spare = self._take_spare()
        except OSError as e:
            log.error("cannot start a session worker: %s", e)
            return None
        worker = Worker(spare, dev, grant.lease_id, grant.expires_at)
        with self._lock:
            handed = spare.proc.poll() is None and hand_off(spare.ctl, conn, info)
            if handed:
                worker.sessions.add(sid)
                self._sessions[sid] = worker
                if worker.key is not None:
                    self._workers.setdefault(worker.key, worker)
        if not handed:
            spare.discard()
            return None
        threading.Thread(target=read_worker_messages, args=(worker, spare.ctl, self._session_ended, self._worker_gone),
                         name="gpupool-worker", daemon=True).start()
        return worker

    def _join(self, conn: socket.socket, sid: str, key: tuple[str, int], info: dict[str, Any]) -> Worker | None:
        """Hand `conn` to the worker already serving its lease on this device, if there is one."""
        with self._lock:
            worker = self._workers.get(key)
            if worker is None or not worker.alive() or worker.ctl is None:
                return None
            if not hand_off(worker.ctl, conn, info):
                return None
            worker.sessions.add(sid)
            self._sessions[sid] = worker
            log.info("session %s joins lease %s on %s:%d", sid, key[0], worker.device.kind, key[1])
            return worker

    def _session_ended(self, worker: Worker, sid: str) -> None:
        with self._lock:
            worker.sessions.discard(sid)
            self._sessions.pop(sid, None)
            self._end_ticket(sid)
            if not worker.sessions:
                # Note [Worker control socket]: decided under the lock, so no hand-off races it.
                if worker.key is not None and self._workers.get(worker.key) is worker:
                    del self._workers[worker.key]
                worker.close_ctl()
        log.info("session %s ended", sid)

    def _end_ticket(self, sid: str) -> None:
        """Under the lock: session `sid` ended; its connection's slots are free."""
        ticket = self._tickets.pop(sid, None)
        if ticket is not None:
            self._gate.close(ticket)

    def _worker_gone(self, worker: Worker) -> None:
        """The worker exited (or broke its control protocol): forget it and its sessions."""
        with self._lock:
            worker.ctl = None
            for sid in worker.sessions:
                self._sessions.pop(sid, None)
                self._end_ticket(sid)
            worker.sessions.clear()
            if worker.key is not None and self._workers.get(worker.key) is worker:
                del self._workers[worker.key]
        try:
            worker.proc.wait(10)  # Note: reaps the worker at once, so it leaves no zombie behind
        except subprocess.TimeoutExpired:
            worker.signal(signal.SIGKILL)
            worker.proc.wait()
        log.info("worker %d exited (%s)", worker.proc.pid, worker.proc.returncode)

    def _pick_device(self) -> DeviceInfo:
        with self._lock:
            dev = self.config.devices[self._next_device % len(self.config.devices)]
            self._next_device += 1
        return dev

    def shutdown(self) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        self._holds.shutdown()
        with self._lock:
            spare, self._spare = self._spare, None
        workers = self._live_workers()
        if spare is not None:
            spare.discard()
        for w in workers:
            w.signal(signal.SIGTERM)
        for w in workers:
            try:
                w.proc.wait(5)
            except subprocess.TimeoutExpired:
                w.signal(signal.SIGKILL)
                w.proc.wait()


def _cut(conn: socket.socket) -> None:
    """End a connection another thread is blocked on: its read fails at once."""
    try:
        socket.socket.shutdown(conn, socket.SHUT_RDWR)  # Note: not SSLSocket's, which drops its state
    except OSError:
        pass
