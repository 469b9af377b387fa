"""`torch.cuda.*` and `torch.accelerator.*` answered for the pooled GPU, and clear failures for
the CUDA features that cannot work on a remote GPU.

Queries that CUDA answers without a context (`is_available`, `device_count`,
`get_device_capability`, `is_bf16_supported`) are answered here without a round trip; the
others open the device's session on first use, as CUDA creates its context.

What cannot work raises `gpupool.UnsupportedError` when it is *created*: user streams, events,
CUDA graphs, memory pools, custom CUDA extensions, NCCL. Note [Lenient streams]: libraries
use the current/default stream as a no-op (`torch.cuda.current_stream().synchronize()`,
`with torch.cuda.stream(torch.cuda.current_stream())`); gpupool runs every op of a device in
order on one stream, so those calls keep working (synchronize waits for the server).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch

from gpupool.client import redirect
from gpupool.errors import UnsupportedError

#: What a pooled GPU reports as its compute capability when the server does not say
#: (CPU-backed devices): an Ampere-class device, which runs bf16 — as the server really does.
DEFAULT_CAPABILITY = (8, 0)

_installed = False
_compile_noticed = False
# Per device index: (server peak at the reset, bytes in use at the reset, highest use seen since).
_peak_reset: dict[int, list[int]] = {}


def _unsupported(what: str, why: str) -> UnsupportedError:
    return UnsupportedError(f"gpupool: {what} cannot work on a pooled (remote) GPU: {why}")


def _index(device: Any = None) -> int:
    """The pooled device index a torch.cuda-style `device` argument names."""
    from gpupool.client.session import current_index

    if device is None:
        return current_index()
    if isinstance(device, int):
        return current_index() if device < 0 else device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type not in ("cuda", redirect.BACKEND):
            raise ValueError(f"Expected a cuda device, but got: {device}")
        return current_index() if device.index is None else device.index
    raise ValueError(f"Expected a cuda device, but got: {device!r}")


def _session(device: Any = None) -> Any:
    from gpupool.client.session import session_for_device

    idx = _index(device)
    redirect.ensure_session(idx)
    return session_for_device(torch.device(redirect.BACKEND, idx))


# ---- queries -------------------------------------------------------------------------------------


def is_available() -> bool:
    return redirect.configured_count() > 0 or device_count() > 0


def device_count() -> int:
    from gpupool.client.session import sessions

    return max(redirect.configured_count(), max((s.index for s in sessions()), default=-1) + 1)


def current_device() -> int:
    from gpupool.client.session import current_index

    return current_index()


def set_device(device: Any) -> None:
    from gpupool.client.session import set_current

    idx = _index(device)
    if idx >= device_count():
        raise RuntimeError(f"gpupool: invalid device ordinal {idx}: {device_count()} pooled GPU(s)")
    set_current(idx)


def is_initialized() -> bool:
    from gpupool.client.session import sessions

    return bool(sessions())


def init() -> None:
    redirect.ensure_session()


def is_in_bad_fork() -> bool:
    return redirect.in_bad_fork()


def get_device_capability(device: Any = None) -> tuple[int, int]:
    return DEFAULT_CAPABILITY


def is_bf16_supported(including_emulation: bool = True) -> bool:
    return True


def is_tf32_supported() -> bool:
    return True


def get_device_name(device: Any = None) -> str:
    return str(_session(device).device_name)


class PooledDeviceProperties:
    """What `torch.cuda.get_device_properties` returns for a pooled GPU.

    `total_memory` is the session's share (what this program may allocate).
    """

    def __init__(self, session: Any) -> None:
        self.name: str = session.device_name
        self.major, self.minor = DEFAULT_CAPABILITY
        self.total_memory: int = int(session.memory_limit)
        self.multi_processor_count = 1
        self.is_integrated = False
        self.is_multi_gpu_board = False
        self.max_threads_per_multi_processor = 2048
        self.max_threads_per_block = 1024
        self.warp_size = 32
        self.regs_per_multiprocessor = 65536
        self.shared_memory_per_block = 49152
        self.shared_memory_per_block_optin = 166912
        self.shared_memory_per_multiprocessor = 167936
        self.L2_cache_size = 0
        self.clock_rate = 0
        self.memory_clock_rate = 0
        self.memory_bus_width = 0
        self.uuid = session.id
        self.pci_bus_id = self.pci_device_id = self.pci_domain_id = 0
        self.gcnArchName = "NVIDIA"
        self.gpupool_kind: str = session.kind

    def __repr__(self) -> str:
        return (
            f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
            f"total_memory={self.total_memory // (1024 * 1024)}MB, "
            f"multi_processor_count={self.multi_processor_count}, pooled=True, kind='{self.gpupool_kind}')"
        )


def get_device_properties(device: Any = None) -> PooledDeviceProperties:
    return PooledDeviceProperties(_session(device))


def synchronize(device: Any = None) -> None:
    _session(device).synchronize()


def mem_get_info(device: Any = None) -> tuple[int, int]:
    st = _session(device).memory_stats()
    return max(st.memory_limit - st.memory_used, 0), st.memory_limit


def _stats(device: Any) -> tuple[int, Any]:
    idx = _index(device)
    st = _session(idx).memory_stats()
    r = _peak_reset.get(idx)
    if r is not None:
        r[2] = max(r[2], st.memory_used)
    return idx, st


def memory_allocated(device: Any = None) -> int:
    return int(_stats(device)[1].memory_used)


def max_memory_allocated(device: Any = None) -> int:
    """The server's peak use; after `reset_peak_memory_stats`, the peak since then.

    Note: the server keeps only its lifetime peak. After a reset, a new lifetime peak is the
    peak since the reset; below it, the answer is the highest use seen at reset and at queries
    since (a lower bound of the true peak).
    """
    idx, st = _stats(device)
    r = _peak_reset.get(idx)
    if r is None or st.memory_peak > r[0]:
        return int(st.memory_peak)
    return int(max(r[1], r[2]))


def reset_peak_memory_stats(device: Any = None) -> None:
    idx, st = _stats(device)
    _peak_reset[idx] = [st.memory_peak, st.memory_used, st.memory_used]


def memory_reserved(device: Any = None) -> int:
    return memory_allocated(device)


def max_memory_reserved(device: Any = None) -> int:
    return max_memory_allocated(device)


def memory_stats(device: Any = None) -> dict[str, Any]:
    idx, st = _stats(device)
    peak = max_memory_allocated(idx)
    out: dict[str, Any] = {}
    for kind in ("allocated_bytes", "reserved_bytes", "active_bytes"):
        out[f"{kind}.all.current"] = st.memory_used
        out[f"{kind}.all.peak"] = peak
    out["gpupool.memory_limit"] = st.memory_limit
    return out


def memory_summary(device: Any = None, abbreviated: bool = False) -> str:
    s = _session(device)
    st = s.memory_stats()
    mib = 1024 * 1024
    return (
        f"gpupool pooled GPU {s.device} ({s.device_name}) on {s.conn.address}: "
        f"{st.memory_used / mib:.1f} MiB in use, peak {st.memory_peak / mib:.1f} MiB, "
        f"share {st.memory_limit / mib:.1f} MiB"
    )


def empty_cache() -> None:
    """Nothing to do: the server frees a tensor's memory when its last handle goes."""


