"""Untrusted input against a real server process: every abuse gets a clear error or a clean
session end, the server keeps serving a concurrent healthy session, and a dead session's worker
process exits (so the OS frees its memory) and is reaped.

The raw-protocol client here speaks the wire format by hand, so tests can send what the real
client never would; where the real client can express the abuse (unknown ops, bad handles), the
real client is used, to check that the error reaches the program as a gpupool exception.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import torch

import gpupool
from gpupool.client import connection as client_connection
from gpupool.errors import ProtocolError, ServerLost
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter, encode_header
from gpupool.protocol.version import PROTOCOL_VERSION
from tests.conftest import TOKEN, ServerProc

Ext = msgspec.msgpack.Ext
HANDSHAKE_TIMEOUT = 3.0
MEMORY_LIMIT = 512 * 1024**2
WAIT = 60.0  # generous bound, only so that a broken server fails the test instead of hanging it


# ---- a client that speaks the wire format by hand ----------------------------------------------


def ref(handle: int) -> Ext:
    return Ext(m.ExtCode.TENSOR, m.HANDLE.pack(handle))


class RawClient:
    """A TCP connection to a server, driven frame by frame."""

    def __init__(self, address: str, hello: bool = True, token: str = TOKEN, protocol: int = PROTOCOL_VERSION) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=WAIT)
        self.reader = FrameReader(self.sock)
        self.writer = FrameWriter(self.sock)
        self.welcome: m.Welcome | None = None
        if hello:
            reply = self.hello(token=token, protocol=protocol)
            assert isinstance(reply, m.Welcome), reply
            self.welcome = reply

    @property
    def session(self) -> str:
        assert self.welcome is not None
        return self.welcome.session

    def hello(self, token: str = TOKEN, protocol: int = PROTOCOL_VERSION) -> Any:
        self.writer.send(m.plain_encoder.encode(m.Hello(protocol=protocol, token=token)))
        return self.reply()

    def send(self, cmds: list[Any], buffers: list[bytes] = ()) -> None:  # type: ignore[assignment]
        self.writer.send(m.plain_encoder.encode(m.Batch(cmds)), [memoryview(b) for b in buffers])

    def reply(self) -> Any:
        raw, _ = self.reader.read_message()
        return m.decode(m.server_message_decoder, raw, "reply")

    def sync(self) -> m.Synced:
        self.send([m.Sync()])
        r = self.reply()
        assert isinstance(r, m.Synced), r
        return r

    def fetch(self, handle: int) -> tuple[m.Data, bytes | None]:
        self.send([m.Fetch(handle)])
        r = self.reply()
        return r, (bytes(self.reader.read_buffer()) if r.error is None else None)

    def ended_by_server(self) -> m.Refused | None:
        """Read until the server closes the connection; returns its `Refused`, if it sent one."""
        refused = None
        while True:
            try:
                r = self.reply()
            except ServerLost:
                return refused
            if isinstance(r, m.Refused):
                refused = r

    def close(self) -> None:
        self.sock.close()


def upload_cmd(seq: int, handle: int, data: bytes, dtype: str = "float32", itemsize: int = 4) -> m.Upload:
    n = len(data) // itemsize
    return m.Upload(seq, handle, dtype, [n], [1], 0, len(data))


# ---- helpers on processes ----------------------------------------------------------------------


def worker_pid(server: ServerProc, session: str) -> int:
    """The worker process of `session`, from the listener's log."""
    pattern = re.compile(rf"session {session} for .* worker pid (\d+)")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = pattern.search(server.log)
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no worker logged for session {session}:\n{server.log[-3000:]}")


