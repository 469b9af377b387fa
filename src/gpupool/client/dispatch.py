"""Where every aten op on a gpupool tensor goes: plan locally, queue remotely, return at once.

The common path (`run_remote`) never waits for the server: output metadata comes from
`meta.plan`, output handles are assigned here, and the op is queued on the connection. Only
ops that must return data to the host wait: copies to the CPU, `.item()`, ops whose output shape
depends on the data, and ops that return plain Python values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gpupool.client import meta
from gpupool.client.session import Session, current_session, session_for_device
from gpupool.client.tensor import Handle, RemoteTensor
from gpupool.errors import UnsupportedError
from gpupool.protocol import messages as m
from gpupool.torchcodec import DTYPE_TO_NAME, dtype_from_name, host_bytes, op_name

aten = torch.ops.aten
_names: dict[Any, str] = {}
_value_returns: dict[Any, bool] = {}


def _name(func: torch._ops.OpOverload) -> str:
    n = _names.get(func)
    if n is None:
        n = _names[func] = op_name(func)
    return n


def _returns_values(func: torch._ops.OpOverload) -> bool:
    r = _value_returns.get(func)
    if r is None:
        r = any(
            not isinstance(ret.type, (torch.TensorType, torch.OptionalType, torch.ListType))
            or (isinstance(ret.type, torch.ListType) and not isinstance(ret.type.getElementType(), torch.TensorType))
            for ret in func._schema.returns
        )
        _value_returns[func] = r
    return r


def wrap(session: Session, hid: int, layout: meta.Layout) -> RemoteTensor:
    shape, stride, offset, dtype = layout
    return RemoteTensor(Handle(hid, session), shape, stride, offset, dtype, session.device)


def _find_session(args: Any, kwargs: dict) -> Session | None:
    found: list[Session] = []

    def visit(x: Any) -> None:
        if isinstance(x, RemoteTensor):
            s = x._h.session
            if not found:
                found.append(s)
            elif s is not found[0]:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two "
                    f"devices, {found[0].device} and {s.device}!"
                )
        elif type(x) is list or type(x) is tuple:
            for v in x:
                visit(v)
        elif isinstance(x, torch.device) and x.type == "gpupool" and not found:
            found.append(session_for_device(x))

    visit(args)
    for v in kwargs.values():
        visit(v)
    return found[0] if found else None


def run_remote(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session | None = None) -> Any:
    """Plan the op locally, queue it on the server, return its (remote) outputs."""
    if session is None:
        session = _find_session(args, kwargs) or current_session()
    if kwargs.get("generator") is not None:
        raise UnsupportedError(
            f"{_name(func)}: an explicit torch.Generator cannot drive a gpupool device; "
            "seed with torch.manual_seed instead"
        )
    if _returns_values(func):
        return run_remote_sync(func, args, kwargs, session)
    p = meta.plan(func, args, kwargs)
    if p is meta.DYNAMIC:
        return run_remote_sync(func, args, kwargs, session)
    conn = session.conn
    inputs = meta.remote_inputs(args, kwargs) if any(o.arg >= 0 for o in p.outs) else []
    outs: list[int] = []
    results: list[torch.Tensor] = []
    for spec in p.outs:
        if spec.arg >= 0:
            t = inputs[spec.arg]
            outs.append(-1)
            if spec.changed:
                _set_layout(t, spec.layout)
            results.append(t)
        else:
            hid = conn.new_handle()
            outs.append(hid)
            results.append(wrap(session, hid, spec.layout))
    conn.op(_name(func), list(args), kwargs, outs)
    return meta.rebuild(p.structure, iter(results))


def run_remote_sync(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session) -> Any:
    """Run an op whose outputs the server must describe: data-dependent shapes, Python values."""
    conn = session.conn
    # The number of tensor outputs is unknown before the op ran: ask for it with handles
    # reserved generously, then free the unused ones.
    n_out = _max_tensor_outputs(func, args, kwargs)
    outs = [conn.new_handle() for _ in range(n_out)]
    reply = conn.op_with_reply(_name(func), list(args), kwargs, outs)
    tensors = []
    for hid, tm in zip(outs, reply.metas):
        layout = (tuple(tm.shape), tuple(tm.stride), tm.offset, dtype_from_name(tm.dtype))
        tensors.append(wrap(session, hid, layout))
    values = iter(reply.values)
    ti = iter(tensors)

    def build(ret: Any) -> Any:
        ty = ret.type
        if isinstance(ty, torch.TensorType):
            return next(ti)
        if isinstance(ty, torch.OptionalType) and isinstance(ty.getElementType(), torch.TensorType):
            return next(ti, None)
        if isinstance(ty, torch.ListType) and isinstance(ty.getElementType(), torch.TensorType):
            return list(ti)
        return next(values, None)

    rets = [build(r) for r in func._schema.returns]
    if len(rets) == 1:
        return rets[0]
    return tuple(rets)


def _max_tensor_outputs(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> int:
    n = 0
    for ret in func._schema.returns:
        ty = ret.type
        if isinstance(ty, torch.ListType) and isinstance(ty.getElementType(), torch.TensorType):
            n += 64
        elif isinstance(ty, (torch.TensorType, torch.OptionalType)):
            n += 1
    return n


def _set_layout(t: torch.Tensor, layout: meta.Layout) -> None:
    """Change a wrapper's client-side metadata to match what an in-place op did remotely."""
    shape, stride, offset, dtype = layout
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python)):
        with torch.no_grad():
            torch.ops.aten.as_strided_.default(t, shape, stride, offset)


