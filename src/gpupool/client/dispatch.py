"""Where every aten op on a gpupool tensor goes: plan locally, queue remotely, return at once.

The common path (`run_remote`) never waits for the server: output metadata comes from
`meta.plan`, output handles are assigned here, and the op is queued on the connection. Only
ops that must return data to the host wait: copies to the CPU, `.item()`, ops whose output shape
depends on the data, and ops that return plain Python values.

Note [Routes]: what is special about an op is decided once per op overload and kept in its
`OpRecord` (oprecord.py): ops returning Python values go through `run_remote_sync`; ops the server may not run
(non-aten custom ops, denied aten ops) run their Python decomposition here, so only allowed aten
ops reach the wire; ops whose output layout on a CPU-backed server differs from their meta
kernel's get their plan corrected. Everything else takes the plain path, so the per-op cost of
the fast path is one dict lookup, as it was for the value-returning check alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from gpupool.client import meta, oprecord, replay
from gpupool.client.hostmem import empty_for_download
from gpupool.client.replay import MISS
from gpupool.client.session import Session, current_session, session_for_device
from gpupool.client.tensor import Handle, RemoteTensor
from gpupool.errors import UnsupportedError
from gpupool.protocol import messages as m
from gpupool.protocol.ops import check_op_name
from gpupool.torchcodec import DTYPE_TO_NAME, dtype_from_name, host_bytes

aten = torch.ops.aten

#: The handler of an op that needs one (None: the plain planned path). See Note [Routes].
Route = Callable[[torch._ops.OpOverload, tuple, dict, Session], Any]
_records = oprecord._records


def _rec(func: torch._ops.OpOverload) -> oprecord.OpRecord:
    r = _records.get(id(func))
    return r if r is not None else oprecord.record_of(func)


def _name(func: torch._ops.OpOverload) -> str:
    return _rec(func).name


def _returns_values(func: torch._ops.OpOverload) -> bool:
    return any(
        not isinstance(ret.type, (torch.TensorType, torch.OptionalType, torch.ListType))
        or (isinstance(ret.type, torch.ListType) and not isinstance(ret.type.getElementType(), torch.TensorType))
        for ret in func._schema.returns
    )


def wrap(session: Session, hid: int, layout: meta.Layout) -> RemoteTensor:
    shape, stride, offset, dtype = layout
    return RemoteTensor(Handle(hid, session), shape, stride, offset, dtype, session.device)


def _find_session(args: Any, kwargs: dict) -> Session | None:
    """The session of the op's tensors; raises if they live on two devices."""
    found: Session | None = None
    for x in args:
        found = _session_of(x, found)
    for x in kwargs.values():
        found = _session_of(x, found)
    return found


def _session_of(x: Any, found: Session | None) -> Session | None:
    # Note: a module-level function, not a recursive closure (a closure cycle delays frees).
    t = type(x)
    if t is RemoteTensor or isinstance(x, RemoteTensor):
        s = x._h.session
        if found is None or s is found:
            return s
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two "
            f"devices, {found.device} and {s.device}!"
        )
    if t is list or t is tuple:
        for v in x:
            found = _session_of(v, found)
        return found
    if found is None and isinstance(x, torch.device) and x.type == "gpupool":
        return session_for_device(x)
    return found


def run_remote(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session | None = None) -> Any:
    """Plan the op locally, queue it on the server, return its (remote) outputs."""
    if session is None:
        session = _find_session(args, kwargs) or current_session()
    rec = _records.get(id(func)) or oprecord.record_of(func)
    if rec.restrided:
        for i, name in rec.restrided:
            t = args[i] if 0 <= i < len(args) else kwargs.get(name)
            if isinstance(t, RemoteTensor) and t._h.shared:
                _unshare(t)
    if kwargs.get("generator") is not None:
        raise UnsupportedError(
            f"{rec.name}: an explicit torch.Generator cannot drive a gpupool device; "
            "seed with torch.manual_seed instead"
        )
    route = rec.route
    if route is oprecord.UNSET:
        route = rec.route = _choose_route(func)
        rec.replayable = route is None or getattr(route, "plans", False)
        rec.fast = rec.replayable and not rec.restrided and not rec.composite and id(func) not in _SPECIAL_IDS
    replayer = session.conn.replayer
    if replayer is not None and rec.replayable:
        out = replayer.step(rec, args, kwargs)
        if out is not MISS:
            return out
    if route is not None:
        return route(func, args, kwargs, session)
    p = meta.plan(func, args, kwargs, rec.values_matter)
    if p is meta.DYNAMIC:
        return run_remote_sync(func, args, kwargs, session)
    return _launch(func, args, kwargs, session, p, rec)


