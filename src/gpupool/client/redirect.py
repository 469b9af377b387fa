"""Transparent "cuda": make code written for a local GPU land on the pooled gpupool device.

`enable()` (called by `gpupool run`'s bootstrap as soon as the program imports torch) installs:

- a global `TorchFunctionMode` (`RedirectMode`) that rewrites "cuda" devices in torch calls
  (`device="cuda"`, `.cuda()`, `.to("cuda:0")`, `torch.tensor(..., device=...)`, `new_*`,
  `*_like`, `pin_memory`) to `gpupool:N`, in every thread and inside backward;
- `with torch.device("cuda")` / `torch.set_default_device("cuda")` mapped to the pooled device;
- `torch.cuda.*`, `torch.accelerator.*`, autocast, GradScaler, `torch.compile` and the features
  that cannot work remotely (`cuda_shim`, `autocast`).

Sessions are opened lazily on the first use of the device, so `torch.cuda.is_available()` and
`import torch` cost no round trip. Servers: $GPUPOOL_SERVER (HOST:PORT, or several separated by
commas: `cuda:i` is the i-th), token $GPUPOOL_TOKEN.

Note [Never "cuda"]: no tensor may report device "cuda" on a CPU-only torch build (the first
autograd node would terminate the process), so "cuda" is rewritten *before* torch sees it.
Note [Cost]: the mode runs on every torch call of the program (~µs). `__torch_function__` does
one dict lookup and, only when there are keyword arguments, one or two more; everything else is
off the fast path.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from gpupool.errors import UnsupportedError

BACKEND = "gpupool"

FORK_MESSAGE = (
    "gpupool: this process was forked from one that holds a gpupool session (e.g. a DataLoader "
    "worker started with the 'fork' method), and the pooled GPU cannot be used from a forked "
    "child, just as CUDA cannot. Keep GPU work in the main process, or start workers with "
    "multiprocessing_context='spawn' (each spawned process opens its own session)."
)

_lock = threading.RLock()
_servers: list[str] = []
_token = ""
_enabled = False
_forked = False
#: Indices of the sessions this module opened (lazily), by device index.
_opened: dict[int, Any] = {}
#: The seed set before the first session existed: applied when it opens (as CUDA queues it).
_pending_seed: int | None = None
_mode: RedirectMode | None = None
#: "cuda"-ish device spec -> the pooled device it means (None: not a device to rewrite).
_map_cache: dict[Any, torch.device | None] = {}


# ---- sessions, opened lazily ---------------------------------------------------------------------


def configured_count() -> int:
    """How many pooled GPUs the program was given ("cuda" device count), with no round trip."""
    return len(_servers)


def in_bad_fork() -> bool:
    return _forked


def ensure_session(index: int | None = None) -> None:
    """Open the sessions up to device `index` (default: the current one) if not open yet."""
    from gpupool.client import session as sess

    if index is None:
        index = sess.current_index()
    s = _opened.get(index)
    if s is not None and s.conn.lost is None and not s.conn.closed:
        return
    if _forked:
        raise UnsupportedError(FORK_MESSAGE)
    if not _servers:
        # Not under `gpupool run`: use whatever sessions the program opened itself.
        return
    if index < 0 or index >= len(_servers):
        raise RuntimeError(
            f"gpupool: invalid device ordinal cuda:{index}: this program was given "
            f"{len(_servers)} pooled GPU(s) (GPUPOOL_SERVER={','.join(_servers)})"
        )
    with _lock:
        live = {s.index: s for s in sess.sessions()}
        for i in range(index + 1):
            if i in _opened and _opened[i] is live.get(i):
                continue
            if i in live:  # opened by the program itself through gpupool.connect()
                _opened[i] = live[i]
                continue
            s = sess.connect(_servers[i], _token, gpu=i if _servers.count(_servers[i]) > 1 else 0, index=i)
            _opened[s.index] = s
            if _pending_seed is not None:
                s.manual_seed(_pending_seed)


def record_seed(seed: int) -> None:
    """Remember a seed so that sessions opened later start from it (CUDA's lazy seeding)."""
    global _pending_seed
    _pending_seed = int(seed)


def pooled_device(index: int | None = None) -> torch.device:
    from gpupool.client.session import current_index

    return torch.device(BACKEND, current_index() if index is None else index)


def _compute_map(d: Any) -> torch.device | None:
    if isinstance(d, str):
        if not (d.startswith("cuda") or d.startswith(BACKEND)):
            return None
        try:
            dev = torch.device(d)
        except RuntimeError:
            return None
    elif isinstance(d, torch.device):
        dev = d
    elif isinstance(d, int) and not isinstance(d, bool):
        # Note: torch reads a bare int as an index of the current accelerator (gpupool).
        dev = torch.device(BACKEND, d)
    else:
        return None
    if dev.type not in ("cuda", BACKEND):
        return None
    return dev


def map_device(d: Any) -> Any:
    """`d` with "cuda" (or "gpupool") rewritten to the pooled `gpupool:N`; other values unchanged.

    Opens the session of that device if needed (the first use of the device).
    """
    try:
        dev = _map_cache[d]
    except KeyError:
        dev = _map_cache[d] = _compute_map(d)
    except TypeError:  # unhashable
        dev = _compute_map(d)
    if dev is None:
        return d
    idx = dev.index
    ensure_session(idx)
    if dev.type == BACKEND and idx is not None:
        return dev
    return pooled_device(idx)


# ---- pinned host memory ----------------------------------------------------------------------------

# Note: keyed by id() with a weakref check; a WeakSet would compare tensors with `==`.
_pinned: dict[int, weakref.ref] = {}


def _mark_pinned(t: torch.Tensor) -> torch.Tensor:
    key = id(t)

    def forget(_ref: weakref.ref) -> None:
        _pinned.pop(key, None)

    _pinned[key] = weakref.ref(t, forget)
    return t


def _is_pinned(t: torch.Tensor) -> bool:
    r = _pinned.get(id(t))
    return r is not None and r() is t


# ---- the mode ------------------------------------------------------------------------------------


def _fix_kwargs(kwargs: dict) -> tuple[dict, bool]:
    """kwargs with a "cuda" device rewritten and pin_memory=True dropped (and reported)."""
    d = kwargs.get("device")
    pin = bool(kwargs.get("pin_memory"))
    m = map_device(d) if d is not None else None
    if m is d and not pin:
        return kwargs, False
    kwargs = dict(kwargs)
    if m is not d:
        kwargs["device"] = m
    if pin:
        kwargs["pin_memory"] = False
    return kwargs, pin


def _h_to(func: Callable, args: tuple, kwargs: dict) -> Any:
    # Tensor.to(device?, dtype?, non_blocking?, copy?, *, memory_format) or to(other, ...)
    if len(args) > 1:
        a1 = args[1]
        if not isinstance(a1, (torch.dtype, torch.Tensor)):
            m = map_device(a1)
            if m is not a1:
                args = (args[0], m, *args[2:])
    if kwargs:
        kwargs, _ = _fix_kwargs(kwargs)
    return func(*args, **kwargs)


def _h_cuda(func: Callable, args: tuple, kwargs: dict) -> Any:
    # Tensor.cuda(device=None, non_blocking=False, memory_format=torch.preserve_format)
    self = args[0]
    device = args[1] if len(args) > 1 else kwargs.get("device")
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    mf = kwargs.get("memory_format", torch.preserve_format)
    target = map_device("cuda" if device is None else device)
    return self.to(target, non_blocking=non_blocking, memory_format=mf)


def _h_pin_memory(func: Callable, args: tuple, kwargs: dict) -> Any:
    # Note: a pinned copy is a host tensor; the transfer to the server is the same either way,
    # so "pinning" is a copy (as CUDA's is) remembered by is_pinned().
    t = args[0]
    if t.device.type != "cpu":
        raise RuntimeError(f"cannot pin '{t.device}' memory: only dense CPU tensors can be pinned")
    if _is_pinned(t):
        return t
    return _mark_pinned(t.clone())


def _h_is_pinned(func: Callable, args: tuple, kwargs: dict) -> Any:
    return _is_pinned(args[0])


def _h_register_hook(func: Callable, args: tuple, kwargs: dict) -> Any:
    # Hooks run inside backward, where torch function modes are off: give them the mode back.
    if len(args) > 1:
        args = (args[0], with_mode(args[1]), *args[2:])
    elif "hook" in kwargs:
        kwargs = dict(kwargs, hook=with_mode(kwargs["hook"]))
    return func(*args, **kwargs)


def _with_pin(func: Callable, args: tuple, kwargs: dict) -> Any:
    kwargs, pin = _fix_kwargs(kwargs)
    out = func(*args, **kwargs)
    if pin and isinstance(out, torch.Tensor) and out.device.type == "cpu":
        _mark_pinned(out)
    return out


def _on_pooled(d: Any) -> bool:
    return isinstance(d, torch.device) and d.type == BACKEND


def _h_tensor_data(func: Callable, args: tuple, kwargs: dict) -> Any:
    """torch.tensor / as_tensor / asarray with a pooled device: build on the host, then upload.

    Note: torch builds such tensors in C++ with the target device's allocator, which a Python
    backend does not have (an internal assert); a host tensor then `.to()` is what it does anyway.
    """
    kwargs, pin = _fix_kwargs(kwargs)
    device = kwargs.get("device")
    if not _on_pooled(device):
        out = func(*args, **kwargs)
        return _mark_pinned(out) if pin and out.device.type == "cpu" else out
    data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
    dtype = kwargs.get("dtype")
    requires_grad = bool(kwargs.get("requires_grad", False))
    if func is not torch.tensor and isinstance(data, torch.Tensor) and data.device == device:
        if dtype is None or data.dtype == dtype:
            return data  # as_tensor/asarray share when they can
    host_kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "requires_grad", "pin_memory")}
    host = func(data, **host_kwargs) if args or "data" not in kwargs else func(data=data, **host_kwargs)
    out = host.to(device)
    return out.requires_grad_() if requires_grad else out


