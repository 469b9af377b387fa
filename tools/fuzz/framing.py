"""Harness: `FrameReader` (protocol/framing.py) on fuzzed byte streams, against a reference.

Each input configures a reader (read-ahead size, limits, how the bytes trickle in: the sizes of
successive receives, and whether the stream ends in a close or a reset) and how its consumer
takes each frame's buffers (read whole, read into a view of the wrong size, skip, or leave for
the next `read_message` to skip); the rest of the input is the stream. The same stream and plan
run through `reference_trace`, a plain reading of the format in framing.py's docstring, and the
two traces of what was read must agree. Only `ProtocolError` and `ServerLost` may come out of the
reader. A second mode writes frames with `FrameWriter` (`send`, `send_stream`) and reads them back.

    python -m tools.fuzz.framing CORPUS -max_total_time=60    # one libFuzzer run, by hand
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["gpupool"]):
    from gpupool.errors import ProtocolError, ServerLost
    from gpupool.protocol import framing
    from gpupool.protocol.framing import FrameReader, FrameWriter, Limits

from tools.fuzz.common import FakeSocket, describe, exception_signature, join_frames, write_seeds

READAHEADS = (0, 1, 8, 9, 64, 4096, framing.READAHEAD)
MAX_MESSAGES = (0, 1, 16, 4096, 64 * 1024, 64 * 1024 * 1024)
MAX_BUFFERS = (0, 1, 3, 4096)
MAX_BUFFER_BYTES = (0, 10, 4096, 1 << 20, 1 << 40)
#: A consumer never allocates more than this for one buffer (the stream would end first).
BIG = 1 << 20
#: Consumer actions per buffer.
READ, READ_INTO, WRONG_SIZE, SKIP, LEAVE, EXTRA = range(6)


class Plan:
    """What the consumer does with each buffer, drawn from a seed (identical in both readers)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed or b"\x00"
        self._i = 0

    def next(self) -> int:
        b = self._seed[self._i % len(self._seed)]
        self._i += 1
        return b % 6


def real_trace(stream: bytes, readahead: int, limits: Limits, chunks: list[int], reset: bool,
               plan: Plan) -> list[Any]:
    sock = FakeSocket(stream, chunks, reset)
    r = FrameReader(sock, limits, readahead=readahead)  # type: ignore[arg-type]
    trace: list[Any] = []
    try:
        for _ in range(10_000):
            msg, sizes = r.read_message()
            trace.append(("msg", bytes(msg), tuple(sizes)))
            for n in sizes:
                act = plan.next()
                if act == LEAVE:
                    break  # the next read_message skips what is left
                if act == WRONG_SIZE:
                    try:
                        r.read_buffer_into(memoryview(bytearray(n + 1 if n <= BIG else 0)))
                        trace.append(("wrong-size-accepted", n))
                    except ProtocolError:
                        trace.append(("refused", n))
                    act = SKIP
                if act == SKIP or n > BIG:
                    r.skip_next()
                    trace.append(("skip", n))
                elif act == READ_INTO:
                    buf = bytearray(n)
                    r.read_buffer_into(memoryview(buf))
                    trace.append(("buf", bytes(buf)))
                else:
                    trace.append(("buf", bytes(r.read_buffer())))
            else:
                if plan.next() == EXTRA:
                    try:
                        r.read_buffer()
                        trace.append(("extra-read-accepted",))
                    except ProtocolError:
                        trace.append(("no-buffer",))
        trace.append(("too-many",))
    except ProtocolError:
        trace.append(("protocol-error",))
    except ServerLost:
        trace.append(("lost",))
    return trace


