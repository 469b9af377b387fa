"""Session lifecycle and the per-session memory share, on a real listener with real workers.

The listener runs in this process (so the tests can ask it `session_count()` and its workers'
process ids); every session runs in its own worker process, and clients run here or in their own
processes. What must hold: however a session ends, its worker exits and is reaped and the listener
forgets it; going over the share raises `gpupool.ShareExceeded` naming the share, host memory is
never taken far past it, and the session and its neighbours carry on.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import gpupool
from gpupool.protocol import messages as m
from gpupool.protocol import ops as oplist
from gpupool.server.device import discover
from gpupool.server.executor import Executor, OpFailed, Ref, _in_bounds
from gpupool.server.gate import GateLimits
from gpupool.server.listener import Server, ServerConfig
from gpupool.server.oppolicy import OpPolicy
from tests.conftest import TOKEN
from tests.test_bad_input import WAIT, RawClient, gone, ref, status_kib, upload_cmd

LIMIT = 256 * 1024**2
MiB = 1024**2


def _start(config: ServerConfig) -> tuple[Server, threading.Thread, str]:
    srv = Server(config)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return srv, t, f"{srv.address[0]}:{srv.address[1]}"


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[Server, str]]:
    srv, t, address = _start(ServerConfig("127.0.0.1", 0, TOKEN, discover(1, 8 * 1024**3), memory_limit=LIMIT))
    yield srv, address
    srv.shutdown()
    t.join(WAIT)


def wait_until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def children(state: str | None = None) -> list[tuple[int, str]]:
    """(pid, cmdline) of this process's children, optionally only those in `state` (e.g. Z)."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == me and (state is None or fields[0] == state):
            out.append((int(entry), cmd))
    return out


def workers() -> list[int]:
    return [pid for pid, cmd in children() if "gpupool.server.worker" in cmd]


def soft_data_limit(pid: int) -> int | None:
    """The RLIMIT_DATA soft limit of `pid` in bytes, None if unlimited."""
    with open(f"/proc/{pid}/limits") as f:
        soft = next(x for x in f if x.startswith("Max data size")).split("size", 1)[1].split()[0]
    return None if soft == "unlimited" else int(soft)


def _computes(s: Any) -> None:
    x = torch.randn(33, 65)
    w = torch.randn(65, 17)
    torch.testing.assert_close((x.to(s.device) @ w.to(s.device)).relu().cpu(), (x @ w).relu(), rtol=0, atol=0)


# ---- however a session ends, its worker goes ---------------------------------------------------


def test_clean_close_ends_the_worker(listener) -> None:
    srv, address = listener
    s = gpupool.connect(address, token=TOKEN)
    held = torch.ones(8 * MiB).to(s.device)  # 32 MiB in the worker
    s.synchronize()
    pid = srv.session_pids()[s.id]
    assert status_kib(pid, "VmRSS") > 32 * 1024
    s.close()
    assert gone(pid)
    wait_until(lambda: s.id not in srv.session_pids(), "the listener forgot the session")
    del held


def test_disconnect_without_goodbye_ends_the_worker(listener) -> None:
    srv, address = listener
    c = RawClient(address)
    c.sync()
    pid = srv.session_pids()[c.session]
    c.close()
    assert gone(pid)
    wait_until(lambda: c.session not in srv.session_pids(), "the listener forgot the session")


_CLIENT = """
    # A client process that holds 64 MiB on the server, then waits to be killed. It speaks the
    # protocol directly (no torch import), so the test spends its time on the server's side.
    import socket, sys, time
    from gpupool.protocol import messages as m
    from gpupool.protocol.framing import FrameReader, FrameWriter
    from gpupool.protocol.version import PROTOCOL_VERSION

    host, _, port = sys.argv[1].rpartition(":")
    sock = socket.create_connection((host, int(port)))
    w, r = FrameWriter(sock), FrameReader(sock)
    w.send(m.plain_encoder.encode(m.Hello(PROTOCOL_VERSION, sys.argv[2])))
    welcome = m.server_message_decoder.decode(r.read_message()[0])
    data = bytes(64 << 20)
    up = m.Upload(1, 1, "uint8", [len(data)], [1], 0, len(data))
    w.send(m.plain_encoder.encode(m.Batch([up, m.Sync()])), [memoryview(data)])
    assert m.server_message_decoder.decode(r.read_message()[0]).error is None
    print("SESSION", welcome.session, flush=True)
    time.sleep(600)
"""