def _h_new_tensor(func: Callable, args: tuple, kwargs: dict) -> Any:
    # Tensor.new_tensor(data, dtype=None, device=None, requires_grad=False)
    self, data = args[0], args[1] if len(args) > 1 else kwargs.get("data")
    kwargs, _ = _fix_kwargs(kwargs)
    device = kwargs.get("device") or self.device
    if not _on_pooled(device):
        return func(*args, **kwargs)
    dtype = kwargs.get("dtype") or self.dtype
    if isinstance(data, torch.Tensor):
        host = data.detach().to("cpu", dtype).clone()
    else:
        host = torch.tensor(data, dtype=dtype)
    out = host.to(device)
    return out.requires_grad_() if kwargs.get("requires_grad") else out


_HANDLERS: dict[Any, Callable[[Callable, tuple, dict], Any]] = {
    torch.tensor: _h_tensor_data,
    torch.as_tensor: _h_tensor_data,
    torch.asarray: _h_tensor_data,
    torch.Tensor.new_tensor: _h_new_tensor,
    torch.Tensor.to: _h_to,
    torch.Tensor.cuda: _h_cuda,
    torch.Tensor.pin_memory: _h_pin_memory,
    torch.Tensor.is_pinned: _h_is_pinned,
    torch.Tensor.register_hook: _h_register_hook,
    torch.Tensor.register_post_accumulate_grad_hook: _h_register_hook,
}


