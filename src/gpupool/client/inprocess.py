"""An in-process gpupool server, for tests and tools: the real executor in a thread.

    from gpupool.client import inprocess

    with inprocess.connect(memory_limit=1 << 30) as s:
        y = model.to(s.device)(x.to(s.device)).cpu()

`InProcessServer` serves each of its `transport()`s on one end of a `socket.socketpair()`, in a
daemon thread, with what a server's worker uses for a session: the Hello/Welcome handshake,
`FrameReader`/`FrameWriter` with the worker's limits, and `Executor.serve` under the server's
op policy (`OpPolicy()`: the reviewed allowlist and sanitisers), so every command is decoded,
checked and run as a server would. A protocol error, an out-of-memory or an internal error ends
the session with a `Refused` reason, as the worker does. The client side is the real client:
`Connection` over a `SocketTransport`, the dispatcher, replay.

What it is not: a separate process. No sandbox, no token or lease check (any Hello of this
protocol version is welcomed), no listener, controller or idle timeout. Each `transport()` is
its own session with its own budget of `memory_limit` bytes (a real worker shares one budget
among a lease's sessions, and serves them in turn on one thread; here each session has a
thread). Since server and client share a process, they share torch's global state:

* the default CPU generator: `m.Seed` (`torch.manual_seed` on a gpupool device, which seeds the
  server's generator) reseeds this process's generator too, and random ops on the device draw
  from the same generator as CPU ones, so interleaving the two differs from a real server;
* torch's thread pools and settings (`torch.set_num_threads`, deterministic algorithms, flush
  denormal, ...), and, with `device="cuda"`, the caching allocator: the budget counts every
  tensor this process holds on that GPU, and no per-process memory fraction is set;
* the process's memory: a CPU-backed worker caps its data segment and keeps freed memory for
  reuse; here neither is done, and `memory_limit` is only the executor's ledger.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from typing import TYPE_CHECKING

import torch

from gpupool.client.transport import SocketTransport
from gpupool.errors import ProtocolError, ServerLost
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter, Limits
from gpupool.protocol.version import PROTOCOL_VERSION

if TYPE_CHECKING:
    from gpupool.client.session import Session

log = logging.getLogger("gpupool.inprocess")

#: What sessions served here are called in messages ("lost the gpupool server at in-process").
LABEL = "in-process"
#: The handshake frame's limits, as the listener reads a Hello.
_HELLO_LIMITS = Limits(max_message=64 * 1024, max_buffers=0, max_buffer_bytes=0)

_numbers = itertools.count(1)


class InProcessTransport(SocketTransport):
    """The client end of an in-process session; `thread` is the one serving it."""

    def __init__(self, sock: socket.socket, server: InProcessServer, thread: threading.Thread) -> None:
        super().__init__(sock, LABEL)
        self.server = server  # kept alive while a session uses it
        self.thread = thread


class _Served:
    """The server end of one session."""

    def __init__(self, sock: socket.socket, sid: str) -> None:
        self.sock = sock
        self.sid = sid
        self.lock = threading.Lock()  # between the serving thread's close and `shutdown`
        self.closed = False

    def shutdown(self) -> None:
        """Wake the serving thread: its next (or current) receive sees the end of the stream."""
        with self.lock:
            if not self.closed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self.lock:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


class InProcessServer:
    """Serves gpupool sessions on `device` in threads of this process (see the module's Note)."""

    def __init__(self, memory_limit: int = 1 << 30, device: str = "cpu") -> None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"an in-process server serves a cpu or cuda device, not {device!r}")
        self.device = dev
        self.memory_limit = int(memory_limit)
        self._lock = threading.Lock()
        self._served: list[_Served] = []
        self._threads: list[threading.Thread] = []
        self.closed = False

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads of its sessions (ended ones are dropped when a new session starts)."""
        with self._lock:
            return list(self._threads)

    def transport(self) -> InProcessTransport:
        """A new session's transport: connected, its server end served by a new thread (pass
        it to `gpupool.connect(transport=...)`, which says Hello)."""
        client, server = socket.socketpair()
        served = _Served(server, f"inprocess-{next(_numbers)}")
        thread = threading.Thread(target=self._serve, args=(served,), name=f"gpupool-{served.sid}", daemon=True)
        with self._lock:
            if self.closed:
                client.close()
                server.close()
                raise RuntimeError("this in-process server is closed")
            self._served = [x for x in self._served if not x.closed] + [served]
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()  # under the lock: a thread in the list is started
        return InProcessTransport(client, self, thread)

    def close(self, timeout: float | None = 10.0) -> None:
        """End every session (their clients see the server go away at their next read) and wait
        up to `timeout` seconds for their threads; an op still running finishes first."""
        with self._lock:
            self.closed = True
            served, threads = list(self._served), list(self._threads)
        for s in served:
            s.shutdown()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one session, on its thread -----------------------------------------------------------

    def _serve(self, s: _Served) -> None:
        from gpupool.server.executor import Executor
        from gpupool.server.memory import Budget

        writer = FrameWriter(s.sock)
        ex: Executor | None = None
        try:
            # As the listener reads a Hello: no read-ahead, the handshake's own limits.
            raw, _ = FrameReader(s.sock, _HELLO_LIMITS, readahead=0).read_message()
            hello: m.Hello = m.decode(m.hello_decoder, raw, "handshake")
            if hello.protocol != PROTOCOL_VERSION:
                _refuse(writer, "version", f"client speaks protocol {hello.protocol}, this server "
                        f"{PROTOCOL_VERSION}: install the same gpupool version on both")
                return
            if hello.hold:
                _refuse(writer, "lease", "an in-process server has no leases to hold")
                return
            limit = self.memory_limit
            # As a worker: one frame's buffers may hold at most the share (plus slack).
            reader = FrameReader(s.sock, Limits(max_buffer_bytes=max(limit, 1) + (1 << 20)))
            ex = Executor(self.device, Budget(self.device, limit))
            writer.send(m.plain_encoder.encode(self._welcome(s.sid)))
            ex.serve(reader, writer)
        except ServerLost:
            pass  # the client went away (or `close`): its tensors are dropped below
        except ProtocolError as e:
            log.info("session %s: protocol error: %s", s.sid, e)  # the client is told why
            _refuse(writer, "protocol", str(e))
        except MemoryError:
            _refuse(writer, "oom", "the in-process server ran out of host memory and ended the session")
        except Exception as e:  # noqa: BLE001 - a bug; the session ends with its reason
            log.exception("session %s: internal error", s.sid)
            _refuse(writer, "internal", f"internal server error, session ended: {type(e).__name__}: {e}")
        finally:
            if ex is not None:
                ex.close()
            s.close()

    def _welcome(self, sid: str) -> m.Welcome:
        dev = self.device
        if dev.type == "cuda":
            kind, name = "cuda", f"{torch.cuda.get_device_name(dev)} (in-process)"
            total = int(torch.cuda.get_device_properties(dev).total_memory)
        else:
            kind, name, total = "cpu", "CPU-backed device (in-process)", self.memory_limit
        return m.Welcome(protocol=PROTOCOL_VERSION, session=sid, device_kind=kind, device_name=name,
                         memory_limit=self.memory_limit, memory_total=total,
                         torch_version=str(torch.__version__))


def _refuse(writer: FrameWriter, code: str, message: str) -> None:
    try:
        writer.send(m.plain_encoder.encode(m.Refused(code=code, message=message[:4000])))
    except ServerLost:
        pass


def connect(memory_limit: int = 1 << 30, device: str = "cpu", index: int | None = None) -> Session:
    """A session (device "gpupool:N") on a fresh `InProcessServer`; closing the session ends
    the server's thread. Installs the gpupool backend, as `gpupool.connect` does."""
    from gpupool.client.session import connect as _connect

    server = InProcessServer(memory_limit, device)
    transport = server.transport()
    try:
        return _connect(LABEL, token="", lease="", index=index, transport=transport)
    except BaseException:
        transport.close()
        server.close()
        raise