def test_client_death_ends_the_worker(listener) -> None:
    srv, address = listener
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CLIENT), address, TOKEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("SESSION"), line
        sid = line.split()[1]
        pid = srv.session_pids()[sid]
        assert status_kib(pid, "VmRSS") > 64 * 1024
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        assert gone(pid)
        wait_until(lambda: sid not in srv.session_pids(), "the listener forgot the session")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The server is still up and serves a new session.
    with gpupool.connect(address, token=TOKEN) as s:
        _computes(s)


def test_concurrent_connects_leave_one_spare_and_no_zombies(listener) -> None:
    srv, address = listener
    wait_until(lambda: srv.session_count() == 0, "earlier sessions ended")
    clients: list[RawClient] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def connect() -> None:
        try:
            c = RawClient(address)
            with lock:
                clients.append(c)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=connect) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors, errors
    assert len({c.session for c in clients}) == 3
    assert srv.session_count() == 3
    pids = list(srv.session_pids().values())
    for c in clients:
        assert c.sync().error is None
        c.close()
    for pid in pids:
        assert gone(pid)
    wait_until(lambda: srv.session_count() == 0, "all sessions ended")
    # Exactly one warm spare remains: the burst did not leave extra workers behind.
    wait_until(lambda: len(workers()) == 1, f"one spare worker is left (now {workers()})")
    assert children("Z") == []


def test_handshake_slots_are_bounded(listener) -> None:
    srv, t, address = _start(
        ServerConfig("127.0.0.1", 0, TOKEN, discover(1, 8 * 1024**3), limits=GateLimits(max_handshakes=2, handshake_timeout=WAIT))
    )
    try:
        idle = [RawClient(address, hello=False) for _ in range(2)]
        extra = RawClient(address, hello=False)
        refused = extra.ended_by_server()
        assert refused is not None and refused.code == "busy"
        extra.close()
        for c in idle:
            c.close()  # their handshakes end ("peer closed") and free their slots

        def handshake_reaches_the_token_check() -> bool:
            c = RawClient(address, hello=False)
            try:
                r = c.hello(token="wrong")  # no worker needed to tell "auth" from "busy"
                return isinstance(r, m.Refused) and r.code == "auth"
            finally:
                c.close()

        wait_until(handshake_reaches_the_token_check, "a handshake slot is free again")
    finally:
        srv.shutdown()
        t.join(WAIT)


# ---- the memory share --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(listener) -> Iterator[tuple[Any, Any]]:
    """A session to push over its share, and a neighbour that must not notice."""
    _, address = listener
    s, other = gpupool.connect(address, token=TOKEN), gpupool.connect(address, token=TOKEN)
    yield s, other
    s.close()
    other.close()