def manual_seed(seed: int) -> None:
    """Seed the pooled device(s); before the first session opens, the seed waits for it."""
    from gpupool.client.session import sessions

    redirect.record_seed(seed)
    for s in sessions():
        s.manual_seed(seed)


def seed() -> None:
    import random

    manual_seed(random.getrandbits(63))


def initial_seed() -> int:
    return redirect._pending_seed if redirect._pending_seed is not None else 67280421310721


def _rng_index(device: Any) -> int:
    if device is None or device == "cuda":
        return redirect.pooled_device().index or 0
    if isinstance(device, int):
        return device
    return torch.device(device).index or 0


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    """The pooled GPU's generator state (it lives on the server, one per session)."""
    idx = _rng_index(device)
    redirect.ensure_session(idx)
    return torch.get_device_module("gpupool").get_rng_state(idx)


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    idx = _rng_index(device)
    redirect.ensure_session(idx)
    torch.get_device_module("gpupool").set_rng_state(new_state, idx)


def _get_rng_state_all() -> list[torch.Tensor]:
    redirect.ensure_session()
    return torch.get_device_module("gpupool").get_rng_state_all()  # type: ignore[no-any-return]


def _set_rng_state_all(new_states: Any) -> None:
    redirect.ensure_session()
    torch.get_device_module("gpupool").set_rng_state_all(new_states)


