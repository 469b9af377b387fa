"""Worker processes as the listener sees them: warm spares, and the running workers, each
serving the sessions of one lease on one device (Note [One budget per lease] in memory.py).

Note [Worker control socket]: the listener and a worker share a SOCK_SEQPACKET pair. The
listener sends a session's description with its connection (`send_fds`); the worker answers
`{"ended": SESSION}` when a session ends. Once a worker has no session left, the listener
closes its end under its lock, so no session is ever handed to a worker that is leaving; the
worker exits at end-of-file. What a worker sends is untrusted (the worker is the sandbox, and a
kernel exploit runs in it): messages are bounded, decoded strictly, and a worker that sends
anything else is killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from gpupool.server.device import DeviceInfo

log = logging.getLogger("gpupool.server")

#: Environment a worker must not inherit: a session's process holds nothing it does not need.
SECRET_ENV = ("GPUPOOL_TOKEN", "GPUPOOL_ADMIN_TOKEN")
#: Largest message a worker may send the listener.
MAX_WORKER_MESSAGE = 1024


def _lifeline() -> int:
    """The read end of this process's lifeline: a pipe whose write end only this process holds.

    Note: a worker blocks reading it and exits at end-of-file, which comes when this process is
    gone, however it ended (even SIGKILL): a session must not outlive its server. Not
    PR_SET_PDEATHSIG: Linux sends that when the *thread* that started the worker ends, and
    workers are started by short-lived threads (refills, handshakes), so a worker that set it
    before its starting thread ended was killed with it (a spare lost under load, or a session).
    """
    global _life
    with _life_lock:
        if _life is None or _life[0] != os.getpid():  # a forked child makes its own
            r, w = os.pipe()
            _life = (os.getpid(), r, w)
        return _life[1]


_life_lock = threading.Lock()
_life: tuple[int, int, int] | None = None  # (pid, read end, write end), write end never closed


def worker_env() -> dict[str, str]:
    """A worker's environment: the listener's, less its secrets.

    Note: OpenBLAS (numpy's) starts a thread pool at import unless told to use one thread; the
    worker must have a single thread when it applies its sandbox (Note [Worker sandbox])."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


class Spare:
    """A worker process started ahead of time, waiting for its first session."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            life = _lifeline()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpupool.server.worker", str(child.fileno()), str(life)],
                pass_fds=[child.fileno(), life],
                env=worker_env(),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctl = parent

    def discard(self) -> None:
        """End a worker that never got a session, and reap it."""
        self.ctl.close()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def hand_off(ctl: socket.socket, conn: socket.socket, info: dict[str, Any]) -> bool:
    """Give session connection `conn` to the worker at `ctl`; False if the worker is gone."""
    try:
        socket.send_fds(ctl, [json.dumps(info).encode()], [conn.fileno()])
    except OSError:
        return False
    return True


class Worker:
    """A running worker: its process, control socket and live sessions; the lease it serves
    (empty in static-token mode, where every session has a worker of its own)."""

    def __init__(self, spare: Spare, device: DeviceInfo, lease_id: str, expires_at: float) -> None:
        self.proc = spare.proc
        self.ctl: socket.socket | None = spare.ctl
        self.device = device
        self.lease_id = lease_id
        self.expires_at = expires_at  # wall-clock seconds; the lease's, kept current by heartbeats
        self.ending = 0.0  # monotonic time the worker was told to end, 0 if not yet
        self.sessions: set[str] = set()

    @property
    def key(self) -> tuple[str, int] | None:
        """Where further sessions of the same lease go (None: a worker per session)."""
        return (self.lease_id, self.device.index) if self.lease_id else None

    def alive(self) -> bool:
        return self.proc.poll() is None and self.ctl is not None and not self.ending

    def close_ctl(self) -> None:
        """No more sessions for this worker: it sees end-of-file, and exits once its sessions
        are over. The socket stays open for reading until then (`read_worker_messages`)."""
        ctl, self.ctl = self.ctl, None
        if ctl is not None:
            try:
                ctl.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass

    def tell_lease_ended(self) -> bool:
        """SIGUSR1: the worker tells its clients why, then exits; SIGKILL if it has not within
        5 s. Returns True the first time."""
        if not self.ending:
            self.ending = time.monotonic()
            self.signal(signal.SIGUSR1)
            return True
        if time.monotonic() - self.ending > 5.0:
            self.signal(signal.SIGKILL)
        return False


def read_worker_messages(worker: Worker, ctl: socket.socket, on_ended: Callable[[Worker, str], None],
                         on_gone: Callable[[Worker], None]) -> None:
    """Run in a thread per worker: report its ended sessions, then that it is gone."""
    try:
        while True:
            try:
                raw = ctl.recv(MAX_WORKER_MESSAGE + 1)
            except OSError:
                break
            if not raw:
                break
            sid = _ended_session(raw)
            if sid is None or sid not in worker.sessions:
                log.error("worker %d sent a bad control message %r: killing it", worker.proc.pid, raw[:80])
                worker.signal(signal.SIGKILL)
                break
            on_ended(worker, sid)
    finally:
        try:
            ctl.close()
        except OSError:
            pass
        on_gone(worker)


def _ended_session(raw: bytes) -> str | None:
    if len(raw) > MAX_WORKER_MESSAGE:
        return None
    try:
        msg = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(msg, dict) or set(msg) != {"ended"} or not isinstance(msg["ended"], str):
        return None
    return msg["ended"]