def _unshare(t: RemoteTensor) -> None:
    """Give `t` a server tensor object of its own before an op changes its metadata (it shared
    one with a `detach` alias, see `Handle`): the server's `detach` makes one, same storage."""
    session = t._h.session
    hid = session.conn.new_handle()
    session.conn.op("aten::detach", [t], {}, [hid])
    t._h = Handle(hid, session)


def _detach(func: Any, args: tuple, kwargs: dict) -> Any:
    """`detach` without a remote op: a new wrapper on the same handle (Note in `Handle`).

    Autograd detaches every gradient it accumulates and every output it saves (12 of the 57 ops
    of a small MLP's training step)."""
    x = args[0]
    if not isinstance(x, RemoteTensor):
        return run_remote(func, args, kwargs)
    x._h.shared = True
    r = RemoteTensor(x._h, x.shape, x.stride(), x.storage_offset(), x.dtype, x.device)
    if x._bits:
        meta.set_bits(r, x._bits)
        r._bits = x._bits
    return r


def _launch(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session, p: meta.Plan,
            rec: oprecord.OpRecord | None = None) -> Any:
    """Queue the op with output handles for its plan's new tensors; return its outputs (and
    record it for step replay, client/replay.py)."""
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
            r = wrap(session, hid, spec.layout)
            if spec.bits:
                meta.set_bits(r, spec.bits)
                r._bits = spec.bits
            results.append(r)
    if rec is None:
        rec = _rec(func)
    conn.op(rec.name, list(args), kwargs, outs)
    if conn.replayer is not None:
        conn.replayer.record(rec, args, kwargs, p, outs)
    return meta.rebuild(p.structure, iter(results))


def run_remote_sync(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session) -> Any:
    """Run an op whose outputs the server must describe: data-dependent shapes, Python values.

    Note: a result that the schema says is an input written to (`out=` ops, in-place ops) is
    that input again, with the layout the server reports (an out= op may have resized it); it
    gets no new handle. Other tensor results get fresh handles, reserved generously for list
    results; the server stores the i-th tensor it returns under the i-th handle.
    """
    conn = session.conn
    slots = _out_slots(func, args, kwargs)
    outs = [-1 if isinstance(s, torch.Tensor) else conn.new_handle() for s in slots]
    reply = conn.op_with_reply(_name(func), list(args), kwargs, outs)
    tensors: list[torch.Tensor] = []
    for slot, hid, tm in zip(slots, outs, reply.metas):
        layout = (tuple(tm.shape), tuple(tm.stride), tm.offset, dtype_from_name(tm.dtype))
        if isinstance(slot, torch.Tensor):
            if meta.layout_of(slot) != layout:
                _set_layout(slot, layout)
            tensors.append(slot)
        else:
            tensors.append(wrap(session, hid, layout))
    values = iter(reply.values)
    n_single_after = [0] * len(func._schema.returns)
    count = 0
    for i in range(len(func._schema.returns) - 1, -1, -1):
        n_single_after[i] = count
        if not _is_tensor_list(func._schema.returns[i].type):
            count += 1
    pos = 0

    def build(i: int, ret: Any) -> Any:
        nonlocal pos
        ty = ret.type
        if isinstance(ty, torch.TensorType) or (
            isinstance(ty, torch.OptionalType) and isinstance(ty.getElementType(), torch.TensorType)
        ):
            pos += 1
            return tensors[pos - 1] if pos <= len(tensors) else None
        if _is_tensor_list(ty):
            end = max(pos, len(tensors) - n_single_after[i])
            out, pos = tensors[pos:end], end
            return out
        return next(values, None)

    rets = [build(i, r) for i, r in enumerate(func._schema.returns)]
    if not rets:
        return None
    if len(rets) == 1:
        return rets[0]
    return tuple(rets)