def is_current_stream_capturing() -> bool:
    return False


# ---- streams, events, graphs: what cannot be a user object --------------------------------------


class Stream:
    """`torch.cuda.Stream`: a user stream cannot be created on a pooled GPU."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _unsupported(
            "torch.cuda.Stream",
            "every op of a pooled GPU runs in order on one stream on the server; remove the "
            "extra streams (torch.cuda.current_stream() and synchronize() keep working)",
        )


class PooledStream(Stream):
    """The one stream of a pooled GPU: what `current_stream()`/`default_stream()` return."""

    def __new__(cls, index: int) -> PooledStream:
        obj = object.__new__(cls)
        obj.device_index = index
        return obj

    device_index: int
    cuda_stream = 0
    stream_id = 0
    priority = 0
    device_type = 1

    @property
    def device(self) -> torch.device:
        return torch.device(redirect.BACKEND, self.device_index)

    def synchronize(self) -> None:
        synchronize(self.device_index)

    def query(self) -> bool:
        synchronize(self.device_index)
        return True

    def wait_stream(self, stream: Any) -> None:
        if not isinstance(stream, PooledStream):
            raise _unsupported("waiting on a foreign stream", "only the pooled GPU's stream exists")

    def wait_event(self, event: Any) -> None:
        raise _unsupported("torch.cuda.Event", "events are not available on a pooled GPU")

    def record_event(self, event: Any = None) -> Any:
        raise _unsupported("torch.cuda.Event", "events are not available on a pooled GPU")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PooledStream) and other.device_index == self.device_index

    def __hash__(self) -> int:
        return hash(("gpupool-stream", self.device_index))

    def __enter__(self) -> PooledStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"<torch.cuda.Stream device=gpupool:{self.device_index} (the pooled GPU's one stream)>"


class ExternalStream(Stream):
    pass


def current_stream(device: Any = None) -> PooledStream:
    return PooledStream(_index(device))


default_stream = current_stream


def _check_stream(stream: Any) -> None:
    if stream is not None and not isinstance(stream, PooledStream):
        raise _unsupported("switching to another CUDA stream", "a pooled GPU has one stream")


def stream(stream: Any) -> contextlib.AbstractContextManager:
    """`with torch.cuda.stream(s)`: a no-op for the pooled GPU's own stream (or None)."""
    _check_stream(stream)
    return contextlib.nullcontext()


class StreamContext(contextlib.nullcontext):
    def __init__(self, stream: Any) -> None:
        _check_stream(stream)
        super().__init__()


def set_stream(stream: Any) -> None:
    _check_stream(stream)


class Event:
    """`torch.cuda.Event`: events (and GPU-side timing) are not available on a pooled GPU."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _unsupported(
            "torch.cuda.Event",
            "the GPU runs behind a network link; time with time.perf_counter() around "
            "torch.cuda.synchronize() instead",
        )


class CUDAGraph:
    """`torch.cuda.CUDAGraph`: graph capture by the program is not available."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _unsupported(
            "CUDA graph capture (torch.cuda.CUDAGraph / torch.cuda.graph)",
            "ops are recorded on the client and replayed by the server; run the code eagerly",
        )


