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


#: Highest polynomial degree the `special_*_polynomial_*` kernels are given: their CPU and
#: CUDA kernels loop `n` times per element, so n = 1e13 held a worker for a day in 4 bytes.
MAX_DEGREE = 10_000


def _degree(b: Bound) -> Callable[[Any], Any] | None:
    """Bound the degree `n`: a scalar past `MAX_DEGREE` is refused; a tensor is clamped, and
    the results of the clamped elements are NaN (no sync to look at the values)."""
    n = b.get("n")
    if not isinstance(n, torch.Tensor):
        if not isinstance(n, (int, float)) or not math.isfinite(n) or abs(n) > MAX_DEGREE:
            raise SanitiserRefused(f"polynomial degree n must be a finite number of at most {MAX_DEGREE}")
        return None
    if n.is_complex():
        raise SanitiserRefused("polynomial degree n must be real")
    too_high = n > MAX_DEGREE
    b.set("n", n.clamp(max=MAX_DEGREE))

    def mark(result: Any) -> Any:
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            result.masked_fill_(too_high, math.nan)
        return result

    return mark


_POLYNOMIALS = (
    "chebyshev_polynomial_t", "chebyshev_polynomial_u", "chebyshev_polynomial_v",
    "chebyshev_polynomial_w", "hermite_polynomial_h", "hermite_polynomial_he",
    "laguerre_polynomial_l", "legendre_polynomial_p", "shifted_chebyshev_polynomial_t",
    "shifted_chebyshev_polynomial_u", "shifted_chebyshev_polynomial_v",
    "shifted_chebyshev_polynomial_w",
)


def _attention_shapes(b: Bound) -> tuple[int, int, int, int]:
    """(batch, heads, query length, key length) of a fused-attention backward call whose
    tensors agree with each other; raises otherwise. The CUDA kernels index `logsumexp` and
    the gradients by the query's shape, so a short `logsumexp` would be read past its end."""
    q, k, v = b.get("query"), b.get("key"), b.get("value")
    grad = b.get("grad_out") if "grad_out" in b.names else b.get("grad_out_")
    out = b.get("out")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v, grad, out)):
        raise SanitiserRefused("query, key, value, out and grad_out must be 4-D tensors")
    bsz, heads, lq, _ = q.shape
    lk = k.shape[2]
    if k.shape[:2] != (bsz, heads) or v.shape[:3] != (bsz, heads, lk):
        raise SanitiserRefused("key and value must match the query's batch, heads and each other's length")
    if tuple(out.shape) != (bsz, heads, lq, v.shape[3]) or grad.shape != out.shape:
        raise SanitiserRefused("out and grad_out must have the attention output's shape")
    lse = b.get("logsumexp")
    if not isinstance(lse, torch.Tensor) or lse.dim() != 3 or lse.shape[:2] != (bsz, heads) or lse.shape[2] < lq:
        raise SanitiserRefused("logsumexp must have shape (batch, heads, at least the query length)")
    for name in ("philox_seed", "philox_offset"):
        t = b.get(name)
        if isinstance(t, torch.Tensor) and t.numel() > 2:
            raise SanitiserRefused(f"{name} must be a seed or offset, not a {t.numel()}-element tensor")
    return bsz, heads, lq, lk


def _flash_backward(b: Bound) -> None:
    _, _, lq, lk = _attention_shapes(b)
    for name in ("cum_seq_q", "cum_seq_k"):
        t = b.get(name)
        if isinstance(t, torch.Tensor) and t.numel():
            raise SanitiserRefused(f"{name}: variable-length attention is not supported")
    if b.get("max_q") != lq or b.get("max_k") != lk:
        raise SanitiserRefused("max_q and max_k must be the query and key lengths")


def _efficient_backward(b: Bound) -> None:
    bsz, heads, lq, lk = _attention_shapes(b)
    bias = b.get("attn_bias")
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (bsz, heads, lq, lk):
        raise SanitiserRefused("attn_bias must have shape (batch, heads, query length, key length)")


#: By canonical op name. Filled in for every unsafe finding of the kernel sweep.
SANITISERS: dict[str, Sanitiser] = {
    **{
        f"aten::special_{p}{overload}": _degree
        for p in _POLYNOMIALS
        for overload in ("", ".out", ".x_scalar", ".x_scalar_out", ".n_scalar", ".n_scalar_out")
    },
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
    # CUDA's fused attention (what gpupool's SDPA routing sends to a CUDA server): not reached
    # by the CPU kernel sweep, so their shapes are checked against each other instead.
    "aten::_scaled_dot_product_flash_attention_backward": _flash_backward,
    "aten::_scaled_dot_product_efficient_attention_backward": _efficient_backward,
}


@lru_cache(maxsize=1)
def unsafe_kernels(path: Path = SWEEP_FILE) -> frozenset[str]:
    """Ops the kernel sweep found reading, writing or spinning out of bounds."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return frozenset()
    return frozenset(f["op"] for f in data.get("unsafe", []))
