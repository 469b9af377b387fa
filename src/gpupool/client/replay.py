"""Step replay: a repeated segment of the op stream goes to the server once, then by reference.

A training loop issues the same ops every step. The client records each segment of its op
stream (Note [Segments]) as a list of `TraceOp`s: per op, its record, a template of its
arguments and the plan of its outputs. When the same segment has been seen twice it is
registered with the server as a trace (`m.Trace`), and from then on every op is only checked
against the trace: no meta plan, no encoding, no command per op. What the ops take from outside
the segment (parameters, optimizer state, the batch) goes as slot handles, scalars that change
per step (learning rates, Adam's bias corrections) as scalar inputs, and the ops matched so far
leave as one small `m.Replay` command (Note [Replay chunks]).

Note [Segments]: a segment ends at a sync point (a request: `.item()`, `.cpu()`, a sync), at an
upload that follows ops of the segment (new data starts a step), after `optimizer.step()` (a
global post-hook: loops that never sync still have steps), and where a replayed trace ends.

Note [Replay is exact]: an op that does not match its trace op — another op, another layout of
an outside tensor, another constant, a scalar of another type — ends the replay: the ops
matched so far go as a (partial) replay, the op runs on the ordinary path, and the segment is
recorded again from there, with the trace's prefix as its start. The server runs exactly the ops
eager mode would have sent, in the same order, with the same arguments; outputs get fresh
handles from the replay handle space (Note [Replay handles]), so tensors a program keeps from a
replayed step stay valid and never alias the next step's.

Note [Replay handles]: the trace's new tensors are numbered (values); a replay names them
`base + value`. Bases come from a handle space of their own (from 2**48), so a replay's block
is contiguous without a lock against `Connection.new_handle`.

Note [Replay chunks]: matched ops leave as `Replay(trace, start, stop, ...)` under the same rules
as ordinary commands (Note [Flush latency] in connection.py): once 512 are matched, once the
oldest has waited `FLUSH_AFTER_S`, before any other command, and at the end of the segment.
Frees that happen while a chunk is matched are sent inside it with the op they precede, so the
server frees them where eager mode would have (Note [Ordering] in connection.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from gpupool.client import meta
from gpupool.client.connection import _user_location
from gpupool.client.oprecord import OpRecord
from gpupool.client.tensor import Handle, RemoteTensor
from gpupool.protocol import messages as m

if TYPE_CHECKING:
    from gpupool.client.connection import Connection
    from gpupool.client.session import Session

#: GPUPOOL_REPLAY=0 turns step replay off (every op then takes the ordinary path).
ENABLED = os.environ.get("GPUPOOL_REPLAY", "1") not in ("0", "false", "no", "off")
#: A segment is registered once it has been seen this many times.
SEEN_TO_REGISTER = 2
#: Longest segment recorded (longer ones run as ordinary ops).
MAX_TRACE_OPS = 16384
#: Traces a session keeps registered (least recently used one forgotten beyond).
MAX_TRACES = 16
#: Segments whose keys are remembered while waiting for a second sighting.
MAX_SEEN = 8
#: Recording costs a little per op: after this many recorded segments without a registration,
#: only every `RECORD_EVERY`-th segment is recorded.
PATIENCE = 32
RECORD_EVERY = 16
#: The first replay handle (Note [Replay handles]).
HANDLE_BASE = 1 << 48
MAX_PENDING = 512

# Template leaf kinds (a leaf is a (kind, data) tuple).
VALUE, EXTERNAL, SCALAR, CONST, LIST, NONE = range(6)
_SCALAR_KINDS = {t: k for k, t in m.SCALAR_KINDS.items()}
_CONST_TYPES = (bool, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


class Untraceable(Exception):
    """An argument a template cannot describe (a host tensor, a symbolic size, ...)."""


class TraceOp:
    """One op of a recorded segment: how to check its next call and what it returns."""

    __slots__ = ("rec", "args", "kw_keys", "kwargs", "outs", "structure", "values_before",
                 "slots_before", "scalars_before", "any_input_out", "key", "where")

    def __init__(self, rec: OpRecord, args: tuple, kw_keys: tuple, kwargs: tuple, outs: tuple,
                 structure: Any, values_before: int, slots_before: int, scalars_before: int) -> None:
        self.rec = rec
        self.args = args
        self.kw_keys = kw_keys
        self.kwargs = kwargs
        #: per flattened result: (input index or -1, value or -1, layout, bits, changed)
        self.outs = outs
        self.structure = structure
        self.values_before = values_before
        self.slots_before = slots_before
        self.scalars_before = scalars_before
        self.any_input_out = any(o[0] >= 0 for o in outs)
        self.key = (id(rec.func), args, kw_keys, kwargs, outs, structure)
        #: The user's line that issued it when it was recorded: a replay's errors name it (a
        #: loop issues a step's ops from the same lines every time).
        self.where: tuple[str, int] | None = None


class Trace:
    """A registered segment."""

    __slots__ = ("id", "ops", "values", "key", "used")

    def __init__(self, tid: int, ops: list[TraceOp], values: int, key: tuple) -> None:
        self.id = tid
        self.ops = ops
        self.values = values
        self.key = key
        self.used = 0.0

    def where(self, at: int) -> tuple[str, int] | None:
        """The user's line of op `at` (as recorded), for an error the server reports there."""
        return self.ops[at].where if 0 <= at < len(self.ops) else None