def _is_tensor_list(ty: Any) -> bool:
    return isinstance(ty, torch.ListType) and isinstance(ty.getElementType(), (torch.TensorType, torch.OptionalType))


def _out_slots(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[Any]:
    """One entry per tensor the op may return: the input it writes and returns, or None."""
    schema = func._schema
    written: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
            for s in a.alias_info.before_set:
                written[s] = v
    slots: list[Any] = []
    for ret in schema.returns:
        ty = ret.type
        if _is_tensor_list(ty):
            slots.extend([None] * 64)
        elif isinstance(ty, (torch.TensorType, torch.OptionalType)):
            target = None
            if ret.alias_info is not None and ret.alias_info.is_write:
                target = next((written[s] for s in ret.alias_info.before_set if s in written), None)
            slots.append(target if isinstance(target, RemoteTensor) else None)
    return slots


def _set_layout(t: torch.Tensor, layout: meta.Layout) -> None:
    """Change a wrapper's client-side metadata to match what an in-place op did remotely."""
    shape, stride, offset, dtype = layout
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python)):
        with torch.no_grad():
            torch.ops.aten.as_strided_.default(t, shape, stride, offset)


# ---- routes: ops that need more than a plan ----------------------------------------------------


def _choose_route(func: torch._ops.OpOverload) -> Route | None:
    """How `func` runs (see Note [Routes]); called once per op overload."""
    refused = check_op_name(_name(func))
    if refused is not None:
        local = _local_implementation(func)
        if local is not None:
            return _run_locally(local)
        return _refuse(refused)
    if _returns_values(func):
        return run_remote_sync
    fix = _CPU_LAYOUT_FIXES.get(func)
    if fix is not None:
        return _run_fixed(fix, cpu_only=True)
    fix = _LAYOUT_FIXES.get(func)
    if fix is not None:
        return _run_fixed(fix, cpu_only=False)
    if func in _CPU_LAYOUT_FROM_SERVER:
        return _run_asking_cpu_server
    return None


def _local_implementation(func: torch._ops.OpOverload) -> Callable[..., Any] | None:
    """A Python implementation of `func` made of allowed ops, if there is one."""
    fn = _LOCAL_IMPLEMENTATIONS.get(func)
    if fn is not None:
        return fn
    from torch._decomp import decomposition_table

    fn = decomposition_table.get(func)
    if fn is not None:
        return fn  # type: ignore[no-any-return]
    try:
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func)
    except (ImportError, AttributeError):
        opdef = None
    if opdef is not None:
        # A `torch.library.custom_op` defined in Python: its own implementation, whose ops
        # dispatch here one by one.
        return opdef._init_fn  # type: ignore[no-any-return]
    return None


_running_locally = threading.local()


def _run_locally(fn: Callable[..., Any]) -> Route:
    def run(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session) -> Any:
        active: set[Any] = _running_locally.__dict__.setdefault("ops", set())
        if func in active:  # a decomposition that comes back to its own op
            raise UnsupportedError(f"{_name(func)} cannot run on a gpupool device: it is not allowed on the server")
        active.add(func)
        try:
            return fn(*args, **kwargs)
        finally:
            active.discard(func)

    return run


def _as_strided_scatter(
    input: torch.Tensor, src: torch.Tensor, size: Any, stride: Any, storage_offset: int | None = None
) -> torch.Tensor:
    # As the CPU kernel does it. PyTorch's own decomposition goes to a prim, which no server runs.
    out = input.clone()
    view = out.as_strided(size, stride, storage_offset)
    if view.shape != src.shape:
        raise RuntimeError(
            f"expected src to have a size equal to the slice of self. src size = {list(src.shape)}, "
            f"slice size = {list(view.shape)}"
        )
    view.copy_(src)
    return out