def test_many_moderate_allocations_hit_the_share(listener, pair) -> None:
    s, other = pair
    held = []
    with pytest.raises(gpupool.ShareExceeded) as ei:
        for _ in range(LIMIT // (16 * MiB) + 4):
            held.append(torch.ones(4 * MiB, device=s.device))  # 16 MiB each
            s.synchronize()
    assert len(held) == LIMIT // (16 * MiB) + 1  # exactly the first one past the share
    msg = str(ei.value)
    assert "share is 256.0 MiB" in msg and "256.0 MiB of it in use" in msg
    assert "test_server_sessions.py" in msg  # the line that made the tensor
    _computes(other)
    # Freeing makes the session usable again.
    del held
    gc.collect()
    assert s.memory_stats().memory_used == 0
    again = [torch.ones(4 * MiB, device=s.device) for _ in range(8)]
    assert sum(float(t.sum()) for t in again) == 8 * 4 * MiB
    _computes(s)
    _computes(other)


def test_one_huge_allocation_is_refused_before_it_is_made(listener, pair) -> None:
    srv, _ = listener
    s, other = pair
    pid = srv.session_pids()[s.id]
    x = torch.empty(10**12, device=s.device)
    with pytest.raises(gpupool.ShareExceeded, match=r"share is 256\.0 MiB .* and this needs 3\.6 TiB more"):
        s.synchronize()
    del x
    assert status_kib(pid, "VmHWM") < 1024 * 1024  # never came near a TiB, or even a GiB
    _computes(s)
    _computes(other)


def test_backstop_stops_allocations_no_check_foresaw(listener, pair) -> None:
    """An op whose output size is not checked in advance (a broadcast) still cannot take the
    host's memory: the worker's data segment is capped a little above the share."""
    srv, _ = listener
    s, other = pair
    pid = srv.session_pids()[s.id]
    assert soft_data_limit(pid) is not None
    one = torch.ones(1, device=s.device)
    y = one.expand(2**30) + 1  # a 4 GiB result from a 4-byte tensor
    with pytest.raises(gpupool.ShareExceeded, match=r"share is 256\.0 MiB"):
        s.synchronize()
    del y
    assert status_kib(pid, "VmHWM") < 2 * 1024 * 1024  # the 4 GiB were never touched
    # torch's thread pool still works under the cap: a parallel op of some size.
    a = torch.randn(256, 256)
    torch.testing.assert_close((a.to(s.device) @ a.to(s.device)).cpu(), a @ a)
    _computes(other)


# ---- the executor's accounting, driven directly ------------------------------------------------


#: The shipped op policy, plus factories that the client never sends (it builds `ones` from
#: `empty` and `fill_`) but that drive the accounting here in one op each.
_LISTED = oplist.load()
_POLICY = OpPolicy(oplist.Allowlist(_LISTED.ops | {
    "aten::ones", "aten::zeros", "aten::full", "aten::arange", "aten::arange.start_step",
    "aten::randperm", "aten::eye", "aten::linspace", "aten::set_.source_Tensor",
}, _LISTED.strings, "test"))


def _executor(device: torch.device, limit: int) -> Executor:
    return Executor(device, limit, _POLICY)


def _op(ex: Executor, name: str, args: list[Any], outs: list[int], **kwargs: Any) -> None:
    ex.run_op(m.Op(1, name, args, kwargs, outs))


def test_precheck_refuses_before_allocating() -> None:
    ex = _executor(torch.device("cpu"), 1 * MiB)
    with pytest.raises(OpFailed, match="needs 256.0 MiB more") as ei:
        _op(ex, "aten::empty.memory_format", [[64 * MiB]], [1])
    assert ei.value.kind == "oom"
    assert ex.ledger.peak == 0  # the post-check would have stored, then freed it
    for name, args, kwargs in [
        ("aten::zeros", [[1024, 1024]], {}),
        ("aten::full", [[300_000], 7], {}),
        ("aten::arange", [10**7], {}),
        ("aten::arange.start_step", [0.0, 1.0, 1e-7], {}),
        ("aten::randperm", [10**6], {}),
        ("aten::eye", [1000], {}),
        ("aten::empty_strided", [[1000, 1000], [1000, 1]], {}),
        ("aten::linspace", [0.0, 1.0, 10**6], {}),
        ("aten::empty.memory_format", [[1000, 1000]], {"dtype": torch.float64}),
    ]:
        with pytest.raises(OpFailed, match="this needs"):
            _op(ex, name, args, [2], **kwargs)
    assert ex.ledger.peak == 0
    _op(ex, "aten::zeros", [[16]], [3])  # small ones pass
    assert ex.memory_used() == 64


def test_precheck_of_ops_that_grow_from_small_inputs() -> None:
    ex = _executor(torch.device("cpu"), 1 * MiB)
    _op(ex, "aten::ones", [[4]], [1])
    _op(ex, "aten::expand", [Ref(1), [10**6, 4]], [2])  # a view: no memory
    for name, args in [
        ("aten::clone", [Ref(2)]),
        ("aten::repeat", [Ref(1), [10**6]]),
        ("aten::cat", [[Ref(2), Ref(2)]]),
        ("aten::resize_", [Ref(1), [10**6]]),
    ]:
        with pytest.raises(OpFailed, match="this needs"):
            _op(ex, name, args, [3] if name != "aten::resize_" else [-1])
    assert ex.ledger.peak == 16


def test_ledger_follows_resizes_out_ops_and_set() -> None:
    ex = _executor(torch.device("cpu"), 64 * MiB)
    _op(ex, "aten::ones", [[256]], [1])
    _op(ex, "aten::empty.memory_format", [[0]], [2])
    assert ex.memory_used() == 1024
    _op(ex, "aten::add.out", [Ref(1), Ref(1)], [-1], out=Ref(2))  # out grows to 1 KiB
    assert ex.memory_used() == 2048
    _op(ex, "aten::resize_", [Ref(2), [1024]], [-1])  # grows in place to 4 KiB
    assert ex.memory_used() == 1024 + 4096
    _op(ex, "aten::view", [Ref(2), [32, 32]], [3])  # a view: same storage, counted once
    assert ex.memory_used() == 1024 + 4096
    _op(ex, "aten::set_.source_Tensor", [Ref(2), Ref(1)], [-1])  # 2 now shares 1's storage
    assert ex.memory_used() == 1024 + 4096  # 3 still holds the old 4 KiB
    ex.handle(m.Free([3]), None, None)  # type: ignore[arg-type]
    assert ex.memory_used() == 1024
    ex.handle(m.Free([1]), None, None)  # type: ignore[arg-type]
    assert ex.memory_used() == 1024  # 2 still holds it
    ex.handle(m.Free([2]), None, None)  # type: ignore[arg-type]
    assert ex.memory_used() == 0 and len(ex.ledger) == 0


def test_out_growth_past_the_share_is_refused_before_it_is_made() -> None:
    """The attack: `zeros.out` / `add.out` with a small `out` grew a session to 6.5x its share,
    and the growth was kept. Now an out= op is sized on meta tensors first."""
    ex = _executor(torch.device("cpu"), 1 * MiB)
    _op(ex, "aten::empty.memory_format", [[0]], [1])
    _op(ex, "aten::ones", [[200_000]], [2])
    for name, args in [("aten::add.out", [Ref(2), Ref(2)]), ("aten::zeros.out", [[64 * MiB]])]:
        with pytest.raises(OpFailed, match="this needs") as ei:
            _op(ex, name, args, [-1], out=Ref(1))
        assert ei.value.kind == "oom"
        assert ex.memory_used() == 800_000 and ex.ledger.peak == 800_000  # never allocated
        assert ex.table[1].shape == (0,)
    _op(ex, "aten::ones", [[16]], [3])


def test_growth_no_check_foresaw_is_rolled_back(monkeypatch) -> None:
    """Where the meta kernel cannot size an out= op, the op runs, and growth past the budget is
    given back: the output gets its old storage size and shape again."""
    from gpupool.server import executor as executor_module

    monkeypatch.setattr(executor_module, "out_growth", lambda spec, args, kwargs: 0)
    ex = _executor(torch.device("cpu"), 1 * MiB)
    _op(ex, "aten::empty.memory_format", [[0]], [1])
    _op(ex, "aten::ones", [[200_000]], [2])
    with pytest.raises(OpFailed, match="out of memory"):
        _op(ex, "aten::add.out", [Ref(2), Ref(2)], [-1], out=Ref(1))
    assert ex.memory_used() == 800_000
    assert ex.table[1].shape == (0,) and ex.table[1].untyped_storage().nbytes() == 0
    _op(ex, "aten::add.out", [Ref(2), Ref(2)], [-1], out=Ref(2))  # in place: no growth
    assert ex.memory_used() == 800_000


def test_forged_views_and_foreign_devices_are_refused() -> None:
    ex = _executor(torch.device("cpu"), 64 * MiB)
    _op(ex, "aten::ones", [[2]], [1])
    with pytest.raises(OpFailed, match="not allowed"):
        _op(ex, "aten::_reshape_alias", [Ref(1), [100000], [1]], [2])
    assert not _in_bounds(torch.ops.aten._reshape_alias(torch.ones(2), [100000], [1]))
    assert _in_bounds(torch.ones(4, 4).t()[1:, ::2])
    assert _in_bounds(torch.empty(0).as_strided([0, 5], [1, 1000]))
    with pytest.raises(OpFailed, match="only use its own device"):
        _op(ex, "aten::empty.memory_format", [[2]], [2], device=torch.device("meta"))
    with pytest.raises(OpFailed, match="must be a dtype"):
        _op(ex, "aten::sum.dim_IntList", [Ref(1), [0], False], [2], dtype=6)
    assert set(ex.table) == {1}


def test_bad_handshakes_leak_no_descriptors_or_threads(listener) -> None:
    _, address = listener
    wait_until(lambda: not [t for t in threading.enumerate() if t.name == "gpupool-handshake"], "handshakes done")
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(30):
        c = RawClient(address, hello=False)
        if i % 3 == 0:
            c.sock.sendall(b"\x00" * 64)
        elif i % 3 == 1:
            r = c.hello(token="nope")
            assert isinstance(r, m.Refused) and r.code == "auth"
        else:
            c.sock.sendall(b"GP\x00\x00")  # half a header, then gone
        c.close()

    def settled() -> bool:
        busy = [t for t in threading.enumerate() if t.name == "gpupool-handshake"]
        return not busy and len(os.listdir("/proc/self/fd")) <= fds

    wait_until(settled, f"handshake threads ended and descriptors returned to {fds}")


def test_backstop_leaves_room_for_many_threads(monkeypatch) -> None:
    """On a many-core host torch starts a thread (an 8 MiB stack, counted by RLIMIT_DATA) per
    core. Started after the cap, they would not fit and libgomp would abort the worker; the
    worker starts them first. 160 threads stand in for a 160-core host here."""
    monkeypatch.setenv("GPUPOOL_WORKER_THREADS", "160")
    srv, t, address = _start(ServerConfig("127.0.0.1", 0, TOKEN, discover(1, 8 * 1024**3), memory_limit=LIMIT))
    try:
        c = RawClient(address)
        data = torch.ones(4 * MiB, dtype=torch.float32).numpy().tobytes()  # 16 MiB
        c.send([upload_cmd(1, 1, data)], [data])
        c.send([m.Op(2, "aten::add.Tensor", [ref(1), ref(1)], {}, [2]), m.Op(3, "aten::sum", [ref(2)], {}, [3])])
        c.send([m.Item(3)])
        v = c.reply()
        assert v.error is None and v.value == 2.0 * 4 * MiB
        pid = srv.session_pids()[c.session]
        with open(f"/proc/{pid}/status") as f:
            threads = int(next(x for x in f if x.startswith("Threads:")).split()[1])
        assert threads >= 160
        assert soft_data_limit(pid) is not None
        c.close()
    finally:
        srv.shutdown()
        t.join(WAIT)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(600.0).reshape(20, 30).t(),
        lambda: torch.arange(2 * 3 * 50, dtype=torch.int16).reshape(2, 3, 50).permute(2, 0, 1),
        lambda: torch.arange(1000.0)[::3],
        lambda: torch.arange(4000.0).reshape(2, 2000).t()[:, 1],
        lambda: (torch.arange(100) % 3 == 0).reshape(10, 10).t(),
        lambda: torch.tensor(5.0),
        lambda: torch.empty(0, 7).t(),
        lambda: torch.arange(100.0),
    ],
    ids=["transposed", "permuted-int16", "strided-1d", "column", "bool", "0-d", "empty", "contiguous"],
)
def test_fetch_gathers_strided_tensors_in_bounded_pieces(make: Any, monkeypatch) -> None:
    """A strided tensor is fetched slice by slice, each at most FETCH_CHUNK bytes, never as a
    whole copy; the client gets exactly the C-order bytes a contiguous copy would have."""
    import socket

    from gpupool.protocol.framing import FrameReader, FrameWriter
    from gpupool.server import executor as ex_mod

    monkeypatch.setattr(ex_mod, "FETCH_CHUNK", 64)
    t = make()
    pieces = list(ex_mod._c_order_chunks(t, 64))
    assert all(p.is_contiguous() for p in pieces)
    assert all(p.numel() * p.element_size() <= 64 or p.numel() == 1 for p in pieces)
    ex = _executor(torch.device("cpu"), 64 * MiB)
    ex._store(1, t)
    a, b = socket.socketpair()
    try:
        b.settimeout(WAIT)
        ex.handle(m.Fetch(1), None, FrameWriter(a))  # type: ignore[arg-type]
        r = FrameReader(b)
        raw, sizes = r.read_message()
        assert m.server_message_decoder.decode(raw).error is None
        got = bytes(r.read_buffer()) if sizes else b""
    finally:
        a.close()
        b.close()
    assert got == t.contiguous().numpy().tobytes()


