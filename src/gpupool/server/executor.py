"""Executes one session's command stream against a handle table on one device.

One `Executor` lives in each session's worker process. It is driven by `serve()` with a frame
reader and writer; everything it does with untrusted input is validated here.

Note [Errors are deferred]: like a CUDA stream, commands run asynchronously from the client's
point of view. The first failure since the last reply is kept in `self.error` and returned with
the next reply (a sync point); later commands still run, and those that use a handle a failed
command should have produced fail too (their errors are not reported: the first is the cause).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import torch

from gpupool.errors import ProtocolError, ServerLost
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, FrameWriter
from gpupool.protocol.ops import check_op_name
from gpupool.server.memory import StorageLedger
from gpupool.torchcodec import (
    DTYPE_TO_NAME,
    DTYPES,
    LAYOUTS,
    MEMORY_FORMATS,
    host_bytes,
    resolve_op,
)

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


def _ext_payload_name(data: memoryview, allowed: dict[str, Any], what: str) -> Any:
    try:
        name = bytes(data).decode("ascii")
        return allowed[name]
    except (UnicodeDecodeError, KeyError):
        raise msgspec.ValidationError(f"unknown {what} {bytes(data)[:40]!r}") from None


class Executor:
    def __init__(self, device: torch.device, memory_limit: int) -> None:
        self.device = device
        self.memory_limit = memory_limit
        self.table: dict[int, torch.Tensor] = {}
        self.error: m.ErrorInfo | None = None
        self.ledger = StorageLedger()
        self.is_cuda = device.type == "cuda"
        self._ops: dict[str, torch._ops.OpOverload] = {}
        self.decoder = m.make_decoder(m.Batch, ext_hook=self._ext_hook)
        self.encoder = m.make_encoder(enc_hook=self._enc_hook)

    # ---- decoding ---------------------------------------------------------------------------

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code == m.ExtCode.TENSOR:
            if len(data) != 8:
                raise msgspec.ValidationError("bad tensor reference")
            return Ref(m.HANDLE.unpack(data)[0])
        if code == m.ExtCode.DTYPE:
            return _ext_payload_name(data, DTYPES, "dtype")
        if code == m.ExtCode.DEVICE:
            return self.device
        if code == m.ExtCode.MEMORY_FORMAT:
            return _ext_payload_name(data, MEMORY_FORMATS, "memory format")
        if code == m.ExtCode.LAYOUT:
            return _ext_payload_name(data, LAYOUTS, "layout")
        if code == m.ExtCode.COMPLEX:
            if len(data) != m.COMPLEX.size:
                raise msgspec.ValidationError("bad complex")
            re, im = m.COMPLEX.unpack(data)
            return complex(re, im)
        if code == m.ExtCode.CPU_TENSOR:
            return self._decode_cpu_tensor(data)
        raise msgspec.ValidationError(f"unknown extension type {code}")

    @staticmethod
    def _decode_cpu_tensor(data: memoryview) -> torch.Tensor:
        if len(data) > m.MAX_EXT_BYTES:
            raise msgspec.ValidationError("inline tensor too large")
        dtype_name, shape, raw = msgspec.msgpack.decode(data, type=tuple[str, list[int], bytes])
        dtype = DTYPES.get(dtype_name)
        if dtype is None or any(s < 0 for s in shape):
            raise msgspec.ValidationError("bad inline tensor")
        numel = 1
        for s in shape:
            numel *= s
        if numel * dtype.itemsize != len(raw):
            raise msgspec.ValidationError("inline tensor size mismatch")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)

    @staticmethod
    def _enc_hook(obj: Any) -> Any:
        if isinstance(obj, complex):
            return msgspec.msgpack.Ext(m.ExtCode.COMPLEX, m.COMPLEX.pack(obj.real, obj.imag))
        if isinstance(obj, torch.dtype):
            return msgspec.msgpack.Ext(m.ExtCode.DTYPE, DTYPE_TO_NAME[obj].encode())
        raise TypeError(f"cannot encode {type(obj).__name__}")

    # ---- the handle table -------------------------------------------------------------------

    def _get(self, handle: int) -> torch.Tensor:
        try:
            return self.table[handle]
        except KeyError:
            raise OpFailed("handle", f"tensor handle {handle} does not exist (freed, or produced by a failed op)") from None

    def _store(self, handle: int, t: torch.Tensor) -> None:
        old = self.table.get(handle)
        if old is not None:
            self.ledger.remove(old)
        self.table[handle] = t
        if not self.is_cuda:
            self.ledger.add(t)

    def _free(self, handle: int) -> None:
        t = self.table.pop(handle, None)
        if t is not None and not self.is_cuda:
            self.ledger.remove(t)

    def memory_used(self) -> int:
        if self.is_cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self.ledger.used

    def memory_peak(self) -> int:
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.ledger.peak

    def _oom(self, needed: int | None = None) -> OpFailed:
        used = self.memory_used()
        extra = f"; it needed {needed} more bytes" if needed else ""
        return OpFailed(
            "oom",
            f"out of memory: this session's share is {_fmt(self.memory_limit)} and "
            f"{_fmt(used)} of it is in use{extra}. Free tensors, use smaller batches, or ask "
            "for a bigger share",
        )

    def _resolve(self, x: Any) -> Any:
        t = type(x)
        if t is Ref:
            return self._get(x.handle)
        if t is list:
            return [self._resolve(v) for v in x]
        return x

    # ---- commands ---------------------------------------------------------------------------

    def _record(self, seq: int, op: str, exc: BaseException) -> None:
        if self.error is not None:
            return
        if isinstance(exc, OpFailed):
            kind, msg = exc.kind, str(exc)
        elif isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc):
            kind, msg = "oom", str(self._oom())
        else:
            kind, msg = "op", f"{type(exc).__name__}: {exc}"
        self.error = m.ErrorInfo(seq=seq, op=op, kind=kind, message=msg[:4000])

    def _take_error(self) -> m.ErrorInfo | None:
        e, self.error = self.error, None
        return e

    def _lookup_op(self, name: str) -> torch._ops.OpOverload:
        fn = self._ops.get(name)
        if fn is None:
            reason = check_op_name(name)
            if reason is not None:
                raise OpFailed("denied", reason)
            try:
                fn = resolve_op(name)
            except LookupError as e:
                raise OpFailed("unknown_op", f"{e}: the server's torch {torch.__version__} has no such op") from None
            self._ops[name] = fn
        return fn

    def run_op(self, cmd: m.Op) -> tuple[list[torch.Tensor], list[Any]]:
        fn = self._lookup_op(cmd.op)
        args = self._resolve(cmd.args)
        kwargs = {k: self._resolve(v) for k, v in cmd.kwargs.items()}
        if kwargs.get("generator") is not None:
            raise OpFailed("op", "explicit generators are not supported; use torch.manual_seed")
        result = fn(*args, **kwargs)
        tensors: list[torch.Tensor] = []
        values: list[Any] = []
        _flatten(result, tensors, values)
        if len(tensors) != len(cmd.outs) and not (cmd.reply and len(tensors) <= len(cmd.outs)):
            raise OpFailed("op", f"{cmd.op} returned {len(tensors)} tensors, the client expected {len(cmd.outs)}")
        stored = []
        for h, t in zip(cmd.outs, tensors):
            if h >= 0:
                self._store(h, t)
                stored.append(h)
        if self.memory_used() > self.memory_limit:
            for h in stored:
                self._free(h)
            raise self._oom()
        return tensors, values

    def upload(self, cmd: m.Upload, reader: FrameReader) -> None:
        """Receive the next buffer; always consumes it, even when the command fails."""
        if not reader.pending_buffers or reader.pending_buffers[0] != cmd.nbytes:
            raise ProtocolError("upload command without its buffer")
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
            raise OpFailed("protocol", f"unknown dtype {cmd.dtype!r}")
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
        if len(cmd.shape) != len(cmd.stride) or any(s < 0 for s in cmd.shape) or cmd.offset < 0:
            raise OpFailed("protocol", "bad upload layout")
        if cmd.nbytes % dtype.itemsize:
            raise OpFailed("protocol", "upload size is not a whole number of elements")
        if self.memory_used() + cmd.nbytes > self.memory_limit:
            raise self._oom(cmd.nbytes)
        numel = cmd.nbytes // dtype.itemsize
        if all(cmd.shape):
            need = cmd.offset + 1 + sum((s - 1) * st for s, st in zip(cmd.shape, cmd.stride))
            if need > numel or any(st < 0 for st in cmd.stride):
                raise OpFailed("protocol", "upload layout reaches past its data")
        host = torch.empty(cmd.nbytes, dtype=torch.uint8)
        reader.read_buffer_into(host_bytes(host))
        flat = host.view(dtype) if cmd.nbytes else torch.empty(0, dtype=dtype)
        if self.is_cuda:
            flat = flat.to(self.device)
        self._store(cmd.handle, flat.as_strided(cmd.shape, cmd.stride, cmd.offset))

    def fetch(self, handle: int) -> tuple[m.Data, memoryview | None]:
        err = self._take_error()
        if err is not None:
            return m.Data(error=err), None
        try:
            t = self._get(handle)
            c = t.detach().contiguous()
            if c.device.type != "cpu":
                c = c.cpu()
            buf = host_bytes(c)
            return m.Data(nbytes=buf.nbytes), buf
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
        """Run commands until the client says goodbye or goes away."""
        while True:
            try:
                raw, _ = reader.read_message()
            except ServerLost:
                return  # client went away: the worker exits and the OS frees everything
            try:
                batch = self.decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise ProtocolError(f"malformed command batch: {e}") from e
            for cmd in batch.cmds:
                if self.handle(cmd, reader, writer):
                    return
            if reader.pending_buffers:
                raise ProtocolError("frame carries buffers no command asked for")

    def handle(self, cmd: m.Command, reader: FrameReader, writer: FrameWriter) -> bool:
        """Execute one command; returns True when the session should end."""
        t = type(cmd)
        if t is m.Op:
            assert isinstance(cmd, m.Op)
            try:
                tensors, values = self.run_op(cmd)
            except Exception as e:  # noqa: BLE001 - deferred to the next sync
                self._record(cmd.seq, cmd.op, e)
                if cmd.reply:
                    writer.send(self.encoder.encode(m.OpResult(error=self._take_error())))
                return False
            if cmd.reply:
                err = self._take_error()
                metas = [_meta(x) for x in tensors]
                writer.send(self.encoder.encode(m.OpResult(error=err, metas=metas, values=values)))
        elif t is m.Free:
            assert isinstance(cmd, m.Free)
            for h in cmd.handles:
                self._free(h)
        elif t is m.Upload:
            assert isinstance(cmd, m.Upload)
            try:
                self.upload(cmd, reader)
            except (OpFailed, torch.OutOfMemoryError, RuntimeError) as e:
                self._record(cmd.seq, "upload", e)
        elif t is m.Fetch:
            assert isinstance(cmd, m.Fetch)
            reply, buf = self.fetch(cmd.handle)
            writer.send(self.encoder.encode(reply), [buf] if buf is not None else [])
        elif t is m.Item:
            assert isinstance(cmd, m.Item)
            writer.send(self.encoder.encode(self.item(cmd.handle)))
        elif t is m.Sync or t is m.Stats:
            writer.send(self.encoder.encode(self.synced()))
        elif t is m.Seed:
            assert isinstance(cmd, m.Seed)
            try:
                torch.manual_seed(cmd.seed)
            except RuntimeError as e:
                self._record(-1, "manual_seed", e)
        elif t is m.Bye:
            return True
        return False


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


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"

