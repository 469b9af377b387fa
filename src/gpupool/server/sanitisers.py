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


def _tensor(b: Bound, name: str) -> torch.Tensor:
    t = b.get(name)
    if not isinstance(t, torch.Tensor):
        raise SanitiserRefused(f"{name} must be a tensor")
    return t


def _pool_indices(dims: int, of: str = "self") -> Sanitiser:
    """Max-pooling backward: `indices` (one per output element, so shaped as `grad_output`)
    index one plane of `of` (flattened spatial position)."""

    def sanitise(b: Bound) -> None:
        if _tensor(b, "indices").shape != _tensor(b, "grad_output").shape:
            raise SanitiserRefused("indices must have grad_output's shape")
        _clamp(b, "indices", _plane(b.get(of), dims) - 1)

    return sanitise


def _unpool(dims: int) -> Sanitiser:
    """Max-unpooling: `indices` index one plane of the output (`output_size`)."""

    def sanitise(b: Bound) -> None:
        size = b.get("output_size")
        if not isinstance(size, list) or len(size) != dims or any(type(s) is not int or s < 0 for s in size):
            raise SanitiserRefused(f"output_size must be {dims} non-negative integers")
        if _tensor(b, "indices").shape != _tensor(b, "self").shape:
            raise SanitiserRefused("indices must have the pooled input's shape")
        _clamp(b, "indices", math.prod(size) - 1)

    return sanitise


def _embedding_dense_backward(b: Bound) -> None:
    n = b.get("num_weights")
    if type(n) is not int or n < 0:
        raise SanitiserRefused("num_weights must be a non-negative integer")
    _clamp(b, "indices", n - 1)


def _bag_shapes(b: Bound, rows: int) -> torch.Tensor:
    """Embedding-bag backward: `grad` has a row per bag, `offset2bag` (empty, or one per index)
    the bag of each index, `offsets` a start per bag into `indices`; clamps the last two."""
    grad, indices = _tensor(b, "grad"), _tensor(b, "indices")
    if grad.dim() != 2:
        raise SanitiserRefused("grad must be a matrix (one row per bag)")
    offset2bag = _tensor(b, "offset2bag")
    if offset2bag.numel() not in (0, indices.numel()):
        raise SanitiserRefused("offset2bag must be empty or hold one bag per index")
    weights = b.get("per_sample_weights") if "per_sample_weights" in b.names else None
    if isinstance(weights, torch.Tensor) and weights.numel() != indices.numel():
        raise SanitiserRefused("per_sample_weights must hold one weight per index")
    _clamp(b, "indices", rows - 1)
    _clamp(b, "offset2bag", grad.shape[0] - 1)
    if "offsets" in b.names:
        _clamp(b, "offsets", indices.numel())
    return grad


def _embedding_bag_backward(b: Bound) -> None:
    """`indices` (and `maximum_indices`, max mode) index the weight rows, `offset2bag` and
    `bag_size` the bags (rows of `grad`)."""
    n = b.get("num_weights")
    if type(n) is not int or n < 0:
        raise SanitiserRefused("num_weights must be a non-negative integer")
    grad = _bag_shapes(b, n)
    if _tensor(b, "bag_size").numel() < grad.shape[0]:
        raise SanitiserRefused("bag_size must hold a size per bag")
    if b.get("mode") == 2 and _tensor(b, "maximum_indices").shape != grad.shape:
        raise SanitiserRefused("maximum_indices must have grad's shape in max mode")
    _clamp(b, "maximum_indices", n - 1)


def _embedding_bag_weights_backward(b: Bound) -> None:
    """`_embedding_bag_per_sample_weights_backward`: `indices` index the rows of `weight`."""
    weight = _tensor(b, "weight")
    if weight.dim() != 2 or _tensor(b, "grad").shape[-1:] != weight.shape[-1:]:
        raise SanitiserRefused("weight must be a matrix with grad's row length")
    _bag_shapes(b, weight.shape[0])


def _ints(b: Bound, name: str) -> list[int]:
    """An `int[]` argument, or an integer tensor's values (read with a sync: the CTC kernels
    copy them to the host anyway)."""
    v = b.get(name)
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise SanitiserRefused(f"{name} must be a 1-D integer tensor")
        v = v.tolist()
    if not isinstance(v, list) or any(type(x) is not int for x in v):
        raise SanitiserRefused(f"{name} must be a list of integers")
    return v


