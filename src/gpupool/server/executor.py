"""Executes one session's command stream against a handle table on one device.

One `Executor` per session, in its lease's worker process (`worker.py`), driven frame by frame
(`serve_frame`); everything it does with untrusted input is validated here.

Note [Errors are deferred]: like a CUDA stream, commands run asynchronously from the client's
point of view. The first failure since the last reply is kept in `self.error` and returned with
the next reply (a sync point); later commands still run, and those that use a handle a failed
command should have produced fail too (their errors are not reported: the first is the cause).

Note [Checks around an op]: before an op runs, the op policy (`oppolicy.py`) has judged its
resolved overload, and its arguments are checked: a device must be the session's own; dtype,
layout and memory format must be the decoded torch objects, never raw integers that aten would
take as out-of-range enum values; strings one of their listed values; no generator. Kernels
that trust their integer arguments get them sanitised (Note [Sanitisers]). Ops whose output
size follows from their arguments (factories, `repeat`, `clone`, ...) and `out=` ops (sized on
meta tensors) are refused before they allocate past the lease's budget. After it ran, every
result must be a strided dense tensor on the session's device (views inside their storage),
tensors it wrote to are re-measured, and the budget is checked again: an op that broke it
leaves no result behind and gives back what it grew.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import torch

from gpupool import torchcodec, wholeops
from gpupool.errors import ProtocolError, ServerLost
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter
from gpupool.server.memory import Budget
from gpupool.server.oppolicy import TYPED_KINDS, OpDenied, OpPolicy, OpSpec, out_growth
from gpupool.server.sanitisers import Bound, SanitiserRefused
from gpupool.server.traces import ReplayRefused, SessionTraces, template_ext_hook
from gpupool.torchcodec import DTYPE_TO_NAME, DTYPES, host_bytes
from gpupool.units import format_bytes

log = logging.getLogger("gpupool.server")


class Ref:
    """A tensor argument by handle, resolved when its command runs."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle


class OpFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _in_bounds(t: torch.Tensor) -> bool:
    """Whether every element of `t` lies inside its storage (false for a forged view)."""
    if t.layout != torch.strided or t.numel() == 0:
        return True
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.storage_offset() >= 0 and min(t.stride(), default=0) >= 0 and (last + 1) * t.element_size() <= t.untyped_storage().nbytes()


#: Host tensors a GPU session's op may return: some kernels return small CPU tensors by design
#: (e.g. the philox seed and offset of memory-efficient attention).
SMALL_HOST_BYTES = 64 * 1024


def _tolerated_elsewhere(t: torch.Tensor) -> bool:
    """A result off the session's device that holds no memory worth counting."""
    if t.device.type == "meta":
        return True
    return t.device.type == "cpu" and t.untyped_storage().nbytes() <= SMALL_HOST_BYTES


_RNN = torch.ops.gpupool.rnn.default
_RNN_CELL = torch.ops.gpupool.rnn_cell.default
_ALLOC_BYTES = re.compile(r"allocate (\d+) bytes")
_STRIDED = torch.strided
_NONE: list[Any] = []  # never appended to: the written tensors of an op that writes none


class _Snapshot:
    """A written tensor's storage size and layout before an op that may grow it."""

    __slots__ = ("storage", "nbytes", "offset", "size", "stride")

    def __init__(self, t: torch.Tensor) -> None:
        self.storage = t.untyped_storage()
        self.nbytes = self.storage.nbytes()
        self.offset, self.size, self.stride = t.storage_offset(), t.size(), t.stride()

    def restore(self, t: torch.Tensor) -> None:
        if self.storage.nbytes() > self.nbytes:
            self.storage.resize_(self.nbytes)
        t.set_(self.storage, self.offset, self.size, self.stride)


