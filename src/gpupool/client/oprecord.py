"""What the client knows about one aten op overload, computed once and kept in one record.

Every op on a gpupool tensor looks its record up by `id(func)` (Note [Op records]); the
dispatcher, the meta planner and step replay read their per-op facts from it instead of each
keeping a table of their own.

Note [Op records]: records are keyed by `id(func)`, not by the overload: `OpOverload.__hash__`
is Python code (~0.7 µs a call) and the overloads are module-level singletons, so their ids are
stable for the life of the process. The `route` is filled in by the dispatcher on first use
(Note [Routes] in dispatch.py); everything else is derived from the schema and tags here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gpupool.torchcodec import op_name

#: Ops that may change the metadata of an argument they write (besides in-place view ops).
_RESTRIDING = {"resize_", "resize_as_", "set_", "as_strided_", "_resize_output_"}
#: Not yet chosen (a route may legitimately be None: the plain planned path).
UNSET: Any = object()


class OpRecord:
    """One op overload's facts. `route`: how the dispatcher runs it (None: planned and queued)."""

    __slots__ = ("func", "name", "restrided", "values_matter", "composite", "route", "replayable",
                 "fast")

    def __init__(self, func: torch._ops.OpOverload) -> None:
        self.func = func
        self.name = op_name(func)
        self.restrided = _restrided_args(func)
        self.values_matter = _values_matter(func)
        self.composite = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
        self.route: Callable[..., Any] | None = UNSET
        #: Whether step replay may stand in for it: its route ends in a planned, queued op.
        self.replayable = False
        #: Whether `dispatch` may offer it to a running replay first (Note [Replay fast path]).
        self.fast = False

    def __repr__(self) -> str:
        return f"<OpRecord {self.name}>"


_records: dict[int, OpRecord] = {}


def record_of(func: torch._ops.OpOverload) -> OpRecord:
    """The record of `func`, made on its first use (Note [Op records])."""
    r = _records.get(id(func))
    if r is None:
        r = _records[id(func)] = OpRecord(func)
    return r


def _values_matter(func: torch._ops.OpOverload) -> bool:
    """Whether scalar *values* (not just their types) can change the output metadata.

    Pointwise, foreach and fused ops give the same output layout for any scalar value, so the
    plan cache keys them by type and step replay takes their scalars as inputs (Adam's bias
    corrections change every step)."""
    name = func.__name__
    return not (torch.Tag.pointwise in func.tags or name.startswith(("_foreach_", "_fused_")))


def _restrided_args(func: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    """The (position, name) of the arguments whose metadata `func` may change in place
    (in-place view ops, resizes, `set_`, `out=` tensors, which an op may resize); -1 for
    keyword-only ones."""
    schema = func._schema
    base = schema.name.split("::", 1)[-1]
    metadata = torch.Tag.inplace_view in func.tags or base in _RESTRIDING
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write and (metadata or a.kwarg_only):
            out.append((-1 if a.kwarg_only else i, a.name))
    return tuple(out)