def reference_trace(stream: bytes, limits: Limits, plan: Plan) -> list[Any]:
    """The same reading, from the format's description alone."""
    pos = 0
    trace: list[Any] = []

    class Lost(Exception):
        pass

    def take(n: int) -> bytes:
        nonlocal pos
        if len(stream) - pos < n:
            raise Lost
        out = stream[pos:pos + n]
        pos += n
        return out

    try:
        pending: list[int] = []
        for _ in range(10_000):
            for n in pending:
                take(n)
            pending = []
            head = take(8)
            magic, nbufs, msglen = head[:2], int.from_bytes(head[2:4], "little"), int.from_bytes(head[4:8], "little")
            if magic != b"GP" or msglen > limits.max_message or nbufs > limits.max_buffers:
                trace.append(("protocol-error",))
                return trace
            sizes = [int.from_bytes(take(8), "little") for _ in range(nbufs)]
            if sum(sizes) > limits.max_buffer_bytes:
                trace.append(("protocol-error",))
                return trace
            msg = take(msglen)
            trace.append(("msg", msg, tuple(sizes)))
            rest = list(sizes)
            for n in sizes:
                act = plan.next()
                if act == LEAVE:
                    break
                if act == WRONG_SIZE:
                    trace.append(("refused", n))
                    act = SKIP
                rest.pop(0)
                if act == SKIP or n > BIG:
                    take(n)
                    trace.append(("skip", n))
                else:
                    trace.append(("buf", take(n)))
            else:
                if plan.next() == EXTRA:
                    trace.append(("no-buffer",))
            pending = rest
        trace.append(("too-many",))
    except Lost:
        trace.append(("lost",))
    return trace


def _writer_roundtrip(fdp: atheris.FuzzedDataProvider) -> None:
    """Frames written by `FrameWriter` read back as they were sent."""
    sink = FakeSocket()
    w = FrameWriter(sink)  # type: ignore[arg-type]
    sent: list[tuple[bytes, list[bytes]]] = []
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        msg = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        bufs = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 70_000)) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        if len(bufs) == 1 and fdp.ConsumeBool():
            step = fdp.ConsumeIntInRange(1, 5000)
            w.send_stream(msg, len(bufs[0]), (memoryview(bufs[0])[i:i + step] for i in range(0, len(bufs[0]), step)))
        else:
            w.send(msg, [memoryview(b) for b in bufs])
        sent.append((msg, bufs))
    if bytes(sink.sent) != join_frames(sent):
        raise AssertionError("FrameWriter wrote other bytes than the format says")
    chunks = [fdp.ConsumeIntInRange(1, 70_000) for _ in range(3)]
    r = FrameReader(FakeSocket(bytes(sink.sent), chunks), readahead=fdp.PickValueInList(list(READAHEADS)))  # type: ignore[arg-type]
    for msg, bufs in sent:
        got, sizes = r.read_message()
        if bytes(got) != msg or sizes != [len(b) for b in bufs]:
            raise AssertionError("a written frame read back differently")
        for b in bufs:
            if bytes(r.read_buffer()) != b:
                raise AssertionError("a written buffer read back differently")


def _stream_too_short(fdp: atheris.FuzzedDataProvider) -> None:
    """`send_stream` whose chunks do not add up must raise `ProtocolError`, never send more."""
    sink = FakeSocket()
    n = fdp.ConsumeIntInRange(0, 5000)
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6000))
    try:
        FrameWriter(sink).send_stream(b"m", n, iter([memoryview(data)]))  # type: ignore[arg-type]
        ok = len(data) == n
    except ProtocolError:
        ok = len(data) != n
    if not ok or len(sink.sent) > 8 + 8 + 1 + n:
        raise AssertionError(f"send_stream of {len(data)} bytes announced as {n}: wrong outcome")


_findings = None