#: Implementations for denied ops whose PyTorch decomposition does not end in allowed aten ops.
_LOCAL_IMPLEMENTATIONS: dict[Any, Callable[..., Any]] = {
    aten.as_strided_scatter.default: _as_strided_scatter,
}


def _refuse(reason: str) -> Route:
    def fail(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session) -> Any:
        raise UnsupportedError(f"{_name(func)} cannot run on a gpupool device: {reason}")

    return fail


#: Adjusts a plan made by a meta kernel to what a CPU-backed server's kernel really returns.
LayoutFix = Callable[[tuple, dict, meta.Plan], meta.Plan]


def _run_fixed(fix: LayoutFix, cpu_only: bool) -> Route:
    def run(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session) -> Any:
        p = meta.plan(func, args, kwargs)
        if p is meta.DYNAMIC:
            return run_remote_sync(func, args, kwargs, session)
        if not cpu_only or session.kind == "cpu":
            p = fix(args, kwargs, p)
        return _launch(func, args, kwargs, session, p)

    run.plans = True  # type: ignore[attr-defined]  # its ops are recorded and replayed as planned ops
    return run


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if index < len(args):
        return args[index]
    return kwargs.get(name, default)


def _empty_outputs(*which: int, when: Callable[[tuple, dict], bool] = lambda a, k: True) -> LayoutFix:
    """Outputs `which` are empty (size 0) where `when` holds."""

    def fix(args: tuple, kwargs: dict, p: meta.Plan) -> meta.Plan:
        if not when(args, kwargs):
            return p
        outs = list(p.outs)
        for i in which:
            o = outs[i]
            # An out= tensor is marked changed: `_launch` then resizes its wrapper to match.
            outs[i] = meta.OutSpec(o.arg, ((0,), (1,), 0, o.layout[3]), o.changed or o.arg >= 0)
        return meta.Plan(tuple(outs), p.structure)

    return fix


def _contiguous_outputs(*which: int) -> LayoutFix:
    """Outputs `which` are contiguous, whatever layout the meta kernel gives them."""

    def fix(args: tuple, kwargs: dict, p: meta.Plan) -> meta.Plan:
        outs = list(p.outs)
        for i in which:
            o = outs[i]
            shape, _, offset, dtype = o.layout
            stride = torch.empty(shape, device="meta").stride()
            outs[i] = meta.OutSpec(o.arg, (shape, stride, offset, dtype), o.changed or o.arg >= 0)
        return meta.Plan(tuple(outs), p.structure)

    return fix


def _not_training(index: int) -> Callable[[tuple, dict], bool]:
    return lambda args, kwargs: not _arg(args, kwargs, index, "training", False)


def _out_like_input(args: tuple, kwargs: dict, p: meta.Plan) -> meta.Plan:
    """An elementwise out= op resizing `out`: TensorIterator gives it the input's layout."""
    x, out = args[0], kwargs.get("out")
    o = p.outs[0]
    if out is None or tuple(out.shape) == tuple(x.shape) or not o.changed:
        return p
    like = torch.empty_like(torch.empty_strided(x.shape, x.stride(), dtype=o.layout[3], device="meta"))
    layout = (tuple(like.shape), like.stride(), 0, o.layout[3])
    return meta.Plan((meta.OutSpec(o.arg, layout, True),), p.structure)


#: Note: where the meta kernel is wrong on every device (`conj_physical.out`'s Python meta makes
#: a resized `out` contiguous; TensorIterator keeps the input's layout, as eager does).
_LAYOUT_FIXES: dict[Any, LayoutFix] = {
    aten.conj_physical.out: _out_like_input,
}


