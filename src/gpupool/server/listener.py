"""The server's front door: accepts connections, checks the token, hands sessions to workers.

Note [What the listener trusts]: nothing a client sends. A connection gets one `Hello` frame of
at most 64 KiB within `handshake_timeout` seconds in total (however slowly its bytes arrive), at
most `max_handshakes` connections are in their handshake at once, and everything after the
handshake happens in the session's own worker process, so no session can block the accept loop,
another handshake, or another session.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpupool.errors import GpupoolError, LeaseError, ProtocolError
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter, Limits
from gpupool.protocol.version import PROTOCOL_VERSION
from gpupool.server.device import DeviceInfo

log = logging.getLogger("gpupool.server")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


#: Environment a worker must not inherit: a session's process holds nothing it does not need.
SECRET_ENV = ("GPUPOOL_TOKEN",)


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


@dataclass
class _SessionRecord:
    proc: subprocess.Popen[bytes]
    device: DeviceInfo
    lease_id: str = ""
    expires_at: float = float("inf")  # wall-clock seconds; the lease's, kept current by heartbeats
    ending: float = 0.0  # monotonic time the worker was told to end, 0 if not yet


def _lifeline() -> int:
    """The read end of this process's lifeline: a pipe whose write end only this process holds.

    Note: a worker blocks reading it and exits at end-of-file, which comes when this process is
    gone, however it ended (even SIGKILL): a session must not outlive its server. Not
    PR_SET_PDEATHSIG: Linux sends that when the *thread* that started the worker ends, and
    workers are started by short-lived threads (refills, handshakes), so a worker that set it
    before its starting thread ended was killed with it (a spare lost under load, or a session).
    """
    global _life
    with _life_lock:
        if _life is None or _life[0] != os.getpid():  # a forked child makes its own
            r, w = os.pipe()
            _life = (os.getpid(), r, w)
        return _life[1]


_life_lock = threading.Lock()
_life: tuple[int, int, int] | None = None  # (pid, read end, write end), write end never closed


class _Spare:
    """A worker process started ahead of time, waiting for a connection."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
            life = _lifeline()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpupool.server.worker", str(child.fileno()), str(life)],
                pass_fds=[child.fileno(), life],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctl = parent

    def hand_off(self, conn: socket.socket, info: dict[str, Any]) -> bool:
        """Give `conn` to the worker; False if it is gone (the caller then discards it)."""
        if self.proc.poll() is not None:
            return False
        try:
            socket.send_fds(self.ctl, [json.dumps(info).encode()], [conn.fileno()])
        except OSError:
            return False
        finally:
            self.ctl.close()
        return True

    def discard(self) -> None:
        """End a worker that never got a session, and reap it."""
        self.ctl.close()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._sock = socket.create_server((config.host, config.port), backlog=128)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._spare: _Spare | None = None
        self._refilling = False
        self._sessions: dict[str, _SessionRecord] = {}
        self._reserved = 0  # sessions admitted whose worker is being handed the connection
        self._handshakes = threading.BoundedSemaphore(config.max_handshakes)
        self._stopping = threading.Event()
        self._next_device = 0

    # ---- workers ----------------------------------------------------------------------------

    def _take_spare(self) -> _Spare:
        """The warm spare if there is one, else a new worker (slower: it imports torch)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.proc.poll() is not None:
            spare.discard()
            spare = None
        if spare is None:
            spare = _Spare()
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
        fresh: _Spare | None = None
        try:
            fresh = _Spare()
        except OSError as e:
            log.error("cannot start a spare worker: %s", e)
        finally:
            with self._lock:
                self._refilling = False
                if fresh is not None and self._spare is None and not self._stopping.is_set():
                    self._spare, fresh = fresh, None
        if fresh is not None:
            fresh.discard()

    def _reap(self) -> None:
        with self._lock:
            for sid, rec in list(self._sessions.items()):
                if rec.proc.poll() is not None:
                    log.info("session %s ended (worker %d exit %s)", sid, rec.proc.pid, rec.proc.returncode)
                    del self._sessions[sid]

    def session_count(self) -> int:
        """Sessions whose worker is still running."""
        self._reap()
        with self._lock:
            return len(self._sessions)

    def session_pids(self) -> dict[str, int]:
        """Worker process id of each running session, by session id."""
        self._reap()
        with self._lock:
            return {sid: rec.proc.pid for sid, rec in self._sessions.items()}

    def usage(self) -> list[dict[str, Any]]:
        """Sessions per device, for the controller's heartbeat."""
        self._reap()
        with self._lock:
            counts = {d.index: 0 for d in self.config.devices}
            for rec in self._sessions.values():
                counts[rec.device.index] = counts.get(rec.device.index, 0) + 1
        return [{"index": i, "sessions": n} for i, n in counts.items()]

    # ---- leases -----------------------------------------------------------------------------

    def sync_leases(self, active: dict[str, Any]) -> None:
        """The controller's view after a heartbeat: `active` maps lease id -> lease (with
        `expires_at`). Sessions of leases no longer listed end now; the others get the renewed
        expiry. Note [Lease expiry]: between heartbeats (or while the controller is away) the last
        known expiry rules, so a session never outlives an unrenewed lease."""
        with self._lock:
            for rec in self._sessions.values():
                if not rec.lease_id:
                    continue
                lease = active.get(rec.lease_id)
                if lease is None:
                    rec.expires_at = 0.0
                else:
                    rec.expires_at = float(lease.get("expires_at", rec.expires_at))
        self.enforce_leases()

    def enforce_leases(self, now: float | None = None) -> int:
        """End sessions whose lease expired or ended; returns how many were told to end."""
        now = time.time() if now is None else now
        ended = 0
        with self._lock:
            for sid, rec in self._sessions.items():
                if rec.proc.poll() is not None or rec.expires_at > now:
                    continue
                if not rec.ending:
                    # Note: SIGUSR1 makes the worker tell its client why, then exit.
                    log.info("session %s: lease %s ended; ending the session", sid, rec.lease_id)
                    rec.ending = time.monotonic()
                    _signal(rec.proc, signal.SIGUSR1)
                    ended += 1
                elif time.monotonic() - rec.ending > 5.0:
                    _signal(rec.proc, signal.SIGKILL)
        return ended

    def _lease_watchdog(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                self.enforce_leases()
                self._reap()
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
            conn.close()  # the worker holds its own copy of the descriptor

    def _admit(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + self.config.handshake_timeout
        # Note: no read-ahead: the connection goes to a worker, whose reader starts afresh.
        reader = FrameReader(conn, Limits(max_message=64 * 1024, max_buffers=0, max_buffer_bytes=0), deadline=deadline, readahead=0)
        try:
            raw, _ = reader.read_message()
            hello = m.decode(m.hello_decoder, raw, "handshake")
        except ProtocolError as e:
            log.info("handshake from %s failed: %s", peer, e)
            self._refuse(conn, "protocol", f"bad handshake: {e}")
            return
        except GpupoolError as e:  # ServerLost: closed, reset or too slow
            log.info("handshake from %s failed: %s", peer, e)
            self._refuse(conn, "protocol", f"no valid handshake within {self.config.handshake_timeout:g} s: {e}")
            return
        if hello.protocol != PROTOCOL_VERSION:
            self._refuse(
                conn,
                "version",
                f"client speaks protocol {hello.protocol}, this server {PROTOCOL_VERSION}: "
                "install the same gpupool version on both",
            )
            return
        grant: dict[str, Any] = {}
        if hello.lease and self.config.verify_lease is not None:
            try:
                claims = self.config.verify_lease(hello.lease)
            except LeaseError as e:
                log.warning("refused %s: %s", peer, e)
                self._refuse(conn, "lease", str(e))
                return
            if not 0 <= hello.gpu < len(claims.gpus):
                self._refuse(conn, "lease", f"lease {claims.id} holds {len(claims.gpus)} GPU(s); GPU {hello.gpu} asked for")
                return
            g = claims.gpus[hello.gpu]
            dev = next((d for d in self.config.devices if d.index == g.index), None)
            if dev is None:
                self._refuse(conn, "lease", f"lease {claims.id} names GPU {g.index}, which this server does not have")
                return
            grant = {"device": dev, "limit": min(g.bytes, dev.memory_total), "lease_id": claims.id, "expires_at": claims.expires_at}
        elif not self.config.token or not hmac.compare_digest(hello.token.encode(), self.config.token.encode()):
            log.warning("refused %s: wrong token", peer)
            what = "no lease and no valid token" if self.config.verify_lease is not None else "invalid token"
            self._refuse(conn, "auth", f"{what}: check --token or GPUPOOL_TOKEN")
            return
        self._reap()
        with self._lock:
            admitted = len(self._sessions) + self._reserved < self.config.max_sessions
            if admitted:
                self._reserved += 1
        if not admitted:
            self._refuse(conn, "busy", f"server at its limit of {self.config.max_sessions} sessions")
            return
        try:
            self._start_session(conn, peer, **grant)
        finally:
            with self._lock:
                self._reserved -= 1

    def _start_session(
        self,
        conn: socket.socket,
        peer: tuple[Any, ...],
        device: DeviceInfo | None = None,
        limit: int | None = None,
        lease_id: str = "",
        expires_at: float = float("inf"),
    ) -> None:
        dev = device or self._pick_device()
        sid = uuid.uuid4().hex[:12]
        if limit is None:
            limit = min(self.config.memory_limit or dev.memory_total, dev.memory_total)
        info = {
            "session": sid,
            "kind": dev.kind,
            "index": dev.index,
            "name": dev.name,
            "memory_total": dev.memory_total,
            "memory_limit": limit,
        }
        try:
            spare = self._take_spare()
        except OSError as e:
            log.error("cannot start a session worker: %s", e)
            self._refuse(conn, "busy", "could not start a session worker")
            return
        if not spare.hand_off(conn, info):
            spare.discard()
            self._refuse(conn, "busy", "could not start a session worker")
            return
        with self._lock:
            self._sessions[sid] = _SessionRecord(spare.proc, dev, lease_id, expires_at)
        log.info(
            "session %s for %s on %s:%d (limit %d bytes, worker pid %d)",
            sid, peer, dev.kind, dev.index, limit, spare.proc.pid,
        )
        threading.Thread(target=self._watch, args=(spare.proc,), name="gpupool-watch", daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()  # Note: reaps the worker at once, so no session leaves a zombie behind
        self._reap()

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
        with self._lock:
            spare, self._spare = self._spare, None
            procs = [rec.proc for rec in self._sessions.values()]
        if spare is not None:
            spare.discard()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass
