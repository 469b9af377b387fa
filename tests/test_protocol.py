"""The wire format on its own: frames and codecs over real socket pairs, no server.

What must hold: every message and buffer arrives as sent, however the bytes are split; anything
malformed, unknown or oversize is a `ProtocolError` (checked before memory is allocated for it);
a peer that goes away is `ServerLost`; small parts of a frame go out in one write.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool.errors import ProtocolError, ServerLost
from gpupool.protocol import messages as m
from gpupool.protocol.framing import (
    COALESCE,
    HEADER_SIZE,
    MAGIC,
    RECV_SLICE,
    FrameReader,
    FrameWriter,
    Limits,
    encode_header,
)
from gpupool.protocol.ops import DENIED, check_op_name

Ext = msgspec.msgpack.Ext


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(30)  # only to avoid a hang if a test is wrong
    b.settimeout(30)
    yield a, b
    a.close()
    b.close()


def _send_in_thread(sock: socket.socket, data: bytes, chunk: int = 0, pause: float = 0.0) -> threading.Thread:
    """Write `data` from another thread (so a full socket buffer cannot deadlock the test)."""

    def run() -> None:
        if not chunk:
            sock.sendall(data)
            return
        for i in range(0, len(data), chunk):
            sock.sendall(data[i : i + chunk])
            if pause:
                time.sleep(pause)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _frame_bytes(message: bytes, buffers: list[bytes]) -> bytes:
    return encode_header(len(message), [len(b) for b in buffers]) + message + b"".join(buffers)


# ---- framing round trips -----------------------------------------------------------------------


def test_message_and_buffers_roundtrip(pair) -> None:
    a, b = pair
    msg = m.plain_encoder.encode(m.Synced(memory_used=5))
    bufs = [b"", b"x" * 10, bytes(range(256)) * 300, b"\x00" * (3 * RECV_SLICE + 7)]
    t = threading.Thread(target=FrameWriter(a).send, args=(msg, [memoryview(x) for x in bufs]))
    t.start()
    r = FrameReader(b)
    raw, sizes = r.read_message()
    assert m.server_message_decoder.decode(raw) == m.Synced(memory_used=5)
    assert sizes == [len(x) for x in bufs]
    got = []
    for n in sizes:
        out = bytearray(n)
        r.read_buffer_into(memoryview(out))
        got.append(bytes(out))
    t.join()
    assert got == bufs
    assert r.pending_buffers == []


def test_buffer_of_any_element_format(pair) -> None:
    """A typed view (e.g. float32 elements) is sent as its bytes."""
    import array

    a, b = pair
    floats = array.array("f", [1.5, -2.0, 3.25])
    FrameWriter(a).send(b"", [memoryview(floats)])
    r = FrameReader(b)
    _, sizes = r.read_message()
    assert sizes == [12]
    assert bytes(r.read_buffer()) == floats.tobytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    message=st.binary(max_size=2000),
    buffers=st.lists(st.binary(max_size=3000), max_size=6),
    chunk=st.integers(min_value=1, max_value=4096),
)
def test_any_split_of_the_byte_stream_reads_the_same(message: bytes, buffers: list[bytes], chunk: int) -> None:
    """Partial reads: the reader reassembles frames however the sender's writes are split."""
    a, b = socket.socketpair()
    try:
        b.settimeout(30)
        data = _frame_bytes(message, buffers) * 2  # two frames back to back
        t = _send_in_thread(a, data, chunk=chunk)
        r = FrameReader(b)
        for _ in range(2):
            raw, sizes = r.read_message()
            assert bytes(raw) == message
            assert [bytes(r.read_buffer()) for _ in sizes] == buffers
        t.join()
    finally:
        a.close()
        b.close()


def test_byte_by_byte_with_pauses(pair) -> None:
    a, b = pair
    hello = m.plain_encoder.encode(m.Hello(protocol=1, token="t"))
    t = _send_in_thread(a, _frame_bytes(hello, [b"abc"]), chunk=1, pause=0.001)
    r = FrameReader(b)
    raw, sizes = r.read_message()
    assert m.hello_decoder.decode(raw) == m.Hello(protocol=1, token="t")
    assert bytes(r.read_buffer()) == b"abc"
    t.join()


def test_unconsumed_buffers_are_skipped_before_the_next_frame(pair) -> None:
    a, b = pair
    w = FrameWriter(a)
    big = b"\x07" * (RECV_SLICE * 2 + 3)
    t = threading.Thread(target=lambda: (w.send(b"one", [memoryview(b"skip me"), memoryview(big)]), w.send(b"two")))
    t.start()
    r = FrameReader(b)
    raw, sizes = r.read_message()
    assert bytes(raw) == b"one" and sizes == [7, len(big)]
    raw, sizes = r.read_message()  # the buffers of "one" were never read
    assert bytes(raw) == b"two" and sizes == []
    t.join()


def test_buffer_size_must_match_and_must_exist(pair) -> None:
    a, b = pair
    FrameWriter(a).send(b"m", [memoryview(b"12345")])
    r = FrameReader(b)
    r.read_message()
    with pytest.raises(ProtocolError, match="5 bytes announced"):
        r.read_buffer_into(memoryview(bytearray(4)))
    assert r.pending_buffers == [5]  # nothing was consumed by the failed call
    assert bytes(r.read_buffer()) == b"12345"
    with pytest.raises(ProtocolError, match="no buffer left"):
        r.read_buffer()
    with pytest.raises(ProtocolError, match="no buffer left"):
        r.skip_next()


class RecordingSocket:
    """A real socket that records each `recv_into`: its size and the memory it wrote to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[tuple[int, object]] = []

    def recv_into(self, view: memoryview, n: int) -> int:
        self.calls.append((n, view.obj))
        return self.sock.recv_into(view, n)

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)


def test_buffers_land_in_the_callers_memory_in_bounded_slices(pair) -> None:
    """Bulk data: `recv_into` straight into the destination, at most 256 KiB per call."""
    a, b = pair
    data = bytes(range(256)) * (5 * RECV_SLICE // 256 + 3)
    t = threading.Thread(target=FrameWriter(a).send, args=(b"m", [memoryview(data)]))
    t.start()
    spy = RecordingSocket(b)
    r = FrameReader(spy)  # type: ignore[arg-type]
    r.read_message()
    spy.calls.clear()
    target = bytearray(len(data))
    r.read_buffer_into(memoryview(target))
    t.join()
    assert bytes(target) == data
    assert len(spy.calls) >= 6
    assert all(n <= RECV_SLICE for n, _ in spy.calls)
    assert all(obj is target for _, obj in spy.calls)  # no staging buffer in between


# ---- coalescing --------------------------------------------------------------------------------


class CountingSocket:
    """A real socket that counts the writes made on it (the FrameWriter only calls sendall)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writes: list[int] = []

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(memoryview(data).nbytes)
        self.sock.sendall(data)


def test_small_parts_are_coalesced_into_one_write(pair) -> None:
    a, b = pair
    spy = CountingSocket(a)
    small = [memoryview(bytes([i]) * 100) for i in range(20)]
    FrameWriter(spy).send(b"message", small)  # type: ignore[arg-type]
    assert len(spy.writes) == 1
    r = FrameReader(b)
    r.read_message()
    assert [bytes(r.read_buffer()) for _ in small] == [bytes(x) for x in small]


def test_large_buffers_go_out_without_being_copied_into_the_header(pair) -> None:
    a, b = pair
    spy = CountingSocket(a)
    big = memoryview(b"\x01" * (COALESCE * 4))
    t = threading.Thread(target=FrameWriter(spy).send, args=(b"m", [memoryview(b"s"), big, memoryview(b"t")]))  # type: ignore[arg-type]
    t.start()
    r = FrameReader(b)
    r.read_message()
    assert [len(r.read_buffer()) for _ in range(3)] == [1, big.nbytes, 1]
    t.join()
    # header+message+small buffer, the big buffer itself, the trailing small buffer
    assert spy.writes == [HEADER_SIZE + 3 * 8 + 1 + 1, big.nbytes, 1]


# ---- limits and malformed frames ---------------------------------------------------------------


def test_bad_magic(pair) -> None:
    a, b = pair
    a.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="magic"):
        FrameReader(b).read_message()


def test_oversize_message_is_refused_before_its_bytes_arrive(pair) -> None:
    a, b = pair
    a.sendall(struct.pack("<2sHI", MAGIC, 0, 0xFFFF_FFFF))  # announces 4 GiB, sends none of it
    with pytest.raises(ProtocolError, match="over the limit"):
        FrameReader(b, Limits(max_message=1 << 20)).read_message()


def test_too_many_buffers(pair) -> None:
    a, b = pair
    a.sendall(struct.pack("<2sHI", MAGIC, 5000, 0))
    with pytest.raises(ProtocolError, match="5000 buffers"):
        FrameReader(b, Limits(max_buffers=4096)).read_message()


def test_oversize_buffers_are_refused_before_their_bytes_arrive(pair) -> None:
    a, b = pair
    a.sendall(encode_header(0, [1 << 20, 1 << 62]))
    with pytest.raises(ProtocolError, match="buffer bytes, over the limit"):
        FrameReader(b, Limits(max_buffer_bytes=1 << 30)).read_message()


def test_buffers_refused_where_none_are_allowed(pair) -> None:
    a, b = pair
    a.sendall(encode_header(1, [1]) + b"x" + b"y")
    with pytest.raises(ProtocolError, match="over the limit of 0"):
        FrameReader(b, Limits(max_buffers=0)).read_message()


def test_header_cannot_express_more(pair) -> None:
    with pytest.raises(ProtocolError):
        encode_header(1 << 32, [])
    with pytest.raises(ProtocolError):
        encode_header(0, [0] * 0x10000)


@pytest.mark.parametrize("cut", [0, 1, HEADER_SIZE - 1, HEADER_SIZE + 4, HEADER_SIZE + 8 + 2, HEADER_SIZE + 8 + 5 + 3])
def test_truncated_frame_is_server_lost(pair, cut: int) -> None:
    a, b = pair
    data = _frame_bytes(b"hello", [b"payload"])
    a.sendall(data[:cut])
    a.close()
    r = FrameReader(b)
    with pytest.raises(ServerLost):
        raw, sizes = r.read_message()
        for _ in sizes:
            r.read_buffer()


def test_reset_peer_is_server_lost(pair) -> None:
    a, b = pair
    a.close()
    with pytest.raises(ServerLost):
        FrameReader(b).read_message()
    with pytest.raises(ServerLost):
        for _ in range(100):  # the first send may still be accepted by the kernel
            FrameWriter(b).send(b"x" * 65536)


def test_deadline_bounds_a_dribbling_peer(pair) -> None:
    """With a deadline, a peer sending one byte at a time cannot hold the reader past it."""
    a, b = pair
    stop = threading.Event()

    def dribble() -> None:
        header = encode_header(1000, [])
        data = header + b"\x00" * 1000
        for i in range(len(data)):
            if stop.is_set():
                return
            try:
                a.sendall(data[i : i + 1])
            except OSError:
                return
            time.sleep(0.05)

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    r = FrameReader(b, deadline=time.monotonic() + 0.5)
    with pytest.raises(ServerLost, match="timed out"):
        r.read_message()  # 1008 bytes at 20/s: cannot finish in time
    stop.set()
    t.join()


# ---- message codecs ----------------------------------------------------------------------------


def _roundtrip(msg: object, decoder: msgspec.msgpack.Decoder) -> object:
    return decoder.decode(m.plain_encoder.encode(msg))


def test_every_server_message_roundtrips() -> None:
    err = m.ErrorInfo(seq=3, op="aten::add.Tensor", kind="op", message="boom")
    msgs = [
        m.Welcome(1, "s", "cpu", "CPU-backed", 10, 20, "2.13"),
        m.Refused("auth", "no"),
        m.Synced(error=err, memory_used=1, memory_peak=2, memory_limit=3),
        m.Data(nbytes=7),
        m.Value(value=1.5),
        m.Value(value=[1, 2]),
        m.OpResult(metas=[m.TensorMeta([2, 3], [3, 1], 0, "float32", 24)], values=[True, 3]),
    ]
    for msg in msgs:
        assert _roundtrip(msg, m.server_message_decoder) == msg


def test_every_command_roundtrips() -> None:
    ref = Ext(m.ExtCode.TENSOR, m.HANDLE.pack(5))
    cmds: list[m.Command] = [
        m.Op(1, "aten::add.Tensor", [ref, 2.0], {"alpha": 1}, [6], False),
        m.Upload(2, 7, "float32", [2], [1], 0, 8, False),
        m.Free([1, 2, 3]),
        m.Seed(42),
        m.Fetch(5),
        m.Item(5),
        m.Sync(),
        m.Stats(),
        m.Bye(),
    ]
    hook = lambda code, data: (code, bytes(data))  # noqa: E731
    dec = m.make_decoder(m.Batch, ext_hook=hook)
    out = dec.decode(m.plain_encoder.encode(m.Batch(cmds)))
    assert out.cmds[0].args[0] == (m.ExtCode.TENSOR, m.HANDLE.pack(5))
    assert out.cmds[1:] == cmds[1:]


@settings(max_examples=100, deadline=None)
@given(
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    op=st.text(max_size=60),
    outs=st.lists(st.integers(min_value=-1, max_value=2**63 - 1), max_size=8),
    scalars=st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=10)), max_size=8),
)
def test_op_roundtrip_property(seq: int, op: str, outs: list[int], scalars: list[object]) -> None:
    cmd = m.Op(seq, op, list(scalars), {"k": scalars[:2]}, outs, bool(seq & 1))
    batch = m.make_decoder(m.Batch).decode(m.plain_encoder.encode(m.Batch([cmd])))
    assert batch.cmds == [cmd]


@pytest.mark.parametrize(
    "payload, match",
    [
        (m.plain_encoder.encode({"type": "hello", "protocol": "1", "token": "t"}), "Expected `int`"),
        (m.plain_encoder.encode({"type": "hello", "protocol": 1}), "missing required field"),
        (m.plain_encoder.encode({"type": "hullo", "protocol": 1, "token": "t"}), "Invalid value 'hullo'"),
        (m.plain_encoder.encode([1, 2, 3]), "Expected `object`"),
        (b"\xc1", "invalid|reserved"),  # msgpack's never-used byte
        (b"\x83\xa4type", "truncated"),
        (m.plain_encoder.encode({"type": "hello", "protocol": 1, "token": Ext(9, b"")}), "got `ext`"),
    ],
)
def test_hello_decoding_is_strict(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        m.decode(m.hello_decoder, payload, "handshake")


def test_batch_with_unknown_command_tag() -> None:
    raw = m.plain_encoder.encode({"type": "batch", "cmds": [["exec", "rm -rf /"]]})
    with pytest.raises(ProtocolError, match="malformed command batch"):
        m.decode(m.make_decoder(m.Batch), raw, "command batch")


def test_command_with_wrong_field_types() -> None:
    raw = m.plain_encoder.encode({"type": "batch", "cmds": [["free", "not a list"]]})
    with pytest.raises(ProtocolError, match="Expected `array`"):
        m.decode(m.make_decoder(m.Batch), raw, "command batch")
    raw = m.plain_encoder.encode({"type": "batch", "cmds": [["fetch", 1.5]]})
    with pytest.raises(ProtocolError, match="Expected `int`"):
        m.decode(m.make_decoder(m.Batch), raw, "command batch")


def test_deep_nesting_is_a_protocol_error_not_a_crash() -> None:
    raw = m.plain_encoder.encode(m.Batch([m.Op(1, "aten::add.Tensor", [], {}, [])]))
    nested = b"\x91" * 100_000 + b"\x01"
    # A Batch whose op args are 100k nested one-element arrays.
    bad = raw.replace(b"\x90", nested, 1)
    with pytest.raises(ProtocolError, match="recursion|depth"):
        m.decode(m.make_decoder(m.Batch), bad, "command batch")


def test_reply_extensions_complex_and_dtype() -> None:
    enc = m.plain_encoder.encode
    v = m.server_message_decoder.decode(enc(m.Value(value=Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(1.0, -2.0)))))
    assert v.value == complex(1, -2)
    v = m.server_message_decoder.decode(enc(m.OpResult(values=[Ext(m.ExtCode.DTYPE, b"bfloat16")])))
    assert v.values == ["bfloat16"] and isinstance(v.values[0], m.DtypeName)


