"""The torch codec: torch objects <-> the wire, both directions in one place.

Op arguments travel as msgpack with extension values for what msgpack has no type for
(`protocol.messages.ExtCode`): the client encodes them (`arg_encoder`), the server decodes them
strictly (`arg_ext_hook`), with the same names (`DTYPES`, ...); the server's replies put complex
scalars and dtypes the same way (`result_enc_hook`), and the client decodes those
(`reply_ext_hook`). The wire itself (frames, messages, bounds) is `protocol/`, free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import torch

from gpupool.protocol import messages as m
from gpupool.protocol.dtypes import DTYPE_NAMES, LAYOUT_NAMES, MEMORY_FORMAT_NAMES

DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}
MEMORY_FORMATS: dict[str, torch.memory_format] = {n: getattr(torch, n) for n in MEMORY_FORMAT_NAMES}
MEMORY_FORMAT_TO_NAME = {v: k for k, v in MEMORY_FORMATS.items()}
LAYOUTS: dict[str, torch.layout] = {n: getattr(torch, n) for n in LAYOUT_NAMES}
LAYOUT_TO_NAME = {v: k for k, v in LAYOUTS.items()}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def op_name(func: torch._ops.OpOverload) -> str:
    """The allowlist name of an op overload, e.g. "aten::add.Tensor"."""
    return func._schema.name + ("." + func._overloadname if func._overloadname != "default" else "")


def resolve_op(name: str) -> torch._ops.OpOverload:
    """The op overload for an allowlist name; raises LookupError if there is none."""
    ns, _, rest = name.partition("::")
    base, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, ns), base)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        raise LookupError(f"unknown op {name!r}") from None


def host_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor's elements."""
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # e.g. one element with zero strides counts as contiguous
        flat = flat.clone()
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


# ---- op arguments: client -> server --------------------------------------------------------------


def arg_encoder(device_tensor: type, handle_of: Callable[[Any], int]) -> msgspec.msgpack.Encoder:
    """The client's encoder of op arguments: a `device_tensor` goes as its handle
    (`handle_of(t)`), a 0-d CPU tensor inline; anything else that is not msgpack is refused."""
    Ext = msgspec.msgpack.Ext
    handle = m.HANDLE.pack
    dtypes = {d: Ext(m.ExtCode.DTYPE, n.encode()) for d, n in DTYPE_TO_NAME.items()}
    formats = {f: Ext(m.ExtCode.MEMORY_FORMAT, n.encode()) for f, n in MEMORY_FORMAT_TO_NAME.items()}
    layouts = {f: Ext(m.ExtCode.LAYOUT, n.encode()) for f, n in LAYOUT_TO_NAME.items()}
    device = Ext(m.ExtCode.DEVICE, b"")

    def enc_hook(obj: Any) -> Any:
        if isinstance(obj, device_tensor):
            return Ext(m.ExtCode.TENSOR, handle(handle_of(obj)))
        if isinstance(obj, torch.dtype):
            return dtypes[obj]
        if isinstance(obj, torch.device):
            return device
        if isinstance(obj, torch.memory_format):
            return formats[obj]
        if isinstance(obj, torch.layout):
            if obj not in layouts:
                raise TypeError(f"layout {obj} is not supported on a gpupool device")
            return layouts[obj]
        if isinstance(obj, complex):
            return Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(obj.real, obj.imag))
        if isinstance(obj, torch.Tensor):
            if obj.dim() == 0 and obj.device.type == "cpu":
                raw = bytes(obj.detach().reshape(1).view(torch.uint8).numpy()) if obj.dtype.itemsize else b""
                return Ext(m.ExtCode.CPU_TENSOR, msgspec.msgpack.encode((DTYPE_TO_NAME[obj.dtype], [], raw)))
            raise TypeError(f"a {obj.device} tensor of shape {tuple(obj.shape)} cannot be an argument of a gpupool op")
        if isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise TypeError("symbolic sizes are not supported on a gpupool device")
        raise TypeError(f"cannot send a {type(obj).__name__} to a gpupool server")

    return msgspec.msgpack.Encoder(enc_hook=enc_hook)


def arg_ext_hook(ref: Callable[[int], Any], device: torch.device) -> Callable[[int, memoryview], Any]:
    """The server's decoder hook for op arguments: a handle becomes `ref(handle)`, a device the
    session's own `device` (a client cannot name another); every payload is checked."""

    def hook(code: int, data: memoryview) -> Any:
        if code == m.ExtCode.TENSOR:
            if len(data) != 8:
                raise msgspec.ValidationError("bad tensor reference")
            return ref(m.HANDLE.unpack(data)[0])
        if code == m.ExtCode.DTYPE:
            return _named(data, DTYPES, "dtype")
        if code == m.ExtCode.DEVICE:
            if len(data):
                raise msgspec.ValidationError("bad device")
            return device
        if code == m.ExtCode.MEMORY_FORMAT:
            return _named(data, MEMORY_FORMATS, "memory format")
        if code == m.ExtCode.LAYOUT:
            return _named(data, LAYOUTS, "layout")
        if code == m.ExtCode.COMPLEX:
            if len(data) != m.COMPLEX.size:
                raise msgspec.ValidationError("bad complex")
            re_, im = m.COMPLEX.unpack(data)
            return complex(re_, im)
        if code == m.ExtCode.CPU_TENSOR:
            try:
                return _cpu_tensor(data)
            except msgspec.ValidationError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure here is a malformed message
                raise msgspec.ValidationError(f"bad inline tensor: {e}") from None
        raise msgspec.ValidationError(f"unknown extension type {code}")

    return hook


def _named(data: memoryview, allowed: dict[str, Any], what: str) -> Any:
    try:
        name = bytes(data[:64]).decode("ascii")
        return allowed[name]
    except (UnicodeDecodeError, KeyError):
        raise msgspec.ValidationError(f"unknown {what} {bytes(data)[:40]!r}") from None


def _cpu_tensor(data: memoryview) -> torch.Tensor:
    if len(data) > m.MAX_EXT_BYTES:
        raise msgspec.ValidationError("inline tensor too large")
    dtype_name, shape, raw = msgspec.msgpack.decode(data, type=tuple[str, list[int], bytes])
    dtype = DTYPES.get(dtype_name)
    if dtype is None or any(s < 0 for s in shape) or len(shape) > 64:
        raise msgspec.ValidationError("bad inline tensor")
    numel = 1
    for s in shape:
        numel *= s
    if numel * dtype.itemsize != len(raw):
        raise msgspec.ValidationError("inline tensor size mismatch")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


# ---- replies: server -> client ---------------------------------------------------------------------


def result_enc_hook(obj: Any) -> Any:
    """The server's encoder hook for values in replies (an op's Python results)."""
    if isinstance(obj, complex):
        return msgspec.msgpack.Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(obj.real, obj.imag))
    if isinstance(obj, torch.dtype):
        return msgspec.msgpack.Ext(m.ExtCode.DTYPE, DTYPE_TO_NAME[obj].encode())
    raise TypeError(f"cannot encode {type(obj).__name__}")


def reply_ext_hook(code: int, data: memoryview) -> Any:
    """The client's decoder hook for replies: the protocol's own (`messages.reply_ext_hook`),
    with dtypes as this torch's dtypes."""
    v = m.reply_ext_hook(code, data)
    if isinstance(v, m.DtypeName):
        if v not in DTYPES:
            raise msgspec.ValidationError(f"dtype {v!r} does not exist in this torch")
        return DTYPES[v]
    return v
