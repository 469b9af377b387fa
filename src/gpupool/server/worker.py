"""A session's worker process: owns one device context, runs one session, then exits.

$GPUPOOL_WORKER_THREADS sets the number of torch's CPU threads per session (default: one per
core), e.g. to keep many CPU-backed sessions from oversubscribing the host.

Started ahead of time by the listener (a warm spare, with torch already imported) and handed the
client's connection over a Unix socket (`socket.send_fds`). When the session ends — cleanly, or
because the client died or sent garbage — the process exits and the OS frees all its memory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable
from typing import Any

from gpupool.protocol.framing import FrameWriter

log = logging.getLogger("gpupool.worker")

#: TCP keepalive for session sockets: a client host that vanished without closing its
#: connection is noticed after about IDLE + INTERVAL * COUNT seconds, and its memory freed.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6


def set_keepalive(sock: socket.socket) -> None:
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
    log.info("session %s: data segment capped at %s bytes", info.get("session"), cap)
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
    """Raised in the worker by SIGUSR1: the listener saw the session's lease end.

    Note: a BaseException, so that the executor's `except Exception` around each op (which
    defers op errors to the next sync) does not swallow it: the session must end.
    """


class WholeFrameWriter(FrameWriter):
    """Sends each frame whole: a lease that ends (SIGUSR1) while a frame goes out ends the
    session once the frame is out.

    Note: the lease-ended handler raises, and a frame cut half-way would leave the client
    reading garbage instead of the Refused frame that says why the session ended. The handler
    (`on_lease_ended`) defers itself while `_sending` is set instead of the signal being blocked
    around each send: Python runs it between bytecodes of the main thread, so it sees the flag
    either before the frame starts or after it is out, and two `sigprocmask` calls per reply
    (~2 µs, on every round trip) are saved. `sendall` resumes after a handler that returns.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._sending = False
        self._ended = False

    def on_lease_ended(self, signum: int, frame: Any) -> None:
        if self._sending:
            self._ended = True
            return
        raise LeaseEnded()

    def _after_frame(self) -> None:
        self._sending = False
        if self._ended:
            self._ended = False  # once: the Refused frame that follows must go out
            raise LeaseEnded()

    def send(self, message: bytes, buffers: Any = ()) -> None:
        self._sending = True
        try:
            super().send(message, buffers)
        finally:
            self._after_frame()

    def send_stream(self, message: bytes, nbytes: int, chunks: Iterable[memoryview]) -> None:
        self._sending = True
        try:
            super().send_stream(message, nbytes, chunks)
        finally:
            self._after_frame()


def run_session(conn: socket.socket, info: dict[str, Any]) -> None:
    """Serve one session on `conn` until it ends; never raises."""
    import torch

    from gpupool.errors import ProtocolError, ServerLost
    from gpupool.protocol import messages as m
    from gpupool.protocol.framing import FrameReader, Limits
    from gpupool.protocol.version import PROTOCOL_VERSION
    from gpupool.server.executor import Executor

    writer = WholeFrameWriter(conn)
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_keepalive(conn)
        conn.settimeout(None)
        device, limit = _setup_device(info)
        # Note: one frame's buffers may hold at most the whole share (plus slack for the
        # frame's other small uploads): a bigger upload could never be stored anyway.
        reader = FrameReader(conn, Limits(max_buffer_bytes=max(limit, 1) + (1 << 20)))
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        ex = Executor(device, limit)
        writer.send(
            m.plain_encoder.encode(
                m.Welcome(
                    protocol=PROTOCOL_VERSION,
                    session=info["session"],
                    device_kind=info["kind"],
                    device_name=info["name"],
                    memory_limit=limit,
                    memory_total=int(info["memory_total"]),
                    torch_version=str(torch.__version__),
                )
            )
        )
        signal.signal(signal.SIGUSR1, writer.on_lease_ended)
        ex.serve(reader, writer)
    except LeaseEnded:
        log.info("session %s: lease ended", info["session"])
        _end(
            writer,
            "lease",
            "the session's lease ended (not renewed in time, released, or its server was drained "
            "or marked down); its memory is freed: request a new lease",
        )
    except ProtocolError as e:
        log.warning("session %s: protocol error: %s", info["session"], e)
        _end(writer, "protocol", str(e))
    except ServerLost:
        pass
    except MemoryError:
        log.warning("session %s: out of host memory", info["session"])
        _end(writer, "oom", "the session's worker ran out of host memory and ended the session")
    except Exception as e:  # noqa: BLE001 - a bug; the session ends, the server carries on
        log.exception("session %s: internal error", info["session"])
        _end(writer, "internal", f"internal server error, session ended: {type(e).__name__}: {e}")
    finally:
        try:
            conn.close()
        except OSError:
            pass


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


def main() -> None:
    logging.basicConfig(level=os.environ.get("GPUPOOL_LOG", "WARNING"), format="%(asctime)s %(name)s %(message)s")
    # Note: Ctrl-C on `gpupool server` reaches the whole process group; the listener ends its
    # workers itself (terminate), so a worker must not die half-way on SIGINT first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(sys.argv[2]))
    ctl = socket.socket(fileno=int(sys.argv[1]))
    import torch  # warm the import before a session arrives

    from gpupool.server.memory import warm_threads

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
        msg, fds, _, _ = socket.recv_fds(ctl, 65536, 1)
    except OSError:
        os._exit(0)
    ctl.close()
    if not fds:
        os._exit(0)  # the listener shut down or discarded this spare
    conn = socket.socket(fileno=fds[0])
    try:
        info = json.loads(msg)
    except ValueError:
        os._exit(1)
    profile_dir = os.environ.get("GPUPOOL_PROFILE_DIR")
    if profile_dir:  # development aid: cProfile each session into PROFILE_DIR/<session>.prof
        import cProfile

        prof = cProfile.Profile()
        prof.runcall(run_session, conn, info)
        prof.dump_stats(os.path.join(profile_dir, f"{info.get('session', 'session')}.prof"))
    else:
        run_session(conn, info)
    # Note: os._exit skips interpreter teardown (slow with torch loaded, and pointless: the OS
    # frees the process's memory and descriptors at once).
    os._exit(0)


if __name__ == "__main__":
    main()
