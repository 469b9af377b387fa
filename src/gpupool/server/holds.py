"""Hold connections: a lease holder's lifeline to the server (`Hello(hold=True)`).

`gpupool run` keeps one open for as long as it runs. The server only watches it: when it
closes while its lease is active, the holder died without releasing (killed, or its host
vanished), so the server ends the lease's sessions and tells the controller at once, and the
GPU is free in seconds instead of at the lease's expiry. A hold that sends anything is closed.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
from collections.abc import Callable

from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameWriter

log = logging.getLogger("gpupool.server")


class Holds:
    """The open hold connections, watched by one thread."""

    def __init__(self, on_closed: Callable[[str], None]) -> None:
        self._on_closed = on_closed  # called with the lease id when its last hold closes
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._by_lease: dict[str, set[socket.socket]] = {}
        self._released: dict[socket.socket, Callable[[], None]] = {}  # called when it closes
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpupool-holds", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._by_lease.values())

    def add(self, conn: socket.socket, lease_id: str, welcome: m.Welcome,
            on_closed: Callable[[], None] = lambda: None) -> None:
        """Hold `conn` (plain or TLS) for `lease_id`; `on_closed` runs once when it closes."""
        from gpupool.server.worker import set_keepalive

        set_keepalive(conn)  # a holder's host that vanished without a FIN is noticed too
        conn.settimeout(2.0)
        try:
            FrameWriter(conn).send(m.plain_encoder.encode(welcome))
        except Exception:  # noqa: BLE001 - the holder is gone already: nothing to hold
            conn.close()
            on_closed()
            return
        conn.setblocking(False)
        with self._lock:
            self._by_lease.setdefault(lease_id, set()).add(conn)
            self._released[conn] = on_closed
            self._sel.register(conn, selectors.EVENT_READ, lease_id)
        self._wake()

    def end(self, lease_id: str, refused: m.Refused) -> None:
        """The lease ended: tell its holders why and close their connections."""
        with self._lock:
            conns = self._by_lease.pop(lease_id, set())
            for c in conns:
                self._sel.unregister(c)
        for c in conns:
            try:
                c.setblocking(True)
                c.settimeout(2.0)
                FrameWriter(c).send(m.plain_encoder.encode(refused))
            except Exception:  # noqa: BLE001 - best effort: the holder may be gone
                pass
            self._close(c)

    def leases(self) -> set[str]:
        with self._lock:
            return set(self._by_lease)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(5)
        with self._lock:
            conns = [c for cs in self._by_lease.values() for c in cs]
            self._by_lease.clear()
        for c in conns:
            self._close(c)

    def _close(self, conn: socket.socket) -> None:
        conn.close()
        with self._lock:
            released = self._released.pop(conn, None)
        if released is not None:
            released()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select():
                if key.data is None:
                    self._wake_r.recv(4096)
                    continue
                self._closed(key.fileobj, key.data)  # type: ignore[arg-type]

    def _closed(self, conn: socket.socket, lease_id: str) -> None:
        """`conn` is readable: its holder closed it (or broke the rule and sent something)."""
        try:
            data = conn.recv(1)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # e.g. a TLS record with no data in it
        except OSError:
            data = b""
        if data:
            log.warning("a hold connection of lease %s sent data: closing it", lease_id)
        with self._lock:
            conns = self._by_lease.get(lease_id)
            if conns is None or conn not in conns:
                return
            conns.discard(conn)
            self._sel.unregister(conn)
            last = not conns
            if last:
                del self._by_lease[lease_id]
        self._close(conn)
        if last:
            log.info("lease %s: its holder hung up", lease_id)
            self._on_closed(lease_id)
