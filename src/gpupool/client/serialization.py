"""`torch.save` / `torch.load` of gpupool tensors, behaving like CUDA checkpoints.

Saving: a gpupool tensor pickles as an ordinary tensor whose storage is tagged "cuda:N", so the
file *is* a CUDA checkpoint: it loads on a real GPU machine, onto the CPU with `map_location`,
with `weights_only=True`, and back onto the pooled GPU here.

Loading: while gpupool is installed, `torch.load` without a `map_location` (or with one naming
"cuda"/"gpupool") restores "cuda"/"gpupool"-tagged storages to host memory, then uploads each
storage once and rebuilds every tensor on it as a device view — so tensors that shared a storage
in the file (tied weights, views) share one on the device too. Parameters stay Parameters.

Note [Storage marks]: the tagger must recognise the host copies made while pickling. They are
marked by data pointer, and unmarked by a finalizer when the host copy dies (after the pickler
is done with it), so a later CPU tensor reusing the address is never mistaken for a device one.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from typing import Any

import torch

_marked: dict[int, int] = {}  # storage data_ptr -> device index
_original_load: Any = None


def _tag(storage: Any) -> str | None:
    if not _marked:
        return None
    try:
        ptr = storage.data_ptr()
    except (AttributeError, RuntimeError):
        return None
    idx = _marked.get(ptr)
    if idx is None or ptr == 0:
        return None
    return f"cuda:{idx}"


def _deserialize(obj: Any, location: str) -> Any:
    return None  # restoring is done by the load wrapper; let torch's defaults handle the rest


def reduce_remote(t: torch.Tensor, proto: Any) -> Any:
    """Pickle a RemoteTensor as a CUDA-tagged tensor (or Parameter) of its current values."""
    from gpupool.client.dispatch import download

    host = download(t.detach())  # type: ignore[arg-type]
    ptr = host.untyped_storage().data_ptr()
    if getattr(t, "_is_param", False) or isinstance(t, torch.nn.Parameter):
        rv: Any = (torch._utils._rebuild_parameter, (host, t.requires_grad, OrderedDict()))
        anchor: Any = host  # pickled inside rv's arguments, which the pickler's memo keeps
    else:
        if t.requires_grad:
            host.requires_grad_(True)
        rv = host.__reduce_ex__(proto)
        anchor = next((a for a in rv[1] if isinstance(a, torch.storage.TypedStorage)), host)
    if ptr:
        _marked[ptr] = t.device.index or 0
        weakref.finalize(anchor, _marked.pop, ptr, None)
    return rv


def _is_device_location(loc: Any) -> bool:
    if loc is None:
        return True
    if isinstance(loc, torch.device):
        return loc.type in ("cuda", "gpupool")
    if isinstance(loc, str):
        return loc.startswith(("cuda", "gpupool"))
    return False


def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
    """`torch.load`, with "cuda"/"gpupool" storages landing on the pooled GPU."""
    if not _is_device_location(map_location):
        return _original_load(f, map_location, *args, **kwargs)
    restored: set[int] = set()
    target_index = 0
    if map_location is not None:
        target_index = torch.device(map_location).index or 0

    def restore(storage: Any, location: str) -> Any:
        if location.startswith(("cuda", "gpupool")):
            restored.add(storage.data_ptr())
            return storage
        return torch.serialization.default_restore_location(storage, location)

    result = _original_load(f, restore, *args, **kwargs)
    if not restored:
        return result
    return _Mover(restored, target_index).move(result)


class _Mover:
    """Rebuild the loaded object graph with device tensors for the restored storages."""

    def __init__(self, restored: set[int], index: int) -> None:
        from gpupool.client.session import session_for_device

        self.restored = restored
        self.session = session_for_device(torch.device("gpupool", index))
        self.flat: dict[int, torch.Tensor] = {}
        self.done: dict[int, Any] = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key in self.done:
            return self.done[key]  # type: ignore[no-any-return]
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.restored:
            return t
        from gpupool.client.dispatch import upload

        flat = self.flat.get(ptr)
        if flat is None:
            host = torch.empty(0, dtype=torch.uint8).set_(storage)
            flat = self.flat[ptr] = upload(host, self.session)
        with torch.no_grad():
            if t.dtype.itemsize and flat.numel() % t.dtype.itemsize == 0:
                typed = flat.view(t.dtype)
            else:
                typed = flat[: flat.numel() - flat.numel() % max(t.dtype.itemsize, 1)].view(t.dtype)
            dev = typed.as_strided(t.shape, t.stride(), t.storage_offset())
        out: torch.Tensor
        if isinstance(t, torch.nn.Parameter):
            out = torch.nn.Parameter(dev, requires_grad=t.requires_grad)
        else:
            out = dev.detach().requires_grad_(t.requires_grad) if t.requires_grad else dev.detach()
        self.done[key] = out
        return out

    def move(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, torch.nn.Module):
            if id(obj) in self.done:
                return obj
            self.done[id(obj)] = obj
            for mod in obj.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[name] = self.tensor(p)  # type: ignore[assignment]
                for name, b in list(mod._buffers.items()):
                    if b is not None:
                        mod._buffers[name] = self.tensor(b)
            return obj
        if isinstance(obj, dict):
            out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
            for k, v in obj.items():
                out[k] = self.move(v)
            if hasattr(obj, "_metadata"):
                out._metadata = obj._metadata  # type: ignore[attr-defined]
            return out
        if isinstance(obj, list):
            return [self.move(v) for v in obj]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self.move(v) for v in obj)
        return obj


def install() -> None:
    """Register the tagger and wrap `torch.load` (idempotent)."""
    global _original_load
    if _original_load is not None:
        return
    torch.serialization.register_package(5, _tag, _deserialize)
    _original_load = torch.load
    wrapped = functools.wraps(_original_load)(load)
    torch.load = wrapped
    torch.serialization.load = wrapped
