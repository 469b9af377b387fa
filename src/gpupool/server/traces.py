"""A session's registered traces (step replay), checked once when they arrive.

Note [Trace templates]: a trace op's arguments are msgpack with three reference kinds instead of
handles: `VALUE n` (the n-th tensor an earlier op of the trace made), `SLOT n` (a tensor from
outside the trace, named per replay) and `SCALAR n` (a number given per replay, of a fixed kind).
A template may hold no handle of its own. When a trace arrives, every op is judged by the op
policy and its constant arguments are checked as an ordinary op's would be (Note [Checks around
an op] in executor.py); value references must name values made by earlier ops, slots and
scalars must be numbered in order, and outputs must number new values in order. A replay then
fills the references in and runs each op through the same `Executor.run_op` as an ordinary op,
with every per-run check (sanitisers, estimates, the budget, result checks): a replay can do
nothing an equivalent stream of ops could not. Only the typed and string argument checks are
not repeated: such arguments (dtypes, devices, layouts, strings) can only be constants of the
template (references are tensors and numbers), checked when the trace arrived.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from gpupool.protocol import messages as m
from gpupool.server.oppolicy import OpSpec

#: Per session: traces kept, ops in one trace, ops in all traces together.
MAX_TRACES = 64
MAX_TRACE_OPS = 32768
MAX_SESSION_TRACE_OPS = 262144


class TraceRefused(Exception):
    """The trace cannot be registered; the message says why."""


class ReplayRefused(Exception):
    """A replay that does not fit its trace (a protocol error of the client's)."""


class Val:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class Slot:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class Scalar:
    __slots__ = ("n", "type")

    def __init__(self, n: int, kind: type) -> None:
        self.n = n
        self.type = kind


def template_ext_hook(plain: Callable[[int, memoryview], Any]) -> Callable[[int, memoryview], Any]:
    """The executor's extension hook, plus the three references; handles are refused."""

    def hook(code: int, data: memoryview) -> Any:
        if code == m.ExtCode.VALUE or code == m.ExtCode.SLOT:
            if len(data) != 8:
                raise msgspec.ValidationError("bad trace reference")
            n = m.HANDLE.unpack(data)[0]
            return Val(n) if code == m.ExtCode.VALUE else Slot(n)
        if code == m.ExtCode.SCALAR:
            kind = m.SCALAR_KINDS.get(bytes(data[8:]))
            if len(data) != 9 or kind is None:
                raise msgspec.ValidationError("bad trace scalar")
            return Scalar(m.HANDLE.unpack(data[:8])[0], kind)
        if code == m.ExtCode.TENSOR:
            raise msgspec.ValidationError("a trace template may not name a tensor handle")
        return plain(code, data)

    return hook


class TraceOpRun:
    """One checked op of a trace."""

    __slots__ = ("name", "spec", "args", "kwargs", "outs", "dynamic")

    def __init__(self, name: str, spec: OpSpec, args: list[Any], kwargs: dict[str, Any], outs: list[int],
                 dynamic: bool) -> None:
        self.name = name
        self.spec = spec
        self.args = args
        self.kwargs = kwargs
        self.outs = outs
        self.dynamic = dynamic  # holds references to fill in per replay


class CompiledTrace:
    __slots__ = ("ops", "values", "slot_at", "scalar_at", "scalar_types")

    def __init__(self, ops: list[TraceOpRun], values: int, slot_at: list[int], scalar_at: list[int],
                 scalar_types: list[type]) -> None:
        self.ops = ops
        self.values = values
        self.slot_at = slot_at  # slot_at[i]: the first slot of op i (len(ops) + 1 entries)
        self.scalar_at = scalar_at
        self.scalar_types = scalar_types


class _Walk:
    """Checks one op's template references while counting them."""

    def __init__(self, values: int, slots: int, scalar_types: list[type]) -> None:
        self.values = values
        self.slots = slots
        self.scalar_types = scalar_types
        self.refs = 0

    def visit(self, x: Any) -> None:
        t = type(x)
        if t is Val:
            if x.n >= self.values:
                raise TraceRefused(f"value {x.n} is used before an op makes it")
            self.refs += 1
        elif t is Slot:
            if x.n != self.slots:
                raise TraceRefused("slots are not numbered in order")
            self.slots += 1
            self.refs += 1
        elif t is Scalar:
            if x.n != len(self.scalar_types):
                raise TraceRefused("scalars are not numbered in order")
            self.scalar_types.append(x.type)
            self.refs += 1
        elif t is list:
            for v in x:
                self.visit(v)


def compile_trace(cmd: m.Trace, spec_of: Callable[[str], OpSpec], decode: Callable[[bytes], Any],
                  check_args: Callable[[OpSpec, list[Any], dict[str, Any]], None]) -> CompiledTrace:
    """Check `cmd` under Note [Trace templates]; raises `TraceRefused` (or the policy's error)."""
    if not cmd.ops or len(cmd.ops) > MAX_TRACE_OPS:
        raise TraceRefused(f"a trace has 1 to {MAX_TRACE_OPS} ops, not {len(cmd.ops)}")
    ops: list[TraceOpRun] = []
    values = 0
    slot_at = [0]
    scalar_at = [0]
    scalar_types: list[type] = []
    walk = _Walk(0, 0, scalar_types)
    for i, op in enumerate(cmd.ops):
        spec = spec_of(op.op)
        try:
            args, kwargs = decode(op.args)
        except Exception as e:  # noqa: BLE001 - any malformed template refuses the trace
            raise TraceRefused(f"op {i} ({op.op[:80]}): bad template: {e}") from None
        walk.values, walk.refs = values, 0
        for a in args:
            walk.visit(a)
        for v in kwargs.values():
            walk.visit(v)
        check_args(spec, args, kwargs)
        for o in op.outs:
            if o == values:
                values += 1
            elif o != -1:
                raise TraceRefused(f"op {i}: outputs must number new values in order")
        if walk.refs:
            args = [_compiled(a) for a in args]
            kwargs = {k: _compiled(v) for k, v in kwargs.items()}
        ops.append(TraceOpRun(spec.name, spec, args, kwargs, list(op.outs), walk.refs > 0))
        slot_at.append(walk.slots)
        scalar_at.append(len(scalar_types))
    if values != cmd.values:
        raise TraceRefused(f"the trace makes {values} values, not {cmd.values}")
    return CompiledTrace(ops, values, slot_at, scalar_at, scalar_types)


class RefList(list):
    """A template list that holds references (a plain `list` in a compiled template holds none,
    and is passed as it is)."""


def _compiled(x: Any) -> Any:
    """`x` with every list that holds references marked (`RefList`), so that `fill` passes the
    others (sizes, dims, ...) without a look at each element."""
    if type(x) is list:
        items = [_compiled(v) for v in x]
        if any(type(v) in _REFS for v in items):
            return RefList(items)
        return items
    return x


def fill(x: Any, base: int, slots: list[int], slot0: int, scalars: list[Any], scalar0: int, ref: type) -> Any:
    """A compiled template value with its references filled in (tensors as `ref(handle)`)."""
    t = type(x)
    if t is Val:
        return ref(base + x.n)
    if t is Slot:
        return ref(slots[x.n - slot0])
    if t is Scalar:
        return scalars[x.n - scalar0]
    if t is RefList:
        return [fill(v, base, slots, slot0, scalars, scalar0, ref) for v in x]
    return x


_REFS = (Val, Slot, Scalar, RefList)


class Runner(Protocol):
    """What a replay needs of its session's executor (`Executor`)."""

    def run_op(self, cmd: m.Op, checked: bool = False) -> Any: ...
    def _free(self, handle: int) -> None: ...
    def _free_outs(self, cmd: m.Op) -> None: ...
    def _record(self, seq: int, op: str, exc: BaseException, at: int = -1) -> None: ...


class SessionTraces:
    """A session's registered traces, and their replays on its executor."""

    def __init__(self, spec_of: Callable[[str], OpSpec], decode: Callable[[bytes], Any],
                 check_args: Callable[[OpSpec, list[Any], dict[str, Any]], None], ref: type,
                 refusal: type[Exception]) -> None:
        self._traces: dict[int, CompiledTrace] = {}
        self._refusals = (TraceRefused, refusal)  # refusal: the policy's (`executor.OpFailed`)
        self._spec_of = spec_of
        self._decode = decode
        self._check_args = check_args
        self._ref = ref  # the executor's tensor-argument type (`executor.Ref`)

    def __len__(self) -> int:
        return len(self._traces)

    def register(self, cmd: m.Trace) -> str:
        """Check and keep a trace; "" when accepted, else why not (nothing else changes)."""
        try:
            if not 0 < cmd.trace < 1 << 32:
                raise TraceRefused("trace ids are 1 to 2**32 - 1")
            traces = self._traces
            old = traces.pop(cmd.trace, None)
            total = sum(len(t.ops) for t in traces.values()) + len(cmd.ops)
            if len(traces) >= MAX_TRACES or total > MAX_SESSION_TRACE_OPS:
                if old is not None:
                    traces[cmd.trace] = old
                raise TraceRefused(f"a session keeps at most {MAX_TRACES} traces of {MAX_SESSION_TRACE_OPS} ops in all")
            traces[cmd.trace] = compile_trace(cmd, self._spec_of, self._decode, self._check_args)
            return ""
        except self._refusals as e:
            return f"trace {cmd.trace} refused: {e}"[:4000]

    def forget(self, trace: int) -> None:
        self._traces.pop(trace, None)

    def replay(self, cmd: m.Replay, ex: Runner) -> None:
        """Run ops `start:stop` of a trace, each as `run_op` runs an ordinary op."""
        trace = self._traces.get(cmd.trace)
        try:
            if trace is None:
                raise ReplayRefused(f"replay of trace {cmd.trace}, which this session has not registered")
            _check_replay(cmd, trace)
        except ReplayRefused as e:
            ex._record(cmd.seq, "replay", e)
            return
        frees = {f.at: f.handles for f in cmd.frees}
        slot0, scalar0 = trace.slot_at[cmd.start], trace.scalar_at[cmd.start]
        base, slots, scalars, ref = cmd.base, cmd.slots, cmd.scalars, self._ref
        for i in range(cmd.start, cmd.stop):
            dead = frees.get(i)
            if dead:
                for h in dead:
                    ex._free(h)
            op = trace.ops[i]
            outs = [base + v if v >= 0 else -1 for v in op.outs]
            if op.dynamic:
                args = [fill(a, base, slots, slot0, scalars, scalar0, ref) for a in op.args]
                kwargs = {k: fill(v, base, slots, slot0, scalars, scalar0, ref) for k, v in op.kwargs.items()}
            else:
                args, kwargs = op.args, op.kwargs
            one = m.Op(cmd.seq, op.name, args, kwargs, outs)
            try:
                ex.run_op(one, checked=True)
            except Exception as e:  # noqa: BLE001 - deferred to the next sync, as for an op
                ex._free_outs(one)
                ex._record(cmd.seq, op.name, e, i)


def _check_replay(cmd: m.Replay, trace: CompiledTrace) -> None:
    if not 0 <= cmd.start < cmd.stop <= len(trace.ops):
        raise ReplayRefused(f"replay of ops {cmd.start}:{cmd.stop} of a trace of {len(trace.ops)}")
    if not 0 <= cmd.base < (1 << 63) - trace.values:
        raise ReplayRefused("replay handle base out of range")
    if len(cmd.slots) != trace.slot_at[cmd.stop] - trace.slot_at[cmd.start]:
        raise ReplayRefused("replay with the wrong number of slots")
    n = trace.scalar_at[cmd.stop] - trace.scalar_at[cmd.start]
    if len(cmd.scalars) != n:
        raise ReplayRefused("replay with the wrong number of scalars")
    types = trace.scalar_types
    s0 = trace.scalar_at[cmd.start]
    for j, v in enumerate(cmd.scalars):
        if type(v) is not types[s0 + j]:
            raise ReplayRefused(f"replay scalar {j} is a {type(v).__name__}, not a {types[s0 + j].__name__}")
    for f in cmd.frees:
        if not cmd.start <= f.at < cmd.stop:
            raise ReplayRefused("replay frees outside its ops")