def test_lease_end_during_a_frame_waits_until_the_frame_is_out() -> None:
    """SIGUSR1 in the middle of a frame (here: while a streamed fetch is being gathered) ends the
    session only once the frame is whole; the Refused frame that follows still goes out."""
    import socket

    from gpupool.protocol.framing import FrameReader
    from gpupool.server.worker import LeaseEnded, WholeFrameWriter

    a, b = socket.socketpair()
    writer = WholeFrameWriter(a)
    old = signal.signal(signal.SIGUSR1, writer.on_lease_ended)

    def chunks() -> Iterator[memoryview]:
        yield memoryview(b"x" * 10)
        signal.raise_signal(signal.SIGUSR1)  # the handler runs here, mid-frame
        yield memoryview(b"y" * 10)

    try:
        with pytest.raises(LeaseEnded):
            writer.send_stream(b"head", 20, chunks())
        writer.send(b"refused")  # once only: the farewell frame is not cut short
        with pytest.raises(LeaseEnded):  # outside a frame the handler raises at once
            signal.raise_signal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, old)
        a.close()
    reader = FrameReader(b)
    assert reader.read_message() == (bytearray(b"head"), [20])
    assert bytes(reader.read_buffer()) == b"x" * 10 + b"y" * 10
    assert reader.read_message() == (bytearray(b"refused"), [])
    b.close()