def gone(pid: int) -> bool:
    """Whether process `pid` exited and was reaped (a zombie still has a /proc entry)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProc]:
    old = os.environ.get("GPUPOOL_HANDSHAKE_TIMEOUT")
    os.environ["GPUPOOL_HANDSHAKE_TIMEOUT"] = str(HANDSHAKE_TIMEOUT)
    try:
        s = ServerProc("--cpu-gpus", "1", "--memory-limit", str(MEMORY_LIMIT))
    finally:
        if old is None:
            del os.environ["GPUPOOL_HANDSHAKE_TIMEOUT"]
        else:
            os.environ["GPUPOOL_HANDSHAKE_TIMEOUT"] = old
    yield s
    s.stop()


@pytest.fixture(scope="module")
def healthy(srv: ServerProc) -> Iterator[gpupool.client.session.Session]:
    """A well-behaved session, open through every abuse below."""
    s = gpupool.connect(srv.address, token=srv.token)
    yield s
    s.close()


_A = torch.arange(12.0).reshape(3, 4)


def assert_healthy(srv: ServerProc, healthy: Any) -> None:
    """The server is up and the concurrent session still computes correctly."""
    assert srv.alive(), srv.log[-3000:]
    r = _A.to(healthy.device)
    torch.testing.assert_close((r @ r.T + 1).cpu(), _A @ _A.T + 1, rtol=0, atol=0)


# ---- before the handshake ----------------------------------------------------------------------


def test_garbage_instead_of_a_hello(srv, healthy) -> None:
    c = RawClient(srv.address, hello=False)
    c.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(200))
    refused = c.ended_by_server()
    assert refused is not None and refused.code == "protocol"
    assert "bad frame magic" in refused.message
    c.close()
    assert_healthy(srv, healthy)


def test_truncated_hello_then_close(srv, healthy) -> None:
    c = RawClient(srv.address, hello=False)
    c.sock.sendall(encode_header(100, []) + b"\x83" * 10)
    c.sock.shutdown(socket.SHUT_WR)
    refused = c.ended_by_server()
    assert refused is not None and "peer closed" in refused.message
    c.close()
    assert_healthy(srv, healthy)


def test_malformed_hello(srv, healthy) -> None:
    for payload, expect in [
        (b"\xc1\xc1", "malformed handshake"),
        (m.plain_encoder.encode({"type": "hello", "protocol": "one", "token": TOKEN}), "Expected `int`"),
        (m.plain_encoder.encode({"type": "batch", "cmds": []}), "Invalid value 'batch'"),
        (b"\x91" * 60000, "malformed handshake"),  # nested past the recursion limit
    ]:
        c = RawClient(srv.address, hello=False)
        c.writer.send(payload)
        refused = c.ended_by_server()
        assert refused is not None and refused.code == "protocol", payload[:20]
        assert expect in refused.message
        c.close()
    assert_healthy(srv, healthy)


def test_oversize_hello_is_refused_before_its_body(srv, healthy) -> None:
    c = RawClient(srv.address, hello=False)
    c.sock.sendall(encode_header(1 << 20, []))  # announces 1 MiB, sends none of it
    refused = c.ended_by_server()
    assert refused is not None and "over the limit" in refused.message
    c.close()
    c = RawClient(srv.address, hello=False)
    c.sock.sendall(encode_header(10, [1 << 30]))  # a hello may carry no buffers
    refused = c.ended_by_server()
    assert refused is not None and "over the limit of 0" in refused.message
    c.close()
    assert_healthy(srv, healthy)


def test_wrong_token(srv, healthy) -> None:
    with pytest.raises(gpupool.AuthError, match="invalid token"):
        gpupool.connect(srv.address, token="not-the-token")
    c = RawClient(srv.address, hello=False)
    r = c.hello(token="")
    assert isinstance(r, m.Refused) and r.code == "auth"
    assert c.ended_by_server() is None  # and then the server hangs up
    c.close()
    assert_healthy(srv, healthy)


def test_wrong_protocol_version(srv, healthy, monkeypatch) -> None:
    monkeypatch.setattr(client_connection, "PROTOCOL_VERSION", PROTOCOL_VERSION + 98)
    with pytest.raises(gpupool.VersionMismatch, match=f"protocol {PROTOCOL_VERSION + 98}"):
        gpupool.connect(srv.address, token=srv.token)
    assert_healthy(srv, healthy)


def test_idle_and_slow_handshakes_time_out_without_blocking_others(srv, healthy) -> None:
    idle = [RawClient(srv.address, hello=False) for _ in range(4)]
    slow = RawClient(srv.address, hello=False)
    # A slow-loris: a valid header announcing a 2000-byte hello, then one byte at a time.
    slow.sock.sendall(encode_header(2000, []))
    cut_off = threading.Event()

    def dribble() -> None:
        for _ in range(2000):
            r, _, _ = select.select([slow.sock], [], [], 0.1)
            if r:  # the server answered (refused) or closed: it cut us off
                cut_off.set()
                return
            try:
                slow.sock.sendall(b"\x00")
            except OSError:
                cut_off.set()
                return

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    # While those hold their handshakes open, a new session opens and works.
    with gpupool.connect(srv.address, token=srv.token) as other:
        x = torch.randn(64, 64)
        torch.testing.assert_close((x.to(other.device) * 2).cpu(), x * 2, rtol=0, atol=0)
    assert_healthy(srv, healthy)
    for c in idle:
        refused = c.ended_by_server()
        assert refused is not None and f"no valid handshake within {HANDSHAKE_TIMEOUT:g} s" in refused.message
        c.close()
    t.join(WAIT)
    # 2000 bytes at up to 10/s would take 200 s: only the total deadline can have cut it off.
    assert cut_off.is_set()
    slow.close()
    assert_healthy(srv, healthy)


# ---- inside a session: stream-level abuse ends the session -------------------------------------


def _assert_session_ended(srv: ServerProc, c: RawClient, expect: str | None) -> None:
    pid = worker_pid(srv, c.session)
    refused = c.ended_by_server()
    if expect is None:
        assert refused is None
    else:
        assert refused is not None and refused.code == "protocol", refused
        assert expect in refused.message, refused.message
    c.close()
    assert gone(pid), f"worker {pid} of session {c.session} did not exit"


@pytest.mark.parametrize(
    "payload, expect",
    [
        (b"\xde\xad\xbe\xef" * 64, "bad frame magic"),
        (encode_header(3, []) + b"\xc1\xc1\xc1", "malformed command batch"),
        (encode_header(2, []) + b"\x92\x01", "malformed command batch"),
    ],
    ids=["garbage", "bad-msgpack", "msgpack-not-a-batch"],
)
def test_stream_garbage_ends_the_session(srv, healthy, payload: bytes, expect: str) -> None:
    c = RawClient(srv.address)
    c.sync()
    c.sock.sendall(payload)
    _assert_session_ended(srv, c, expect)
    assert_healthy(srv, healthy)


def test_unknown_command_and_wrong_types_end_the_session(srv, healthy) -> None:
    for batch, expect in [
        ({"type": "batch", "cmds": [["spawn", "/bin/sh"]]}, "Invalid value 'spawn'"),
        ({"type": "batch", "cmds": [["op", 1, "aten::add.Tensor", [], {}, "outs"]]}, "Expected `array`"),
    ]:
        c = RawClient(srv.address)
        c.writer.send(m.plain_encoder.encode(batch))
        _assert_session_ended(srv, c, expect)
    assert_healthy(srv, healthy)


def test_truncated_frame_then_close_ends_the_session(srv, healthy) -> None:
    c = RawClient(srv.address)
    data = m.plain_encoder.encode(m.Batch([m.Sync()]))
    c.sock.sendall(encode_header(len(data), [])[:5])
    c.sock.shutdown(socket.SHUT_WR)
    _assert_session_ended(srv, c, None)
    assert_healthy(srv, healthy)


def test_frames_over_the_size_bounds(srv, healthy) -> None:
    c = RawClient(srv.address)
    c.sock.sendall(encode_header(10, [MEMORY_LIMIT + (2 << 20)]))  # more than the share
    _assert_session_ended(srv, c, "over the limit")
    c = RawClient(srv.address)
    c.sock.sendall(encode_header(256 << 20, []))  # a 256 MiB message
    _assert_session_ended(srv, c, "over the limit")
    assert_healthy(srv, healthy)


def test_upload_without_its_buffer(srv, healthy) -> None:
    c = RawClient(srv.address)
    c.send([upload_cmd(1, 1, b"\x00" * 64)])  # no buffer in the frame
    _assert_session_ended(srv, c, "without its buffer")
    c = RawClient(srv.address)
    c.send([upload_cmd(1, 1, b"\x00" * 64)], [b"\x00" * 60])  # a shorter one
    _assert_session_ended(srv, c, "without its buffer")
    c = RawClient(srv.address)
    c.send([m.Sync()], [b"stray"])  # a buffer nothing asked for
    assert isinstance(c.reply(), m.Synced)
    _assert_session_ended(srv, c, "buffers no command asked for")
    assert_healthy(srv, healthy)


def test_upload_cut_short_on_the_wire(srv, healthy) -> None:
    c = RawClient(srv.address)
    cmd = upload_cmd(1, 1, b"\x00" * (64 << 20))
    c.sock.sendall(encode_header(len(m.plain_encoder.encode(m.Batch([cmd]))), [64 << 20]))
    c.sock.sendall(m.plain_encoder.encode(m.Batch([cmd])) + b"\x00" * (1 << 20))
    c.sock.shutdown(socket.SHUT_WR)
    _assert_session_ended(srv, c, None)
    assert_healthy(srv, healthy)


# ---- inside a session: command-level errors are deferred, the session carries on ---------------


@pytest.fixture(scope="module")
def victim(srv: ServerProc) -> Iterator[Any]:
    s = gpupool.connect(srv.address, token=srv.token)
    yield s
    s.close()


def _still_works(s: Any) -> None:
    x = torch.randn(5, 7)
    torch.testing.assert_close((x.to(s.device).exp() - 1).cpu(), x.exp() - 1, rtol=0, atol=0)


@pytest.mark.parametrize(
    "op, expect",
    [
        ("aten::does_not_exist", "unknown op 'aten::does_not_exist'"),
        ("aten::add.NoSuchOverload", "unknown op"),
        ("os::system", "namespace 'os' is not allowed"),
        ("aten::from_file", "aten::from_file is not allowed"),
        ("aten::_reshape_alias", "is not allowed"),
        ("builtins::eval", "namespace 'builtins' is not allowed"),
        ("no namespace", "malformed op name"),
    ],
)
def test_unknown_and_denied_ops_fail_at_the_next_sync(srv, healthy, victim, op: str, expect: str) -> None:
    conn = victim.conn
    h = conn.new_handle()
    conn.op(op, ["/etc/passwd", True, 10], {}, [h])  # queued: no error yet
    with pytest.raises(gpupool.RemoteOpError, match=re.escape(expect)) as ei:
        victim.synchronize()
    assert ei.value.op == op
    assert "test_bad_input.py" in ei.value.location
    _still_works(victim)
    assert_healthy(srv, healthy)


def test_handles_that_do_not_exist(srv, healthy, victim) -> None:
    conn = victim.conn
    h = conn.new_handle()
    conn.op("aten::neg", [ref(987654321)], {}, [h])
    with pytest.raises(gpupool.RemoteOpError, match="handle 987654321 does not exist"):
        victim.synchronize()
    with pytest.raises(gpupool.RemoteOpError, match="does not exist"):
        conn.request(m.Fetch(h))  # the failed op produced nothing
    with pytest.raises(gpupool.RemoteOpError, match="does not exist"):
        conn.request(m.Item(123))
    conn.command(m.Free([5555, 6666]))  # freeing unknown handles is harmless
    victim.synchronize()
    _still_works(victim)
    assert_healthy(srv, healthy)


def test_typed_arguments_cannot_smuggle_raw_values(srv, healthy, victim) -> None:
    """A dtype as a bare integer, a device as a string: checked before aten sees them."""
    conn = victim.conn
    for kwargs, expect in [
        ({"dtype": 1000}, "'dtype' of aten::empty.memory_format must be a dtype"),
        ({"memory_format": 99}, "must be a memory_format"),
        ({"device": "meta"}, "'device' of aten::empty.memory_format must be a device"),
        ({"device": "cuda:1"}, "must be a device"),
    ]:
        conn.op("aten::empty.memory_format", [[4]], kwargs, [conn.new_handle()])
        with pytest.raises(gpupool.RemoteOpError, match=re.escape(expect)):
            victim.synchronize()
    _still_works(victim)
    assert_healthy(srv, healthy)


def test_bad_upload_commands_are_deferred_errors(srv, healthy) -> None:
    c = RawClient(srv.address)
    data = b"\x00" * 64
    for cmd, expect in [
        (m.Upload(1, 1, "float33", [16], [1], 0, 64), "unknown dtype"),
        (m.Upload(2, 1, "float32", [17], [1], 0, 64), "reaches past its data"),
        (m.Upload(3, 1, "float32", [4, 4], [1], 0, 64), "bad upload layout"),
        (m.Upload(4, 1, "float32", [4], [-1], 3, 64), "bad upload layout"),
        (m.Upload(5, 1, "float64", [9], [1], 0, 64), "reaches past its data"),
        (m.Upload(6, 1, "float32", [16], [1], 0, 64, True), "handle 1 does not exist"),
    ]:
        c.send([cmd], [data])
        err = c.sync().error
        assert err is not None and expect in err.message, (cmd, err)
        assert err.seq == cmd.seq
    # The stream stayed in step: a good upload after the bad ones round-trips.
    payload = bytes(range(64))
    c.send([upload_cmd(9, 2, payload)], [payload])
    assert c.sync().error is None
    r, got = c.fetch(2)
    assert r.error is None and got == payload
    c.send([m.Bye()])
    assert c.ended_by_server() is None
    c.close()
    assert_healthy(srv, healthy)


# ---- a client dies mid-stream ------------------------------------------------------------------


_DYING_CLIENT = """
    import sys, time, torch, gpupool
    from gpupool.protocol import messages as m
    from gpupool.protocol.framing import encode_header
    s = gpupool.connect(sys.argv[1], token=sys.argv[2])
    held = torch.ones(32 * 2**20).to(s.device)   # 128 MiB held by the worker
    s.synchronize()
    # Start a 256 MiB upload and stop after 16 MiB of it.
    cmd = m.Upload(10**6, 10**6, "uint8", [256 << 20], [1], 0, 256 << 20)
    body = m.plain_encoder.encode(m.Batch([cmd]))
    sock = s.conn._sock
    sock.sendall(encode_header(len(body), [256 << 20]) + body)
    sock.sendall(b"\\x00" * (16 << 20))
    print("SESSION", s.id, flush=True)
    time.sleep(600)
"""


def test_client_killed_mid_upload(srv, healthy) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_DYING_CLIENT), srv.address, srv.token],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("SESSION"), line
        pid = worker_pid(srv, line.split()[1])
        assert status_kib(pid, "VmRSS") > 128 * 1024  # it really holds the client's tensor
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        assert gone(pid), f"worker {pid} outlived its killed client"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_healthy(srv, healthy)


def test_server_reply_errors_end_the_client_session_cleanly(srv) -> None:
    """A client that gets a `Refused` mid-session marks the session lost, with the reason."""
    s = gpupool.connect(srv.address, token=srv.token)
    try:
        s.conn._sock.sendall(b"garbage!")
        select.select([s.conn._sock], [], [], WAIT)  # the server's answer has arrived
        with pytest.raises(ProtocolError, match="bad frame magic"):
            s.synchronize()
        with pytest.raises(ServerLost, match="bad frame magic"):
            torch.ones(2).to(s.device)
    finally:
        s.close()
