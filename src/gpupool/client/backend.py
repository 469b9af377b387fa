"""Registers the `gpupool` PyTorch device (PrivateUse1) and its device module `torch.gpupool`.

Note: this must run before the first `backward()` in the process — the autograd engine reads
the device guard once. `gpupool.connect()` and `gpupool run` call `install()` first thing.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_installed = False
_lock = threading.Lock()
_lib: Any = None


class _DeviceContext:
    """`torch.gpupool.device(i)`: make gpupool:i the current device for a block."""

    def __init__(self, device: Any) -> None:
        self.index = device if isinstance(device, int) else (_as_device(device).index or 0)
        self.previous = 0

    def __enter__(self) -> None:
        from gpupool.client.session import current_index, set_current

        self.previous = current_index()
        set_current(self.index)

    def __exit__(self, *exc: Any) -> None:
        from gpupool.client.session import set_current

        set_current(self.previous)


class DeviceModule:
    """`torch.gpupool`: what PyTorch asks of a device backend, answered for the pooled GPU."""

    # Checkpointing saves the device's RNG state only when this says the device was used.
    _initialized = True
    device = _DeviceContext

    # The dtypes torch.autocast may use on this device.
    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        from gpupool.client.session import sessions

        return bool(sessions())

    def _is_in_bad_fork(self) -> bool:
        return False

    def device_count(self) -> int:
        from gpupool.client.session import sessions

        return max((s.index for s in sessions()), default=-1) + 1

    def current_device(self) -> int:
        from gpupool.client.session import current_index

        return current_index()

    def set_device(self, device: Any) -> None:
        from gpupool.client.session import set_current

        idx = device if isinstance(device, int) else torch.device(device).index
        set_current(idx or 0)

    def synchronize(self, device: Any = None) -> None:
        from gpupool.client.session import current_session, session_for_device

        s = current_session() if device is None else session_for_device(_as_device(device))
        s.synchronize()

    def manual_seed(self, seed: int) -> None:
        from gpupool.client.session import sessions

        for s in sessions():
            s.manual_seed(seed)

    manual_seed_all = manual_seed

    def seed_all(self) -> None:
        import random

        self.manual_seed(random.getrandbits(63))

    # The device generator lives on the server (one per session); checkpointing and
    # torch.random.fork_rng save and restore it through these.
    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return self._session(device).get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device: Any = None) -> None:
        self._session(device).set_rng_state(new_state)

    def get_rng_state_all(self) -> list[torch.Tensor]:
        from gpupool.client.session import sessions

        return [s.get_rng_state() for s in sorted(sessions(), key=lambda s: s.index)]

    def set_rng_state_all(self, new_states: Any) -> None:
        from gpupool.client.session import sessions

        for s, state in zip(sorted(sessions(), key=lambda s: s.index), new_states):
            s.set_rng_state(state)

    def _session(self, device: Any) -> Any:
        from gpupool.client.session import current_session, session_for_device

        if device is None or device == "gpupool" or (isinstance(device, torch.device) and device.index is None):
            return current_session()
        return session_for_device(_as_device(device))

    def memory_allocated(self, device: Any = None) -> int:
        return self._stats(device).memory_used

    def max_memory_allocated(self, device: Any = None) -> int:
        return self._stats(device).memory_peak

    def _stats(self, device: Any) -> Any:
        from gpupool.client.session import current_session, session_for_device

        s = current_session() if device is None else session_for_device(_as_device(device))
        return s.memory_stats()


def _as_device(device: Any) -> torch.device:
    if isinstance(device, int):
        return torch.device("gpupool", device)
    return torch.device(device)


def _flush_after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    from gpupool.client.session import flush_all

    flush_all()


def install() -> None:
    """Register the backend once per process (idempotent, thread-safe)."""
    global _installed, _lib
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        from gpupool.client import dispatch

        _setup_privateuseone_for_python_backend("gpupool", DeviceModule())
        lib = torch.library.Library("_", "IMPL")
        lib.fallback(dispatch.fallback, "PrivateUse1")
        _lib = lib
        from gpupool.client.metakernels import prefer_cpp_meta_kernels

        prefer_cpp_meta_kernels()
        _behave_like_cuda()
        _backward_on_this_thread()
        from gpupool.client import functions, rnn, serialization

        functions.install()
        rnn.install()
        serialization.install()
        # Note [Flush latency]: the ops of an optimizer step are sent as it returns, so the GPU
        # runs them while the program prepares the next batch.
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_flush_after_step)
        _installed = True


def _backward_on_this_thread() -> None:
    """Run backward on the thread that calls it, not on autograd's per-device worker thread.

    Note: a device's backward normally runs on a worker thread of the autograd engine; for a
    Python device every op there also pays GIL hand-offs between the two threads (~15% of a small
    training step, measured). The work is the same either way; only where it runs changes. The
    setting is per thread: this covers the thread that installed gpupool (the main thread).
    GPUPOOL_AUTOGRAD_THREADS=1 keeps PyTorch's default.
    """
    import os

    if os.environ.get("GPUPOOL_AUTOGRAD_THREADS") == "1":
        return
    setter = getattr(torch._C, "_set_multithreading_enabled", None)
    if setter is not None:
        setter(False)


def _behave_like_cuda() -> None:
    """Make PyTorch treat gpupool tensors as it treats CUDA ones where it checks the type.

    - `Module.to()` swaps parameters in place (`swap_tensors`), so an optimizer built before
      `.to(device)` still holds the very tensors that train (otherwise `.data` assignment would
      leave a wrapper subclass's handle behind).
    - Optimizers default to their foreach implementation, as on CUDA; it checks
      `type(p) in _foreach_supported_types`, which a subclass fails.
    """
    from gpupool.client.tensor import RemoteTensor

    torch.__future__.set_swap_module_params_on_conversion(True)
    from torch.optim import optimizer as optim_module
    from torch.utils import _foreach_utils

    # Note: two lists: optimizers read their own copy in torch.optim.optimizer.
    for types in (
        getattr(_foreach_utils, "_foreach_supported_types", None),
        getattr(optim_module, "_foreach_supported_types", None),
    ):
        if isinstance(types, list) and RemoteTensor not in types:
            types.append(RemoteTensor)
