"""Torch-function-level routing for ops whose kernel choice PyTorch makes in C++ by device.

`F.scaled_dot_product_attention` picks its fused kernel with a per-device C++ stub that a
Python backend cannot register; on a gpupool tensor it would fall back to the math
decomposition (~20 ops, and results that differ from the GPU's in the last bits). Instead we
ask the server which kernel its device would pick (once per signature; the answer is cached)
and call that aten op directly, so the server runs the same fused kernel a local program would.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from gpupool.client.tensor import RemoteTensor

aten = torch.ops.aten
_original_sdpa: Any = None
_choices: dict[Any, int] = {}

# sdp::SDPBackend values, as returned by aten::_fused_sdp_choice
MATH, FLASH, EFFICIENT = 0, 1, 2


def _key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, rest: tuple) -> Any:
    def sig(t: Any) -> Any:
        if t is None:
            return None
        return (t.shape, t.stride(), t.dtype, t.requires_grad)

    return (sig(q), sig(k), sig(v), sig(mask), rest, torch.is_grad_enabled())


def _choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float, is_causal: bool, scale: Any) -> int:
    key = _key(q, k, v, mask, (dropout_p, is_causal, scale))
    c = _choices.get(key)
    if c is None:
        # A value-returning op: runs on the server now (one round trip per new signature).
        c = int(aten._fused_sdp_choice.default(q, k, v, mask, dropout_p, is_causal, scale=scale))
        _choices[key] = c
    return c


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if not isinstance(query, RemoteTensor) or enable_gqa or query.dim() != 4:
        return _call_original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:
        # As PyTorch's convert_boolean_attn_mask: True keeps, False masks out.
        mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill_(mask.logical_not(), -math.inf)
    choice = _choice(query, key, value, mask, dropout_p, is_causal, scale)
    kind = query._h.session.kind
    if choice == FLASH and kind == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu.default(
            query, key, value, dropout_p, is_causal, attn_mask=mask, scale=scale
        )[0]
    if choice == FLASH and kind == "cuda" and mask is None and query.shape[-1] % 8 == 0:
        return aten._scaled_dot_product_flash_attention.default(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    if choice == EFFICIENT and kind == "cuda" and mask is None:
        need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention.default(
            query, key, value, None, need_lse, dropout_p, is_causal, scale=scale
        )[0]
    return _call_original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _call_original(q: Any, k: Any, v: Any, mask: Any, dropout_p: float, is_causal: bool, scale: Any, enable_gqa: bool) -> Any:
    if enable_gqa:
        return _original_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=True)
    return _original_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


def install() -> None:
    """Route `F.scaled_dot_product_attention` on gpupool tensors (idempotent)."""
    global _original_sdpa
    if _original_sdpa is not None:
        return
    import torch.nn.functional as F

    _original_sdpa = F.scaled_dot_product_attention

    @functools.wraps(_original_sdpa)
    def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
        q = args[0] if args else kwargs.get("query")
        if isinstance(q, RemoteTensor):
            return sdpa(*args, **kwargs)
        return _original_sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = scaled_dot_product_attention