class graph:  # noqa: N801 - mirrors torch.cuda.graph
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _unsupported(
            "CUDA graph capture (torch.cuda.CUDAGraph / torch.cuda.graph)",
            "ops are recorded on the client and replayed by the server; run the code eagerly",
        )


def make_graphed_callables(*args: Any, **kwargs: Any) -> Any:
    raise _unsupported("torch.cuda.make_graphed_callables", "CUDA graphs are not available")


def graph_pool_handle() -> Any:
    raise _unsupported("torch.cuda.graph_pool_handle", "CUDA graphs are not available")


class MemPool:
    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _unsupported("torch.cuda.MemPool", "the server owns the device's allocator")


def use_mem_pool(*args: Any, **kwargs: Any) -> Any:
    raise _unsupported("torch.cuda.use_mem_pool", "the server owns the device's allocator")


def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
    raise _unsupported(
        "torch.cuda.set_per_process_memory_fraction",
        "the memory share is set when the GPU is leased (gpupool run -p FRACTION) and enforced "
        "by the server",
    )


class device:  # noqa: N801 - mirrors torch.cuda.device
    """`with torch.cuda.device(i)`: make pooled device i the current one inside the block."""

    def __init__(self, device: Any) -> None:
        self.idx = -1 if device is None else _index(device)
        self.prev = -1

    def __enter__(self) -> None:
        from gpupool.client.session import current_index, set_current

        self.prev = current_index()
        if self.idx >= 0:
            set_current(self.idx)

    def __exit__(self, *exc: Any) -> None:
        from gpupool.client.session import set_current

        if self.idx >= 0:
            set_current(self.prev)


class device_of(device):  # noqa: N801 - mirrors torch.cuda.device_of
    def __init__(self, obj: Any) -> None:
        idx = obj.get_device() if isinstance(obj, torch.Tensor) and obj.device.type == redirect.BACKEND else -1
        super().__init__(idx if idx >= 0 else None)


class _NoNVTX:
    """NVTX ranges are profiler annotations: without a local GPU they mark nothing."""

    @staticmethod
    def rangePushA(msg: str) -> int:
        return 0

    @staticmethod
    def rangePop() -> int:
        return 0

    @staticmethod
    def rangeStartA(msg: str) -> int:
        return 0

    @staticmethod
    def rangeEnd(range_id: int) -> None:
        return None

    @staticmethod
    def markA(msg: str) -> None:
        return None


# ---- torch.compile, DataParallel, extensions, NCCL -------------------------------------------------


def compile(model: Any = None, **kwargs: Any) -> Any:  # noqa: A001 - mirrors torch.compile
    """`torch.compile`: runs the model eagerly (graphs cannot be shipped to the server yet)."""
    global _compile_noticed
    if not kwargs.get("disable", False) and not _compile_noticed:
        _compile_noticed = True
        print(
            "gpupool: torch.compile is not supported on a pooled GPU yet; the model runs "
            "eagerly (same results; compiled graphs cannot be shipped to the server yet).",
            file=sys.stderr,
            flush=True,
        )
    if model is None:
        return lambda m: m
    return model


