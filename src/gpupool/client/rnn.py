"""Recurrent cells on the gpupool device.

For a PrivateUse1 tensor PyTorch's RNN code takes the path it takes on CUDA: the fused cells
`_thnn_fused_lstm_cell` / `_thnn_fused_gru_cell`, whose kernels (and backward kernels) exist only
for CUDA. A CPU-backed server has neither, so `nn.LSTM`/`nn.GRU` would fail there. We give those
ops an AutogradPrivateUse1 kernel that computes the cell from ordinary differentiable ops: autograd
records those, so forward and backward both run on any server.

Note: the sums are ordered as in the fused kernels (gates, then biases), so results match a local
CPU run to rounding, not bit for bit (the CPU path adds each bias inside its own linear).
"""

from __future__ import annotations

from typing import Any

import torch

_lib: Any = None


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
    _lib = lib