@pytest.mark.parametrize(
    "ext, match",
    [
        (Ext(m.ExtCode.DTYPE, b"float33"), "unknown dtype"),
        (Ext(m.ExtCode.DTYPE, b"x" * 1000), "unknown dtype"),
        (Ext(m.ExtCode.COMPLEX, b"\x00" * 15), "bad complex"),
        (Ext(m.ExtCode.TENSOR, m.HANDLE.pack(1)), "unexpected extension type 1"),
        (Ext(99, b""), "unexpected extension type 99"),
        (Ext(-5, b""), "unexpected extension type -5"),
    ],
)
def test_reply_with_bad_extension_is_refused(ext: Ext, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        m.decode(m.server_message_decoder, m.plain_encoder.encode(m.Value(value=ext)), "reply")


@pytest.mark.parametrize(
    "ext, match",
    [
        (Ext(m.ExtCode.DTYPE, b"float33"), "unknown dtype"),
        (Ext(m.ExtCode.DTYPE, "float32".encode("utf-16")), "unknown dtype"),
        (Ext(m.ExtCode.MEMORY_FORMAT, b"sideways"), "unknown memory format"),
        (Ext(m.ExtCode.LAYOUT, b"sparse_coo"), "unknown layout"),
        (Ext(m.ExtCode.TENSOR, b"\x01\x02"), "bad tensor reference"),
        (Ext(m.ExtCode.DEVICE, b"cuda:1"), "bad device"),
        (Ext(m.ExtCode.COMPLEX, b""), "bad complex"),
        (Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode(("float32", [2], b"\x00" * 4))), "size mismatch"),
        (Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode(("float99", [], b""))), "bad inline tensor"),
        (Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode(("float32", [-1], b""))), "bad inline tensor"),
        (Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode(("float32", [0, 2**62, 2**62], b""))), "inline tensor"),
        (Ext(m.ExtCode.CPU_TENSOR, b"\xc1"), "inline tensor|invalid|reserved"),
        (Ext(m.ExtCode.CPU_TENSOR, b"\x00" * (m.MAX_EXT_BYTES + 1)), "too large"),
        (Ext(42, b""), "unknown extension type 42"),
    ],
)
def test_server_side_command_decoding_is_strict(ext: Ext, match: str) -> None:
    """The executor's decoder: every extension payload is validated while decoding."""
    torch = pytest.importorskip("torch")
    from gpupool.server.executor import Executor

    ex = Executor(torch.device("cpu"), 1 << 20)
    raw = m.plain_encoder.encode(m.Batch([m.Op(1, "aten::add.Tensor", [ext], {}, [1])]))
    with pytest.raises(ProtocolError, match=match):
        m.decode(ex.decoder, raw, "command batch")


