"""Harness: every decoder of the wire's messages on fuzzed msgpack.

The decoders: the listener's `hello_decoder`, a server's command decoder (an `Executor`'s, with
its extension hook: tensor references, dtypes, the device, inline host tensors), and the two
reply decoders (`messages.server_message_decoder`, and the client's own in
client/connection.py). Through `messages.decode`, the only way the code decodes, malformed
input must come out as `ProtocolError` and nothing else. What decodes must encode again (with
the extension types put back) to bytes that decode to the same thing: `encode(decode(x))` is a
fixed point after one round.

The first input byte picks the decoder; the rest is the message. A structure-aware mutator
(`mutate.py`) edits decoded msgpack trees as often as libFuzzer flips bytes, so inputs stay
near the real messages the seeds hold.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["gpupool"]):
    import msgspec
    import torch

    from gpupool.errors import ProtocolError
    from gpupool.protocol import messages as m
    from gpupool.server.executor import Executor, Ref
    from gpupool.torchcodec import DTYPE_TO_NAME, LAYOUT_TO_NAME, MEMORY_FORMAT_TO_NAME

    try:
        from gpupool.client import connection as _client_connection

        CLIENT_REPLY_DECODER = getattr(_client_connection, "_reply_decoder", None)
    except Exception:  # noqa: BLE001 - the client is being edited; fuzz what imports
        CLIENT_REPLY_DECODER = None

from tools.fuzz import mutate
from tools.fuzz.common import describe, exception_signature, write_seeds

Ext = msgspec.msgpack.Ext
torch.set_num_threads(1)
_executor = Executor(torch.device("cpu"), 1 << 20)

#: (name, decoder, encoder enc_hook) by selector.
DECODERS: list[tuple[str, Any]] = [
    ("hello", m.hello_decoder),
    ("batch", _executor.decoder),
    ("server-reply", m.server_message_decoder),
]
if CLIENT_REPLY_DECODER is not None:
    DECODERS.append(("client-reply", CLIENT_REPLY_DECODER))


def _enc_hook(obj: Any) -> Any:
    """Put extension values back the way a peer sends them."""
    if isinstance(obj, Ref):
        return Ext(m.ExtCode.TENSOR, m.HANDLE.pack(obj.handle))
    if isinstance(obj, torch.dtype):
        return Ext(m.ExtCode.DTYPE, DTYPE_TO_NAME[obj].encode())
    if isinstance(obj, torch.device):
        return Ext(m.ExtCode.DEVICE, b"")
    if isinstance(obj, torch.memory_format):
        return Ext(m.ExtCode.MEMORY_FORMAT, MEMORY_FORMAT_TO_NAME[obj].encode())
    if isinstance(obj, torch.layout):
        return Ext(m.ExtCode.LAYOUT, LAYOUT_TO_NAME[obj].encode())
    if isinstance(obj, m.DtypeName):
        return Ext(m.ExtCode.DTYPE, str(obj).encode())
    if isinstance(obj, complex):
        return Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(obj.real, obj.imag))
    if isinstance(obj, torch.Tensor):
        name = DTYPE_TO_NAME[obj.dtype]
        raw = obj.contiguous().view(torch.uint8).numpy().tobytes() if obj.numel() else b""
        return Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode([name, list(obj.shape), raw]))
    raise TypeError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_findings = None


def check(selector: int, payload: bytes) -> None:
    """Decode `payload` with decoder `selector`; raises AssertionError for a broken property."""
    name, dec = DECODERS[selector % len(DECODERS)]
    try:
        obj = m.decode(dec, payload, name)
    except ProtocolError:
        return
    try:
        first = _encoder.encode(obj)
    except (RecursionError, OverflowError):
        return  # nested past what this harness's encoder takes: not the decoder's business
    again = m.decode(dec, first, name)  # must decode: it is what a peer would send for `obj`
    second = _encoder.encode(again)
    if first != second:
        raise AssertionError(f"{name}: encode(decode(x)) is not a fixed point: {first[:80]!r} != {second[:80]!r}")


def test_one(data: bytes) -> None:
    if not data:
        return
    try:
        check(data[0], data[1:])
    except AssertionError as e:
        _record("invariant", f"messages: {str(e).split(':')[0]}", e, data)
    except ProtocolError as e:  # the re-encoded message did not decode
        _record("invariant", f"messages: re-encoded value refused: {str(e)[:60]}", e, data)
    except Exception as e:  # noqa: BLE001 - anything but ProtocolError out of a decoder
        _record("crash", exception_signature(e, "messages: "), e, data)


def _record(kind: str, sig: str, e: BaseException, data: bytes) -> None:
    global _findings
    from tools.fuzz.libfuzzer import findings_here

    if _findings is None:
        _findings = findings_here()
    _findings.add(kind, sig, describe(e), data)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    # Note: an exception here would end libFuzzer (it is the harness's, not the code's): a bug
    # of the mutator falls back to libFuzzer's own mutation.
    try:
        return _mutate(data, max_size, seed)
    except Exception:  # noqa: BLE001
        return atheris.Mutate(data, max_size)


def _mutate(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if not data or rng.random() < 0.4:
        return atheris.Mutate(data, max_size)
    sel, body = data[:1], data[1:]
    if rng.random() < 0.05:
        sel = bytes([rng.randrange(256)])
    out = mutate.mutate_message(body, rng, typed=rng.random() < 0.7)
    if out is None:
        out = atheris.Mutate(body, max(1, max_size - 1))
    return (sel + out)[:max_size]


def seeds() -> list[bytes]:
    from tools.fuzz.corpus import seed_sessions

    out = [bytes([0]) + m.plain_encoder.encode(m.Hello(protocol=3, token="t", client="fuzz", lease="", gpu=0)),
           bytes([0]) + m.plain_encoder.encode(m.Hello(protocol=3, token="t", lease="x.y", gpu=1, hold=True))]
    for s in seed_sessions():
        out.extend(bytes([1]) + msg for msg, _ in s)
    replies = [
        m.Welcome(3, "abc", "cpu", "CPU", 1 << 20, 1 << 30, "2.13"), m.Refused("protocol", "no"),
        m.Synced(m.ErrorInfo(1, "aten::add", "op", "bad"), 1, 2, 3), m.Data(None, 16),
        m.Value(None, Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(1, 2))), m.Value(None, Ext(m.ExtCode.DTYPE, b"float32")),
        m.OpResult(None, [m.TensorMeta([2, 3], [3, 1], 0, "float32", 24)], [1, 2.5, True, None]),
    ]
    for r in replies:
        raw = m.plain_encoder.encode(r)
        out += [bytes([2]) + raw, bytes([3]) + raw]
    return out


def main() -> None:
    write_seeds(sys.argv, seeds())
    atheris.Setup(sys.argv, test_one, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