def parse_input(data: bytes) -> tuple[int, Limits, list[int], bool, bytes, bytes]:
    """An input's reader configuration, plan and stream, by plain position (seeds can be
    written by hand): read-ahead, three limits, the number of receive sizes and each (u16),
    reset, the plan's length, the plan, then the stream."""
    b = data + bytes(max(0, 8 - len(data)))
    readahead = READAHEADS[b[1] % len(READAHEADS)]
    limits = Limits(MAX_MESSAGES[b[2] % len(MAX_MESSAGES)], MAX_BUFFERS[b[3] % len(MAX_BUFFERS)],
                    MAX_BUFFER_BYTES[b[4] % len(MAX_BUFFER_BYTES)])
    n = b[5] % 5
    pos = 6
    chunks = []
    for _ in range(n):
        raw = b[pos:pos + 2].ljust(2, b"\x00")
        chunks.append(1 + int.from_bytes(raw, "little") * (1 if raw[1] < 0x80 else 3))
        pos += 2
    reset = bool(b[pos] & 1) if pos < len(b) else False
    plan_len = (b[pos + 1] % 17) if pos + 1 < len(b) else 0
    plan = b[pos + 2:pos + 2 + plan_len]
    return readahead, limits, chunks, reset, plan, data[pos + 2 + plan_len:]


def test_one(data: bytes) -> None:
    if not data:
        return
    mode = data[0] % 16
    try:
        if mode == 0:
            _writer_roundtrip(atheris.FuzzedDataProvider(data[1:]))
            return
        if mode == 1:
            _stream_too_short(atheris.FuzzedDataProvider(data[1:]))
            return
        readahead, limits, chunks, reset, seed, stream = parse_input(data)
        got = real_trace(stream, readahead, limits, chunks, reset, Plan(seed))
        want = reference_trace(stream, limits, Plan(seed))
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise AssertionError(f"reader and reference differ at event {at}: {got[at:at + 1]} != {want[at:at + 1]} "
                                 f"(readahead {readahead}, limits {vars(limits)}, chunks {chunks})")
    except AssertionError as e:
        _record("invariant", e, data)
    except Exception as e:  # noqa: BLE001 - anything else out of the reader is a crash
        _record("crash", e, data)


def _record(kind: str, e: BaseException, data: bytes) -> None:
    global _findings
    from tools.fuzz.libfuzzer import findings_here

    if _findings is None:
        _findings = findings_here()
    sig = exception_signature(e, "framing: ") if kind == "crash" else f"framing: {str(e).split(':')[0]}"
    _findings.add(kind, sig, describe(e), data)


def seeds() -> list[bytes]:
    """Inputs to start from: well-formed streams under each reader configuration and plan."""
    from tools.fuzz.corpus import seed_streams

    out = []
    for i, stream in enumerate(seed_streams()[:24]):
        plan = bytes((i + k) % 6 for k in range(1 + i % 5))
        sizes = [1 + i % 7, 3 + i] if i % 3 else []
        head = bytes([2 + i % 14, i % len(READAHEADS), 5, 3, 4, len(sizes)])
        head += b"".join(n.to_bytes(2, "little") for n in sizes)
        out.append(head + bytes([i % 2, len(plan)]) + plan + stream)
    with_buffers = join_frames([(b"abc", [b"x" * 10, b"y" * 5]), (b"", [b""]), (b"def", [])])
    for act in range(6):
        out.append(bytes([2, 4, 5, 3, 4, 1, 3, 0, 0, 3, act, act, (act + 1) % 6]) + with_buffers)
    out.append(bytes([0]) + bytes(range(64)))  # the writer's round trip
    out.append(bytes([1]) + bytes(range(64)))
    return out


def self_check() -> int:
    """Run the seeds against a reader with a bug put in (`skip_next` skips a byte too few);
    returns how many of them the harness caught. For tests: the oracle must see it."""
    import tempfile

    global _findings
    from tools.fuzz.common import Findings

    _findings = Findings(tempfile.mkdtemp(prefix="gpupool-fuzz-selfcheck-"))

    def skip_short(self: FrameReader) -> None:
        n = self._pending.pop(0)
        if n:
            self._recv_exact_into(memoryview(bytearray(n - 1)))

    FrameReader.skip_next = skip_short  # type: ignore[method-assign]
    for s in seeds():
        test_one(s)
    return sum(f["count"] for f in _findings.load())


def main() -> None:
    if sys.argv[1:] == ["--self-check"]:
        caught = self_check()
        print(f"caught {caught}")
        sys.exit(0 if caught else 1)
    write_seeds(sys.argv, seeds())
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