class Executor:
    """One session's handle table and error state, drawing on its lease's `Budget`."""

    def __init__(self, device: torch.device, budget: Budget | int, policy: OpPolicy | None = None,
                 record: set[str] | None = None) -> None:
        self.device = device
        self.budget = budget if isinstance(budget, Budget) else Budget(device, budget)
        self.table: dict[int, torch.Tensor] = {}
        self.error: m.ErrorInfo | None = None
        self.ledger = self.budget.ledger
        self._key = self.budget.new_session() << 64  # this session's ledger keys: key | handle
        self.is_cuda = device.type == "cuda"
        self.policy = policy or OpPolicy()
        self._specs = self.policy.specs  # the policy's cache, read here without a call per op
        self.ran = record  # if given: where the canonical names of the ops that ran are added
        args = torchcodec.arg_ext_hook(Ref, device)
        self.decoder = m.make_decoder(m.Batch, ext_hook=args)
        self.encoder = m.make_encoder(enc_hook=torchcodec.result_enc_hook)
        template = m.make_decoder(tuple[list[Any], dict[str, Any]], ext_hook=template_ext_hook(args))
        self._saved: dict[int, int] = {}  # context handle -> saved tensors counted (`_count_saved`)
        self.traces = SessionTraces(self._spec, template.decode, self._check_args, Ref, OpFailed)

    @property
    def memory_limit(self) -> int:
        return self.budget.limit

    # ---- the handle table -------------------------------------------------------------------

    def _get(self, handle: int) -> torch.Tensor:
        try:
            return self.table[handle]
        except KeyError:
            raise OpFailed("handle", f"tensor handle {handle} does not exist (freed, or produced by a failed op)") from None

    def _store(self, handle: int, t: torch.Tensor) -> None:
        if handle in self.table and not self.is_cuda:
            self.ledger.remove(self._key | handle)
            if self._saved:
                self._uncount_saved(handle)
        self.table[handle] = t
        if not self.is_cuda:
            self.ledger.add(self._key | handle, t)

    def _free(self, handle: int) -> None:
        if self.table.pop(handle, None) is not None and not self.is_cuda:
            self.ledger.remove(self._key | handle)
            if self._saved:
                self._uncount_saved(handle)

    def _count_saved(self, handle: int, ctx: torch.Tensor) -> None:
        """Count what the autograd graph behind a `gpupool::rnn` context keeps (Note [Whole
        RNNs] in wholeops.py) as long as the context's handle; the ledger counts each storage
        once, so saved inputs and outputs that handles hold already cost nothing more."""
        if self.is_cuda:
            return  # the caching allocator counts them
        saved = wholeops.saved_tensors(ctx)
        for i, t in enumerate(saved):
            self.ledger.add(self._saved_key(handle, i), t)
        if saved:
            self._saved[handle] = len(saved)

    def _uncount_saved(self, handle: int) -> None:
        for i in range(self._saved.pop(handle, 0)):
            self.ledger.remove(self._saved_key(handle, i))

    def _saved_key(self, handle: int, i: int) -> int:
        # Negative: apart from every handle's key (`self._key | handle`, never negative).
        return -(((self._key | handle) << 32) | (i + 1))

    def close(self) -> None:
        """Drop every tensor of this session (its lease's other sessions keep theirs)."""
        for h in list(self.table):
            self._free(h)

    def memory_used(self) -> int:
        return self.budget.used()

    def memory_peak(self) -> int:
        return self.budget.peak()

    def _oom(self, needed: int | None = None) -> OpFailed:
        used = self.memory_used()
        extra = f", and this needs {format_bytes(needed)} more" if needed else ""
        return OpFailed(
            "oom",
            f"out of memory: this lease's share is {format_bytes(self.memory_limit)} "
            f"({self.memory_limit} bytes), {format_bytes(used)} of it in use{extra}. Free tensors, "
            "use smaller batches, or ask for a bigger share",
        )

    def _resolve(self, x: Any) -> Any:
        t = type(x)
        if t is Ref:
            return self._get(x.handle)
        if t is list:
            return [self._resolve(v) for v in x]
        return x

    # ---- commands ---------------------------------------------------------------------------

    def _record(self, seq: int, op: str, exc: BaseException, at: int = -1) -> None:
        if self.error is not None:
            return
        text = str(exc)
        if isinstance(exc, OpFailed):
            kind, msg = exc.kind, text
        elif isinstance(exc, ReplayRefused):
            kind, msg = "protocol", text
        elif isinstance(exc, wholeops.RnnArgumentError):
            kind, msg = "op", text
        elif isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text:
            found = _ALLOC_BYTES.search(text)
            kind, msg = "oom", str(self._oom(int(found.group(1)) if found else None))
        else:
            kind, msg = "op", f"{type(exc).__name__}: {text}"
        self.error = m.ErrorInfo(seq=seq, op=op, kind=kind, message=msg[:4000], at=at)

    def _take_error(self) -> m.ErrorInfo | None:
        e, self.error = self.error, None
        return e

    def _spec(self, name: str) -> OpSpec:
        try:
            return self.policy.spec(name)
        except OpDenied as e:
            raise OpFailed(e.kind, str(e)) from None

    def _check_args(self, spec: OpSpec, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Typed enums must be the decoded torch objects, strings one of their listed values."""
        for i, name, kind in spec.typed:
            v = args[i] if i < len(args) else kwargs.get(name)
            if v is None:
                continue
            if type(v) is not TYPED_KINDS[kind]:
                raise OpFailed("op", f"argument {name!r} of {spec.name} must be a {kind}, got {type(v).__name__}")
            if kind == "device" and v != self.device:
                raise OpFailed("denied", f"a session may only use its own device, not {v}")
        for i, name, values in spec.strings:
            v = args[i] if i < len(args) else kwargs.get(name)
            if v is not None and (type(v) is not str or v not in values):
                shown = repr(v)[:40]
                raise OpFailed("denied", f"argument {name!r} of {spec.name} must be one of {sorted(values)}, not {shown}")
        for i, name in spec.generators:
            if (args[i] if i < len(args) else kwargs.get(name)) is not None:
                raise OpFailed("op", "explicit generators are not supported; use torch.manual_seed")

    def run_op(self, cmd: m.Op, checked: bool = False) -> tuple[list[torch.Tensor], list[Any]]:
        """Run one op under Note [Checks around an op]; a failed op stores nothing.

        `checked`: its typed and string arguments were checked already (a replayed op: they are
        constants of its trace, checked when it was registered, Note [Trace templates])."""
        spec = self._specs.get(cmd.op) or self._spec(cmd.op)
        get = self._get
        args = [get(x.handle) if type(x) is Ref else self._resolve(x) for x in cmd.args]
        kwargs = {k: self._resolve(v) for k, v in cmd.kwargs.items()} if cmd.kwargs else {}
        if spec.checked and not checked:
            self._check_args(spec, args, kwargs)
        fixup = None
        if spec.sanitise is not None:
            try:
                fixup = spec.sanitise(Bound(spec.names, args, kwargs))
            except SanitiserRefused as e:
                raise OpFailed("denied", f"{spec.name}: {e}") from None
        if spec.estimate is not None:
            need = spec.estimate(lambda name: spec.arg(name, args, kwargs))
            if need is not None and self.memory_used() + need > self.memory_limit:
                raise self._oom(need)
        written = self._written(spec, cmd, args) if spec.writes else _NONE
        if spec.out:
            need = out_growth(spec, args, kwargs)
            if need and self.memory_used() + need > self.memory_limit:
                raise self._oom(need)
        before = [_Snapshot(t) for _, t in written] if spec.grows else _NONE
        try:
            result = spec.call(*args, **kwargs)
            if fixup is not None:
                result = fixup(result)
        finally:
            if written:
                self._refresh(written)
        tensors: list[torch.Tensor] = []
        values: list[Any] = []
        _flatten(result, tensors, values)
        if len(tensors) != len(cmd.outs) and not (cmd.reply and len(tensors) <= len(cmd.outs)):
            raise OpFailed("op", f"{cmd.op} returned {len(tensors)} tensors, the client expected {len(cmd.outs)}")
        # Note: only results stored under a new handle are checked: one the client marks -1 is
        # an input the op wrote (checked by `_refresh`), or, from a lying client, dropped now.
        dev = self.device
        on_cpu = not self.is_cuda
        for h, t in zip(cmd.outs, tensors):
            # The common result (strided, a named dtype, on the device, not a view) costs no call.
            if h >= 0 and (t.layout is not _STRIDED or t.is_nested or t.dtype not in DTYPE_TO_NAME
                           or spec.views or (not t.is_cpu if on_cpu else t.device != dev)):
                self._check_result(spec, t)
        stored = []
        for h, t in zip(cmd.outs, tensors):
            if h >= 0:
                self._store(h, t)
                stored.append(h)
        if (spec.fn is _RNN or spec.fn is _RNN_CELL) and stored and cmd.outs[-1] >= 0:
            self._count_saved(cmd.outs[-1], tensors[-1])
        if (self.budget.used() if self.is_cuda else self.ledger.used) > self.budget.limit:
            for h in stored:
                self._free(h)
            self._roll_back(written, before)
            raise self._oom()
        if self.ran is not None:
            self.ran.add(spec.name)
        return tensors, values

    def _check_result(self, spec: OpSpec, t: torch.Tensor) -> None:
        """A result the session may keep: a strided dense tensor on its device, inside its
        storage, of a dtype the wire can name (Note [Deny by default] in protocol/ops.py)."""
        if t.layout is not _STRIDED or t.is_nested or t.dtype not in DTYPE_TO_NAME:  # quantized too
            raise OpFailed("denied", f"{spec.name} made a {t.layout} {t.dtype} tensor: only strided dense tensors may be kept")
        if t.device != self.device and not _tolerated_elsewhere(t):
            raise OpFailed("denied", f"{spec.name} made a tensor on {t.device}, not on the session's device")
        if spec.views and not _in_bounds(t):
            raise OpFailed("denied", f"{spec.name} made a view outside its tensor's storage")

    def _written(self, spec: OpSpec, cmd: m.Op, args: list[Any]) -> list[tuple[int, torch.Tensor]]:
        """The handles (with their tensors) of the arguments `spec`'s op writes to."""
        out: list[tuple[int, torch.Tensor]] = []
        for i, name in spec.writes:
            raw = cmd.args[i] if i < len(cmd.args) else cmd.kwargs.get(name)
            for r in raw if isinstance(raw, list) else [raw]:
                if type(r) is Ref:
                    out.append((r.handle, self.table[r.handle]))
        return out

    def _refresh(self, written: list[tuple[int, torch.Tensor]]) -> None:
        """Re-measure tensors an op wrote to; one resized out of bounds is dropped."""
        for h, t in written:
            if not _in_bounds(t):
                self._free(h)
                raise OpFailed("denied", f"tensor handle {h} was changed to reach outside its storage")
            if not self.is_cuda and h in self.table:
                self.ledger.refresh(self._key | h, t)

    def _roll_back(self, written: list[tuple[int, torch.Tensor]], before: list[_Snapshot]) -> None:
        """Give back what an op that broke the budget grew: written tensors get their old
        storage size and layout again (their contents are undefined, as after any failed op)."""
        for (h, t), snap in zip(written, before):
            snap.restore(t)
            if not self.is_cuda and h in self.table:
                self.ledger.refresh(self._key | h, t)

    def upload(self, cmd: m.Upload, reader: FrameReader) -> None:
        """Receive the next buffer; always consumes it, even when the command fails."""
        if not reader.pending_buffers or reader.pending_buffers[0] != cmd.nbytes:
            raise ProtocolError(
                f"upload of {cmd.nbytes} bytes without its buffer (the frame has "
                f"{reader.pending_buffers[:1] or 'no'} buffer bytes left)"
            )
        before = len(reader.pending_buffers)
        try:
            self._upload(cmd, reader)
        finally:
            # Note: whatever failed, the buffer is consumed so the stream stays in sync.
            if len(reader.pending_buffers) == before:
                reader.skip_next()

    def _upload(self, cmd: m.Upload, reader: FrameReader) -> None:
        dtype = DTYPES.get(cmd.dtype)
        if dtype is None:
            raise OpFailed("protocol", f"unknown dtype {cmd.dtype[:40]!r}")
        if cmd.into:
            dst = self._get(cmd.handle)
            if dst.dtype != dtype or not dst.is_contiguous() or dst.nbytes != cmd.nbytes:
                raise OpFailed("op", "upload into a tensor of another layout")
            if not self.is_cuda:
                reader.read_buffer_into(host_bytes(dst))
                return
            staging = torch.empty(cmd.nbytes, dtype=torch.uint8, pin_memory=True)
            reader.read_buffer_into(host_bytes(staging))
            dst.view(-1).view(torch.uint8).copy_(staging, non_blocking=True)
            return
        if (
            len(cmd.shape) != len(cmd.stride)
            or len(cmd.shape) > 64
            or any(s < 0 for s in cmd.shape)
            or any(st < 0 for st in cmd.stride)
            or cmd.offset < 0
        ):
            raise OpFailed("protocol", "bad upload layout")
        if cmd.nbytes % dtype.itemsize:
            raise OpFailed("protocol", "upload size is not a whole number of elements")
        if self.memory_used() + cmd.nbytes > self.memory_limit:
            raise self._oom(cmd.nbytes)
        numel = cmd.nbytes // dtype.itemsize
        if all(cmd.shape):
            need = cmd.offset + 1 + sum((s - 1) * st for s, st in zip(cmd.shape, cmd.stride))
            if need > numel:
                raise OpFailed("protocol", "upload layout reaches past its data")
        host = torch.empty(cmd.nbytes, dtype=torch.uint8)
        reader.read_buffer_into(host_bytes(host))
        flat = host.view(dtype) if cmd.nbytes else torch.empty(0, dtype=dtype)
        if self.is_cuda:
            flat = flat.to(self.device)
        self._store(cmd.handle, flat.as_strided(cmd.shape, cmd.stride, cmd.offset))

    def fetch(self, handle: int) -> tuple[m.Data, memoryview | Iterator[memoryview] | None]:
        """The tensor's elements in C order: a contiguous CPU tensor's own memory, else slices
        of at most `FETCH_CHUNK` bytes gathered one at a time (never a full copy)."""
        err = self._take_error()
        if err is not None:
            return m.Data(error=err), None
        try:
            t = self._get(handle).detach().resolve_conj().resolve_neg()
            nbytes = t.numel() * t.element_size()
            if t.device.type == "cpu" and t.is_contiguous():
                return m.Data(nbytes=nbytes), host_bytes(t)
            return m.Data(nbytes=nbytes), (host_bytes(c.cpu()) for c in _c_order_chunks(t, FETCH_CHUNK))
        except Exception as e:  # noqa: BLE001 - reported to the client
            self._record(-1, "fetch", e)
            return m.Data(error=self._take_error()), None

    def item(self, handle: int) -> m.Value:
        err = self._take_error()
        if err is not None:
            return m.Value(error=err)
        try:
            t = self._get(handle)
            return m.Value(value=t.item())
        except Exception as e:  # noqa: BLE001
            self._record(-1, "item", e)
            return m.Value(error=self._take_error())

    def synced(self) -> m.Synced:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        return m.Synced(
            error=self._take_error(),
            memory_used=self.memory_used(),
            memory_peak=self.memory_peak(),
            memory_limit=self.memory_limit,
        )

    # ---- the loop ---------------------------------------------------------------------------

    def serve(self, reader: FrameReader, writer: FrameWriter) -> None:
        """Run commands until the client says goodbye or goes away.

        Raises `ProtocolError` for a stream that is not valid gpupool protocol; the caller ends
        the session with a `Refused` reply.
        """
        try:
            while not self.serve_frame(reader, writer):
                pass
        except ServerLost:
            return  # client went away: its tensors are dropped with the executor

    def serve_frame(self, reader: FrameReader, writer: FrameWriter) -> bool:
        """Read one frame and run its commands; True when the session ends (`Bye`)."""
        raw, _ = reader.read_message()
        batch = m.decode(self.decoder, raw, "command batch")
        del raw
        for cmd in batch.cmds:
            if self.handle(cmd, reader, writer):
                return True
        if reader.has_pending_buffers:
            raise ProtocolError("frame carries buffers no command asked for")
        return False

    def handle(self, cmd: m.Command, reader: FrameReader, writer: FrameWriter) -> bool:
        """Execute one command; returns True when the session should end."""
        t = type(cmd)
        if t is m.Op:
            assert isinstance(cmd, m.Op)
            for h in cmd.frees:
                self._free(h)
            try:
                tensors, values = self.run_op(cmd)
                metas = [_meta(x) for x in tensors] if cmd.reply else None
            except Exception as e:  # noqa: BLE001 - deferred to the next sync (or this reply)
                self._free_outs(cmd)
                self._record(cmd.seq, cmd.op, e)
                if cmd.reply:
                    writer.send(self.encoder.encode(m.OpResult(error=self._take_error())))
                return False
            if cmd.reply:
                err = self._take_error()
                try:
                    encoded = self.encoder.encode(m.OpResult(error=err, metas=metas or [], values=values))
                except TypeError as e:
                    self._free_outs(cmd)
                    failed = m.ErrorInfo(cmd.seq, cmd.op, "op", f"cannot send the result: {e}")
                    encoded = self.encoder.encode(m.OpResult(error=err or failed))
                writer.send(encoded)
        elif t is m.Replay:
            assert isinstance(cmd, m.Replay)
            self.traces.replay(cmd, self)
        elif t is m.Free:
            assert isinstance(cmd, m.Free)
            for h in cmd.handles:
                self._free(h)
        elif t is m.Trace:
            assert isinstance(cmd, m.Trace)
            writer.send(self.encoder.encode(m.Value(value=self.traces.register(cmd))))
        elif t is m.Forget:
            assert isinstance(cmd, m.Forget)
            self.traces.forget(cmd.trace)
        elif t is m.Upload:
            assert isinstance(cmd, m.Upload)
            try:
                self.upload(cmd, reader)
            except (ProtocolError, ServerLost):
                raise
            except Exception as e:  # noqa: BLE001 - deferred to the next sync
                self._record(cmd.seq, "upload", e)
        elif t is m.Fetch:
            assert isinstance(cmd, m.Fetch)
            reply, payload = self.fetch(cmd.handle)
            if payload is None:
                writer.send(self.encoder.encode(reply))
            elif isinstance(payload, memoryview):
                writer.send(self.encoder.encode(reply), [payload])
            else:
                # Note: past the header there is no way to report an error in-band; a failure
                # while gathering ends the session, without another frame after the broken one.
                try:
                    writer.send_stream(self.encoder.encode(reply), reply.nbytes, payload)
                except ServerLost:
                    raise
                except Exception as e:  # noqa: BLE001
                    log.warning("fetch of handle %d failed mid-stream: %s", cmd.handle, e)
                    raise ServerLost(f"fetch failed mid-stream: {e}") from e
        elif t is m.Item:
            assert isinstance(cmd, m.Item)
            writer.send(self.encoder.encode(self.item(cmd.handle)))
        elif t is m.Sync or t is m.Stats:
            writer.send(self.encoder.encode(self.synced()))
        elif t is m.Seed:
            assert isinstance(cmd, m.Seed)
            try:
                # Note: not torch.manual_seed: on a CPU-only build it also queues a lazy CUDA
                # seeding call with a formatted stack, ~25x the cost of seeding itself.
                torch.random.default_generator.manual_seed(cmd.seed)
                if self.is_cuda:
                    torch.cuda.manual_seed(cmd.seed)
            except (RuntimeError, ValueError, OverflowError) as e:
                self._record(-1, "manual_seed", e)
        elif t is m.GetRngState:
            err = self._take_error()
            value = None if err is not None else bytes(self._generator().get_state().numpy())
            writer.send(self.encoder.encode(m.Value(error=err, value=value)))
        elif t is m.SetRngState:
            assert isinstance(cmd, m.SetRngState)
            try:
                if len(cmd.state) > m.MAX_RNG_STATE:
                    raise OpFailed("protocol", "generator state too large")
                self._generator().set_state(torch.frombuffer(bytearray(cmd.state), dtype=torch.uint8))
            except (OpFailed, RuntimeError, ValueError) as e:
                self._record(-1, "set_rng_state", e)
        elif t is m.Bye:
            return True
        return False

    def _free_outs(self, cmd: m.Op) -> None:
        """Note: a failed op, or one whose result cannot be described, leaves no handle."""
        for h in cmd.outs:
            if h >= 0:
                self._free(h)

    def _generator(self) -> torch.Generator:
        """The session's device generator: what random ops without `generator=` draw from."""
        if self.is_cuda:
            return torch.cuda.default_generators[self.device.index or 0]
        return torch.random.default_generator


#: Largest slice a strided or device tensor is gathered into on its way to the client.
FETCH_CHUNK = 4 * 1024 * 1024


def _c_order_chunks(t: torch.Tensor, limit: int) -> Iterator[torch.Tensor]:
    """Contiguous pieces of `t` that, concatenated, are `t`'s elements in C order."""
    if t.is_contiguous():
        flat = t.reshape(-1)  # a view
        step = max(1, limit // max(1, t.element_size()))
        for i in range(0, flat.numel(), step):
            yield flat[i : i + step]
        return
    if t.dim() == 0:
        yield t.contiguous()
        return
    row = (t[0].numel() if t.shape[0] else 0) * t.element_size()
    if row > limit:
        for i in range(t.shape[0]):
            yield from _c_order_chunks(t[i], limit)
        return
    step = max(1, limit // max(1, row))
    for i in range(0, t.shape[0], step):
        yield t[i : i + step].contiguous()


def _flatten(result: Any, tensors: list[torch.Tensor], values: list[Any]) -> None:
    if isinstance(result, torch.Tensor):
        tensors.append(result)
    elif isinstance(result, (tuple, list)):
        for r in result:
            _flatten(r, tensors, values)
    elif result is not None:
        values.append(result)


def _meta(t: torch.Tensor) -> m.TensorMeta:
    return m.TensorMeta(
        shape=list(t.shape),
        stride=list(t.stride()),
        offset=t.storage_offset(),
        dtype=DTYPE_TO_NAME[t.dtype],
        storage_bytes=t.untyped_storage().nbytes(),
    )
