"""The server's front door: accepts connections, checks the token, hands sessions to workers."""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass

import msgspec

from gpupool.errors import GpupoolError
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter, Limits
from gpupool.protocol.version import PROTOCOL_VERSION
from gpupool.server.device import DeviceInfo

log = logging.getLogger("gpupool.server")

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class ServerConfig:
    host: str
    port: int
    token: str
    devices: list[DeviceInfo]
    memory_limit: int | None = None  # per session; default: the device's memory
    max_sessions: int = 32


class _Spare:
    """A worker process started ahead of time, waiting for a connection."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl = parent
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.server.worker", str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
        )
        child.close()

    def hand_off(self, conn: socket.socket, info: dict) -> bool:
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
        self.ctl.close()
        try:
            self.proc.terminate()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._sock = socket.create_server((config.host, config.port), backlog=128)
        self.address = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._spare: _Spare | None = None
        self._sessions: dict[str, tuple[subprocess.Popen, DeviceInfo]] = {}
        self._stopping = threading.Event()
        self._next_device = 0

    # ---- workers ----------------------------------------------------------------------------

    def _take_spare(self) -> _Spare:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None or spare.proc.poll() is not None:
            spare = _Spare()
        threading.Thread(target=self._refill, daemon=True).start()
        return spare

    def _refill(self) -> None:
        if self._stopping.is_set():
            return
        fresh = _Spare()
        with self._lock:
            if self._spare is None and not self._stopping.is_set():
                self._spare, fresh = fresh, None  # type: ignore[assignment]
        if fresh is not None:
            fresh.discard()

    def _reap(self) -> None:
        with self._lock:
            for sid, (proc, _) in list(self._sessions.items()):
                if proc.poll() is not None:
                    log.info("session %s ended (worker exit %s)", sid, proc.returncode)
                    del self._sessions[sid]

    def session_count(self) -> int:
        self._reap()
        with self._lock:
            return len(self._sessions)

    # ---- connections ------------------------------------------------------------------------

    def serve_forever(self) -> None:
        threading.Thread(target=self._refill, daemon=True).start()
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            threading.Thread(target=self._handshake, args=(conn, peer), daemon=True).start()

    def _refuse(self, writer: FrameWriter, code: str, message: str) -> None:
        try:
            writer.send(m.plain_encoder.encode(m.Refused(code=code, message=message)))
        except GpupoolError:
            pass

    def _handshake(self, conn: socket.socket, peer: tuple) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = FrameReader(conn, Limits(max_message=64 * 1024, max_buffers=0, max_buffer_bytes=0))
            writer = FrameWriter(conn)
            try:
                raw, _ = reader.read_message()
                hello = m.hello_decoder.decode(raw)
            except (GpupoolError, msgspec.DecodeError, msgspec.ValidationError, OSError) as e:
                log.info("handshake from %s failed: %s", peer, e)
                self._refuse(writer, "protocol", f"bad handshake: {e}")
                return
            if hello.protocol != PROTOCOL_VERSION:
                self._refuse(
                    writer,
                    "version",
                    f"client speaks protocol {hello.protocol}, this server {PROTOCOL_VERSION}: "
                    "install the same gpupool version on both",
                )
                return
            if not hmac.compare_digest(hello.token.encode(), self.config.token.encode()):
                log.warning("refused %s: wrong token", peer)
                self._refuse(writer, "auth", "invalid token: check --token or GPUPOOL_TOKEN")
                return
            if self.session_count() >= self.config.max_sessions:
                self._refuse(writer, "busy", f"server at its limit of {self.config.max_sessions} sessions")
                return
            dev = self._pick_device()
            sid = uuid.uuid4().hex[:12]
            limit = min(self.config.memory_limit or dev.memory_total, dev.memory_total)
            info = {
                "session": sid,
                "kind": dev.kind,
                "index": dev.index,
                "name": dev.name,
                "memory_total": dev.memory_total,
                "memory_limit": limit,
            }
            spare = self._take_spare()
            if not spare.hand_off(conn, info):
                spare.discard()
                self._refuse(writer, "busy", "could not start a session worker")
                return
            with self._lock:
                self._sessions[sid] = (spare.proc, dev)
            log.info("session %s for %s on %s:%d (limit %d bytes)", sid, peer, dev.kind, dev.index, limit)
            threading.Thread(target=self._watch, args=(spare.proc,), daemon=True).start()
        finally:
            conn.close()  # the worker holds its own copy of the descriptor

    def _watch(self, proc: subprocess.Popen) -> None:
        proc.wait()
        self._reap()

    def _pick_device(self) -> DeviceInfo:
        with self._lock:
            dev = self.config.devices[self._next_device % len(self.config.devices)]
            self._next_device += 1
        return dev

    def shutdown(self) -> None:
        self._stopping.set()
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            spare, self._spare = self._spare, None
            procs = [p for p, _ in self._sessions.values()]
        if spare is not None:
            spare.discard()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
