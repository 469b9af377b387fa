"""Command streams to start fuzzing from: built here with the protocol's encoders, and recorded
from a real client's training step (`record`), as lists of frames (message, buffers).

Handles: seeds use 1..99 for what they make; `PREAMBLE_HANDLES` are the tensors the executor
harness creates before each input, so any stream may refer to them.

    python -m tools.fuzz.corpus record HOST:PORT TOKEN OUT   # record a training step's frames
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import msgspec

from gpupool.protocol import messages as m

Ext = msgspec.msgpack.Ext
Frame = tuple[bytes, list[bytes]]

#: (handle, dtype, shape, raw bytes) of the tensors the executor harness uploads first.
PREAMBLE: list[tuple[int, str, list[int], bytes]] = [
    (901, "float32", [4, 4], struct.pack("<16f", *[i * 0.5 - 3 for i in range(16)])),
    (902, "float32", [8], struct.pack("<8f", *range(8))),
    (903, "int64", [5], struct.pack("<5q", 0, 1, 2, 3, 4)),
    (904, "bool", [3], b"\x01\x00\x01"),
    (905, "float64", [2, 3], struct.pack("<6d", 1.5, -2, 0, 4, 1e-3, 7)),
    (906, "uint8", [16], bytes(range(16))),
    (907, "int32", [2, 2], struct.pack("<4i", 1, 0, 0, 1)),
    (908, "float32", [], struct.pack("<f", 2.0)),
]
PREAMBLE_HANDLES = [h for h, *_ in PREAMBLE]
DTYPES = sorted(["float32", "float64", "float16", "bfloat16", "complex64", "complex128", "uint8", "int8",
                 "int16", "int32", "int64", "bool"])


def ref(handle: int) -> Ext:
    return Ext(m.ExtCode.TENSOR, m.HANDLE.pack(handle & 0xFFFF_FFFF_FFFF_FFFF))


def dtype(name: str) -> Ext:
    return Ext(m.ExtCode.DTYPE, name.encode())


DEVICE = Ext(m.ExtCode.DEVICE, b"")


def frame(cmds: list[Any], buffers: list[bytes] | None = None) -> Frame:
    return m.plain_encoder.encode(m.Batch(cmds)), list(buffers or [])


def upload(seq: int, handle: int, dt: str, shape: list[int], data: bytes) -> tuple[m.Upload, bytes]:
    stride: list[int] = []
    acc = 1
    for s in reversed(shape):
        stride.insert(0, acc)
        acc *= s
    return m.Upload(seq, handle, dt, shape, stride, 0, len(data)), data


def preamble_frame() -> Frame:
    cmds, bufs = [], []
    for i, (h, dt, shape, data) in enumerate(PREAMBLE):
        c, b = upload(-100 - i, h, dt, shape, data)
        cmds.append(c)
        bufs.append(b)
    return frame(cmds, bufs)


def seed_sessions() -> list[list[Frame]]:
    """Small sessions that use every command and extension type, each a list of frames."""
    f32 = struct.pack("<12f", *range(12))
    up1, b1 = upload(1, 1, "float32", [3, 4], f32)
    up2, b2 = upload(2, 2, "float32", [4, 3], f32)
    inline = Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode(["int64", [2], struct.pack("<2q", 1, 0)]))
    cplx = Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(1.0, -2.0))
    sessions = [
        [frame([up1, up2], [b1, b2]),
         frame([m.Op(3, "aten::mm", [ref(1), ref(2)], {}, [3], True),
                m.Op(4, "aten::add.Tensor", [ref(3), ref(3)], {"alpha": 2}, [4]),
                m.Op(5, "aten::sum", [ref(4)], {}, [5]), m.Item(5), m.Fetch(4), m.Sync()])],
        [frame([up1], [b1]),
         frame([m.Op(2, "aten::transpose.int", [ref(1), 0, 1], {}, [6], True),
                m.Op(3, "aten::mul_.Tensor", [ref(1), ref(1)], {}, [-1]),
                m.Op(4, "aten::index_select", [ref(1), 0, inline], {}, [7], True),
                m.Op(5, "aten::_to_copy", [ref(7)], {"dtype": dtype("float64")}, [8]),
                m.Op(6, "aten::empty.memory_format", [[2, 3]], {"dtype": dtype("float32"), "device": DEVICE}, [9]),
                m.Op(7, "aten::fill_.Scalar", [ref(9), 1.5], {}, [-1]), m.Fetch(9),
                m.Free([6, 7]), m.Stats()])],
        [frame([m.Seed(1234), m.Op(1, "aten::empty.memory_format", [[4, 4]], {"device": DEVICE}, [10]),
                m.Op(1, "aten::normal_", [ref(10), 0.0, 1.0], {}, [-1]),
                m.GetRngState(), m.Op(2, "aten::abs", [ref(10)], {}, [11], True),
                m.Op(3, "aten::mul.Scalar", [ref(11), cplx], {}, [12], True),
                m.Op(4, "aten::zeros_like", [ref(10)], {"dtype": dtype("int64")}, [13]),
                m.Op(4, "aten::arange.start_out", [0, 10, 2], {"out": ref(13)}, [-1]),
                m.Item(13), m.Sync()]),
         frame([m.SetRngState(b"\x00" * 16), m.Bye()])],
        [frame([up1], [b1]),
         frame([m.Op(2, "aten::add.out", [ref(1), ref(1)], {"out": ref(1)}, [-1]),
                m.Op(3, "aten::view", [ref(1), [12]], {}, [14], True),
                m.Op(4, "aten::as_strided", [ref(1), [2, 2], [1, 1], 0], {}, [15], True),
                m.Op(5, "aten::max.dim", [ref(1), 1], {}, [16, 17], True),
                m.Op(6, "aten::cat", [[ref(1), ref(1)]], {}, [18]),
                m.Op(7, "aten::resize_", [ref(18), [4, 4]], {}, [-1]),
                m.Fetch(14), m.Fetch(18), m.Sync()]),
         frame([m.Upload(8, 1, "float32", [3, 4], [4, 1], 0, 48, True)], [b1]),
         frame([m.Op(9, "aten::relu_", [ref(1)], {}, [-1], True, [14, 15]), m.Sync()])],
        # Step replay: a trace (templates with value, slot and scalar references), replays of
        # it whole and in parts with frees at positions, a forget, a replay of the forgotten.
        [frame([up1], [b1]),
         frame([_trace_seed(), m.Replay(2, 1, 0, 2, (1 << 48), [1, 1], [0.5]),
                m.Replay(3, 1, 0, 1, (1 << 48) + 8, [1, 1], [], [m.FreeAt(0, [1 << 48])]),
                m.Replay(4, 1, 1, 2, (1 << 48) + 8, [], [2.0]), m.Fetch((1 << 48) + 9), m.Sync()]),
         frame([m.Forget(1), m.Replay(5, 1, 0, 2, (1 << 48) + 16, [1, 1], [0.5]), m.Sync()])],
        # gpupool's own ops: a whole LSTM layer forward and backward on uploaded weights.
        [frame(*_rnn_seed())],
    ]
    return sessions


def _template(args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    return msgspec.msgpack.encode([args, kwargs or {}])


def _trace_seed() -> m.Trace:
    """add(slot0, slot1) -> v0; mul(v0, scalar0) -> v1."""
    slot = [Ext(m.ExtCode.SLOT, m.HANDLE.pack(i)) for i in range(2)]
    return m.Trace(1, [
        m.TraceOp("aten::add.Tensor", _template([slot[0], slot[1]]), [0]),
        m.TraceOp("aten::mul.Scalar", _template([Ext(m.ExtCode.VALUE, m.HANDLE.pack(0)),
                                                 Ext(m.ExtCode.SCALAR, m.HANDLE.pack(0) + b"f")]), [1]),
    ], 2)


def _rnn_seed() -> tuple[list[Any], list[bytes]]:
    """input (5, 2, 3), h0 and c0 (1, 2, 4), one layer of weights (16x3, 16x4, 16, 16)."""
    shapes = [(31, [5, 2, 3]), (32, [1, 2, 4]), (33, [1, 2, 4]), (34, [16, 3]), (35, [16, 4]), (36, [16]), (37, [16])]
    cmds: list[Any] = []
    bufs: list[bytes] = []
    for i, (h, shape) in enumerate(shapes):
        n = 1
        for d in shape:
            n *= d
        c, b = upload(20 + i, h, "float32", shape, struct.pack(f"<{n}f", *[(j % 7) * 0.1 for j in range(n)]))
        cmds.append(c)
        bufs.append(b)
    need = [True, False, False, True, True, True, True]
    cmds += [m.Op(40, "gpupool::rnn", [0, ref(31), [ref(32), ref(33)], [ref(h) for h in range(34, 38)],
                                       True, 1, 0.0, True, False, False, need], {}, [41, 42, 43, 44]),
             m.Op(41, "gpupool::rnn_backward", [ref(44), [ref(41), None, None], [ref(h) for h in (31, 34, 35, 36, 37)]],
                  {}, [45, 46, 47, 48, 49]),
             m.Fetch(45), m.Sync()]
    return cmds, bufs


def seed_streams() -> list[bytes]:
    """Each seed session as one byte stream, and each of its frames alone."""
    from tools.fuzz.common import join_frames

    out = []
    for s in seed_sessions():
        out.append(join_frames(s))
        out.extend(join_frames([f]) for f in s)
    return out


# ---- recording a real client ------------------------------------------------------------------


def save(frames: list[Frame], path: Path | str) -> None:
    Path(path).write_bytes(msgspec.msgpack.encode([[msg, bufs] for msg, bufs in frames]))


def load(path: Path | str) -> list[Frame]:
    raw = msgspec.msgpack.decode(Path(path).read_bytes(), type=list[tuple[bytes, list[bytes]]])
    return [(msg, list(bufs)) for msg, bufs in raw]


class RecordingProxy:
    """A TCP proxy on loopback that keeps what the client sends (the server's side is relayed)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = bytearray()
        self.closed = threading.Event()  # the client's side ended
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        up = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, keep: bool) -> None:
        try:
            while True:
                b = src.recv(1 << 16)
                if not b:
                    break
                if keep:
                    self.sent += b
                dst.sendall(b)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if keep:
                self.closed.set()


def record(address: str, token: str, out: Path | str) -> int:
    """Run a small model's training steps through a proxy to the server at `address`; save the
    frames the client sent after its hello. Returns how many."""
    import torch
    from tools.fuzz.common import split_frames

    import gpupool

    proxy = RecordingProxy(address)
    torch.manual_seed(0)
    with gpupool.connect(proxy.address, token=token) as s:
        dev = s.device
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(32, 8).to(dev), torch.randint(0, 4, (32,)).to(dev)
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            float(loss)
        (model(x).softmax(-1).argmax(-1) == y).float().mean().item()
    proxy.closed.wait(30)
    frames = split_frames(proxy.sent)
    if not frames:
        raise RuntimeError("recorded no whole frames")
    save(frames[1:], out)  # frames[0] is the hello
    return len(frames) - 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "record":
        print(f"recorded {record(sys.argv[2], sys.argv[3], sys.argv[4])} frames", flush=True)
    else:
        raise SystemExit(__doc__)
