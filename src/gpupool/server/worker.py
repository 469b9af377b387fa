"""A worker process: owns one device context and serves every session of one lease on it.

$GPUPOOL_WORKER_THREADS sets the number of torch's CPU threads per worker (default: one per
core), e.g. to keep many CPU-backed sessions from oversubscribing the host.

Started ahead of time by the listener (a warm spare, with torch already imported and the
sandbox applied, Note [Worker sandbox]) and handed client connections over its control socket
(`socket.send_fds`, a SOCK_SEQPACKET pair): the first one decides the device and the budget,
later ones are further sessions of the same lease (Note [One budget per lease] in memory.py).
The worker tells the listener on the same socket when a session ends; the listener closes it
once the worker has no session left, and the worker then exits and the OS frees all its memory.

Note [Worker sandbox]: a worker runs kernels on hostile arguments, so it is the isolation unit.
It holds no secrets (the listener strips them from its environment; it never sees a token or a
key), and before it starts a single thread, right after its imports, it restricts itself
(`sandbox.py`): it can read the libraries torch loads lazily, use the GPU's device files and
the sockets it was given, and nothing else: no other file, no new socket, no new process, no
signal or ptrace to another process. A CPU-backed worker's memory is also capped by the kernel
(`memory.cap_process_data`).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gpupool.protocol.framing import FrameWriter

if TYPE_CHECKING:
    from gpupool.server.oppolicy import OpPolicy

log = logging.getLogger("gpupool.worker")

#: TCP keepalive for session sockets: a client host that vanished without closing its
#: connection is noticed after about IDLE + INTERVAL * COUNT seconds, and its memory freed.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
#: Largest control message (a session's description).
CTL_MESSAGE = 64 * 1024


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive on a TCP socket; nothing on a relay's Unix socket (its relay watches TCP)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        opt = getattr(socket, name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


def _setup_device(info: dict[str, Any]) -> tuple[Any, int]:
    import torch

    limit = int(info["memory_limit"])
    if info["kind"] == "cuda":
        dev = torch.device("cuda", int(info["index"]))
        torch.cuda.set_device(dev)
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), dev)
        return dev, limit
    from gpupool.server.memory import cap_process_data, keep_freed_memory

    keep_freed_memory(limit)
    cap = cap_process_data(limit)
    log.info("worker %d: data segment capped at %s bytes", os.getpid(), cap)
    return torch.device("cpu"), limit


def _end(writer: Any, code: str, message: str) -> None:
    """Tell the client why the session ends, if it still listens."""
    from gpupool.errors import ServerLost
    from gpupool.protocol import messages as m

    try:
        writer.send(m.plain_encoder.encode(m.Refused(code=code, message=message[:4000])))
    except (ServerLost, MemoryError):
        pass


class LeaseEnded(BaseException):
    """Raised in the worker by SIGUSR1: the listener saw the lease end.

    Note: a BaseException, so that the executor's `except Exception` around each op (which
    defers op errors to the next sync) does not swallow it: every session must end.
    """


class SendGuard:
    """Defers the lease-ended signal while any session's frame goes out.

    Note: the lease-ended handler raises, and a frame cut half-way would leave the client
    reading garbage instead of the Refused frame that says why the session ended. The handler
    (`on_lease_ended`) defers itself while `sending` is set instead of the signal being blocked
    around each send: Python runs it between bytecodes of the main thread, so it sees the flag
    either before the frame starts or after it is out, and two `sigprocmask` calls per reply
    (~2 µs, on every round trip) are saved. `sendall` resumes after a handler that returns.
    """

    def __init__(self) -> None:
        self.sending = False
        self.ended = False

    def on_lease_ended(self, signum: int, frame: Any) -> None:
        if self.sending:
            self.ended = True
            return
        raise LeaseEnded()

    def after_frame(self) -> None:
        self.sending = False
        if self.ended:
            self.ended = False  # once: the Refused frames that follow must go out
            raise LeaseEnded()


class WholeFrameWriter(FrameWriter):
    """Sends each frame whole: a lease that ends while a frame goes out ends the sessions once
    the frame is out (`SendGuard`)."""

    def __init__(self, sock: socket.socket, guard: SendGuard | None = None) -> None:
        super().__init__(sock)
        self.guard = guard or SendGuard()

    def on_lease_ended(self, signum: int, frame: Any) -> None:
        self.guard.on_lease_ended(signum, frame)

    def send(self, message: bytes, buffers: Any = ()) -> None:
        self.guard.sending = True
        try:
            super().send(message, buffers)
        finally:
            self.guard.after_frame()

    def send_stream(self, message: bytes, nbytes: int, chunks: Iterable[memoryview]) -> None:
        self.guard.sending = True
        try:
            super().send_stream(message, nbytes, chunks)
        finally:
            self.guard.after_frame()


class _Session:
    """One client connection served by this worker."""

    def __init__(self, sid: str, sock: socket.socket, reader: Any, writer: WholeFrameWriter, executor: Any,
                 idle_timeout: float = 0.0) -> None:
        self.sid, self.sock, self.reader, self.writer, self.executor = sid, sock, reader, writer, executor
        self.idle_timeout = idle_timeout
        self.active = time.monotonic()  # when it last sent a frame or one of its frames ended


class WorkerHost:
    """The sessions of one lease on one device, served in turn by one thread.

    Note [Sessions in one worker]: sessions are served a frame at a time: a frame whose bytes
    arrived (or were read ahead) is run whole, then the next ready session's. Sessions of one
    lease belong to one program and its children, so one session waiting on another's long op
    is like two CUDA streams of one process sharing a GPU.
    """

    def __init__(self, ctl: socket.socket, info: dict[str, Any], policy: OpPolicy,
                 seen_fd: int | None = None) -> None:
        from gpupool.server.memory import Budget

        self.ctl: socket.socket | None = ctl
        self.guard = SendGuard()
        self.sessions: dict[int, _Session] = {}
        self.device, limit = _setup_device(info)
        self.budget = Budget(self.device, limit)
        self.policy = policy
        self.seen_fd = seen_fd
        self.ran: set[str] | None = set() if seen_fd is not None else None
        self._lock = threading.Lock()
        self._version = 0  # bumped when `sessions` changes, for the hang-up watcher

    # ---- sessions ---------------------------------------------------------------------------

    def add(self, conn: socket.socket, info: dict[str, Any]) -> None:
        """Start serving `conn`: send its `Welcome`."""
        import torch

        from gpupool.errors import ServerLost
        from gpupool.protocol import messages as m
        from gpupool.protocol.framing import FrameReader, Limits
        from gpupool.protocol.version import PROTOCOL_VERSION
        from gpupool.server.executor import Executor

        writer = WholeFrameWriter(conn, self.guard)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_keepalive(conn)
        conn.settimeout(None)
        limit = self.budget.limit
        # Note: one frame's buffers may hold at most the whole share (plus slack for the
        # frame's other small uploads): a bigger upload could never be stored anyway.
        reader = FrameReader(conn, Limits(max_buffer_bytes=max(limit, 1) + (1 << 20)))
        ex = Executor(self.device, self.budget, self.policy, record=self.ran)
        session = _Session(str(info["session"]), conn, reader, writer, ex, float(info.get("idle_timeout", 0.0)))
        with self._lock:
            self.sessions[conn.fileno()] = session
            self._version += 1
        try:
            writer.send(
                m.plain_encoder.encode(
                    m.Welcome(
                        protocol=PROTOCOL_VERSION,
                        session=session.sid,
                        device_kind=info["kind"],
                        device_name=info["name"],
                        memory_limit=limit,
                        memory_total=int(info["memory_total"]),
                        torch_version=str(torch.__version__),
                    )
                )
            )
        except ServerLost:
            self.close(session)

    def close(self, s: _Session) -> None:
        """End session `s`: drop its tensors, close its socket, tell the listener."""
        with self._lock:
            if self.sessions.pop(s.sock.fileno(), None) is None:
                return  # closed already
            self._version += 1
        s.executor.close()
        try:
            s.sock.close()
        except OSError:
            pass
        self._tell({"ended": s.sid})

    def write_ops_seen(self) -> None:
        """Append the ops this worker ran to $GPUPOOL_OPS_SEEN's file (for tools/allowlist.py)."""
        if self.seen_fd is None or not self.ran:
            return
        try:
            names = sorted(set(self.ran))  # Note: the serving thread may be adding to it
        except RuntimeError:
            names = sorted(set(self.ran))
        try:
            os.write(self.seen_fd, (" ".join(names) + "\n").encode())
        except OSError:
            pass

    def _tell(self, message: dict[str, Any]) -> None:
        if self.ctl is None:
            return
        try:
            self.ctl.send(json.dumps(message).encode())
        except OSError:
            pass

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until no session is left and the listener sent no more; never raises."""
        signal.signal(signal.SIGUSR1, self.guard.on_lease_ended)
        threading.Thread(target=self._watch_hangups, name="gpupool-hangups", daemon=True).start()
        try:
            while self.sessions or self.ctl is not None:
                ready = [s for s in self.sessions.values() if s.reader.buffered]
                if not ready:
                    ready = self._wait()
                for s in ready:
                    if isinstance(s, socket.socket):
                        self._receive_session()
                    else:
                        self._serve(s)
        except LeaseEnded:
            log.info("worker %d: lease ended; ending %d session(s)", os.getpid(), len(self.sessions))
            for s in list(self.sessions.values()):
                _end(
                    s.writer,
                    "lease",
                    "the session's lease ended (not renewed in time, released, or its server was "
                    "drained or marked down); its memory is freed: request a new lease",
                )
                self.close(s)

    def _wait(self) -> list[Any]:
        """The sessions (and the control socket) with bytes to read; ends idle sessions.

        Note [Idle sessions]: a session is idle while it sends nothing and none of its frames
        runs: the clock restarts when a frame of it ends, so its own op, however long, is never
        idle time. Time it spent waiting behind another session's frame does not count either
        (a session with bytes waiting is never idle; one that stayed silent through it is).
        """
        socks: list[Any] = [s.sock for s in self.sessions.values()]
        if self.ctl is not None:
            socks.append(self.ctl)
        now = time.monotonic()
        timed = [s.active + s.idle_timeout - now for s in self.sessions.values() if s.idle_timeout > 0]
        wait = max(0.0, min(timed)) + 0.05 if timed else None
        readable, _, _ = select.select(socks, [], [], wait)
        if timed:
            self._end_idle(time.monotonic(), set(readable))
        by_sock = {s.sock: s for s in self.sessions.values()}
        return [self.ctl if r is self.ctl else by_sock[r] for r in readable if r is self.ctl or r in by_sock]

    def _end_idle(self, now: float, readable: set[Any]) -> None:
        for s in list(self.sessions.values()):
            if s.idle_timeout > 0 and now - s.active >= s.idle_timeout and s.sock not in readable \
                    and not s.reader.buffered:
                log.info("session %s: idle for %.0f s; ending it", s.sid, now - s.active)
                _end(s.writer, "idle", f"the session sent nothing for {s.idle_timeout:g} s and was ended "
                     "(the server's --idle-timeout); its memory is freed: connect again")
                self.close(s)

    def _receive_session(self) -> None:
        assert self.ctl is not None
        try:
            msg, fds, _, _ = socket.recv_fds(self.ctl, CTL_MESSAGE, 1)
        except OSError:
            msg, fds = b"", []
        if not msg:  # the listener closed: no more sessions will come
            self.ctl.close()
            self.ctl = None
            return
        if not fds:
            return
        conn = socket.socket(fileno=fds[0])
        try:
            info = json.loads(msg)
        except ValueError:
            conn.close()
            return
        self.add(conn, info)

    def _serve(self, s: _Session) -> None:
        """Run one frame of session `s`; end the session when it says so, breaks the protocol
        or goes away."""
        from gpupool.errors import ProtocolError, ServerLost

        try:
            done = s.executor.serve_frame(s.reader, s.writer)
            s.active = time.monotonic()
            if done:
                self.close(s)
        except ServerLost:
            self.close(s)  # the client went away: its tensors are dropped
        except ProtocolError as e:
            log.warning("session %s: protocol error: %s", s.sid, e)
            _end(s.writer, "protocol", str(e))
            self.close(s)
        except MemoryError:
            log.warning("session %s: out of host memory", s.sid)
            _end(s.writer, "oom", "the session's worker ran out of host memory and ended the session")
            self.close(s)
        except Exception as e:  # noqa: BLE001 - a bug; the session ends, the worker carries on
            log.exception("session %s: internal error", s.sid)
            _end(s.writer, "internal", f"internal server error, session ended: {type(e).__name__}: {e}")
            self.close(s)

    def _watch_hangups(self) -> None:
        """End the worker when every client hung up, even inside a long op.

        Note: the serving thread notices a closed connection at its next read, but an op can
        run for hours on a crafted scalar; a worker whose clients are all gone is killed at once,
        so its GPU share is free within seconds whatever the op.
        """
        flags = select.POLLRDHUP | select.POLLHUP | select.POLLERR
        while True:
            with self._lock:
                version = self._version
                fds = [s.sock.fileno() for s in self.sessions.values()]
            if not fds:
                threading.Event().wait(0.5)
                continue
            poller = select.poll()
            for fd in fds:
                poller.register(fd, flags)
            events = poller.poll(500)
            gone = {fd for fd, ev in events if ev & flags}
            with self._lock:
                if version == self._version and gone == set(fds):
                    log.info("worker %d: every client hung up; exiting", os.getpid())
                    self.write_ops_seen()
                    os._exit(0)
            if gone:
                threading.Event().wait(0.2)  # the serving thread may be closing them already


def _die_with_parent(lifeline: int) -> None:
    """End this worker when the listener's process ends, even by SIGKILL (`listener._lifeline`).

    Note: a session must not outlive its server: the controller marks a dead server's leases
    ended, and its clients must see the connection drop (a clear error at their next sync)
    rather than keep computing on a GPU the pool believes is free.
    """

    def watch() -> None:
        try:
            while os.read(lifeline, 1):
                pass
        except OSError:
            pass
        os._exit(0)  # end-of-file: no process holds the write end any more

    threading.Thread(target=watch, name="gpupool-lifeline", daemon=True).start()


def _open_seen_file() -> int | None:
    """$GPUPOOL_OPS_SEEN (for `tools/allowlist.py`): the file each session appends the ops it
    ran to, opened before the sandbox forbids opening files."""
    path = os.environ.get("GPUPOOL_OPS_SEEN")
    if not path:
        return None
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def main() -> None:
    logging.basicConfig(level=os.environ.get("GPUPOOL_LOG", "WARNING"), format="%(asctime)s %(name)s %(message)s")
    # Note: Ctrl-C on `gpupool server` reaches the whole process group; the listener ends its
    # workers itself (terminate), so a worker must not die half-way on SIGINT first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=int(sys.argv[1]))
    lifeline = int(sys.argv[2])
    import warnings

    import torch  # warm the imports before a session arrives

    import gpupool.server.executor  # noqa: F401
    from gpupool.server import worker_sandbox
    from gpupool.server.memory import warm_threads
    from gpupool.server.oppolicy import OpPolicy

    warnings.simplefilter("ignore")  # a kernel's warnings would only fill the server's log
    seen_fd = _open_seen_file()
    profile = os.environ.get("GPUPOOL_PROFILE_DIR")
    profile_fd = os.open(os.path.join(profile, f"worker-{os.getpid()}.prof"), os.O_WRONLY | os.O_CREAT, 0o600) if profile else None
    # The policy reads its data files ($GPUPOOL_ALLOWLIST may be anywhere) before the sandbox
    # closes the file system.
    policy = OpPolicy()
    log.info("worker %d: %s", os.getpid(), worker_sandbox.apply())
    _die_with_parent(lifeline)
    threads = os.environ.get("GPUPOOL_WORKER_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    elif threads:
        log.warning("ignoring GPUPOOL_WORKER_THREADS=%r: not a positive number", threads)
    warm_threads()
    # Note: decoding a batch allocates thousands of small objects; with the default thresholds
    # the cyclic GC then runs every few hundred ops, re-walking torch's import-time objects.
    # Freeze those, and collect young objects less often (command objects form no cycles).
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        msg, fds, _, _ = socket.recv_fds(ctl, CTL_MESSAGE, 1)
    except OSError:
        os._exit(0)
    if not fds:
        os._exit(0)  # the listener shut down or discarded this spare
    conn = socket.socket(fileno=fds[0])
    try:
        info = json.loads(msg)
    except ValueError:
        os._exit(1)
    host = WorkerHost(ctl, info, policy, seen_fd)
    host.add(conn, info)
    if profile_fd is not None:  # development aid: cProfile the worker into PROFILE_DIR
        import cProfile
        import marshal

        prof = cProfile.Profile()
        prof.runcall(host.run)
        prof.create_stats()
        os.write(profile_fd, marshal.dumps(prof.stats))  # type: ignore[attr-defined]
    else:
        host.run()
    host.write_ops_seen()
    # Note: os._exit skips interpreter teardown (slow with torch loaded, and pointless: the OS
    # frees the process's memory and descriptors at once).
    os._exit(0)


if __name__ == "__main__":
    main()
