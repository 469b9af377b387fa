"""`torch.autocast("cuda")` on the pooled GPU, with CUDA's casting policy.

Two parts:

1. "cuda" autocast means the gpupool device: `torch.autocast`/`torch.cuda.amp.autocast`,
   `torch.is_autocast_enabled("cuda")` & co., `torch.amp.custom_fwd/custom_bwd` and
   `GradScaler("cuda")` are rewritten to device type "gpupool".
2. A policy for the AutocastPrivateUse1 dispatch key. PyTorch registers per-op autocast kernels
   for CUDA, but for PrivateUse1 none: without a policy every op would run in fp32. We register
   Python kernels for exactly the ops CUDA's autocast handles (the op lists of
   ATen/autocast_mode.h that autocast_mode.cpp registers for CUDA), with the same policies —
   lower precision, fp32, fp32 with an output dtype, promote to the widest type, banned — and a
   fallthrough for every other op. The casts run on the server, so ops really run in
   bf16/fp16 there.

Note [Autocast cost]: outside an autocast region AutocastPrivateUse1 is excluded from dispatch,
so these kernels cost nothing; inside, ~10 µs per listed op.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from gpupool.client import redirect

BACKEND = redirect.BACKEND
KEY = "AutocastPrivateUse1"

#: Ops run in the autocast dtype (AT_FORALL_LOWER_PRECISION_FP, plus CUDA's cudnn ones).
LOWER_PRECISION_FP = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution",
    "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear",
    "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    "cudnn_convolution", "cudnn_convolution_transpose",
)  # fmt: skip

#: Ops run in fp32 (AT_FORALL_FP32).
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim",
    "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)  # fmt: skip

#: Ops whose optional `dtype` argument is set to fp32 when unset (AT_FORALL_FP32_SET_OPT_DTYPE).
FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
    "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
    "sum.dim_IntList",
)  # fmt: skip

#: Ops redispatched to their dtype-taking overload with fp32 (AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE).
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}

#: Ops run in the widest floating type among their arguments (AT_FORALL_PROMOTE).
PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
    "index_put", "tensordot", "scatter_add",
)  # fmt: skip

#: Ops CUDA's autocast refuses (autocast_mode.cpp: binary_cross_entropy_banned).
BANNED = {
    "binary_cross_entropy": (
        "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
        "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
        "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
        "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
        "safe to autocast."
    )
}

_lib: Any = None
_fallthrough_lib: Any = None
_installed = False
_orig: dict[str, Any] = {}
# Note [Cast cache]: like C++'s, it holds fp32 leaf tensors that require grad (the weights) cast
# to the autocast dtype, so a weight used twice in one region is cast once; keyed by id() with
# a weakref check, emptied by torch.clear_autocast_cache() (autocast's outermost exit).
_cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
_EXCLUDE = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)


def all_policy_ops() -> set[str]:
    """Every op name (with overload) this module gives a kernel: for checks against CUDA's."""
    return {*LOWER_PRECISION_FP, *FP32, *FP32_SET_OPT_DTYPE, *FP32_APPEND_DTYPE, *PROMOTE, *BANNED}


def _op(name: str) -> torch._ops.OpOverload | None:
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


# ---- casting -------------------------------------------------------------------------------------


def _eligible(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.device.type == BACKEND
        and t.is_floating_point()
        and t.dtype is not torch.float64
    )


def _cast_tensor(t: torch.Tensor, to: torch.dtype, lower: torch.dtype) -> torch.Tensor:
    if not _eligible(t) or t.dtype is to:
        return t
    cacheable = (
        to is lower
        and t.dtype is torch.float32
        and t.requires_grad
        and t.is_leaf
        and not t._is_view()
        and torch.is_autocast_cache_enabled()
    )
    if cacheable:
        hit = _cache.get(id(t))
        if hit is not None and hit[0]() is t and hit[1].dtype is to:
            return hit[1]
    out = torch.ops.aten._to_copy.default(t, dtype=to)
    if cacheable:
        _cache[id(t)] = (weakref.ref(t), out)
    return out