# ---- templates ---------------------------------------------------------------------------------


def _leaf(x: Any, values: bool, produced: dict[int, int]) -> tuple:
    t = type(x)
    if t is RemoteTensor or isinstance(x, RemoteTensor):
        v = produced.get(x._h.id)
        if v is not None:
            return (VALUE, v)
        return (EXTERNAL, (x.shape, x.stride(), x.storage_offset(), x.dtype, x._bits))
    if t is float or t is int or t is complex:
        return (CONST, (t, x)) if values else (SCALAR, t)
    if x is None:
        return (NONE, None)
    if t is list or t is tuple:
        return (LIST, (t, tuple(_leaf(v, values, produced) for v in x)))
    if isinstance(x, _CONST_TYPES):
        return (CONST, (t, x))
    raise Untraceable(t.__name__)


def _match(leaves: tuple, xs: Any, base: int, session: Session, slots: list[int], scalars: list[Any]) -> bool:
    """Whether the arguments `xs` fit `leaves`; appends their slot handles and scalars."""
    if len(xs) != len(leaves):
        return False
    for (kind, d), x in zip(leaves, xs):
        if kind == VALUE:
            if not isinstance(x, RemoteTensor) or x._h.id != base + d or x._h.session is not session:
                return False
        elif kind == EXTERNAL:
            if not isinstance(x, RemoteTensor):
                return False
            shape, stride, offset, dtype, bits = d
            if (x.dtype is not dtype or x.shape != shape or x.stride() != stride
                    or x.storage_offset() != offset or x._bits != bits or x._h.session is not session):
                return False
            slots.append(x._h.id)
        elif kind == SCALAR:
            if type(x) is not d:
                return False
            scalars.append(x)
        elif kind == CONST:
            if type(x) is not d[0] or x != d[1]:
                return False
        elif kind == LIST:
            if type(x) is not d[0] or not _match(d[1], x, base, session, slots, scalars):
                return False
        elif x is not None:
            return False
    return True


class _Placeholder:
    __slots__ = ("code", "payload")

    def __init__(self, code: int, payload: bytes) -> None:
        self.code = code
        self.payload = payload


def _wire(leaf: tuple, counters: list[int]) -> Any:
    """A leaf as the server's template value (Note [Trace templates] in server/traces.py)."""
    kind, d = leaf
    if kind == VALUE:
        return _Placeholder(m.ExtCode.VALUE, m.HANDLE.pack(d))
    if kind == EXTERNAL:
        counters[0] += 1
        return _Placeholder(m.ExtCode.SLOT, m.HANDLE.pack(counters[0] - 1))
    if kind == SCALAR:
        counters[1] += 1
        return _Placeholder(m.ExtCode.SCALAR, m.HANDLE.pack(counters[1] - 1) + _SCALAR_KINDS[d])
    if kind == CONST:
        return d[1]
    if kind == LIST:
        return [_wire(v, counters) for v in d[1]]
    return None


# ---- the replayer --------------------------------------------------------------------------------

#: Note [Replay fast path]: the replayer that most recently started a replay, while it replays.
#: `dispatch.dispatch` offers it each op first (`Replayer.try_next`), before finding the op's
#: session and route: an op that is the trace's next one is then matched and answered at once.
#: The match itself proves the op is this session's (every tensor is checked to be), and a miss
#: changes nothing, so an op of another session, or one that differs, takes the ordinary path,
#: which calls its own session's `Replayer.step`.
active: Replayer | None = None

START, RECORDING, REPLAYING, IDLE = range(4)
#: What `Replayer.step` returns for an op it does not replay.
MISS: Any = object()


