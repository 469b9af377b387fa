"""The server's front door: accepts connections, checks the token, hands sessions to workers.

Note [What the listener trusts]: nothing a client sends. A connection gets one `Hello` frame of
at most 64 KiB within `handshake_timeout` seconds in total (however slowly its bytes arrive), at
most `max_handshakes` connections are in their handshake at once, and everything after the
handshake happens in the session's worker process (one per lease and device, Note [One budget
per lease] in memory.py), so no session can block the accept loop, another handshake, or
another lease's session. Who is admitted is decided by `admission.admit`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
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
from gpupool.server.holds import Holds
from gpupool.server.workers import Spare, Worker, hand_off, read_worker_messages

log = logging.getLogger("gpupool.server")


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
    #: Seconds a connection has, in total, to deliver its `Hello`.
    handshake_timeout: float = field(default_factory=lambda: _env_float("GPUPOOL_HANDSHAKE_TIMEOUT", 10.0))
    #: Connections in their handshake at once; more are refused at once.
    max_handshakes: int = 128
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
        self._handshakes = threading.BoundedSemaphore(config.max_handshakes)
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
            if not self._handshakes.acquire(blocking=False):
                log.warning("refused %s: %d handshakes already in progress", peer, self.config.max_handshakes)
                self._refuse_now(conn, "busy", "too many connections are opening sessions; try again")
                continue
            try:
                threading.Thread(target=self._handshake, args=(conn, peer), name="gpupool-handshake", daemon=True).start()
            except RuntimeError as e:  # cannot start a thread
                self._handshakes.release()
                log.error("cannot start a handshake thread: %s", e)
                self._refuse_now(conn, "busy", "server overloaded; try again")

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

    def _handshake(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        try:
            self._admit(conn, peer)
        except Exception:  # noqa: BLE001 - one bad connection must not end anything else
            log.exception("handshake with %s failed", peer)
        finally:
            self._handshakes.release()
            conn.close()  # a worker or the holds hold their own copy of the descriptor

    def _read_hello(self, conn: socket.socket, peer: tuple[Any, ...]) -> m.Hello | None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + self.config.handshake_timeout
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
            self._refuse(conn, "protocol", f"no valid handshake within {self.config.handshake_timeout:g} s: {e}")
        return None

    def _admit(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        hello = self._read_hello(conn, peer)
        if hello is None:
            return
        with self._lock:
            holdings = Holdings(len(self._sessions) + self._reserved, len(self._holds), frozenset(self._ended_leases))
        cfg = self.config
        decision = admit(hello, cfg.devices, cfg.token, cfg.verify_lease, holdings,
                         AdmitLimits(PROTOCOL_VERSION, cfg.max_sessions))
        if isinstance(decision, Refusal):
            log.warning("refused %s: %s", peer, decision.message)
            self._refuse(conn, decision.code, decision.message)
            return
        if decision.hold:
            dev = decision.device
            assert dev is not None
            self._holds.add(conn.dup(), decision.lease_id, m.Welcome(
                protocol=PROTOCOL_VERSION, session=f"hold-{uuid.uuid4().hex[:12]}", device_kind=dev.kind,
                device_name=dev.name, memory_limit=decision.limit or 0, memory_total=dev.memory_total,
                torch_version=""))
            return
        with self._lock:
            self._reserved += 1
        try:
            self._start_session(conn, peer, decision)
        finally:
            with self._lock:
                self._reserved -= 1

    def _start_session(self, conn: socket.socket, peer: tuple[Any, ...], grant: Grant) -> None:
        dev = grant.device or self._pick_device()
        limit = grant.limit
        if limit is None:
            limit = min(self.config.memory_limit or dev.memory_total, dev.memory_total)
        sid = uuid.uuid4().hex[:12]
        info = {"session": sid, "kind": dev.kind, "index": dev.index, "name": dev.name,
                "memory_total": dev.memory_total, "memory_limit": limit}
        if grant.lease_id and self._join(conn, sid, (grant.lease_id, dev.index), info):
            log.info("session %s for %s joins lease %s on %s:%d", sid, peer, grant.lease_id, dev.kind, dev.index)
            return
        try:
            spare = self._take_spare()
        except OSError as e:
            log.error("cannot start a session worker: %s", e)
            self._refuse(conn, "busy", "could not start a session worker")
            return
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
            self._refuse(conn, "busy", "could not start a session worker")
            return
        log.info("session %s for %s on %s:%d (limit %d bytes, worker pid %d)",
                 sid, peer, dev.kind, dev.index, limit, worker.proc.pid)
        threading.Thread(target=read_worker_messages, args=(worker, spare.ctl, self._session_ended, self._worker_gone),
                         name="gpupool-worker", daemon=True).start()

    def _join(self, conn: socket.socket, sid: str, key: tuple[str, int], info: dict[str, Any]) -> bool:
        """Hand `conn` to the worker already serving its lease on this device, if there is one."""
        with self._lock:
            worker = self._workers.get(key)
            if worker is None or not worker.alive() or worker.ctl is None:
                return False
            if not hand_off(worker.ctl, conn, info):
                return False
            worker.sessions.add(sid)
            self._sessions[sid] = worker
            return True

    def _session_ended(self, worker: Worker, sid: str) -> None:
        with self._lock:
            worker.sessions.discard(sid)
            self._sessions.pop(sid, None)
            if not worker.sessions:
                # Note [Worker control socket]: decided under the lock, so no hand-off races it.
                if worker.key is not None and self._workers.get(worker.key) is worker:
                    del self._workers[worker.key]
                worker.close_ctl()
        log.info("session %s ended", sid)

    def _worker_gone(self, worker: Worker) -> None:
        """The worker exited (or broke its control protocol): forget it and its sessions."""
        with self._lock:
            worker.ctl = None
            for sid in worker.sessions:
                self._sessions.pop(sid, None)
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
