"""Every message of the wire format, as typed immutable records, and their strict codecs.

Client -> server: `Hello` once, then `Batch` frames of commands. Commands that need an answer
(`Fetch`, `Item`, `Sync`, an `Op` with ``reply=True``) make the server send one reply frame;
everything else is fire-and-forget, like kernels queued on a CUDA stream.

Op arguments are msgpack values; the few torch objects they hold travel as msgpack extension
types (see `ExtCode`). The decoder accepts only those codes, with bounded payloads.

Every record forbids unknown fields (and array-like ones extra elements): a frame with a field
this version does not know is a protocol error, not silently half-read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgspec

from gpupool.errors import ProtocolError
from gpupool.protocol.dtypes import DTYPE_NAMES


class ExtCode:
    """msgpack extension codes used inside op arguments."""

    TENSOR = 1  # payload: u64 handle
    DTYPE = 2  # payload: dtype name, e.g. b"float32"
    DEVICE = 3  # payload: empty; always the session's device on the server
    MEMORY_FORMAT = 4  # payload: name, e.g. b"contiguous_format"
    LAYOUT = 5  # payload: name, e.g. b"strided"
    COMPLEX = 6  # payload: two f64
    CPU_TENSOR = 7  # payload: small host tensor inline: dtype name, shape, raw bytes (msgpack)
    # Only inside a `TraceOp`'s template (decoded by the trace decoder, refused elsewhere):
    VALUE = 8  # payload: u64 value number: a tensor an earlier op of the trace made
    SLOT = 9  # payload: u64 slot number: a tensor from outside, named by the replay
    SCALAR = 10  # payload: u64 scalar number, then one kind byte: b"f" float, b"i" int, b"c" complex


#: The kind byte of a `SCALAR` reference, and the Python type a replay must give it.
SCALAR_KINDS: dict[bytes, type] = {b"f": float, b"i": int, b"c": complex}


HANDLE = struct.Struct("<Q")
COMPLEX = struct.Struct("<dd")
#: Largest extension payload (an inline host tensor) a decoder accepts.
MAX_EXT_BYTES = 64 * 1024


# ---- handshake -------------------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", frozen=True, forbid_unknown_fields=True):
    """`lease`: a controller-signed lease (pool mode); `gpu`: which of its GPUs this session uses.
    Without a lease, `token` must be the server's static token.

    With `hold` (and a lease), the connection is the lease holder's lifeline, not a session: the
    server answers `Welcome`, then sends nothing until the lease ends. When a hold connection
    closes while its lease is still active (`gpupool run` was killed), the server ends the lease's
    sessions and tells the controller, so the GPU is free at once instead of at the lease's expiry.
    """

    protocol: int
    token: str
    client: str = ""
    lease: str = ""
    gpu: int = 0
    hold: bool = False


class Welcome(msgspec.Struct, tag="welcome", frozen=True, forbid_unknown_fields=True):
    protocol: int
    session: str
    device_kind: str  # "cuda" or "cpu" (a CPU-backed device, labelled as such)
    device_name: str
    memory_limit: int
    memory_total: int
    torch_version: str


class Refused(msgspec.Struct, tag="refused", frozen=True, forbid_unknown_fields=True):
    code: str  # "auth", "version", "busy", "protocol"
    message: str


# ---- commands --------------------------------------------------------------------------------


class Op(msgspec.Struct, tag="op", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Run aten op `op` (e.g. "aten::add.Tensor"); tensor results are stored under `outs`.

    `outs` has one entry per tensor in the flattened result: a new handle, or -1 where the
    result is an input returned again (in-place and out= ops) and needs no new handle.
    With `reply`, the server answers with `OpResult` (metadata and non-tensor values).
    `frees`: handles to free before the op runs (tensors the client dropped before it made the
    op), so the op can use their memory; a separate `free` command would cost a command per op
    in a loop like `c = a + b`.
    """

    seq: int
    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    outs: list[int]
    reply: bool = False
    frees: list[int] = []