#: Note: the CPU batch-norm kernels return empty saved statistics in evaluation mode, where
#: the meta kernels (modelled on CUDA) give them one element per channel; CPU `nonzero_static`
#: is row-major where its meta kernel is column-major (as CUDA's `nonzero`).
_CPU_LAYOUT_FIXES: dict[Any, LayoutFix] = {
    aten.native_batch_norm.default: _empty_outputs(1, 2, when=_not_training(5)),
    aten.native_batch_norm.out: _empty_outputs(1, 2, when=_not_training(5)),
    aten._native_batch_norm_legit.default: _empty_outputs(1, 2, when=_not_training(5)),
    aten._native_batch_norm_legit_no_training.default: _empty_outputs(1, 2),
    aten._batch_norm_no_update.default: _empty_outputs(1, 2),
    aten.nonzero_static.default: _contiguous_outputs(0),
    aten.nonzero_static.out: _contiguous_outputs(0),
}


def _run_asking_cpu_server(func: torch._ops.OpOverload, args: tuple, kwargs: dict, session: Session) -> Any:
    if session.kind == "cpu":
        return run_remote_sync(func, args, kwargs, session)
    p = meta.plan(func, args, kwargs)
    if p is meta.DYNAMIC:
        return run_remote_sync(func, args, kwargs, session)
    return _launch(func, args, kwargs, session, p)


_run_asking_cpu_server.plans = True  # type: ignore[attr-defined]  # planned where it is not a sync


def _overloads(*packets: Any) -> frozenset[Any]:
    return frozenset(getattr(p, o) for p in packets for o in p.overloads())


#: Note: ops whose CPU kernels lay out their results differently from their meta kernels (LAPACK
#: writes column-major; pocketfft picks its own strides), found by the OpInfo sweep. On a
#: CPU-backed server they wait for the server to report the real layout (they are heavy ops, so
#: the round trip is small beside them); elsewhere they take the meta kernel's word.
_CPU_LAYOUT_FROM_SERVER: frozenset[Any] = _overloads(
    aten.max_unpool2d,
    aten.max_unpool3d,
    aten.linalg_eig,
    aten.linalg_householder_product,
    aten.cholesky_inverse,
    aten.ormqr,
    aten._fft_r2c,
    aten._fft_c2c,
    aten._fft_c2r,
)


# ---- host <-> device ---------------------------------------------------------------------------


