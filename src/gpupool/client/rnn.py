"""Recurrent cells on the gpupool device.

For a PrivateUse1 tensor PyTorch's RNN code takes the path it takes on CUDA: the fused cells
`_thnn_fused_lstm_cell` / `_thnn_fused_gru_cell`, whose kernels (and backward kernels) exist only
for CUDA. A CPU-backed server has neither, so `nn.LSTM`/`nn.GRU` would fail there. We give those
ops an AutogradPrivateUse1 kernel that computes the cell from ordinary differentiable ops: autograd
records those, so forward and backward both run on any server.

Whole layers: `nn.LSTM`/`nn.GRU`/`nn.RNN` (`aten::lstm.input`, `gru.input`, `rnn_tanh.input`,
`rnn_relu.input`) do not reach the cells at all: they go to the server whole, forward and backward
one op each (Note [Whole RNNs] in gpupool/wholeops.py); so do the cells of `nn.LSTMCell` and its
kin (`aten::lstm_cell`, ...). `GPUPOOL_WHOLE_RNN=0` turns that off (the layers then run their
cells, as below). Packed sequences (`lstm.data`) still run their cells.

Note: in the cells below the sums are ordered as in the fused kernels (gates, then biases), so
results match a local CPU run to rounding, not bit for bit (the CPU path adds each bias inside
its own linear).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gpupool import wholeops

_lib: Any = None
#: GPUPOOL_WHOLE_RNN=0: recurrent layers run their cells op by op (see the module's docstring).
WHOLE = os.environ.get("GPUPOOL_WHOLE_RNN", "1") not in ("0", "false", "no", "off")
#: `_WholeRNN.apply`'s and `_WholeCell.apply`'s arguments before the tensors.
_FIXED_RNN, _FIXED_CELL = 8, 2


def _keep(ctx: Any, fixed: int, tensors: tuple, rctx: torch.Tensor) -> None:
    """What the backward needs: the server's context, and the inputs that want gradients."""
    ctx.set_materialize_grads(False)  # an unused output's gradient goes as None, not zeros
    ctx.fixed = fixed
    ctx.need = need = [bool(n) for n in ctx.needs_input_grad[fixed:]]
    ctx.rctx = rctx if any(need) else None
    if ctx.rctx is not None:
        ctx.save_for_backward(*[t for t, n in zip(tensors, need) if n])


def _backward(ctx: Any, grads: tuple) -> tuple:
    head = (None,) * ctx.fixed
    if ctx.rctx is None:
        return head + (None,) * len(ctx.need)
    found = iter(torch.ops.gpupool.rnn_backward(ctx.rctx, list(grads), list(ctx.saved_tensors)))
    return head + tuple(next(found) if n else None for n in ctx.need)


class _WholeRNN(torch.autograd.Function):
    """A recurrent layer as two server ops (Note [Whole RNNs])."""

    @staticmethod
    def forward(ctx: Any, kind: int, nhx: int, has_biases: bool, num_layers: int, dropout: float, train: bool,
                bidirectional: bool, batch_first: bool, input: torch.Tensor, *rest: torch.Tensor) -> Any:
        need = [bool(n) for n in ctx.needs_input_grad[_FIXED_RNN:]]
        out, hs, rctx = torch.ops.gpupool.rnn(kind, input, list(rest[:nhx]), list(rest[nhx:]), has_biases,
                                              num_layers, dropout, train, bidirectional, batch_first, need)
        _keep(ctx, _FIXED_RNN, (input, *rest), rctx)
        return (out, *hs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        return _backward(ctx, grads)


class _WholeCell(torch.autograd.Function):
    """A recurrent cell as one server op forward, one backward (Note [Whole RNNs])."""

    @staticmethod
    def forward(ctx: Any, kind: int, nhx: int, input: torch.Tensor, *rest: torch.Tensor | None) -> Any:
        need = [bool(n) for n in ctx.needs_input_grad[_FIXED_CELL:]]
        hx, (w_ih, w_hh, b_ih, b_hh) = list(rest[:nhx]), rest[nhx:]
        hs, rctx = torch.ops.gpupool.rnn_cell(kind, input, hx, w_ih, w_hh, b_ih, b_hh, need)
        _keep(ctx, _FIXED_CELL, (input, *rest), rctx)
        return tuple(hs) if len(hs) > 1 else hs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        return _backward(ctx, grads)


def _lstm_cell_whole(input: torch.Tensor, hx: list[torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
                     b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> Any:
    return _WholeCell.apply(wholeops.LSTM, len(hx), input, *hx, w_ih, w_hh, b_ih, b_hh)


def _single_state_cell(kind: int) -> Any:
    def run(input: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
            b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> Any:
        return _WholeCell.apply(kind, 1, input, hx, w_ih, w_hh, b_ih, b_hh)

    return run


def _lstm(input: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor], has_biases: bool,
          num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> Any:
    return _WholeRNN.apply(wholeops.LSTM, len(hx), has_biases, num_layers, dropout, train, bidirectional,
                           batch_first, input, *hx, *params)


def _single_state(kind: int) -> Any:
    def run(input: torch.Tensor, hx: torch.Tensor, params: list[torch.Tensor], has_biases: bool,
            num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> Any:
        return _WholeRNN.apply(kind, 1, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                               input, hx, *params)

    return run


def _lstm_cell(igates: torch.Tensor, hgates: torch.Tensor, cx: torch.Tensor,
               input_bias: torch.Tensor | None = None, hidden_bias: torch.Tensor | None = None) -> tuple:
    gates = igates + hgates
    if input_bias is not None:
        gates = gates + input_bias
    if hidden_bias is not None:
        gates = gates + hidden_bias
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    # The third result is the fused kernel's workspace for its own backward; nothing reads it here.
    return hy, cy, gates.detach()


def _gru_cell(igates: torch.Tensor, hgates: torch.Tensor, hx: torch.Tensor,
              input_bias: torch.Tensor | None = None, hidden_bias: torch.Tensor | None = None) -> tuple:
    if input_bias is not None:
        igates = igates + input_bias
    if hidden_bias is not None:
        hgates = hgates + hidden_bias
    ir, iz, inn = igates.chunk(3, 1)
    hr, hz, hn = hgates.chunk(3, 1)
    r = (ir + hr).sigmoid()
    z = (iz + hz).sigmoid()
    n = (inn + r * hn).tanh()
    hy = n + z * (hx - n)
    return hy, torch.cat((r, z, n, hn), 1).detach()


def install() -> None:
    """Register the cells for the gpupool device's autograd key (idempotent)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_thnn_fused_lstm_cell", _lstm_cell, "AutogradPrivateUse1")
    lib.impl("_thnn_fused_gru_cell", _gru_cell, "AutogradPrivateUse1")
    if WHOLE:
        lib.impl("lstm.input", _lstm, "AutogradPrivateUse1")
        lib.impl("lstm_cell", _lstm_cell_whole, "AutogradPrivateUse1")
        for kind in range(1, len(wholeops.KINDS)):
            lib.impl(f"{wholeops.KINDS[kind]}.input", _single_state(kind), "AutogradPrivateUse1")
            lib.impl(f"{wholeops.KINDS[kind]}_cell", _single_state_cell(kind), "AutogradPrivateUse1")
    _lib = lib
