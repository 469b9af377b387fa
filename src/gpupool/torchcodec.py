"""Torch objects <-> wire names. Shared by client and server; the wire side is `protocol/`."""

from __future__ import annotations

import torch

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
