"""Output metadata of an op, computed on the client with `meta` tensors and cached.

The client never waits for the server to learn an output's shape: it runs the op on meta
tensors (no data) and caches the result by signature — the op and the shapes, strides, offsets
and dtypes of its tensor arguments, plus scalar values where they can change the output's
metadata. A training step repeats the same signatures, so nearly every op is a cache hit.

Note [Plans]: a cached `Plan` says, for each tensor in the flattened output, either "new tensor
with this layout" or "input k again" (in-place and out= ops), with the layout input k has after
the op (out= may resize it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gpupool.client.oprecord import record_of
from gpupool.client.tensor import RemoteTensor
from gpupool.errors import UnsupportedError

Layout = tuple[tuple[int, ...], tuple[int, ...], int, torch.dtype]


class DynamicOutput(Exception):
    """The op's output metadata depends on the data: the server must tell us."""


@dataclass(frozen=True)
class OutSpec:
    arg: int  # index into the flattened tensor inputs, or -1 for a new tensor
    layout: Layout
    changed: bool  # an input whose metadata the op changed (out= resize, t_, as_strided_)
    bits: int = 0  # a new tensor's conjugate/negative bits (see Note [Conj bits] in tensor.py)


@dataclass(frozen=True)
class Plan:
    outs: tuple[OutSpec, ...]
    structure: Any  # how to rebuild the op's return value from the flat tensors


#: The plan of an op whose output metadata depends on the data (see `DynamicOutput`).
DYNAMIC = Plan((), None)
_META_DEVICE = torch.device("meta")
_cache: dict[Any, Plan] = {}
_stats = {"hits": 0, "misses": 0}
CONJ, NEG = 1, 2


def bits_of(t: torch.Tensor) -> int:
    return (CONJ if t.is_conj() else 0) | (NEG if t.is_neg() else 0)


def set_bits(t: torch.Tensor, bits: int) -> None:
    """Give `t` (a wrapper or a meta tensor) the conjugate/negative bits `bits`."""
    torch._C._set_conj(t, bool(bits & CONJ))
    torch._C._set_neg(t, bool(bits & NEG))


def layout_of(t: torch.Tensor) -> Layout:
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype)


def signature(x: Any, values: bool) -> Any:
    """A hashable key for an argument; RemoteTensors by layout, scalars by value or type."""
    t = type(x)
    if t is RemoteTensor or isinstance(x, RemoteTensor):
        return (x.shape, x.stride(), x.storage_offset(), x.dtype, x._bits)
    if t is list or t is tuple:
        return tuple(signature(v, values) for v in x)
    if t is float or t is int or t is bool or t is complex:
        return (t, x) if values else t
    if isinstance(x, torch.Tensor):
        return ("host", x.shape, x.dtype, x.device.type, x.item() if values and x.numel() == 1 and x.device.type != "meta" else None)
    return x


def to_meta(x: Any, inputs: list[torch.Tensor], metas: list[torch.Tensor]) -> Any:
    """Replace RemoteTensors by meta tensors of the same layout (recording both, in order)."""
    if isinstance(x, RemoteTensor):
        numel_needed = x.storage_offset() + sum((s - 1) * st for s, st in zip(x.shape, x.stride())) + 1 if x.numel() else 0
        mt = torch.empty((max(numel_needed, 0),), dtype=x.dtype, device=_META_DEVICE).as_strided(
            x.shape, x.stride(), x.storage_offset()
        )
        if x._bits:
            set_bits(mt, x._bits)
        inputs.append(x)
        metas.append(mt)
        return mt
    t = type(x)
    if t is list or t is tuple:
        return t(to_meta(v, inputs, metas) for v in x)
    if isinstance(x, torch.device):
        return _META_DEVICE
    if isinstance(x, torch.Tensor) and (x.dim() != 0 or x.device.type != "cpu"):
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, "
            f"gpupool and {x.device}! (a host tensor may join a device op only as a 0-dim scalar)"
        )
    return x


def remote_inputs(args: tuple, kwargs: dict) -> list[RemoteTensor]:
    """The RemoteTensors among the arguments, in the order `to_meta` records them."""
    acc: list[RemoteTensor] = []
    _collect_remote(args, acc)
    for v in kwargs.values():
        _collect_remote(v, acc)
    return acc


