"""Length-prefixed frames: a typed message followed by raw buffers that bypass the encoder.

Layout of one frame (little endian)::

    magic  b"GP"   2 bytes
    nbufs  u16     number of raw buffers after the message
    msglen u32     bytes of the encoded message
    buflen u64 * nbufs
    message (msgpack, decoded strictly by `messages`)
    buffer 0, buffer 1, ...

Note: buffers are read by the consumer *after* it decoded the message, straight into memory it
allocated for them (`recv_into` in slices of at most 256 KiB, the fastest way measured on
loopback). The reader enforces that every announced buffer byte is consumed or skipped before the
next frame, so a consumer that fails half-way cannot desynchronise the stream.

A reader may read ahead of the frame it was asked for (Note [Read-ahead]); the listener's
handshake reader does not, since it hands the socket to a worker process, which must find the
next frame's first byte in the kernel.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable

from gpupool.errors import ProtocolError, ServerLost

MAGIC = b"GP"
_HEAD = struct.Struct("<2sHI")
_LEN = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size
RECV_SLICE = 256 * 1024
#: Bytes a reader may take from the socket ahead of need (see Note [Read-ahead]).
READAHEAD = 64 * 1024
#: Writes smaller than this are coalesced with the frame header into one `sendall`.
COALESCE = 64 * 1024
#: The most the header format can express.
MAX_BUFFERS_FORMAT = 0xFFFF
MAX_MESSAGE_FORMAT = 0xFFFF_FFFF


class Limits:
    """Upper bounds on what a peer may announce; anything above is a protocol error."""

    def __init__(
        self,
        max_message: int = 64 * 1024 * 1024,
        max_buffers: int = 4096,
        max_buffer_bytes: int = 1 << 40,
    ) -> None:
        self.max_message = max_message
        self.max_buffers = max_buffers
        #: Total over all buffers of one frame.
        self.max_buffer_bytes = max_buffer_bytes


def encode_header(message_len: int, buffer_lens: list[int] | tuple[int, ...]) -> bytes:
    """The bytes that precede a frame's message: magic, counts, and each buffer's length."""
    if len(buffer_lens) > MAX_BUFFERS_FORMAT:
        raise ProtocolError(f"{len(buffer_lens)} buffers do not fit in one frame")
    if message_len > MAX_MESSAGE_FORMAT:
        raise ProtocolError(f"message of {message_len} bytes does not fit in one frame")
    return _HEAD.pack(MAGIC, len(buffer_lens), message_len) + b"".join(_LEN.pack(n) for n in buffer_lens)


class FrameWriter:
    """Sends frames on a connected socket. Not thread-safe: callers hold their own lock."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, message: bytes, buffers: list[memoryview] | tuple[memoryview, ...] = ()) -> None:
        """Send one frame: small parts go out in one write, large buffers without a copy."""
        if not buffers:
            # The common frame (a batch of commands, a reply): one write, no buffer bookkeeping.
            try:
                self._sock.sendall(encode_header(len(message), ()) + message)
            except OSError as e:
                raise ServerLost(f"connection lost while sending: {e}") from e
            return
        views = [b if (b.format == "B" and b.ndim == 1) else b.cast("B") for b in buffers]
        head = bytearray(encode_header(len(message), [b.nbytes for b in views]))
        head += message
        try:
            for b in views:
                if b.nbytes < COALESCE:
                    head += b
                else:
                    if head:
                        self._sock.sendall(head)
                        head = bytearray()
                    self._sock.sendall(b)
            if head:
                self._sock.sendall(head)
        except OSError as e:
            raise ServerLost(f"connection lost while sending: {e}") from e

    def send_stream(self, message: bytes, nbytes: int, chunks: Iterable[memoryview]) -> None:
        """Send a frame with one buffer of `nbytes`, produced piecewise by `chunks`.

        For data that does not exist in one piece (a strided tensor gathered slice by slice), so
        the sender never holds a full copy. If the chunks do not add up to `nbytes` the stream is
        broken: `ProtocolError` is raised and the connection must be closed.
        """
        head = bytearray(encode_header(len(message), [nbytes]))
        head += message
        sent = 0
        try:
            self._sock.sendall(head)
            for c in chunks:
                c = c if (c.format == "B" and c.ndim == 1) else c.cast("B")
                sent += c.nbytes
                if sent > nbytes:
                    break
                self._sock.sendall(c)
        except OSError as e:
            raise ServerLost(f"connection lost while sending: {e}") from e
        if sent != nbytes:
            raise ProtocolError(f"a buffer of {nbytes} bytes was announced and {sent} produced")