class Upload(msgspec.Struct, tag="up", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Host data for a tensor follows as the frame's next raw buffer.

    With `into`, the bytes fill the existing tensor `handle` (same dtype, contiguous, `nbytes`
    matching); otherwise a new tensor of the given layout is created under `handle`.
    """

    seq: int
    handle: int
    dtype: str
    shape: list[int]
    stride: list[int]
    offset: int
    nbytes: int
    into: bool = False


class Free(msgspec.Struct, tag="free", array_like=True, frozen=True, forbid_unknown_fields=True):
    handles: list[int]


class Seed(msgspec.Struct, tag="seed", array_like=True, frozen=True, forbid_unknown_fields=True):
    seed: int


class Fetch(msgspec.Struct, tag="fetch", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Send back the tensor's elements, contiguous, as one raw buffer (`Data`)."""

    handle: int


class Item(msgspec.Struct, tag="item", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Send back the value of a one-element tensor (`Value`)."""

    handle: int


class Sync(msgspec.Struct, tag="sync", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Answer `Synced` once every earlier command has run."""


class Stats(msgspec.Struct, tag="stats", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Answer `Synced` with memory use; a sync point like `Sync`."""


#: Largest generator state accepted (a CPU generator's is about 5 KB, a CUDA one's 16 bytes).
MAX_RNG_STATE = 64 * 1024


class GetRngState(msgspec.Struct, tag="getrng", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Answer `Value` with the session generator's state as bytes (a sync point)."""


class SetRngState(msgspec.Struct, tag="setrng", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Restore the session generator's state (as `torch.Generator.set_state`)."""

    state: bytes


class Bye(msgspec.Struct, tag="bye", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Clean end of the session."""


# ---- step replay (client/replay.py, server/traces.py) -----------------------------------------


class TraceOp(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One op of a trace. `args`: msgpack `[args, kwargs]` whose tensors are `VALUE` and `SLOT`
    references and whose per-replay scalars are `SCALAR` references (no handles); `outs`: per
    flattened tensor result, the value number it becomes (numbered in order) or -1 for an input
    returned again."""

    op: str
    args: bytes
    outs: list[int]


class Trace(msgspec.Struct, tag="trace", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Register (or replace) trace `trace`; the server answers `Value` with "" when it accepted
    it, or with why not (a sync point for the trace only: earlier errors stay pending)."""

    trace: int
    ops: list[TraceOp]
    values: int


class FreeAt(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Handles to free just before op `at` of a replay runs."""

    at: int
    handles: list[int]


class Replay(msgspec.Struct, tag="replay", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Run ops `start` to `stop` (exclusive) of trace `trace`: value v is stored under handle
    `base + v`; `slots` and `scalars` are those of the ops in that range, in order."""

    seq: int
    trace: int
    start: int
    stop: int
    base: int
    slots: list[int]
    scalars: list[Any]
    frees: list[FreeAt] = []


class Forget(msgspec.Struct, tag="forget", array_like=True, frozen=True, forbid_unknown_fields=True):
    """Drop trace `trace`."""

    trace: int


Command = Op | Upload | Free | Seed | Fetch | Item | Sync | Stats | GetRngState | SetRngState | Bye | Trace | Replay | Forget


class Batch(msgspec.Struct, tag="batch", frozen=True, forbid_unknown_fields=True):
    cmds: list[Command]


ClientMessage = Hello | Batch


# ---- replies ---------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The first failure since the last reply. `seq` is the command's sequence number."""

    seq: int
    op: str
    kind: str  # "op", "oom", "handle", "unknown_op", "denied", "protocol"
    message: str
    at: int = -1  # in a `Replay`: the failed op's position in its trace


class TensorMeta(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    shape: list[int]
    stride: list[int]
    offset: int
    dtype: str
    storage_bytes: int


class Synced(msgspec.Struct, tag="synced", frozen=True, forbid_unknown_fields=True):
    error: ErrorInfo | None = None
    memory_used: int = 0
    memory_peak: int = 0
    memory_limit: int = 0


class Data(msgspec.Struct, tag="data", frozen=True, forbid_unknown_fields=True):
    """One raw buffer follows unless `error` is set."""

    error: ErrorInfo | None = None
    nbytes: int = 0


class Value(msgspec.Struct, tag="value", frozen=True, forbid_unknown_fields=True):
    error: ErrorInfo | None = None
    value: Any = None


class OpResult(msgspec.Struct, tag="opresult", frozen=True, forbid_unknown_fields=True):
    error: ErrorInfo | None = None
    metas: list[TensorMeta] = []
    values: list[Any] = []


ServerMessage = Welcome | Refused | Synced | Data | Value | OpResult


# ---- codecs ----------------------------------------------------------------------------------


def _reject_ext(code: int, data: memoryview) -> Any:
    raise msgspec.ValidationError(f"unexpected extension type {code}")


class DtypeName(str):
    """A dtype that arrived as an extension value, by its wire name (see `dtypes.DTYPE_NAMES`)."""


def reply_ext_hook(code: int, data: memoryview) -> Any:
    """Extension values a server may put in replies: complex scalars and dtypes."""
    if code == ExtCode.COMPLEX:
        if len(data) != COMPLEX.size:
            raise msgspec.ValidationError("bad complex value")
        re, im = COMPLEX.unpack(data)
        return complex(re, im)
    if code == ExtCode.DTYPE:
        name = bytes(data[:64]).decode("ascii", "replace")
        if len(data) > 64 or name not in DTYPE_NAMES:
            raise msgspec.ValidationError(f"unknown dtype {name!r}")
        return DtypeName(name)
    raise msgspec.ValidationError(f"unexpected extension type {code}")


def make_decoder(kind: Any, ext_hook: Callable[[int, memoryview], Any] | None = None) -> msgspec.msgpack.Decoder:
    """A strict decoder for `kind`; extension types are refused unless `ext_hook` takes them."""
    return msgspec.msgpack.Decoder(kind, ext_hook=ext_hook or _reject_ext)


def make_encoder(enc_hook: Callable[[Any], Any] | None = None) -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder(enc_hook=enc_hook)


def decode(decoder: msgspec.msgpack.Decoder, raw: bytes | bytearray | memoryview, what: str) -> Any:
    """Decode with `decoder`; anything malformed becomes one `ProtocolError` naming `what`.

    Note: msgspec signals nesting deeper than the interpreter's recursion limit with
    `RecursionError`, not a decode error; a peer can send that with a few KiB, so it is caught.
    """
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ProtocolError(f"malformed {what}: {e}") from None


server_message_decoder = make_decoder(ServerMessage, ext_hook=reply_ext_hook)
hello_decoder = make_decoder(Hello)
plain_encoder = make_encoder()
