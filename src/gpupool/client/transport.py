"""How a session's frames reach its server: the `Transport` seam, separate from the socket.

`Connection` (connection.py) speaks the protocol: the handshake, batching, replies and errors.
A `Transport` only moves frames (protocol/framing.py): it is what `Connection` needs of a byte
stream and nothing more, like httpx's transport under its client. `SocketTransport` is the one
every real session uses (TCP, TLS-wrapped where Note [When TLS is required] in gpupool/tls.py
says so); `gpupool.client.inprocess` gives one whose peer is the real executor in a thread of
this process, for tests and tools.

A transport raises `ServerLost` when the peer goes away or a deadline passes, and
`ProtocolError` for a frame that is not gpupool's, as `FrameReader` and `FrameWriter` do.
"""

from __future__ import annotations

import socket
from typing import Protocol

from gpupool import tls as tls_policy
from gpupool.protocol.framing import FrameReader, FrameWriter


class Transport(Protocol):
    """A connected frame stream to one server. Not thread-safe: `Connection` holds its lock
    around every call."""

    #: What the peer is called in messages (HOST:PORT, "in-process").
    label: str

    def send(self, message: bytes, buffers: list[memoryview] | tuple[memoryview, ...] = ()) -> None:
        """Send one frame: `message`, then each of `buffers` as a raw buffer."""

    def read_message(self) -> bytearray:
        """The next frame's message (its buffers are then read in order, or skipped by the
        next `read_message`)."""

    def read_buffer_into(self, view: memoryview) -> None:
        """Receive the current frame's next buffer into `view`, exactly its size."""

    def read_buffer(self) -> bytearray:
        """Receive the current frame's next buffer into fresh memory."""

    def set_deadline(self, when: float | None) -> None:
        """Give up receiving at `when` (a `time.monotonic()` value) with `ServerLost`; None:
        wait for the peer without limit (what a session does once its handshake is over)."""

    def close(self) -> None:
        """Close the stream; never raises `OSError`."""


class SocketTransport:
    """Frames on a connected socket (TCP, TLS or a Unix socket pair)."""

    def __init__(self, sock: socket.socket, label: str = "") -> None:
        self.label = label
        self._sock = sock
        self._writer = FrameWriter(sock)
        self._reader = FrameReader(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def send(self, message: bytes, buffers: list[memoryview] | tuple[memoryview, ...] = ()) -> None:
        self._writer.send(message, buffers)

    def read_message(self) -> bytearray:
        return self._reader.read_message()[0]

    def read_buffer_into(self, view: memoryview) -> None:
        self._reader.read_buffer_into(view)

    def read_buffer(self) -> bytearray:
        return self._reader.read_buffer()

    def set_deadline(self, when: float | None) -> None:
        self._reader.deadline = when
        if when is None:
            # Note: the reader sets the socket's timeout for each receive under a deadline, and
            # `open_transport`'s socket has the connect timeout: neither applies any more.
            try:
                self._sock.settimeout(None)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def open_transport(address: str, timeout: float, tls: bool | None = None) -> SocketTransport:
    """A `SocketTransport` to the data-plane server at HOST:PORT: connected within `timeout`,
    TLS-wrapped and verified where TLS is on (`gpupool.tls.connect`; ConnectError otherwise).

    The socket keeps `timeout` on each receive until `set_deadline(None)`, so a server that
    accepts but never answers the handshake fails it instead of hanging the client."""
    sock = tls_policy.connect(address, timeout, tls)
    try:
        return SocketTransport(sock, address)
    except BaseException:
        sock.close()
        raise
