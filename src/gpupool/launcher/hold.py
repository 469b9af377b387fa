"""The hold connection of `gpupool run`: its lease's lifeline to the GPU server.

Note [Hold connection]: `gpupool run` opens one data-plane connection whose `Hello` has
`hold=True` and keeps it open, silent, for as long as the command runs, and closes it after it has
released the lease. If `gpupool run` dies without releasing (kill -9, its host gone), the kernel
closes the connection; the server sees that while the lease is active, ends the lease's sessions
and tells the controller, so the GPU is free in seconds instead of at the lease's expiry. The
server sends nothing on it until the lease ends, then a `Refused` saying why.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from gpupool import tls as tls_policy
from gpupool.errors import ConnectError, GpupoolError, LeaseError, ProtocolError
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter, Limits
from gpupool.protocol.version import PROTOCOL_VERSION

log = logging.getLogger("gpupool.launcher")

_LIMITS = Limits(max_message=64 * 1024, max_buffers=0, max_buffer_bytes=0)


class LeaseHold:
    """A hold connection for one lease (Note [Hold connection]).

    `on_ended(why)` is called once, from the hold's thread, if the server ends the hold before
    `close()`: the lease ended there (or the server went away).
    """

    def __init__(self, address: str, lease_text: str, on_ended: Callable[[str], None],
                 timeout: float = 30.0) -> None:
        self.address = address
        self._lease = lease_text
        self._on_ended = on_ended
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpupool-hold", daemon=True)
        self.session = ""

    def open(self) -> LeaseHold:
        """Connect and be welcomed; raises LeaseError (the server refused the lease) or
        ConnectError (it cannot be reached)."""
        sock = tls_policy.connect(self.address, self._timeout, what="lease's server")
        try:
            self.session = self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        self._sock = sock
        self._thread.start()
        return self

    def _handshake(self, sock: socket.socket) -> str:
        hello = m.Hello(protocol=PROTOCOL_VERSION, token="", client=socket.gethostname(), lease=self._lease,
                        gpu=0, hold=True)
        try:
            FrameWriter(sock).send(m.plain_encoder.encode(hello))
            raw, _ = FrameReader(sock, _LIMITS).read_message()
        except GpupoolError as e:
            raise ConnectError(f"{self.address} closed the hold connection during the handshake: {e}") from None
        reply = m.decode(m.server_message_decoder, raw, "reply")
        if isinstance(reply, m.Refused):
            if reply.code == "lease":
                raise LeaseError(f"{self.address} refused the lease: {reply.message}")
            raise ConnectError(f"{self.address} refused the hold connection: {reply.message}")
        if not isinstance(reply, m.Welcome):
            raise ProtocolError(f"expected a welcome, got {type(reply).__name__}")
        return reply.session

    def _watch(self) -> None:
        assert self._sock is not None
        try:
            raw, _ = FrameReader(self._sock, _LIMITS).read_message()
            reply = m.decode(m.server_message_decoder, raw, "hold message")
            why = reply.message if isinstance(reply, m.Refused) else f"unexpected {type(reply).__name__}"
        except GpupoolError as e:
            why = f"the server closed the hold connection ({e})"
        if not self._closing.is_set():
            self._on_ended(why)

    def close(self) -> None:
        """Close the hold: call it after releasing the lease (else the server reports it abandoned)."""
        self._closing.set()
        if self._sock is None:
            return
        try:
            # Note: the socket's own shutdown, not SSLSocket's, which drops its TLS state.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # wakes the watching thread
        except OSError:
            pass
        self._thread.join(10)
        self._sock.close()