class Replayer:
    """One connection's recorder and replayer. Every method runs under the connection's lock."""

    def __init__(self, conn: Connection, session: Session, encode_hook: Callable[[Any], Any]) -> None:
        self.conn = conn
        self.session = session
        self.lock = conn._lock
        self.state = START
        self.traces: dict[int, Trace] = {}
        self._by_key: dict[tuple, Trace] = {}
        self._seen: dict[tuple, int] = {}
        self._next_id = 1
        self._next_base = HANDLE_BASE
        self._unregistered = 0
        self._segments = 0
        # recording
        self.ops: list[TraceOp] = []
        self.produced: dict[int, int] = {}
        self._values = self._slots = self._scalars = 0
        # replaying
        self.trace: Trace | None = None
        self.pos = 0
        self.base = 0
        self.chunk_start = 0
        self.chunk_t0 = 0.0
        self.slots: list[int] = []
        self.scalars: list[Any] = []
        self.frees: list[m.FreeAt] = []
        self.stats = {"segments_replayed": 0, "ops_replayed": 0, "partial": 0, "mismatches": 0,
                      "traces_registered": 0, "traces_refused": 0}

        def hook(obj: Any) -> Any:
            if type(obj) is _Placeholder:
                return msgspec.msgpack.Ext(obj.code, obj.payload)
            return encode_hook(obj)

        self._encoder = msgspec.msgpack.Encoder(enc_hook=hook)

    # ---- per op --------------------------------------------------------------------------

    def step(self, rec: OpRecord, args: tuple, kwargs: dict) -> Any:
        """The op's outputs if it continues (or starts) a replay; `MISS` otherwise."""
        with self.lock:
            state = self.state
            if state == START:
                if not self.traces or not self._start(rec, args, kwargs):
                    self._begin_recording()
                    return MISS
                assert self.trace is not None
                return self._emit_op(self.trace.ops[0], args, kwargs)
            if state != REPLAYING:
                return MISS
            trace = self.trace
            assert trace is not None
            op = trace.ops[self.pos]
            slots, scalars = self.slots, self.scalars
            n_slots, n_scalars = len(slots), len(scalars)
            if op.rec is not rec or not self._fits(op, args, kwargs):
                del slots[n_slots:], scalars[n_scalars:]
                found = self._switch(rec, args, kwargs)
                if found is None:
                    self._mismatch()
                    return MISS
                op = found
            return self._emit_op(op, args, kwargs)

    def try_next(self, rec: OpRecord, args: tuple, kwargs: dict) -> Any:
        """Note [Replay fast path]: the op's outputs if it is the replay's next op; otherwise
        `MISS`, with nothing changed (the ordinary path then decides)."""
        with self.lock:
            if self.state != REPLAYING:
                return MISS
            trace = self.trace
            assert trace is not None
            op = trace.ops[self.pos]
            if op.rec is not rec:
                return MISS
            slots, scalars = self.slots, self.scalars
            n_slots, n_scalars = len(slots), len(scalars)
            if not self._fits(op, args, kwargs):
                del slots[n_slots:], scalars[n_scalars:]
                return MISS
            return self._emit_op(op, args, kwargs)

    def _fits(self, op: TraceOp, args: tuple, kwargs: dict) -> bool:
        base, session, slots, scalars = self.base, self.session, self.slots, self.scalars
        if not _match(op.args, args, base, session, slots, scalars):
            return False
        if kwargs or op.kw_keys:
            if len(kwargs) != len(op.kw_keys):
                return False
            try:
                vals = [kwargs[k] for k in op.kw_keys]
            except KeyError:
                return False
            return _match(op.kwargs, vals, base, session, slots, scalars)
        return True

    def _start(self, rec: OpRecord, args: tuple, kwargs: dict) -> bool:
        """Begin replaying the most recently used trace whose first op fits this op."""
        self.base = self._next_base
        for trace in sorted(self.traces.values(), key=lambda t: -t.used):
            first = trace.ops[0]
            self.slots, self.scalars, self.frees = [], [], []
            if first.rec is rec and self._fits(first, args, kwargs):
                self.trace, self.pos, self.chunk_start = trace, 0, 0
                self._next_base += trace.values + 1
                self.state = REPLAYING
                self.chunk_t0 = time.perf_counter()
                trace.used = self.chunk_t0
                self.conn.replay_pending = True
                global active
                active = self
                return True
        return False

    def _switch(self, rec: OpRecord, args: tuple, kwargs: dict) -> TraceOp | None:
        """Another registered trace with the same ops so far whose next op fits this one."""
        cur = self.trace
        assert cur is not None
        prefix = cur.key[: self.pos]
        for trace in self.traces.values():
            if trace is cur or len(trace.ops) <= self.pos or trace.key[: self.pos] != prefix:
                continue
            op = trace.ops[self.pos]
            n_slots, n_scalars = len(self.slots), len(self.scalars)
            if op.rec is rec and self._fits(op, args, kwargs):
                # This op's slots and scalars belong to the new trace's first chunk.
                slots, scalars = self.slots[n_slots:], self.scalars[n_scalars:]
                del self.slots[n_slots:], self.scalars[n_scalars:]
                if self.pos > self.chunk_start:
                    self._send_chunk()
                self.slots, self.scalars = slots, scalars
                # Note: the ops so far are the same in both traces, values and slots numbered
                # alike: the next chunks name the new trace from here.
                self.trace = trace
                self.chunk_start = self.pos
                self._next_base = max(self._next_base, self.base + trace.values + 1)
                return op
            del self.slots[n_slots:], self.scalars[n_scalars:]
        return None

    def _emit_op(self, op: TraceOp, args: tuple, kwargs: dict) -> Any:
        conn = self.conn
        if conn.frees:
            frees, conn.frees = conn.frees, []
            self.frees.append(m.FreeAt(self.pos, frees))
        session, base, device = self.session, self.base, self.session.device
        inputs = meta.remote_inputs(args, kwargs) if op.any_input_out else None
        results: list[torch.Tensor] = []
        for arg, value, layout, bits, changed in op.outs:
            if arg >= 0:
                assert inputs is not None
                t = inputs[arg]
                if changed:
                    from gpupool.client.dispatch import _set_layout

                    _set_layout(t, layout)
                results.append(t)
            else:
                r = RemoteTensor(Handle(base + value, session), layout[0], layout[1], layout[2], layout[3], device)
                if bits:
                    meta.set_bits(r, bits)
                    r._bits = bits
                results.append(r)
        self.pos += 1
        trace = self.trace
        assert trace is not None
        if self.pos == len(trace.ops):
            self._send_chunk()
            self.stats["segments_replayed"] += 1
            self._end_replay()
        elif self.pos - self.chunk_start >= MAX_PENDING or time.perf_counter() - self.chunk_t0 >= conn.flush_after:
            self._send_chunk()
            conn._flush_locked()
        return meta.rebuild(op.structure, iter(results))

    def _send_chunk(self) -> None:
        """Queue the ops matched since the last chunk as one `Replay` (Note [Replay chunks])."""
        trace = self.trace
        assert trace is not None
        if self.pos > self.chunk_start:
            seq = self.conn.next_seq()
            cmd = m.Replay(seq, trace.id, self.chunk_start, self.pos, self.base, self.slots, self.scalars, self.frees)
            self.conn.queue_raw(msgspec.Raw(self._encoder.encode(cmd)), seq, trace.ops[self.chunk_start].rec.name,
                                trace.where)
            self.stats["ops_replayed"] += self.pos - self.chunk_start
        self.slots, self.scalars, self.frees = [], [], []
        self.chunk_start = self.pos
        self.chunk_t0 = time.perf_counter()

    def _end_replay(self) -> None:
        global active
        self.trace = None
        self.state = START
        self.conn.replay_pending = False
        if active is self:
            active = None

    def _mismatch(self) -> None:
        """Note [Replay is exact]: send what matched, record the segment from its prefix on."""
        trace = self.trace
        assert trace is not None
        self.stats["mismatches"] += 1
        self._send_chunk()
        pos, base = self.pos, self.base
        self._end_replay()
        self._begin_recording()
        if pos and self.state == RECORDING:
            prefix = trace.ops[:pos]
            self.ops = prefix
            self._values = prefix[-1].values_before + sum(1 for x in prefix[-1].outs if x[1] >= 0)
            self._slots, self._scalars = _counts_after(prefix)
            self.produced = {base + v: v for v in range(self._values)}

    def pending(self) -> None:
        """Another command is about to be queued: the matched ops go first (Note [Replay chunks])."""
        if self.state == REPLAYING and self.pos > self.chunk_start:
            self._send_chunk()

    # ---- recording -----------------------------------------------------------------------------

    def _begin_recording(self) -> None:
        self._segments += 1
        if self._unregistered >= PATIENCE and self._segments % RECORD_EVERY:
            self.state = IDLE
            return
        self.state = RECORDING
        self.ops, self.produced = [], {}
        self._values = self._slots = self._scalars = 0

    def record(self, rec: OpRecord, args: tuple, kwargs: dict, plan: meta.Plan, outs: list[int]) -> None:
        """An op that went the ordinary way (`dispatch._launch`): add it to the segment."""
        with self.lock:
            if self.state == START:
                self._begin_recording()
            if self.state != RECORDING:
                return
            if len(self.ops) >= MAX_TRACE_OPS:
                self.state = IDLE
                return
            values = rec.values_matter
            produced = self.produced
            try:
                a = tuple(_leaf(x, values, produced) for x in args)
                keys = tuple(kwargs)
                kw = tuple(_leaf(kwargs[k], values, produced) for k in keys)
            except Untraceable:
                self.state = IDLE
                return
            specs = []
            v0 = self._values
            for spec, h in zip(plan.outs, outs):
                if spec.arg >= 0:
                    specs.append((spec.arg, -1, spec.layout, 0, spec.changed))
                else:
                    produced[h] = self._values
                    specs.append((-1, self._values, spec.layout, spec.bits, False))
                    self._values += 1
            n_slots, n_scalars = _counts_after_leaves(a + kw)
            op = TraceOp(rec, a, keys, kw, tuple(specs), plan.structure, v0, self._slots, self._scalars)
            op.where = _user_location()
            self._slots += n_slots
            self._scalars += n_scalars
            self.ops.append(op)

    def boundary(self) -> None:
        """The segment ends here (Note [Segments])."""
        with self.lock:
            if self.state == REPLAYING:
                self.stats["partial"] += 1
                self._send_chunk()
                self._end_replay()
                return
            recorded = self.ops if self.state == RECORDING else []
            self.state = START
            self.ops, self.produced = [], {}
            if recorded:
                self._learn(recorded)

    def _learn(self, ops: list[TraceOp]) -> None:
        try:
            key = tuple(op.key for op in ops)
            hash(key)
        except TypeError:
            return
        if key in self._by_key:
            return
        seen = self._seen.pop(key, 0) + 1
        if seen < SEEN_TO_REGISTER:
            self._seen[key] = seen
            while len(self._seen) > MAX_SEEN:
                del self._seen[next(iter(self._seen))]
            self._unregistered += 1
            return
        self._register(ops, key)

    def _register(self, ops: list[TraceOp], key: tuple) -> None:
        """Send the trace; it is used once the server has accepted it (one round trip, once)."""
        values = sum(1 for o in ops for x in o.outs if x[1] >= 0)
        tid = self._next_id
        self._next_id += 1
        wire = []
        counters = [0, 0]
        for op in ops:
            tmpl = [[_wire(x, counters) for x in op.args], {k: _wire(x, counters) for k, x in zip(op.kw_keys, op.kwargs)}]
            try:
                blob = self._encoder.encode(tmpl)
            except TypeError:
                return
            wire.append(m.TraceOp(op.rec.name, blob, [x[1] for x in op.outs]))
        refused = self.conn.ask(m.Trace(tid, wire, values))
        if refused:
            self.stats["traces_refused"] += 1
            self._by_key[key] = Trace(0, [], 0, key)  # never retried
            return
        if len(self.traces) >= MAX_TRACES:
            old = min(self.traces.values(), key=lambda t: t.used)
            del self.traces[old.id]
            del self._by_key[old.key]
            self.conn.queue_raw(msgspec.Raw(m.plain_encoder.encode(m.Forget(old.id))), 0, "")
        trace = Trace(tid, ops, values, key)
        self.traces[tid] = trace
        self._by_key[key] = trace
        self._unregistered = 0
        self.stats["traces_registered"] += 1


def _counts_after_leaves(leaves: tuple) -> tuple[int, int]:
    slots = scalars = 0
    for kind, d in leaves:
        if kind == EXTERNAL:
            slots += 1
        elif kind == SCALAR:
            scalars += 1
        elif kind == LIST:
            s, c = _counts_after_leaves(d[1])
            slots += s
            scalars += c
    return slots, scalars


def _counts_after(ops: list[TraceOp]) -> tuple[int, int]:
    last = ops[-1]
    s, c = _counts_after_leaves(last.args + last.kwargs)
    return last.slots_before + s, last.scalars_before + c


_hook_lock = threading.Lock()
_hooked = False


def install_step_hook() -> None:
    """End a segment after every `optimizer.step()` (Note [Segments])."""
    global _hooked
    with _hook_lock:
        if _hooked:
            return
        _hooked = True
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        from gpupool.client.session import sessions

        for s in sessions():
            r = s.conn.replayer
            if r is not None:
                r.boundary()

    register_optimizer_step_post_hook(after_step)