def _cast(x: Any, to: torch.dtype, lower: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return _cast_tensor(x, to, lower)
    if type(x) is list or type(x) is tuple:
        return type(x)(_cast(v, to, lower) for v in x)
    return x


def _widest(args: Any, lower: torch.dtype) -> torch.dtype:
    """`at::autocast::promote_type`: fp32 if any eligible argument is fp32, else the lower type."""
    current = lower

    def visit(x: Any) -> None:
        nonlocal current
        if isinstance(x, torch.Tensor):
            if not _eligible(x):
                return
            if current is torch.float32 or x.dtype is torch.float32:
                current = torch.float32
            elif x.dtype is not lower:
                raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
        elif type(x) is list or type(x) is tuple:
            for v in x:
                visit(v)

    visit(args)
    return current


# ---- kernels -------------------------------------------------------------------------------------


def _lower_kernel(op: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE), torch._C.DisableTorchFunction():
            lower = _orig["get_autocast_dtype"](BACKEND)
            args = _cast(args, lower, lower)
            kwargs = {k: _cast(v, lower, lower) for k, v in kwargs.items()}
            return op(*args, **kwargs)

    return kernel


def _fp32_kernel(op: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE), torch._C.DisableTorchFunction():
            lower = _orig["get_autocast_dtype"](BACKEND)
            args = _cast(args, torch.float32, lower)
            kwargs = {k: _cast(v, torch.float32, lower) for k, v in kwargs.items()}
            return op(*args, **kwargs)

    return kernel


def _set_opt_dtype_kernel(op: Any) -> Callable[..., Any]:
    names = [a.name for a in op._schema.arguments]
    pos = names.index("dtype")
    kwarg_only = op._schema.arguments[pos].kwarg_only

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE), torch._C.DisableTorchFunction():
            if args and _eligible(args[0]):
                if not kwarg_only and len(args) > pos:
                    if args[pos] is None:
                        args = (*args[:pos], torch.float32, *args[pos + 1 :])
                elif kwargs.get("dtype") is None:
                    kwargs = dict(kwargs, dtype=torch.float32)
            return op(*args, **kwargs)

    return kernel


def _append_dtype_kernel(op: Any, target: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE), torch._C.DisableTorchFunction():
            first = args[0]
            out_type = torch.float32 if _eligible(first) else first.dtype
            return target(*args, **kwargs, dtype=out_type)

    return kernel


def _promote_kernel(op: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE), torch._C.DisableTorchFunction():
            lower = _orig["get_autocast_dtype"](BACKEND)
            to = _widest((args, tuple(kwargs.values())), lower)
            args = _cast(args, to, lower)
            kwargs = {k: _cast(v, to, lower) for k, v in kwargs.items()}
            return op(*args, **kwargs)

    return kernel


def _banned_kernel(message: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)

    return kernel


def _register_policy() -> None:
    global _lib, _fallthrough_lib
    lib = torch.library.Library("aten", "IMPL")
    table: list[tuple[tuple[str, ...], Callable[[Any], Callable[..., Any]]]] = [
        (LOWER_PRECISION_FP, _lower_kernel),
        (FP32, _fp32_kernel),
        (FP32_SET_OPT_DTYPE, _set_opt_dtype_kernel),
        (PROMOTE, _promote_kernel),
    ]
    for names, make in table:
        for name in names:
            op = _op(name)
            if op is not None:
                lib.impl(op, make(op), KEY)
    for name, target in FP32_APPEND_DTYPE.items():
        op, to = _op(name), _op(target)
        if op is not None and to is not None:
            lib.impl(op, _append_dtype_kernel(op, to), KEY)
    for name, message in BANNED.items():
        op = _op(name)
        if op is not None:
            lib.impl(op, _banned_kernel(message), KEY)
    _lib = lib
    try:
        fl = torch.library.Library("_", "IMPL")
        fl.fallback(torch.library.fallthrough_kernel, KEY)
        _fallthrough_lib = fl
    except RuntimeError:
        pass  # someone (the backend) registered the fallthrough already


# ---- "cuda" autocast means the pooled device -------------------------------------------------------


def _dev(device_type: Any) -> Any:
    return BACKEND if device_type == "cuda" else device_type