def _patch_data_parallel() -> None:
    """`nn.DataParallel` over the one pooled GPU runs the module directly (as CUDA does for
    one device, minus the scatter through CUDA streams); several pooled GPUs: unsupported."""
    from torch.nn.parallel import DataParallel

    orig_init = DataParallel.__init__
    if getattr(orig_init, "_gpupool", False):
        return

    def __init__(self: Any, module: Any, device_ids: Any = None, output_device: Any = None, dim: int = 0) -> None:
        orig_init(self, module, device_ids, output_device, dim)
        if self.device_ids:
            if len(self.device_ids) > 1:
                raise _unsupported(
                    "nn.DataParallel over several pooled GPUs",
                    "it scatters through CUDA streams; use one device, or one process per GPU",
                )
            self.src_device_obj = redirect.pooled_device(self.device_ids[0])
            self.module.to(self.src_device_obj)

    def forward(self: Any, *inputs: Any, **kwargs: Any) -> Any:
        if not self.device_ids:
            return self.module(*inputs, **kwargs)
        dev = self.src_device_obj

        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(dev)
            if isinstance(x, (list, tuple)):
                return type(x)(move(v) for v in x)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return self.module(*move(inputs), **move(kwargs))

    __init__._gpupool = True  # type: ignore[attr-defined]
    DataParallel.__init__ = __init__  # type: ignore[method-assign]
    DataParallel.forward = forward  # type: ignore[method-assign]


def _is_cuda_source(path: Any) -> bool:
    return str(path).endswith((".cu", ".cuh"))


def patch_cpp_extension(mod: Any) -> None:
    """Custom CUDA extensions cannot run: their kernels would need the GPU in this process."""
    if getattr(mod, "_gpupool_patched", False):
        return
    why = "its kernels would run on a GPU in this process, and there is none; only the server has one"
    load, load_inline = mod.load, mod.load_inline

    def _load(name: str, sources: Any, *args: Any, **kwargs: Any) -> Any:
        srcs = [sources] if isinstance(sources, str) else list(sources)
        if kwargs.get("with_cuda") or any(_is_cuda_source(s) for s in srcs):
            raise _unsupported(f"the custom CUDA extension {name!r}", why)
        return load(name, sources, *args, **kwargs)

    def _load_inline(name: str, cpp_sources: Any, cuda_sources: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cuda_sources or kwargs.get("with_cuda"):
            raise _unsupported(f"the custom CUDA extension {name!r}", why)
        return load_inline(name, cpp_sources, cuda_sources, *args, **kwargs)

    def _cuda_extension(name: str, *args: Any, **kwargs: Any) -> Any:
        raise _unsupported(f"the custom CUDA extension {name!r}", why)

    mod.load = _load
    mod.load_inline = _load_inline
    mod.CUDAExtension = _cuda_extension
    mod._gpupool_patched = True


def patch_distributed(dist: Any) -> None:
    """NCCL needs GPUs in this process: refuse it clearly instead of failing inside c10d."""
    if getattr(dist, "_gpupool_patched", False) or not hasattr(dist, "init_process_group"):
        return

    def check(backend: Any) -> None:
        if backend is not None and "nccl" in str(backend).lower():
            raise _unsupported(
                f"torch.distributed with backend {str(backend)!r}",
                "NCCL talks to GPUs in this process; pooled GPUs are reached over the gpupool "
                "protocol. Use one process per pooled GPU without NCCL collectives",
            )

    def wrap(fn: Callable) -> Callable:
        def inner(*args: Any, **kwargs: Any) -> Any:
            backend = kwargs.get("backend", args[0] if args and fn.__name__ == "init_process_group" else None)
            check(backend)
            return fn(*args, **kwargs)

        inner.__name__ = fn.__name__
        inner.__doc__ = fn.__doc__
        inner.__wrapped__ = fn  # type: ignore[attr-defined]
        return inner

    for name in ("init_process_group", "new_group"):
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name)))
    dist._gpupool_patched = True


# ---- installation -----------------------------------------------------------------------------------


def _set(mod: Any, name: str, value: Any) -> None:
    setattr(mod, name, value)


def install() -> None:
    """Patch torch.cuda, torch.accelerator and friends (idempotent)."""
    global _installed
    if _installed:
        return
    import torch.cuda.graphs
    import torch.cuda.nvtx
    import torch.cuda.streams

    c = torch.cuda
    for name, fn in {
        "is_available": is_available,
        "device_count": device_count,
        "current_device": current_device,
        "set_device": set_device,
        "is_initialized": is_initialized,
        "init": init,
        "_is_in_bad_fork": is_in_bad_fork,
        "get_device_capability": get_device_capability,
        "get_device_name": get_device_name,
        "get_device_properties": get_device_properties,
        "is_bf16_supported": is_bf16_supported,
        "is_tf32_supported": is_tf32_supported,
        "synchronize": synchronize,
        "mem_get_info": mem_get_info,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_reserved,
        "max_memory_reserved": max_memory_reserved,
        "memory_cached": memory_reserved,
        "max_memory_cached": max_memory_reserved,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "reset_max_memory_allocated": reset_peak_memory_stats,
        "reset_max_memory_cached": reset_peak_memory_stats,
        "memory_stats": memory_stats,
        "memory_summary": memory_summary,
        "empty_cache": empty_cache,
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        "seed": seed,
        "seed_all": seed,
        "initial_seed": initial_seed,
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "get_rng_state_all": _get_rng_state_all,
        "set_rng_state_all": _set_rng_state_all,
        "is_current_stream_capturing": is_current_stream_capturing,
        "current_stream": current_stream,
        "default_stream": default_stream,
        "stream": stream,
        "set_stream": set_stream,
        "StreamContext": StreamContext,
        "Stream": Stream,
        "ExternalStream": ExternalStream,
        "Event": Event,
        "CUDAGraph": CUDAGraph,
        "graph": graph,
        "make_graphed_callables": make_graphed_callables,
        "graph_pool_handle": graph_pool_handle,
        "MemPool": MemPool,
        "use_mem_pool": use_mem_pool,
        "set_per_process_memory_fraction": set_per_process_memory_fraction,
        "device": device,
        "device_of": device_of,
    }.items():
        _set(c, name, fn)
    for name, fn in {"Stream": Stream, "ExternalStream": ExternalStream, "Event": Event}.items():
        _set(torch.cuda.streams, name, fn)
    for name, fn in {
        "CUDAGraph": CUDAGraph,
        "graph": graph,
        "make_graphed_callables": make_graphed_callables,
        "graph_pool_handle": graph_pool_handle,
        "is_current_stream_capturing": is_current_stream_capturing,
    }.items():
        _set(torch.cuda.graphs, name, fn)
    _set(torch.cuda.nvtx, "_nvtx", _NoNVTX())
    # torch.cuda.memory.* are the same functions under another name.
    mem = sys.modules.get("torch.cuda.memory")
    if mem is not None:
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
                     "reset_peak_memory_stats", "memory_stats", "memory_summary", "empty_cache", "mem_get_info"):
            _set(mem, name, getattr(c, name))

    acc = torch.accelerator
    for name, fn in {
        "is_available": is_available,
        "device_count": device_count,
        "current_device_index": current_device,
        "current_device_idx": current_device,
        "set_device_index": set_device,
        "set_device_idx": set_device,
        "synchronize": synchronize,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_reserved,
        "max_memory_reserved": max_memory_reserved,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "memory_stats": memory_stats,
        "empty_cache": empty_cache,
        "get_memory_info": mem_get_info,
    }.items():
        if hasattr(acc, name):
            _set(acc, name, fn)

    _set(torch, "compile", compile)
    _patch_data_parallel()
    if "torch.distributed" in sys.modules:
        patch_distributed(sys.modules["torch.distributed"])
    if "torch.utils.cpp_extension" in sys.modules:
        patch_cpp_extension(sys.modules["torch.utils.cpp_extension"])
    _installed = True


def post_import_hooks() -> dict[str, Callable[[Any], None]]:
    """Modules to patch when (if ever) the program imports them: module name -> patch."""
    return {"torch.utils.cpp_extension": patch_cpp_extension, "torch.distributed": patch_distributed}
