"""Sessions: one connection to a server, exposed to PyTorch as one `gpupool:N` device."""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from gpupool.errors import ConnectError, GpupoolError, SessionClosed
from gpupool.protocol import messages as m

if TYPE_CHECKING:
    from gpupool.client.transport import Transport

_lock = threading.Lock()
_sessions: dict[int, Session] = {}
_current = 0


class Session:
    """A live session on a gpupool server. Use as a context manager; `.device` is its device."""

    def __init__(self, address: str, token: str, index: int, lease: str = "", gpu: int = 0,
                 tls: bool | None = None, transport: Transport | None = None) -> None:
        from gpupool.client.connection import Connection

        self.conn = Connection(address, token, lease=lease, gpu=gpu, tls=tls, transport=transport)
        self.index = index
        self.device = torch.device("gpupool", index)
        encoder = _make_encoder()
        self.conn.set_encoder(encoder)
        from gpupool.client import replay

        if replay.ENABLED and encoder.enc_hook is not None:
            replay.install_step_hook()
            self.conn.replayer = replay.Replayer(self.conn, self, encoder.enc_hook)
        w = self.conn.welcome
        self.kind = w.device_kind
        self.device_name = w.device_name
        self.memory_limit = w.memory_limit
        self.memory_total = w.memory_total
        self.server_torch = w.torch_version
        self.id = w.session

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<gpupool.Session {self.id} on {self.conn.address}: {self.device} = {self.kind} "
            f"'{self.device_name}', share {self.memory_limit} bytes>"
        )

    def replay_stats(self) -> dict[str, int]:
        """Step replay's counters (docs/transparency.md): segments and ops replayed, segments that
        ended early or differed from their trace, traces registered or refused."""
        r = self.conn.replayer
        if r is None:
            return {"segments_replayed": 0, "ops_replayed": 0, "partial": 0, "mismatches": 0,
                    "traces_registered": 0, "traces_refused": 0}
        return dict(r.stats)

    def synchronize(self) -> None:
        """Wait until every queued op ran; raises the first error since the last sync."""
        self.conn.sync()

    def memory_stats(self) -> m.Synced:
        return self.conn.sync()

    def manual_seed(self, seed: int) -> None:
        self.conn.command(m.Seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF))

    def get_rng_state(self) -> torch.Tensor:
        """The server generator's state, as a CPU uint8 tensor (like torch.cuda.get_rng_state)."""
        reply = self.conn.request(m.GetRngState())
        return torch.frombuffer(bytearray(reply.value), dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor) -> None:
        data = state.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        self.conn.command(m.SetRngState(data))

    def close(self) -> None:
        self.conn.close()
        with _lock:
            if _sessions.get(self.index) is self:
                del _sessions[self.index]


def connect(
    address: str | None = None,
    token: str | None = None,
    lease: str | None = None,
    gpu: int = 0,
    index: int | None = None,
    tls: bool | None = None,
    transport: Transport | None = None,
) -> Session:
    """Open a session on a gpupool server; its device is `session.device` ("gpupool:N").

    `address`, `token` and `lease` default to $GPUPOOL_SERVER, $GPUPOOL_TOKEN and
    $GPUPOOL_LEASE (or the file $GPUPOOL_LEASE_PATH). With a lease (a controller-signed grant, what `gpupool run` passes), the
    session uses the lease's GPU number `gpu` and its memory share.

    `tls`: None (the default) uses TLS off loopback, or on loopback with $GPUPOOL_TLS=1, verified
    against $GPUPOOL_CA (Note [When TLS is required] in gpupool/tls.py).

    `transport`: an open `Transport` (gpupool/client/transport.py) to use instead of a socket to
    `address` (e.g. `gpupool.client.inprocess`); `address` then only names it in messages, and
    defaults to the transport's label.
    """
    from gpupool.client.backend import install

    install()
    if transport is not None:
        address = address or transport.label
    address = address or os.environ.get("GPUPOOL_SERVER")
    token = token if token is not None else os.environ.get("GPUPOOL_TOKEN", "")
    if lease is None:
        lease = os.environ.get("GPUPOOL_LEASE", "") or _lease_from_file()
    if not address:
        raise ConnectError("no server given: pass an address or set GPUPOOL_SERVER=HOST:PORT")
    with _lock:
        if index is None:
            index = next(i for i in range(len(_sessions) + 1) if i not in _sessions)
        elif index in _sessions:
            raise ConnectError(f"device gpupool:{index} already has a session")
        s = Session(address, token, index, lease=lease, gpu=gpu, tls=tls, transport=transport)
        _sessions[index] = s
    return s


_autoconnect: Callable[[int], None] | None = None


def set_autoconnect(fn: Callable[[int], None] | None) -> None:
    """`fn(index)` opens the session of device gpupool:index on its first use; `gpupool run`
    sets it, so any first use — an op, `torch.load` of a CUDA checkpoint — connects."""
    global _autoconnect
    _autoconnect = fn


def _auto(index: int) -> Session | None:
    if _autoconnect is None:
        return None
    _autoconnect(index)
    return _sessions.get(index)


def _lease_from_file() -> str:
    """The current signed lease that `gpupool run` keeps renewed in $GPUPOOL_LEASE_PATH."""
    path = os.environ.get("GPUPOOL_LEASE_PATH")
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise ConnectError(f"cannot read the lease that `gpupool run` keeps in {path}: {e}") from e


def current_session() -> Session:
    s = _sessions.get(_current) or _auto(_current)
    if s is None:
        raise SessionClosed(
            "no gpupool session is open: call gpupool.connect(...) or run the program under "
            "`gpupool run`"
        )
    return s


def session_for_device(device: torch.device) -> Session:
    idx = device.index if device.index is not None else _current
    s = _sessions.get(idx) or _auto(idx)
    if s is None:
        raise SessionClosed(f"no gpupool session is open for device {device}")
    return s


def sessions() -> list[Session]:
    return list(_sessions.values())


def flush_all() -> None:
    """Send every open session's queued commands now (Note [Flush latency] in connection.py).
    A session that is closed or lost is left alone: its next use says so."""
    for s in list(_sessions.values()):
        try:
            s.conn.flush()
        except GpupoolError:
            pass


def set_current(index: int) -> None:
    global _current
    _current = index


def current_index() -> int:
    return _current


@atexit.register
def _close_all() -> None:
    for s in list(_sessions.values()):
        try:
            s.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _make_encoder() -> msgspec.msgpack.Encoder:
    from gpupool.client.tensor import RemoteTensor
    from gpupool.torchcodec import arg_encoder

    return arg_encoder(RemoteTensor, lambda t: t._h.id)