def _patch_autocast_apis() -> None:
    from torch.amp import autocast_mode, grad_scaler

    for name in ("is_autocast_enabled", "get_autocast_dtype", "set_autocast_enabled", "set_autocast_dtype",
                 "clear_autocast_cache"):
        _orig[name] = getattr(torch, name)
    get_dtype = _orig["get_autocast_dtype"]
    is_enabled = _orig["is_autocast_enabled"]
    set_enabled = _orig["set_autocast_enabled"]
    set_dtype = _orig["set_autocast_dtype"]
    clear = _orig["clear_autocast_cache"]

    def is_autocast_enabled(device_type: str | None = None) -> bool:
        return bool(is_enabled(BACKEND if device_type is None else _dev(device_type)))

    def get_autocast_dtype(device_type: str) -> torch.dtype:
        return get_dtype(_dev(device_type))  # type: ignore[no-any-return]

    def set_autocast_enabled(*args: Any) -> None:
        if len(args) == 1:  # the deprecated form: CUDA's flag
            set_enabled(BACKEND, args[0])
        else:
            set_enabled(_dev(args[0]), args[1])

    def set_autocast_dtype(device_type: str, dtype: torch.dtype) -> None:
        set_dtype(_dev(device_type), dtype)

    def clear_autocast_cache() -> None:
        _cache.clear()
        clear()

    torch.is_autocast_enabled = is_autocast_enabled
    torch.get_autocast_dtype = get_autocast_dtype
    torch.set_autocast_enabled = set_autocast_enabled
    torch.set_autocast_dtype = set_autocast_dtype
    torch.clear_autocast_cache = clear_autocast_cache
    torch.get_autocast_gpu_dtype = lambda: get_dtype(BACKEND)  # type: ignore[attr-defined]
    torch.set_autocast_gpu_dtype = lambda dtype: set_dtype(BACKEND, dtype)  # type: ignore[attr-defined]

    cls = autocast_mode.autocast
    init = cls.__init__

    def __init__(self: Any, device_type: str, dtype: Any = None, enabled: bool = True, cache_enabled: Any = None) -> None:
        init(self, _dev(device_type), dtype, enabled, cache_enabled)

    cls.__init__ = __init__  # type: ignore[method-assign]

    custom_fwd, custom_bwd = autocast_mode.custom_fwd, autocast_mode.custom_bwd

    def _custom_fwd(fwd: Any = None, *, device_type: str, cast_inputs: Any = None) -> Any:
        return custom_fwd(fwd, device_type=_dev(device_type), cast_inputs=cast_inputs)

    def _custom_bwd(bwd: Any = None, *, device_type: str) -> Any:
        return custom_bwd(bwd, device_type=_dev(device_type))

    for mod in (autocast_mode, torch.amp):
        mod.custom_fwd = _custom_fwd  # type: ignore[attr-defined]
        mod.custom_bwd = _custom_bwd  # type: ignore[attr-defined]

    scaler = grad_scaler.GradScaler
    scaler_init = scaler.__init__

    def _scaler_init(self: Any, device: str = "cuda", *args: Any, **kwargs: Any) -> None:
        scaler_init(self, device, *args, **kwargs)
        # Note: after the original init, so its "cuda" availability check (patched) runs as on
        # a GPU machine; then the scaler's tensors and checks use the pooled device type.
        if self._device == "cuda":
            self._device = BACKEND

    scaler.__init__ = _scaler_init  # type: ignore[method-assign]


def _wrap_sdpa() -> None:
    """Apply the lower-precision policy to `F.scaled_dot_product_attention` itself.

    Note: on gpupool tensors the client routes SDPA at the torch-function level straight to the
    fused aten op the server would pick (`client/functions.py`), past
    aten::scaled_dot_product_attention — the op CUDA's autocast casts at. Cast here instead,
    as that kernel would: every floating argument on the device (q, k, v, a float mask).
    """
    import torch.nn.functional as F

    inner = F.scaled_dot_product_attention
    if getattr(inner, "_gpupool_autocast", False):
        return
    is_enabled, get_dtype = _orig["is_autocast_enabled"], _orig["get_autocast_dtype"]

    @functools.wraps(inner)
    def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
        if is_enabled(BACKEND):
            q = args[0] if args else kwargs.get("query")
            if isinstance(q, torch.Tensor) and q.device.type == BACKEND:
                lower = get_dtype(BACKEND)
                args = _cast(args, lower, lower)
                kwargs = {k: _cast(v, lower, lower) for k, v in kwargs.items()}
        return inner(*args, **kwargs)

    scaled_dot_product_attention._gpupool_autocast = True  # type: ignore[attr-defined]
    F.scaled_dot_product_attention = scaled_dot_product_attention


def install() -> None:
    """Register the policy and the "cuda" autocast mapping (idempotent)."""
    global _installed
    if _installed:
        return
    _patch_autocast_apis()
    _register_policy()
    _wrap_sdpa()
    # CUDA's default autocast dtype is fp16; keep the pooled device's the same.
    _orig["set_autocast_dtype"](BACKEND, torch.float16)
    _installed = True