def test_a_worker_outlives_the_thread_that_started_it() -> None:
    """Workers are started by short-lived threads (spare refills, handshakes): the end of that
    thread must not end the worker, only the end of the listener's process does (Note in
    `workers._lifeline`; Linux's PR_SET_PDEATHSIG fires on the thread's end)."""
    from gpupool.server.workers import Spare

    made: list[Spare] = []

    def start() -> None:
        made.append(Spare())
        time.sleep(3)  # the worker is well into its start-up when this thread ends

    t = threading.Thread(target=start)
    t.start()
    t.join()
    spare = made[0]
    try:
        time.sleep(1)
        assert spare.proc.poll() is None, "the worker died with the thread that started it"
    finally:
        spare.discard()


def test_a_freed_tensor_makes_room_for_the_next_one(listener) -> None:
    """A tensor dropped before the next op is freed on the server before that op allocates
    (Note [Ordering] in client/connection.py): a share that holds one copy is enough for a loop
    that drops the old copy and makes a new one."""
    srv, address = listener
    host = torch.ones(LIMIT * 6 // 10, dtype=torch.uint8)
    with gpupool.connect(address, token=TOKEN) as s:
        x = host.to(s.device)
        for _ in range(3):
            del x
            x = host.to(s.device)
            s.synchronize()
        assert x[-8:].cpu().tolist() == [1] * 8