def _ctc(b: Bound) -> None:
    """CTC loss and its backward index `log_probs` (T, N, C) by the class ids in `targets` and
    `blank`, walk each sample's `input_lengths` time steps and `target_lengths` labels (of a
    padded (N, S) `targets` or a 1-D concatenation), and the backward reads `log_alpha`
    (N, T, 2 * the longest target + 1) and a loss per sample. Lengths are checked (they are
    host values), class ids clamped."""
    log_probs, targets = _tensor(b, "log_probs"), _tensor(b, "targets")
    if log_probs.dim() != 3:
        raise SanitiserRefused("log_probs must be (time, batch, classes)")
    steps, batch, classes = log_probs.shape
    blank = b.get("blank")
    blank = 0 if blank is None else blank
    if type(blank) is not int or not 0 <= blank < classes:
        raise SanitiserRefused(f"blank must be a class index in [0, {classes})")
    il, tl = _ints(b, "input_lengths"), _ints(b, "target_lengths")
    if len(il) != batch or len(tl) != batch:
        raise SanitiserRefused("input_lengths and target_lengths must hold one length per sample")
    if any(not 0 <= x <= steps for x in il) or any(x < 0 for x in tl):
        raise SanitiserRefused(f"input lengths must lie in [0, {steps}] and target lengths be non-negative")
    if targets.dim() == 2:
        if targets.shape[0] != batch or any(x > targets.shape[1] for x in tl):
            raise SanitiserRefused("padded targets must have a row per sample, each as long as its length")
    elif targets.dim() != 1 or sum(tl) > targets.numel():
        raise SanitiserRefused("targets must be (batch, length) or the concatenation of the targets")
    if "log_alpha" in b.names:
        alpha, nll, grad = _tensor(b, "log_alpha"), _tensor(b, "neg_log_likelihood"), _tensor(b, "grad")
        if alpha.dim() != 3 or alpha.shape[:2] != (batch, steps) or alpha.shape[2] < 2 * max(tl, default=0) + 1:
            raise SanitiserRefused("log_alpha must be (batch, time, 2 * longest target + 1)")
        if nll.shape != (batch,) or grad.numel() != batch:
            raise SanitiserRefused("neg_log_likelihood and grad must hold one loss per sample")
    _clamp(b, "targets", classes - 1)


def _fft(b: Bound) -> None:
    """The internal FFT kernels take dimensions already wrapped and do not check them."""
    x, dims = _tensor(b, "self"), b.get("dim")
    if not isinstance(dims, list) or any(type(d) is not int or not -x.dim() <= d < x.dim() for d in dims):
        raise SanitiserRefused(f"dim must list dimensions of a {x.dim()}-D tensor")
    wrapped = [d % x.dim() for d in dims]
    if len(set(wrapped)) != len(wrapped):
        raise SanitiserRefused("dim must not repeat a dimension")
    if b.get("normalization") not in (0, 1, 2):
        raise SanitiserRefused("normalization must be 0, 1 or 2")
    b.set("dim", wrapped)


def _grid_sampler(b: Bound) -> None:
    """The grid samplers dispatch on the mode integers without a default case."""
    if b.get("interpolation_mode") not in (0, 1, 2) or b.get("padding_mode") not in (0, 1, 2):
        raise SanitiserRefused("interpolation_mode and padding_mode must be 0, 1 or 2")