def test_server_side_decoding_of_valid_extensions() -> None:
    torch = pytest.importorskip("torch")
    from gpupool.server.executor import Executor, Ref

    ex = Executor(torch.device("cpu"), 1 << 20)
    args = [
        Ext(m.ExtCode.TENSOR, m.HANDLE.pack(7)),
        Ext(m.ExtCode.DTYPE, b"bfloat16"),
        Ext(m.ExtCode.DEVICE, b""),
        Ext(m.ExtCode.MEMORY_FORMAT, b"channels_last"),
        Ext(m.ExtCode.LAYOUT, b"strided"),
        Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(0.5, 2.0)),
        Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode(("int16", [2], b"\x01\x00\x02\x00"))),
    ]
    batch = ex.decoder.decode(m.plain_encoder.encode(m.Batch([m.Op(1, "aten::x", args, {}, [])])))
    got = batch.cmds[0].args
    assert isinstance(got[0], Ref) and got[0].handle == 7
    assert got[1:6] == [torch.bfloat16, torch.device("cpu"), torch.channels_last, torch.strided, complex(0.5, 2.0)]
    assert torch.equal(got[6], torch.tensor([1, 2], dtype=torch.int16))


# ---- the op allowlist --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, reason",
    [
        ("aten::add.Tensor", None),
        ("aten::mm", None),
        ("os::system", "namespace 'os'"),
        ("prims::add", "namespace 'prims'"),
        ("aten::from_file", "not allowed"),
        ("aten::_reshape_alias", "not allowed"),
        ("aten", "malformed"),
        ("aten::", "malformed"),
        ("::add", "namespace ''"),
        ("aten::" + "x" * 300, "malformed"),
        ("aten::ädd", "malformed"),
    ],
)
def test_op_names(name: str, reason: str | None) -> None:
    got = check_op_name(name)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_denied_ops_are_all_aten() -> None:
    assert all(n.startswith("aten::") for n in DENIED)


def test_read_ahead_keeps_frames_apart_and_never_writes_to_empty_views(pair) -> None:
    """Two frames in one write: the reader takes both in one recv (read-ahead), and a zero-byte
    buffer may be read into a read-only empty view (an empty tensor's bytes) while bytes of the
    next frame are already buffered."""
    a, b = pair
    first = _frame_bytes(b"\x91\x01", [b"", b"abc"])
    second = _frame_bytes(b"\x91\x02", [b"xyz"])
    a.sendall(first + second)
    r = FrameReader(b)
    raw, sizes = r.read_message()
    assert bytes(raw) == b"\x91\x01" and sizes == [0, 3]
    r.read_buffer_into(memoryview(b""))  # read-only and empty: must not be assigned to
    out = bytearray(3)
    r.read_buffer_into(memoryview(out))
    assert bytes(out) == b"abc"
    raw, sizes = r.read_message()
    assert bytes(raw) == b"\x91\x02" and sizes == [3]
    assert bytes(r.read_buffer()) == b"xyz"


def test_unknown_fields_and_extra_elements_are_protocol_errors() -> None:
    """Issue 10: unknown msgpack fields were silently ignored."""
    batch = m.make_decoder(m.Batch)
    with pytest.raises(ProtocolError, match="unknown field `hidden`"):
        m.decode(m.hello_decoder, msgspec.msgpack.encode(
            {"type": "hello", "protocol": 3, "token": "t", "hidden": 1}), "handshake")
    with pytest.raises(ProtocolError, match="unknown field `also`"):
        m.decode(batch, msgspec.msgpack.encode({"type": "batch", "cmds": [], "also": 1}), "batch")
    with pytest.raises(ProtocolError, match="length"):  # an array-like command with one more element
        m.decode(batch, msgspec.msgpack.encode({"type": "batch", "cmds": [["free", [1], 2]]}), "batch")
    with pytest.raises(ProtocolError, match="unknown field"):
        m.decode(m.server_message_decoder, msgspec.msgpack.encode(
            {"type": "refused", "code": "auth", "message": "no", "extra": True}), "reply")
    ok = m.decode(batch, msgspec.msgpack.encode({"type": "batch", "cmds": [["free", [1]]]}), "batch")
    assert ok == m.Batch([m.Free([1])])
