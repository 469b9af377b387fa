"""The wire baseline: plain Python sockets doing what gpupool's transport does, and nothing else.

`python -m bench.sockbase` is a loopback server in its own process (like the gpupool server);
`SockClient` is its client, used by the baseline worker. Requests are a 9-byte header
(`kind`, u64 size):

- ``S n``: the client `sendall`s n bytes; the server `recv_into`s them in 256 KiB slices into a
  buffer it keeps, then answers one byte (so the time covers delivery, like gpupool's sync).
- ``R n``: the server `sendall`s n bytes; the client `recv_into`s them in 256 KiB slices.
- ``P``: the request is padded to 100 bytes; the server answers 100 bytes (round trip).

Note: both ends reuse buffers allocated once, so this is the ceiling of the wire itself: it
pays no page faults for fresh memory, which gpupool's `.cpu()` and server-side uploads do.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading

HEAD = struct.Struct("<cQ")
SLICE = 256 * 1024
PING_BYTES = 100


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` with `recv_into` in slices of at most 256 KiB (the fastest measured)."""
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got : min(n, got + SLICE)])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def _serve_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(HEAD.size)
    hv = memoryview(head)
    ping = bytearray(PING_BYTES)
    pv = memoryview(ping)
    buf = bytearray(0)
    try:
        while True:
            recv_exact_into(conn, hv)
            kind, n = HEAD.unpack(head)
            if kind == b"P":
                recv_exact_into(conn, pv[HEAD.size :])
                conn.sendall(ping)
            elif kind in (b"S", b"R"):
                if len(buf) < n:
                    buf = bytearray(n)
                view = memoryview(buf)[:n]
                if kind == b"S":
                    recv_exact_into(conn, view)
                    conn.sendall(b"k")
                else:
                    conn.sendall(view)
            else:
                return
    except (ConnectionError, OSError):
        return
    finally:
        conn.close()


def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    srv = socket.create_server((host, port))
    h, p = srv.getsockname()[:2]
    print(f"sockbase listening on {h}:{p}", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


class SockClient:
    """One connection to the baseline server, with buffers kept across calls."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ping = bytearray(PING_BYTES)
        self._ping[: HEAD.size] = HEAD.pack(b"P", 0)
        self._pong = memoryview(bytearray(PING_BYTES))
        self._ack = memoryview(bytearray(1))

    def send(self, data: memoryview) -> None:
        """Host to peer: `data` delivered and acknowledged."""
        self.sock.sendall(HEAD.pack(b"S", data.nbytes))
        self.sock.sendall(data)
        recv_exact_into(self.sock, self._ack)

    def receive(self, into: memoryview) -> None:
        """Peer to host: fill `into`."""
        self.sock.sendall(HEAD.pack(b"R", into.nbytes))
        recv_exact_into(self.sock, into)

    def ping(self) -> None:
        self.sock.sendall(self._ping)
        recv_exact_into(self.sock, self._pong)

    def close(self) -> None:
        try:
            self.sock.sendall(HEAD.pack(b"Q", 0))
        except OSError:
            pass
        self.sock.close()


if __name__ == "__main__":
    serve(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