class FrameReader:
    """Receives frames: `read_message()` first, then each announced buffer in order.

    With `deadline` (a `time.monotonic()` value) every receive gives up at that moment, however
    the peer dribbles its bytes: this is what stops a slow handshake from holding a thread.
    """

    def __init__(
        self,
        sock: socket.socket,
        limits: Limits | None = None,
        deadline: float | None = None,
        readahead: int = READAHEAD,
    ) -> None:
        self._sock = sock
        self.limits = limits or Limits()
        self.deadline = deadline
        self._pending: list[int] = []
        # Note [Read-ahead]: small reads (a header, a message) take whatever the socket has, up
        # to `readahead` bytes, so a small frame costs one recv instead of two or three. Bytes
        # read ahead belong to this reader: a socket handed to another reader mid-stream must
        # use readahead=0 before the hand-off (the listener's handshake does).
        self._ahead = bytearray(max(readahead, _HEAD.size))
        self._ahead_view = memoryview(self._ahead)
        self._can_read_ahead = readahead > 0
        self._start = 0
        self._end = 0

    @property
    def pending_buffers(self) -> list[int]:
        """Sizes of the buffers of the current frame not yet consumed."""
        return list(self._pending)

    @property
    def buffered(self) -> bool:
        """Whether bytes of the next frame were read ahead (a poll of the socket would miss them)."""
        return self._end > self._start

    @property
    def has_pending_buffers(self) -> bool:
        """Whether the current frame has buffers not yet consumed (no list made)."""
        return bool(self._pending)

    def _recv_some_into(self, view: memoryview) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ServerLost("timed out waiting for the peer")
            self._sock.settimeout(left)
        try:
            k = self._sock.recv_into(view, view.nbytes)
        except TimeoutError as e:
            raise ServerLost("timed out waiting for the peer") from e
        except OSError as e:
            raise ServerLost(f"connection lost while receiving: {e}") from e
        if k == 0:
            raise ServerLost("peer closed the connection")
        return k

    def _fill(self, n: int) -> None:
        """Receive until the read-ahead holds at least `n` bytes (n <= its size)."""
        have = self._end - self._start
        if self._start:
            if have:
                self._ahead[:have] = self._ahead[self._start:self._end]
            self._start, self._end = 0, have
        while self._end < n:
            self._end += self._recv_some_into(self._ahead_view[self._end:])

    def _take(self, n: int) -> memoryview:
        """The next `n` bytes (n <= the read-ahead size), received with as few recvs as can be."""
        if self._end - self._start < n:
            if not self._can_read_ahead:
                out = memoryview(bytearray(n))
                self._recv_exact_into(out)
                return out
            self._fill(n)
        out = self._ahead_view[self._start:self._start + n]
        self._start += n
        return out

    def _recv_exact_into(self, view: memoryview) -> None:
        got = 0
        n = view.nbytes
        have = self._end - self._start
        if have and n:  # Note: n == 0 may come with a read-only view (b""): never assign to it
            got = min(have, n)
            view[:got] = self._ahead_view[self._start:self._start + got]
            self._start += got
        while got < n:
            got += self._recv_some_into(view[got:min(n, got + RECV_SLICE)])

    def read_message(self) -> tuple[bytearray, list[int]]:
        """Read one frame's header and message; returns the message and its buffer sizes.

        Raises `ServerLost` when the peer closes before a frame starts or mid-frame, and
        `ProtocolError` for a frame that is not gpupool's or is over the limits (checked before
        anything of that size is allocated).
        """
        if self._pending:
            self.skip_pending()
        if self._can_read_ahead:
            # Note: the common path (every frame after the handshake) reads the header in place.
            if self._end - self._start < HEADER_SIZE:
                self._fill(HEADER_SIZE)
            magic, nbufs, msglen = _HEAD.unpack_from(self._ahead, self._start)
            self._start += HEADER_SIZE
        else:
            magic, nbufs, msglen = _HEAD.unpack(self._take(HEADER_SIZE))
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {bytes(magic)!r}: not a gpupool peer")
        if msglen > self.limits.max_message:
            raise ProtocolError(
                f"message of {msglen} bytes is over the limit of {self.limits.max_message}"
            )
        if nbufs > self.limits.max_buffers:
            raise ProtocolError(f"{nbufs} buffers in one frame, over the limit of {self.limits.max_buffers}")
        sizes: list[int] = []
        if nbufs:
            if 8 * nbufs <= len(self._ahead):
                raw: bytes | bytearray = bytes(self._take(8 * nbufs))
            else:
                raw = bytearray(8 * nbufs)
                self._recv_exact_into(memoryview(raw))
            total = 0
            for (n,) in _LEN.iter_unpack(raw):
                total += n
                sizes.append(n)
            if total > self.limits.max_buffer_bytes:
                raise ProtocolError(
                    f"frame announces {total} buffer bytes, over the limit of {self.limits.max_buffer_bytes}"
                )
        if msglen > len(self._ahead):
            msg = bytearray(msglen)
            self._recv_exact_into(memoryview(msg))
        elif self._can_read_ahead:
            if self._end - self._start < msglen:
                self._fill(msglen)
            start = self._start
            self._start = start + msglen
            msg = self._ahead[start:self._start]  # a copy (bytearray slice): the read-ahead is reused
        else:
            msg = bytearray(self._take(msglen))
        self._pending = list(sizes)  # Note: a copy; the caller may keep the returned list
        return msg, sizes

    def read_buffer_into(self, view: memoryview) -> None:
        """Receive the next buffer of the current frame into `view` (exactly its size)."""
        if not self._pending:
            raise ProtocolError("no buffer left in this frame")
        n = self._pending[0]
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes != n:
            raise ProtocolError(f"buffer of {n} bytes announced, {view.nbytes} expected")
        self._pending.pop(0)
        self._recv_exact_into(view)

    def read_buffer(self) -> bytearray:
        """Receive the next buffer into fresh memory."""
        if not self._pending:
            raise ProtocolError("no buffer left in this frame")
        out = bytearray(self._pending[0])
        self.read_buffer_into(memoryview(out))
        return out

    def skip_next(self) -> None:
        """Discard the next buffer of the current frame."""
        if not self._pending:
            raise ProtocolError("no buffer left in this frame")
        n = self._pending.pop(0)
        scratch = memoryview(bytearray(min(n, RECV_SLICE)))
        while n:
            k = min(n, RECV_SLICE)
            self._recv_exact_into(scratch[:k])
            n -= k

    def skip_pending(self) -> None:
        """Discard buffers of the current frame that the consumer did not take."""
        while self._pending:
            self.skip_next()
