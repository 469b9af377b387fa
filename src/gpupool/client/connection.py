"""A session's connection to a server: handshake, the batched command stream, replies.

Note [Ordering]: commands are appended in program order and sent in batches; the server runs
them in that order. Frees collected so far are appended *after* the pending commands, so a
handle is never freed before a command that uses it, and *before* the command being queued
(which cannot use a handle that has died): an op carries them in its `frees` field, an upload
or a request gets a `free` command before it. A tensor dropped before the next op (`del x` and a
new `x = big.to(device)`) is freed on the server before that op allocates, so a share that holds
one copy is enough, and the server reuses the memory (first touches of fresh memory cost ~3 s of
CPU per GiB on these VMs). A separate `free` per op instead cost op_add_small 12 → 17 µs per op.
`__del__` of a handle only appends to `self.frees` (atomic under the GIL) and never takes the
lock, because the garbage collector can run it anywhere, also inside `flush()`.

Note [Flush latency]: a batch leaves when 512 commands are queued, at a sync point, or with the
first command queued after the oldest one has waited `FLUSH_AFTER_S` (0.5 ms). Batching saves a
system call and a server wake-up per op (what `op_add_small` measures); the time bound keeps the
GPU busy: with only the count, a training step of 60 ops sat in the client until nine steps were
queued, and the server's compute, which should overlap the client issuing the next ops, came
after it instead.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from gpupool.client.transport import Transport, open_transport
from gpupool.errors import (
    AuthError,
    ConnectError,
    GpupoolError,
    LeaseError,
    LeaseExpired,
    ProtocolError,
    RemoteOpError,
    ServerLost,
    SessionClosed,
    ShareExceeded,
    UnsupportedError,
    VersionMismatch,
)
from gpupool.netaddr import parse_host_port
from gpupool.protocol import messages as m
from gpupool.protocol.version import PROTOCOL_VERSION
from gpupool.torchcodec import reply_ext_hook

if TYPE_CHECKING:
    from gpupool.client.replay import Replayer

FORK_MESSAGE = (
    "this process was forked from one holding a gpupool session; a forked child cannot use the "
    "parent's session (like CUDA): start workers with the 'spawn' method (e.g. "
    "DataLoader(multiprocessing_context='spawn')) or keep device work in the parent"
)


class OutOfShare(ShareExceeded, torch.OutOfMemoryError):
    """`ShareExceeded` that is also a `torch.OutOfMemoryError`, as a CUDA OOM would be, so
    `except torch.cuda.OutOfMemoryError` in training code (batch-size finders) catches it."""


#: Send without waiting once this many commands are queued.
MAX_PENDING = 512
#: ... or once the oldest queued command has waited this long (seconds): see Note [Flush latency].
FLUSH_AFTER_S = float(os.environ.get("GPUPOOL_FLUSH_AFTER_S", "0.0005"))

#: Bumped in a forked child. A connection remembers the value it was made under, so "is this
#: the process that opened me?" costs no `getpid()` system call on every command.
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_forked)

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_torch_dir: str | None = None


_internal_code: dict[Any, bool] = {}


def _is_internal(code: Any) -> bool:
    global _torch_dir
    if _torch_dir is None:
        import torch

        _torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    fn = code.co_filename
    r = _internal_code[code] = fn.startswith(_here) or fn.startswith(_torch_dir) or fn.startswith("<frozen")
    return r


def _user_location() -> tuple[str, int] | None:
    """The first frame outside torch and gpupool: the user's line that issued an op.

    Runs for every op, so it only walks frames and looks each code object up once; the text is
    made when an error is reported.
    """
    f = sys._getframe(2)
    known = _internal_code
    while f is not None:
        code = f.f_code
        internal = known.get(code)
        if internal is None:
            internal = _is_internal(code)
        if not internal:
            return (code.co_filename, f.f_lineno)
        f = f.f_back  # type: ignore[assignment]
    return None


_reply_decoder = m.make_decoder(m.ServerMessage, ext_hook=reply_ext_hook)


def parse_address(address: str) -> tuple[str, int]:
    try:
        return parse_host_port(address, "server address")
    except ValueError as e:
        raise ConnectError(str(e)) from None


class Connection:
    """One session's command stream to its server, over a `Transport` (transport.py).

    Without `transport`, a socket to `address` is opened (`open_transport`: TLS as `tls` and
    Note [When TLS is required] say, `timeout` for connecting and for the handshake). With one,
    it is used as it is (`timeout` and `tls` do not apply) and `address` is only the name of the
    peer in messages (the transport's `label` when empty).
    """

    def __init__(self, address: str, token: str, timeout: float = 30.0, lease: str = "", gpu: int = 0,
                 tls: bool | None = None, transport: Transport | None = None) -> None:
        if transport is None:
            transport = open_transport(address, timeout, tls)
        self.address = address = address or transport.label
        self.transport: Transport = transport
        try:
            hello = m.Hello(protocol=PROTOCOL_VERSION, token=token, client=socket.gethostname(), lease=lease, gpu=gpu)
            transport.send(m.plain_encoder.encode(hello))
            reply = self._read_reply()
        except ServerLost as e:
            transport.close()
            raise ConnectError(f"{address} closed the connection during the handshake: {e}") from None
        except BaseException:
            transport.close()
            raise
        if isinstance(reply, m.Refused):
            transport.close()
            if reply.code == "auth":
                raise AuthError(f"{address} refused the session: {reply.message}")
            if reply.code == "version":
                raise VersionMismatch(reply.message)
            if reply.code == "lease":
                raise LeaseError(f"{address} refused the lease: {reply.message}")
            raise ConnectError(f"{address} refused the session: {reply.message}")
        if not isinstance(reply, m.Welcome):
            transport.close()
            raise ProtocolError(f"expected a welcome, got {type(reply).__name__}")
        transport.set_deadline(None)  # the handshake's timeout ends: ops may run for hours
        self.welcome: m.Welcome = reply
        self._lock = threading.RLock()
        self._cmds: list[msgspec.Raw] = []
        self._queued_at = 0.0  # when the oldest command of `_cmds` was queued by `op`
        self._bufs: list[memoryview] = []
        self.frees: list[int] = []
        self._handles = itertools.count(1)
        self._seq = itertools.count(1)
        #: seq -> (op name, where the user issued it; for a replay chunk, a function of the
        #: failed op's position in its trace, see `queue_raw`)
        self._where: dict[int, tuple[str, Any]] = {}
        self.closed = False
        self._fork_generation = _fork_generation
        self.lost: str | None = None
        self._encoder: msgspec.msgpack.Encoder | None = None
        #: Step replay (client/replay.py), set by the session; None when it is off.
        self.replayer: Replayer | None = None
        #: Whether the replayer holds matched ops not yet queued (they go before any command).
        self.replay_pending = False
        self.flush_after = FLUSH_AFTER_S

    @property
    def _sock(self) -> socket.socket:
        """The socket of a `SocketTransport`, for tests that write raw bytes into a session
        (tests/test_bad_input.py); `AttributeError` on any other transport."""
        sock: socket.socket = getattr(self.transport, "sock")  # noqa: B009 - not every transport has one
        return sock

    def set_encoder(self, encoder: msgspec.msgpack.Encoder) -> None:
        self._encoder = encoder

    # ---- handles and commands ---------------------------------------------------------------

    def new_handle(self) -> int:
        return next(self._handles)

    def _check_open(self) -> None:
        if self._fork_generation != _fork_generation:
            raise UnsupportedError(FORK_MESSAGE)
        if self.closed:
            raise SessionClosed("this gpupool session is closed; its tensors are gone")
        if self.lost is not None:
            raise ServerLost(self.lost)

    def op(self, name: str, args: list[Any], kwargs: dict[str, Any], outs: list[int]) -> None:
        """Queue an op; it runs on the server later, in order."""
        seq = next(self._seq)
        assert self._encoder is not None
        frees: list[int] = []
        if self.frees:  # Note [Ordering]: they died before this op was made; freed before it runs
            frees, self.frees = self.frees, []
        raw = msgspec.Raw(self._encoder.encode(m.Op(seq, name, args, kwargs, outs, False, frees)))
        now = time.perf_counter()
        with self._lock:
            self._check_open()
            if self.replay_pending:
                self.replayer.pending()  # type: ignore[union-attr]
            self._where[seq] = (name, _user_location())
            cmds = self._cmds
            if not cmds:
                self._queued_at = now
            cmds.append(raw)
            if len(cmds) >= MAX_PENDING or now - self._queued_at >= self.flush_after:
                self._flush_locked()

    def op_with_reply(self, name: str, args: list[Any], kwargs: dict[str, Any], outs: list[int]) -> m.OpResult:
        """Run an op now and wait for its result's metadata and values (a sync point)."""
        seq = next(self._seq)
        assert self._encoder is not None
        raw = msgspec.Raw(self._encoder.encode(m.Op(seq, name, args, kwargs, outs, True)))
        with self._lock:
            self._where[seq] = (name, _user_location())
            return self.request(raw)  # type: ignore[no-any-return]

    def command(self, cmd: Any, buffer: memoryview | None = None, flush: bool = False) -> None:
        with self._lock:
            self._check_open()
            if self.replay_pending:
                self.replayer.pending()  # type: ignore[union-attr]
            self._queue_frees()  # Note [Ordering]: they died before this command was made
            self._cmds.append(msgspec.Raw(m.plain_encoder.encode(cmd)))
            if buffer is not None:
                self._bufs.append(buffer)
            if flush or len(self._cmds) >= MAX_PENDING:
                self._flush_locked()

    def upload(self, handle: int, dtype: str, shape: list[int], stride: list[int], offset: int, data: memoryview, into: bool) -> None:
        seq = next(self._seq)
        cmd = m.Upload(seq, handle, dtype, shape, stride, offset, data.nbytes, into)
        with self._lock:
            if self.replayer is not None:
                self.replayer.boundary()  # Note [Segments] in replay.py: new data starts a step
            self._where[seq] = ("upload", _user_location())
        # Note: sent at once, so later changes to the host tensor do not reach the device.
        self.command(cmd, data, flush=True)

    def flush(self) -> None:
        with self._lock:
            if self.replay_pending:
                self.replayer.pending()  # type: ignore[union-attr]
            if self._cmds or self.frees:
                self._check_open()
                self._flush_locked()

    def _queue_frees(self) -> None:
        if self.frees:
            frees, self.frees = self.frees, []
            self._cmds.append(msgspec.Raw(m.plain_encoder.encode(m.Free(frees))))

    def _flush_locked(self) -> None:
        self._queue_frees()
        cmds = self._cmds
        if not cmds:
            return
        self._cmds = []
        bufs = self._bufs
        if bufs:
            self._bufs = []
        msg = m.plain_encoder.encode(m.Batch(cmds))  # type: ignore[arg-type]
        try:
            self.transport.send(msg, bufs)
        except ServerLost as e:
            self.lost = f"lost the gpupool server at {self.address}: {e}"
            why = self._farewell()
            raise why if why is not None else ServerLost(self.lost) from None

    def _farewell(self) -> Exception | None:
        """After a failed send: the error of the Refused frame the server sent before it closed
        the connection (a lease that ended, the share exceeded), if it is there to read.

        Note: a server that ends a session sends why and closes; a client that was sending at
        that moment gets a broken pipe first, and the reason waits unread in its socket buffer
        (what the transport has received and not yet handed over).
        """
        self.transport.set_deadline(time.monotonic() + 1.0)
        try:
            reply = self._read_reply()
        except (GpupoolError, OSError):
            return None
        finally:
            self.transport.set_deadline(None)
        return self._refused(reply) if type(reply) is m.Refused else None

    def _refused(self, reply: m.Refused) -> Exception:
        """The error for a session the server ended, with its reason (the session is over)."""
        self.lost = f"the server ended the session: {reply.message}"
        if reply.code == "protocol":
            return ProtocolError(self.lost)
        if reply.code == "oom":
            return OutOfShare(self.lost)
        if reply.code == "lease":
            return LeaseExpired(self.lost)
        return ServerLost(self.lost)

    # ---- replies ----------------------------------------------------------------------------

    def _read_reply(self) -> Any:
        raw = self.transport.read_message()
        return m.decode(_reply_decoder, raw, "reply from the server")

    def request(self, cmd: Any, into: memoryview | None = None) -> Any:
        """Send `cmd` with everything queued before it and wait for its reply (a sync point)."""
        raw = cmd if type(cmd) is msgspec.Raw else msgspec.Raw(m.plain_encoder.encode(cmd))
        with self._lock:
            self._check_open()
            if self.replayer is not None:
                self.replayer.boundary()  # a sync point ends a segment (Note [Segments])
            # Note: frees go *before* the request: their tensors died before it was made, so no
            # queued command still uses them, and the reply (e.g. memory in use) reflects them.
            self._queue_frees()
            self._cmds.append(raw)
            self._flush_locked()
            try:
                reply = self._read_reply()
                if type(reply) is m.Refused:
                    raise self._refused(reply)
                err = getattr(reply, "error", None)
                if isinstance(reply, m.Data) and err is None:
                    if into is not None:
                        self.transport.read_buffer_into(into)
                    else:
                        into = memoryview(self.transport.read_buffer())
            except ServerLost as e:
                self.lost = self.lost or f"lost the gpupool server at {self.address}: {e}"
                raise ServerLost(self.lost) from None
            except ProtocolError as e:
                # Note: after a malformed or unexpected frame the stream cannot be trusted to be
                # in step any more: the session is over.
                self.lost = self.lost or f"the session with {self.address} broke: {e}"
                raise
            where = self._where
            if where:
                self._where = {}
        if err is not None:
            raise self._error(err, where)
        return reply

    # ---- step replay (client/replay.py) --------------------------------------------------------

    def next_seq(self) -> int:
        return next(self._seq)

    def queue_raw(self, raw: msgspec.Raw, seq: int, name: str,
                  where: Callable[[int], tuple[str, int] | None] | None = None) -> None:
        """Queue an encoded command (a replay chunk) under the lock the caller holds; `seq`, when
        nonzero, names it in errors, and `where(at)` the user's line of its op at trace
        position `at` (the server says which op failed).

        Note: frees collected so far go *after* it, unlike before other commands (Note
        [Ordering]): the replayer hands the frees that precede each matched op to the chunk
        itself (`FreeAt`), so what is left here died after the chunk's last op, which may still
        use it.
        """
        self._check_open()
        if seq:
            self._where[seq] = (name, where)
        if not self._cmds:
            self._queued_at = time.perf_counter()
        self._cmds.append(raw)
        if len(self._cmds) >= MAX_PENDING:
            self._flush_locked()

    def ask(self, cmd: m.Trace) -> str:
        """Register a trace: one round trip that leaves earlier ops' pending errors pending."""
        with self._lock:
            self._check_open()
            self._queue_frees()
            self._cmds.append(msgspec.Raw(m.plain_encoder.encode(cmd)))
            self._flush_locked()
            try:
                reply = self._read_reply()
            except ServerLost as e:
                self.lost = self.lost or f"lost the gpupool server at {self.address}: {e}"
                raise ServerLost(self.lost) from None
            if type(reply) is m.Refused:
                raise self._refused(reply)
            if not isinstance(reply, m.Value) or not isinstance(reply.value, str):
                raise ProtocolError(f"expected the server's answer to a trace, got {type(reply).__name__}")
            return reply.value

    def _error(self, err: m.ErrorInfo, where: dict[int, tuple[str, Any]]) -> RemoteOpError:
        op, place = where.get(err.seq, (err.op, None))
        if callable(place):  # a replay chunk: the line that issued the failed op
            place = place(err.at)
        if place is None and err.op:
            op = err.op  # a replayed op: the server names which one
        loc = f"{place[0]}:{place[1]}" if place else ""
        text = f"{op} failed on the gpupool server: {err.message}"
        if loc:
            text += f"\n  issued at {loc}"
        cls = OutOfShare if err.kind == "oom" else RemoteOpError
        return cls(text, op=op, location=loc)

    def sync(self) -> m.Synced:
        return self.request(m.Sync())  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                # Note: a forked child holds a copy of the parent's socket: it must never write
                # to it; closing its own descriptor (the transport's close) leaves the parent's
                # session intact.
                if self.lost is None and self._fork_generation == _fork_generation:
                    self._cmds.append(msgspec.Raw(m.plain_encoder.encode(m.Bye())))
                    self._flush_locked()
            except ServerLost:
                pass
            finally:
                self.closed = True
                self.transport.close()
