"""Sanitisers for kernels that trust their integer arguments.

Note [Sanitisers]: PyTorch's kernels are not memory-safe against crafted arguments (its security
policy says so): many backward and fused kernels index memory with whatever integers they are
given (`max_pool2d_with_indices_backward` writes `grad_input[indices]` for any int64 value), and
an allowlist cannot tell a crafted call from autograd's own. `tools/kernel_sweep.py` finds such
kernels by trying out-of-range and huge values; its findings are data
(`protocol/kernel_sweep.json`), and an op it found unsafe runs only with a sanitiser here
(`oppolicy.build_spec` denies it otherwise).

A sanitiser rewrites the arguments before the kernel runs, on the device, without a sync:
index tensors are clamped into the range the kernel may touch (a legitimate call, whose
indices are in range, is unchanged), iteration counts are bounded. Where clamping would turn a
hostile value into a plausible wrong result (a degree past any sensible polynomial), the
sanitiser also returns a fix-up that marks such results NaN. Each sanitiser costs one small
elementwise kernel per index tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SWEEP_FILE = Path(__file__).resolve().parent.parent / "protocol" / "kernel_sweep.json"


class Bound:
    """An op's arguments by schema name, as the executor will pass them."""

    __slots__ = ("names", "args", "kwargs")

    def __init__(self, names: Sequence[str], args: list[Any], kwargs: dict[str, Any]) -> None:
        self.names, self.args, self.kwargs = names, args, kwargs

    def _index(self, name: str) -> int:
        return self.names.index(name)

    def get(self, name: str) -> Any:
        i = self._index(name)
        return self.args[i] if i < len(self.args) else self.kwargs.get(name)

    def set(self, name: str, value: Any) -> None:
        i = self._index(name)
        if i < len(self.args):
            self.args[i] = value
        else:
            self.kwargs[name] = value


#: Rewrites a bound call in place; may return a function applied to the op's result.
Sanitiser = Callable[[Bound], "Callable[[Any], Any] | None"]


class SanitiserRefused(ValueError):
    """A sanitiser found an argument no legitimate call has (raised as an op error)."""


def _clamp(b: Bound, name: str, high: int, low: int = 0) -> None:
    """Clamp integer tensor argument `name` into [low, high] (an empty range: into [low, low])."""
    t = b.get(name)
    if isinstance(t, torch.Tensor) and t.numel() and not t.is_floating_point():
        b.set(name, t.clamp(low, max(low, high)))


def _plane(x: Any, dims: int) -> int:
    """Elements in one (batch, channel) plane of the last `dims` dimensions of tensor `x`."""
    if not isinstance(x, torch.Tensor) or x.dim() < dims:
        raise SanitiserRefused(f"expected a tensor with at least {dims} dimensions")
    return math.prod(x.shape[-dims:])


def _pool_indices(dims: int, of: str = "self") -> Sanitiser:
    """Max-pooling backward: `indices` index one plane of `of` (flattened spatial position)."""

    def sanitise(b: Bound) -> None:
        _clamp(b, "indices", _plane(b.get(of), dims) - 1)

    return sanitise


def _unpool(dims: int) -> Sanitiser:
    """Max-unpooling: `indices` index one plane of the output (`output_size`)."""

    def sanitise(b: Bound) -> None:
        size = b.get("output_size")
        if not isinstance(size, list) or len(size) != dims or any(type(s) is not int or s < 0 for s in size):
            raise SanitiserRefused(f"output_size must be {dims} non-negative integers")
        _clamp(b, "indices", math.prod(size) - 1)

    return sanitise


def _embedding_dense_backward(b: Bound) -> None:
    n = b.get("num_weights")
    if type(n) is not int or n < 0:
        raise SanitiserRefused("num_weights must be a non-negative integer")
    _clamp(b, "indices", n - 1)


def _embedding_bag_backward(b: Bound) -> None:
    """`indices` index the weight rows, `offset2bag` the bags (rows of `grad`), and
    `maximum_indices` (max mode) the weight rows again."""
    n = b.get("num_weights")
    grad = b.get("grad")
    if type(n) is not int or n < 0 or not isinstance(grad, torch.Tensor) or grad.dim() < 1:
        raise SanitiserRefused("num_weights must be a non-negative integer and grad a tensor")
    _clamp(b, "indices", n - 1)
    _clamp(b, "offset2bag", grad.shape[0] - 1)
    if "maximum_indices" in b.names:
        _clamp(b, "maximum_indices", n - 1)


#: By canonical op name. Filled in for every unsafe finding of the kernel sweep.
SANITISERS: dict[str, Sanitiser] = {
    "aten::max_pool2d_with_indices_backward": _pool_indices(2),
    "aten::max_pool2d_with_indices_backward.grad_input": _pool_indices(2),
    "aten::max_pool3d_with_indices_backward": _pool_indices(3),
    "aten::max_pool3d_with_indices_backward.grad_input": _pool_indices(3),
    "aten::adaptive_max_pool2d_backward": _pool_indices(2),
    "aten::adaptive_max_pool2d_backward.grad_input": _pool_indices(2),
    "aten::adaptive_max_pool3d_backward": _pool_indices(3),
    "aten::adaptive_max_pool3d_backward.grad_input": _pool_indices(3),
    "aten::fractional_max_pool2d_backward": _pool_indices(2),
    "aten::fractional_max_pool2d_backward.grad_input": _pool_indices(2),
    "aten::fractional_max_pool3d_backward": _pool_indices(3),
    "aten::fractional_max_pool3d_backward.grad_input": _pool_indices(3),
    "aten::max_unpool2d": _unpool(2),
    "aten::max_unpool2d.out": _unpool(2),
    "aten::max_unpool3d": _unpool(3),
    "aten::max_unpool3d.out": _unpool(3),
    "aten::embedding_dense_backward": _embedding_dense_backward,
    "aten::embedding_dense_backward.out": _embedding_dense_backward,
    "aten::_embedding_bag_dense_backward": _embedding_bag_backward,
    "aten::_embedding_bag_dense_backward.out": _embedding_bag_backward,
}


@lru_cache(maxsize=1)
def unsafe_kernels(path: Path = SWEEP_FILE) -> frozenset[str]:
    """Ops the kernel sweep found reading, writing or spinning out of bounds."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return frozenset()
    return frozenset(f["op"] for f in data.get("unsafe", []))