def _segments(b: Bound) -> None:
    """`segment_reduce` and its backward walk the segments that `lengths` or `offsets` describe
    along `axis` of `data`; only lengths are checked by PyTorch, and only forward. Both are
    checked here, by value (a sync; these ops are rare)."""
    data = _tensor(b, "data")
    axis = b.get("axis")
    axis = 0 if axis is None else axis
    if "indices" in b.names and b.get("indices") is not None:
        raise SanitiserRefused("segment_reduce with indices is not supported")
    lengths, offsets = b.get("lengths"), b.get("offsets")
    seg = lengths if isinstance(lengths, torch.Tensor) else offsets
    if not isinstance(seg, torch.Tensor) or (lengths is not None and offsets is not None):
        raise SanitiserRefused("give exactly one of lengths and offsets, as a tensor")
    if type(axis) is not int or axis != seg.dim() - 1 or not 0 <= axis < data.dim() \
            or seg.shape[:axis] != data.shape[:axis] or seg.is_floating_point():
        raise SanitiserRefused("lengths/offsets must be integers shaped as data up to axis, with axis last")
    size = data.shape[axis]
    if seg is lengths:
        ok = bool((seg >= 0).all()) and bool((seg.sum(-1) == size).all())
        segments = seg.shape[-1]
    else:
        ok = seg.shape[-1] >= 1 and bool((seg[..., :1] >= 0).all()) and bool((seg[..., -1:] <= size).all()) \
            and bool((seg.diff(dim=-1) >= 0).all())
        segments = seg.shape[-1] - 1
    if not ok:
        raise SanitiserRefused(f"segments must be non-negative and cover the {size} elements along axis")
    if "output" in b.names:
        shape = (*data.shape[:axis], segments, *data.shape[axis + 1:])
        if tuple(_tensor(b, "output").shape) != shape or tuple(_tensor(b, "grad").shape) != shape:
            raise SanitiserRefused("output and grad must have one entry per segment")
    if "unsafe" in b.names and b.get("unsafe"):
        b.set("unsafe", False)


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


def _materialise_zeros(b: Bound) -> Callable[[Any], Any]:
    """A ZeroTensor reports storage it does not have (its data pointer is null): an in-place
    op on it, `resize_` among them, wrote through null and killed the worker (found by `make
    fuzz`; plain torch 2.13 crashes the same way). Autograd's formulas ask for it only as an
    optimisation, so the session gets real zeros of the same shape and dtype instead."""

    def real(result: Any) -> Any:
        if isinstance(result, torch.Tensor) and result._is_zerotensor():
            return torch.zeros(result.shape, dtype=result.dtype, device=result.device)
        return result

    return real


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
    "aten::_efficientzerotensor": _materialise_zeros,
    "aten::_efficientzerotensor.out": _materialise_zeros,
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
    "aten::_embedding_bag_backward": _embedding_bag_backward,
    "aten::_embedding_bag_per_sample_weights_backward": _embedding_bag_weights_backward,
    "aten::_embedding_bag_per_sample_weights_backward.out": _embedding_bag_weights_backward,
    **{f"aten::{op}{overload}": _ctc for op in ("_ctc_loss", "_ctc_loss_backward")
       for overload in ("", ".Tensor", ".out", ".Tensor_out")},
    **{f"aten::_fft_{kind}{overload}": _fft for kind in ("c2c", "c2r", "r2c") for overload in ("", ".out")},
    **{f"aten::grid_sampler_{d}d{suffix}": _grid_sampler for d in (2, 3)
       for suffix in ("", ".out", "_backward", "_backward.out")},
    "aten::segment_reduce": _segments,
    "aten::segment_reduce.out": _segments,
    "aten::_segment_reduce_backward": _segments,
    "aten::_segment_reduce_backward.out": _segments,
    # CUDA's fused attention (what gpupool's SDPA routing sends to a CUDA server): not reached
    # by the CPU kernel sweep, so their shapes are checked against each other instead.
    "aten::_scaled_dot_product_flash_attention_backward": _flash_backward,
    "aten::_scaled_dot_product_efficient_attention_backward": _efficient_backward,
}


def family(name: str) -> str:
    """The kernel family of an overload: `aten::_fft_c2c.out`, `aten::index_add_` and
    `aten::index_add.out` are `aten::_fft_c2c`, `aten::index_add`.

    Note [Kernel families]: the sweep calls what real code calls, mostly the functional
    overload, but the in-place and `out=` overloads of an op run the same kernel (structured
    kernels, or a functional kernel writing into the given tensor). So a finding on one overload
    makes the whole family need a sanitiser, and a family swept clean covers its siblings."""
    base = name.split(".", 1)[0]
    return base[:-1] if base.endswith("_") and not base.endswith("__") else base


@lru_cache(maxsize=1)
def unsafe_kernels(path: Path = SWEEP_FILE) -> frozenset[str]:
    """Families (Note [Kernel families]) of the ops the kernel sweep found reading, writing or
    spinning out of bounds."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return frozenset()
    return frozenset(family(f["op"]) for f in data.get("unsafe", []))