def upload(
    src: torch.Tensor,
    session: Session,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> RemoteTensor:
    """A new device tensor with `src`'s values, sent as one raw buffer.

    Its strides follow `memory_format`; with `torch.preserve_format` a dense tensor keeps its
    strides (a transposed host tensor stays transposed on the device, as `.to("cuda")` keeps it).
    """
    host = src.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if host.is_conj():
        host = host.resolve_conj()
    if host.is_neg():
        host = host.resolve_neg()
    if memory_format is torch.preserve_format:
        if not host.is_contiguous():
            # `empty_like` keeps the strides of a dense tensor and makes others contiguous.
            dense = torch.empty_like(host)
            if dense.stride() != host.stride():
                host = dense.copy_(host)
    elif not host.is_contiguous(memory_format=memory_format):
        host = host.contiguous(memory_format=memory_format)
    # Note: `host` is now dense and non-overlapping: its elements are the `numel` consecutive
    # ones from its storage offset, in memory order, whatever its strides.
    conn = session.conn
    hid = conn.new_handle()
    shape = list(host.shape)
    stride = list(host.stride())
    flat = host.as_strided((host.numel(),), (1,), host.storage_offset())
    conn.upload(hid, DTYPE_TO_NAME[host.dtype], shape, stride, 0, host_bytes(flat), into=False)
    return wrap(session, hid, (tuple(shape), tuple(stride), 0, host.dtype))


def download(t: RemoteTensor) -> torch.Tensor:
    """The tensor's elements as a new contiguous CPU tensor (a sync point)."""
    out = empty_for_download(t.shape, t.dtype)
    src = _fetchable(t)
    src._h.session.conn.request(m.Fetch(src._h.id), into=host_bytes(out))
    return out


def _fetchable(t: RemoteTensor) -> RemoteTensor:
    """`t`, or a server-side copy of it that the server can send as plain bytes.

    Note: a tensor with conjugate/negative bits (see Note [Conj bits] in tensor.py) is resolved
    on the server first; complex tensors always are (a no-op alias there when there is no bit),
    since the results of ops the server describes (`run_remote_sync`) carry no bits here. A
    one-element tensor may have a non-unit stride that a "contiguous" check ignores but a byte
    view does not: copy it to a fresh one. The ops are sent by name, past local dispatch.
    """
    session = t._h.session
    names: list[tuple[str, dict]] = []
    if t._bits or t.dtype.is_complex:
        names += [("aten::resolve_conj", {}), ("aten::resolve_neg", {})]
    if t.numel() == 1 and any(st != 1 for st in t.stride()):
        names.append(("aten::clone", {"memory_format": torch.contiguous_format}))
    for name, kwargs in names:
        hid = session.conn.new_handle()
        session.conn.op(name, [t], kwargs, [hid])
        t = wrap(session, hid, meta.layout_of(t))  # no bits; freed when dropped, like any wrapper
    return t


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
    # A host tensor going to the device: one upload, in the layout `.to()` promises.
    session = session_for_device(torch.device(device)) if device is not None else current_session()
    mf = kwargs.get("memory_format") or torch.preserve_format
    return upload(x, session, dtype, memory_format=mf)


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
            and not dst._bits  # raw bytes would skip the conjugation a conj view implies
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
    return item(args[0])


def item(x: RemoteTensor) -> Any:
    """The value of a one-element device tensor: one round trip (a sync point)."""
    reply = x._h.session.conn.request(m.Item(x._h.id))
    v = reply.value
    if isinstance(v, list) and len(v) == 2 and x.dtype.is_complex:
        return complex(v[0], v[1])
    return v


def _is_pinned(func: Any, args: tuple, kwargs: dict) -> Any:
    return False


SPECIAL: dict[Any, Callable[[Any, tuple, dict], Any]] = {
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten._local_scalar_dense.default: _local_scalar_dense,
    aten.is_pinned.default: _is_pinned,
    aten.record_stream.default: lambda f, a, k: None,
    aten.detach.default: _detach,
}
_SPECIAL_IDS = {id(k): v for k, v in SPECIAL.items()}


def dispatch(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    r = replay.active
    if r is not None:  # Note [Replay fast path] in replay.py
        rec = _records.get(id(func))
        if rec is not None and rec.fast:
            out = r.try_next(rec, args, kwargs)
            if out is not MISS:
                return out
    special = _SPECIAL_IDS.get(id(func))
    if special is not None:
        return special(func, args, kwargs)
    if (_records.get(id(func)) or oprecord.record_of(func)).composite:
        # Note: without autograd keys (inference tensors) composite ops such as `to` reach us
        # whole; decompose them so copies and views take their usual paths.
        out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
    return run_remote(func, args, kwargs)


def fallback(func: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    """PrivateUse1 fallback: factory ops (`torch.empty(..., device="gpupool")`) land here."""
    special = _SPECIAL_IDS.get(id(func))
    if special is not None:
        return special(func, args, kwargs)
    session = _find_session(args, kwargs) or current_session()
    return run_remote(func, args, kwargs, session)


# ---- kernels for calls made with the Python key excluded --------------------------------------

#: Note [Python key excluded]: PyTorch builds `torch.tensor(data, device=...)` with the Python
#: dispatch key excluded: it allocates on the device (our fallback: no tensor argument, fine),
#: then copies the host data in with `copy_`, which then reaches PrivateUse1 with a wrapper
#: argument. A Python *fallback* cannot be called that way (PyTorch asserts `func != nullptr`
#: looking for a per-op Python kernel), so those ops get per-op PrivateUse1 kernels.
_DIRECT_OPS = (aten.copy_.default,)
_direct_lib: Any = None


def _register_direct_kernels() -> None:
    global _direct_lib
    if _direct_lib is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    for op in _DIRECT_OPS:
        lib.impl(op, _direct_kernel(op), "PrivateUse1")
    _direct_lib = lib


def _direct_kernel(op: torch._ops.OpOverload) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        return dispatch(op, args, kwargs)

    return kernel


_register_direct_kernels()