# ---- host <-> device ---------------------------------------------------------------------------


def upload(src: torch.Tensor, session: Session, dtype: torch.dtype | None = None) -> RemoteTensor:
    """A new device tensor with `src`'s values (contiguous), sent as one raw buffer."""
    host = src.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if host.is_conj():
        host = host.resolve_conj()
    if host.is_neg():
        host = host.resolve_neg()
    host = host.contiguous()
    conn = session.conn
    hid = conn.new_handle()
    shape = list(host.shape)
    stride = list(host.stride())
    conn.upload(hid, DTYPE_TO_NAME[host.dtype], shape, stride, 0, host_bytes(host), into=False)
    return wrap(session, hid, (tuple(shape), tuple(stride), 0, host.dtype))


def download(t: RemoteTensor) -> torch.Tensor:
    """The tensor's elements as a new contiguous CPU tensor (a sync point)."""
    out = torch.empty(t.shape, dtype=t.dtype)
    conn = t._h.session.conn
    conn.request(m.Fetch(t._h.id), into=host_bytes(out))
    return out


def _to_copy(func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    if isinstance(x, RemoteTensor):
        if device is not None and torch.device(device).type == "cpu":
            host = download(x)
            if dtype is not None and dtype != host.dtype:
                host = host.to(dtype)
            mf = kwargs.get("memory_format")
            if mf is not None and mf != torch.preserve_format:
                host = host.contiguous(memory_format=mf)
            if kwargs.get("pin_memory"):
                host = host.pin_memory() if torch.cuda.is_available() else host
            return host
        if device is not None and torch.device(device).type != "gpupool":
            raise UnsupportedError(f"cannot copy a gpupool tensor to {device} directly; go through .cpu()")
        other = session_for_device(torch.device(device)) if device is not None else x._h.session
        if other is not x._h.session:
            return upload(download(x), other, dtype)
        return run_remote(func, args, kwargs, x._h.session)
    # A host tensor going to the device.
    session = session_for_device(torch.device(device)) if device is not None else current_session()
    r = upload(x, session, dtype)
    mf = kwargs.get("memory_format")
    if mf is not None and mf not in (torch.preserve_format, torch.contiguous_format):
        r = r.contiguous(memory_format=mf)
    return r


def _copy_(func: Any, args: tuple, kwargs: dict) -> Any:
    dst, src = args[0], args[1]
    if isinstance(dst, RemoteTensor) and isinstance(src, RemoteTensor):
        if dst._h.session is src._h.session:
            return run_remote(func, args, kwargs, dst._h.session)
        src = download(src)
    if isinstance(dst, RemoteTensor):
        session = dst._h.session
        host = src.detach()
        if (
            host.dtype == dst.dtype
            and host.shape == dst.shape
            and dst.is_contiguous()
            and host.device.type == "cpu"
            and dst.storage_offset() == 0
            and not host.is_conj()
            and not host.is_neg()
        ):
            host = host.contiguous()
            session.conn.upload(dst._h.id, DTYPE_TO_NAME[host.dtype], list(host.shape), list(host.stride()), 0, host_bytes(host), into=True)
            return dst
        tmp = upload(host, session)
        run_remote(aten.copy_.default, (dst, tmp), {}, session)
        return dst
    # A device tensor copied into host memory.
    host = download(src)
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python)):
        dst.copy_(host)
    return dst


def _local_scalar_dense(func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    reply = x._h.session.conn.request(m.Item(x._h.id))
    v = reply.value
    if isinstance(v, list) and len(v) == 2 and x.dtype.is_complex:
        return complex(v[0], v[1])
    return v


def _is_pinned(func: Any, args: tuple, kwargs: dict) -> Any:
    return False


def _unsupported(what: str) -> Callable[..., Any]:
    def fail(func: Any, args: tuple, kwargs: dict) -> Any:
        raise UnsupportedError(f"{_name(func)}: {what}")

    return fail


SPECIAL: dict[Any, Callable[[Any, tuple, dict], Any]] = {
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten._local_scalar_dense.default: _local_scalar_dense,
    aten.is_pinned.default: _is_pinned,
    aten.record_stream.default: lambda f, a, k: None,
}


def dispatch(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    special = SPECIAL.get(func)
    if special is not None:
        return special(func, args, kwargs)
    if func in _composite:
        # Note: without autograd keys (inference tensors) composite ops such as `to` reach us
        # whole; decompose them so copies and views take their usual paths.
        out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
    return run_remote(func, args, kwargs)


class _CompositeOps:
    """Ops with a CompositeImplicitAutograd kernel, looked up once per op."""

    def __init__(self) -> None:
        self._known: dict[Any, bool] = {}

    def __contains__(self, func: Any) -> bool:
        r = self._known.get(func)
        if r is None:
            r = self._known[func] = torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"
            )
        return r


_composite = _CompositeOps()


def fallback(func: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    """PrivateUse1 fallback: factory ops (`torch.empty(..., device="gpupool")`) land here."""
    special = SPECIAL.get(func)
    if special is not None:
        return special(func, args, kwargs)
    session = _find_session(args, kwargs) or current_session()
    return run_remote(func, args, kwargs, session)
