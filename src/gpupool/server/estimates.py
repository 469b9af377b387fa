"""How many bytes an op will allocate, computed from its arguments before it runs.

Note: only for ops whose output size follows from their arguments (factories, `repeat`, `cat`,
`clone`, ...); the executor refuses such an op before it allocates when the bytes would not fit
the session's budget. Other ops are measured after they ran (Note [Checks around an op] in
executor.py). `out=` variants are sized by running them on meta tensors (`oppolicy.out_growth`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

#: An op's argument by schema name (None when not given).
Getter = Callable[[str], Any]
#: Estimates the bytes an op will allocate from its bound arguments; None when it cannot tell.
Estimator = Callable[[Getter], "int | None"]


def _numel(size: Any) -> int | None:
    if type(size) is int:
        return size if size >= 0 else None
    if not isinstance(size, list):
        return None
    n = 1
    for s in size:
        if type(s) is not int or s < 0:
            return None
        n *= s
    return n


def _itemsize(dtype: Any, default: torch.dtype) -> int:
    return (dtype if isinstance(dtype, torch.dtype) else default).itemsize


def _by_size(default: Callable[[Getter], torch.dtype] | None = None) -> Estimator:
    def est(get: Getter) -> int | None:
        n = _numel(get("size"))
        if n is None:
            return None
        if default is not None:
            dflt = default(get)
        else:
            dflt = torch.get_default_dtype()
        return n * _itemsize(get("dtype"), dflt)

    return est


def _self_dtype(get: Getter) -> torch.dtype:
    t = get("self")
    return t.dtype if isinstance(t, torch.Tensor) else torch.get_default_dtype()


def _full_dtype(get: Getter) -> torch.dtype:
    v = get("fill_value")
    if isinstance(v, bool):
        return torch.bool
    if isinstance(v, int):
        return torch.int64
    if isinstance(v, complex):
        return torch.complex128 if torch.get_default_dtype() == torch.float64 else torch.complex64
    return torch.get_default_dtype()


def _strided(get: Getter) -> int | None:
    size, stride = get("size"), get("stride")
    if not isinstance(size, list) or _numel(size) is None or not isinstance(stride, list) \
            or len(stride) != len(size):
        return None
    if any(type(s) is not int for s in stride):
        return None
    if 0 in size:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(size, stride))
    t = get("self")
    dflt = t.dtype if isinstance(t, torch.Tensor) else torch.get_default_dtype()
    return span * _itemsize(get("dtype"), dflt)


def _arange(get: Getter, inclusive: bool = False) -> int | None:
    start, end, step = get("start"), get("end"), get("step")
    start = 0 if start is None else start
    step = 1 if step is None else step
    nums = (start, end, step)
    if not all(isinstance(v, (int, float)) for v in nums):
        return None
    try:
        n = math.floor((end - start) / step) + 1 if inclusive else math.ceil((end - start) / step)
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    all_int = all(isinstance(v, int) for v in nums)
    return max(n, 0) * _itemsize(get("dtype"), torch.int64 if all_int else torch.get_default_dtype())


def _steps(get: Getter) -> int | None:
    n = _numel(get("steps"))
    return None if n is None else n * _itemsize(get("dtype"), torch.get_default_dtype())


def _randperm(get: Getter) -> int | None:
    n = _numel(get("n"))
    return None if n is None else n * _itemsize(get("dtype"), torch.int64)


def _eye(get: Getter) -> int | None:
    n, k = _numel(get("n")), _numel(get("m") if get("m") is not None else get("n"))
    return None if n is None or k is None else n * k * _itemsize(get("dtype"), torch.get_default_dtype())


def _like(get: Getter) -> int | None:
    t = get("self")
    if not isinstance(t, torch.Tensor):
        return None
    return t.numel() * _itemsize(get("dtype"), t.dtype)


def _repeat(get: Getter) -> int | None:
    t, reps = get("self"), get("repeats")
    if not isinstance(t, torch.Tensor) or _numel(reps) is None:
        return None
    return t.numel() * _numel(reps) * t.element_size()  # type: ignore[operator]


def _resize(get: Getter) -> int | None:
    t = get("self")
    n = _numel(get("size"))
    if not isinstance(t, torch.Tensor) or n is None:
        return None
    new = (t.storage_offset() + n) * t.element_size()
    return max(0, new - t.untyped_storage().nbytes())


def _cat(get: Getter) -> int | None:
    ts = get("tensors")
    if not isinstance(ts, list) or not all(isinstance(t, torch.Tensor) for t in ts):
        return None
    return sum(t.numel() for t in ts) * max((t.element_size() for t in ts), default=0)


def _rnn(get: Getter) -> int | None:
    """`gpupool::rnn`: its outputs, and what a trained layer keeps for backward (gates, cell and
    hidden states per step and layer), a bound the ledger then replaces with the real count."""
    x, hx = get("input"), get("hx")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not isinstance(hx, list) or not hx:
        return None
    if not all(isinstance(h, torch.Tensor) and h.dim() == 3 for h in hx):
        return None
    layers = get("num_layers")
    if type(layers) is not int or layers < 1:
        return None
    steps = x.shape[0] * x.shape[1]
    dirs = 2 if get("bidirectional") else 1
    hidden, out = hx[-1].shape[-1], hx[0].shape[-1]
    gates = {0: 4, 1: 3}.get(get("kind"), 1) * hidden
    # mkldnn keeps ~17 hidden sizes a step for an LSTM layer (measured: 420 MiB for 400 x 64 steps
    # of 256), the decomposition less: four sets of gates, the cell and the hidden state.
    per_layer = steps * dirs * (4 * gates + 2 * hidden + out)
    trained = any(get("need_grad") or [])
    return (steps * dirs * out + per_layer * (layers if trained else 2)) * x.element_size()


def _rnn_cell(get: Getter) -> int | None:
    """`gpupool::rnn_cell`: its states, and what a trained cell keeps (gates and states)."""
    x, hx = get("input"), get("hx")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not isinstance(hx, list) or not hx:
        return None
    if not all(isinstance(h, torch.Tensor) and h.dim() == 2 for h in hx):
        return None
    batch, hidden = x.shape[0], hx[0].shape[1]
    gates = {0: 4, 1: 3}.get(get("kind"), 1) * hidden
    return batch * (2 * gates + 4 * hidden) * x.element_size()


#: By op base name (`aten::zeros.names` and `aten::zeros.default` share one).
ESTIMATORS: dict[str, Estimator] = {
    **{
        n: _by_size()
        for n in ("empty", "zeros", "ones", "rand", "randn", "empty_permuted", "normal")
    },
    "full": _by_size(_full_dtype),
    "randint": _by_size(lambda get: torch.int64),
    **{n: _by_size(_self_dtype) for n in ("new_empty", "new_zeros", "new_ones", "new_full")},
    "empty_strided": _strided,
    "new_empty_strided": _strided,
    "arange": _arange,
    "range": lambda get: _arange(get, inclusive=True),
    "linspace": _steps,
    "logspace": _steps,
    "randperm": _randperm,
    "eye": _eye,
    **{
        n: _like
        for n in (
            "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
            "randint_like", "clone", "_to_copy",
        )
    },
    "repeat": _repeat,
    "resize_": _resize,
    "cat": _cat,
    "stack": _cat,
    "rnn": _rnn,  # gpupool::rnn (no aten op has this base name)
    "rnn_cell": _rnn_cell,  # gpupool::rnn_cell (nor this one)
}