def _collect_remote(x: Any, acc: list[RemoteTensor]) -> None:
    # Note: a module-level function, not a closure: a recursive closure is a reference cycle
    # that would keep the op's inputs (and their server memory) alive until the cyclic GC runs.
    if isinstance(x, RemoteTensor):
        acc.append(x)
    elif type(x) is list or type(x) is tuple:
        for v in x:
            _collect_remote(v, acc)


def structure_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return True
    if isinstance(out, (tuple, list)):
        return (type(out), tuple(structure_of(o) for o in out))
    return None if out is None else ("value", out)


def flat_tensors(out: Any, acc: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        acc.append(out)
    elif isinstance(out, (tuple, list)):
        for o in out:
            flat_tensors(o, acc)
    return acc


def rebuild(structure: Any, tensors: Iterator[torch.Tensor]) -> Any:
    if structure is True:
        return next(tensors)
    if structure is None:
        return None
    if structure[0] == "value":
        return structure[1]
    kind, parts = structure
    return kind(rebuild(p, tensors) for p in parts)


def args_signature(args: tuple, values: bool) -> tuple:
    """`signature(args)` with the common flat cases inline (the per-op hot path)."""
    out: list[Any] = []
    for x in args:
        t = type(x)
        if t is RemoteTensor:
            out.append((x.shape, x.stride(), x.storage_offset(), x.dtype, x._bits))
        elif t is float or t is int or t is bool:
            out.append((t, x) if values else t)
        elif x is None:
            out.append(None)
        else:
            out.append(signature(x, values))
    return tuple(out)


def plan(func: torch._ops.OpOverload, args: tuple, kwargs: dict, values: bool | None = None) -> Plan:
    """The op's plan; `values`: whether scalar values key it (`OpRecord.values_matter`)."""
    if values is None:
        values = record_of(func).values_matter
    key: Any = (
        id(func),
        args_signature(args, values),
        signature(tuple(kwargs.items()), values) if kwargs else None,
    )
    try:
        p = _cache.get(key)
    except TypeError:  # an unhashable argument: no caching
        key, p = None, None
    if p is not None:
        _stats["hits"] += 1
        return p
    _stats["misses"] += 1
    try:
        p = _infer(func, args, kwargs)
    except DynamicOutput:
        p = DYNAMIC
    if key is not None:
        _cache[key] = p
    return p


def _infer(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Plan:
    inputs: list[torch.Tensor] = []
    metas: list[torch.Tensor] = []
    margs = to_meta(args, inputs, metas)
    mkwargs = {k: to_meta(v, inputs, metas) for k, v in kwargs.items()}
    if mkwargs.get("pin_memory"):
        mkwargs["pin_memory"] = False
    try:
        out = func(*margs, **mkwargs)
    except (NotImplementedError, torch._subclasses.fake_tensor.DynamicOutputShapeException) as e:
        raise DynamicOutput(str(e)) from e
    except RuntimeError as e:
        text = str(e)
        # Note: a meta kernel that needs data ("cannot repeat_interleave a meta tensor without
        # output_size", `.item()` on a meta tensor) or that does not exist for Meta: the server
        # runs the op and describes its outputs. Genuine argument errors are raised there too,
        # at once, since such ops wait for the server's reply.
        if "data-dependent" in text or "Meta" in text and "backend" in text or "meta tensor" in text.lower():
            raise DynamicOutput(text) from e
        raise
    if not func._schema.returns:
        out = None  # a Python meta kernel of an op that returns nothing may return its inputs
    ids = {id(mt): i for i, mt in enumerate(metas)}
    specs = []
    flat = flat_tensors(out, [])
    for o in flat:
        if o.layout != torch.strided:
            raise UnsupportedError(
                f"{func}: {o.layout} tensors are not supported on a gpupool device (strided only)"
            )
    for o in flat:
        k = ids.get(id(o), -1)
        lay = layout_of(o)
        changed = k >= 0 and lay != layout_of(inputs[k])
        specs.append(OutSpec(k, lay, changed, bits_of(o) if k < 0 else 0))
    return Plan(tuple(specs), structure_of(out))


def cache_stats() -> dict[str, int]:
    return dict(_stats, size=len(_cache))