class RedirectMode(TorchFunctionMode):
    """Rewrites "cuda" devices in torch calls to the pooled device (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        h = _HANDLERS.get(func)
        if h is not None:
            return h(func, args, kwargs or {})
        if kwargs:
            if "device" in kwargs or "pin_memory" in kwargs:
                return _with_pin(func, args, kwargs)
            return func(*args, **kwargs)
        return func(*args)


def with_mode(fn: Callable) -> Callable:
    """`fn` wrapped to run with the redirect active: for code the autograd engine calls."""
    if getattr(fn, "_gpupool_with_mode", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _mode is None or torch._C._len_torch_function_stack() > 0:
            return fn(*args, **kwargs)
        with _mode:
            return fn(*args, **kwargs)

    wrapper._gpupool_with_mode = True  # type: ignore[attr-defined]
    return wrapper


def push_mode() -> None:
    """Activate the redirect in the calling thread (modes are thread-local)."""
    if _mode is not None:
        torch.overrides._push_mode(_mode)


# ---- patches: threads, backward, default device ---------------------------------------------------


def _patch_threads() -> None:
    # Note: `_bootstrap_inner` (not `run`) so that Thread subclasses overriding run() are covered.
    orig = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
    if getattr(orig, "_gpupool", False):
        return

    def _bootstrap_inner(self: threading.Thread) -> None:
        try:
            push_mode()
        except Exception:  # noqa: BLE001 - a thread must start even if torch is shutting down
            pass
        orig(self)

    _bootstrap_inner._gpupool = True  # type: ignore[attr-defined]
    threading.Thread._bootstrap_inner = _bootstrap_inner  # type: ignore[attr-defined]


def _patch_backward() -> None:
    """Python code the autograd engine runs (custom backward, unpack hooks) gets the mode.

    Note: the engine runs nodes with torch function modes off (and on its own thread for
    gpupool tensors), so a custom backward or a checkpoint recomputation creating
    `device="cuda"` tensors needs the mode pushed again.
    """
    from torch.autograd import function as autograd_function
    from torch.autograd import graph

    bcf = autograd_function.BackwardCFunction
    if not getattr(bcf.apply, "_gpupool_with_mode", False):
        bcf.apply = with_mode(bcf.apply)  # type: ignore[method-assign]

    sth = graph.saved_tensors_hooks
    orig_init = sth.__init__
    if getattr(orig_init, "_gpupool", False):
        return

    def __init__(self: Any, pack_hook: Callable, unpack_hook: Callable) -> None:
        orig_init(self, pack_hook, with_mode(unpack_hook))

    __init__._gpupool = True  # type: ignore[attr-defined]
    sth.__init__ = __init__  # type: ignore[method-assign]


def _patch_device_context() -> None:
    """`with torch.device("cuda")` and `set_default_device("cuda")` mean the pooled device.

    Note: torch puts their DeviceContext mode *below* ours on the stack, so it would add
    device="cuda" after we looked: rewrite the device when the context is made instead.
    """
    from torch.utils import _device

    cls = _device.DeviceContext
    orig_init = cls.__init__
    if getattr(orig_init, "_gpupool", False):
        return

    def __init__(self: Any, device: Any) -> None:
        orig_init(self, map_device(device))

    __init__._gpupool = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def _patch_is_cuda() -> None:
    """`t.is_cuda` is True for tensors on the pooled GPU (code branches on it)."""
    base = torch._C.TensorBase.is_cuda

    def is_cuda(self: torch.Tensor) -> bool:
        return bool(base.__get__(self)) or self.device.type == BACKEND

    torch.Tensor.is_cuda = property(is_cuda)  # type: ignore[assignment,method-assign]


def _after_fork_in_child() -> None:
    global _forked
    from gpupool.client import session as sess

    live = sess.sessions()
    if not live:
        return  # forked before any session: the child may open its own, as CUDA allows
    _forked = True
    for s in live:
        # Note: poison the inherited connection (a shared socket) so nothing is ever written to
        # it from the child; then forget it, so the child's seeding and exit hooks skip it.
        s.conn.lost = FORK_MESSAGE
    sess._sessions.clear()
    _opened.clear()


# ---- entry point -----------------------------------------------------------------------------------


def enable(servers: str | list[str] | None = None, token: str | None = None) -> None:
    """Make "cuda" mean the pooled GPU in this process (idempotent).

    `servers`/`token` default to $GPUPOOL_SERVER / $GPUPOOL_TOKEN; no connection is made here.
    """
    global _enabled, _mode, _servers, _token
    with _lock:
        if servers is None:
            servers = os.environ.get("GPUPOOL_SERVER", "")
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        leased = os.environ.get("GPUPOOL_LEASE_GPUS", "")
        if leased.isdigit() and len(servers) == 1:
            # A lease of N GPUs on one server: cuda:i is the lease's i-th GPU there.
            servers = servers * max(1, int(leased))
        _servers = list(servers)
        _token = token if token is not None else os.environ.get("GPUPOOL_TOKEN", "")
        if _enabled:
            return
        from gpupool.client import autocast, cuda_shim
        from gpupool.client.backend import install

        install()
        from gpupool.client import session as sess

        sess.set_autoconnect(ensure_session)
        _mode = RedirectMode()
        _patch_threads()
        _patch_backward()
        _patch_device_context()
        _patch_is_cuda()
        cuda_shim.install()
        autocast.install()
        os.register_at_fork(after_in_child=_after_fork_in_child)
        push_mode()
        _enabled = True


def is_enabled() -> bool:
    return _enabled
