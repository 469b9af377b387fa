"""gpupool's own ops, defined alike in the client and the server: whole recurrent layers.

Note [Whole RNNs]: PyTorch decomposes `nn.LSTM`/`nn.GRU`/`nn.RNN` on a device without cuDNN into
its cells, step by step: a 2-layer LSTM over 35 steps is ~4,500 ops a training step, where a CPU
or CUDA server has one fused kernel forward (mkldnn, cuDNN) and one backward. So the client
sends the layer whole (client/rnn.py): `gpupool::rnn` runs `torch.lstm`/`gru`/`rnn_tanh`/
`rnn_relu` on the server, with autograd on for the inputs that need gradients, and returns the
outputs and a context tensor; `gpupool::rnn_backward` takes the context and the outputs'
gradients and returns the inputs' gradients. The server's autograd graph lives as long as the
context tensor's handle. A cell (`nn.LSTMCell`, ...; `aten::lstm_cell` and its kin) goes the
same way as `gpupool::rnn_cell`, with the same backward. The results are exactly what the same
layer gives on the server's own device in eager mode (the same kernels run), so on a CPU-backed
server they equal a local CPU run bit for bit.

Safety: the arguments are checked here before any kernel sees them (`check_rnn`, `check_cell`:
the shape of every weight against the layer's sizes, one dtype and device, bounds on the sizes),
the context is only ever an empty tensor whose graph hangs on its Python object (`_GRAPH`), so
no other tensor can stand for one, and what the graph saves is
counted against the share (`saved_tensors`, Note [One budget per lease] in server/memory.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class RnnArgumentError(ValueError):
    """Arguments that are not those of a well-formed layer or cell: an op error, no bug."""


#: `kind` of `gpupool::rnn`: the aten op it runs.
KINDS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
LSTM = 0
MAX_LAYERS = 64

_lib = torch.library.Library("gpupool", "DEF")
_lib.define(
    "rnn(int kind, Tensor input, Tensor[] hx, Tensor[] params, bool has_biases, int num_layers, "
    "float dropout, bool train, bool bidirectional, bool batch_first, bool[] need_grad) "
    "-> (Tensor, Tensor[], Tensor)"
)
_lib.define(
    "rnn_cell(int kind, Tensor input, Tensor[] hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "bool[] need_grad) -> (Tensor[], Tensor)"
)
_lib.define("rnn_backward(Tensor ctx, Tensor?[] grads, Tensor[] inputs) -> Tensor[]")


def check_rnn(kind: int, input: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor],
              has_biases: bool, num_layers: int, bidirectional: bool, batch_first: bool) -> None:
    """Raise ValueError unless the arguments are those of a well-formed layer of `KINDS[kind]`."""
    if not 0 <= kind < len(KINDS):
        raise RnnArgumentError(f"rnn kind {kind} is not one of 0..{len(KINDS) - 1}")
    if not 1 <= num_layers <= MAX_LAYERS:
        raise RnnArgumentError(f"num_layers must be 1 to {MAX_LAYERS}, not {num_layers}")
    if input.dim() != 3:
        raise RnnArgumentError(f"an rnn input has 3 dimensions, not {input.dim()}")
    dtype, device = input.dtype, input.device
    if not dtype.is_floating_point:
        raise RnnArgumentError(f"an rnn runs on floating-point tensors, not {dtype}")
    for t in (*hx, *params):
        if t.dtype != dtype or t.device != device:
            raise RnnArgumentError("every tensor of an rnn must have the input's dtype and device")
    batch = input.shape[0] if batch_first else input.shape[1]
    dirs = 2 if bidirectional else 1
    lstm = kind == LSTM
    if len(hx) != (2 if lstm else 1):
        raise RnnArgumentError(f"{KINDS[kind]} takes {2 if lstm else 1} hidden-state tensors, not {len(hx)}")
    hidden = hx[-1].shape[-1] if hx[-1].dim() == 3 else -1  # the cell state's size for an LSTM
    out_size = hx[0].shape[-1] if hx[0].dim() == 3 else -1  # the projection's size (or hidden)
    for h, size in zip(hx, (out_size, hidden)):
        if tuple(h.shape) != (num_layers * dirs, batch, size):
            raise RnnArgumentError(f"hidden state of shape {tuple(h.shape)}, expected {(num_layers * dirs, batch, size)}")
    if hidden < 1 or out_size < 1:
        raise RnnArgumentError("an rnn's hidden state needs 3 dimensions and a size of at least 1")
    proj = lstm and out_size != hidden
    per = 2 + 2 * bool(has_biases) + int(proj)
    if len(params) != num_layers * dirs * per:
        raise RnnArgumentError(f"{len(params)} weights for {num_layers} layers, expected {num_layers * dirs * per}")
    gates = {0: 4, 1: 3}.get(kind, 1) * hidden
    shapes_of: list[tuple[int, ...]] = []
    for layer in range(num_layers):
        width = input.shape[2] if layer == 0 else out_size * dirs
        want: list[tuple[int, ...]] = [(gates, width), (gates, out_size)]
        if has_biases:
            want += [(gates,), (gates,)]
        if proj:
            want.append((out_size, hidden))
        shapes_of += want * dirs
    for p, shape in zip(params, shapes_of):
        if tuple(p.shape) != shape:
            raise RnnArgumentError(f"an rnn weight of shape {tuple(p.shape)}, expected {shape}")


def check_cell(kind: int, input: torch.Tensor, hx: list[torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
               b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> None:
    """Raise ValueError unless the arguments are those of a well-formed cell of `KINDS[kind]`."""
    if not 0 <= kind < len(KINDS):
        raise RnnArgumentError(f"rnn kind {kind} is not one of 0..{len(KINDS) - 1}")
    lstm = kind == LSTM
    if len(hx) != (2 if lstm else 1):
        raise RnnArgumentError(f"{KINDS[kind]}_cell takes {2 if lstm else 1} hidden-state tensors, not {len(hx)}")
    if input.dim() != 2 or any(h.dim() != 2 for h in hx):
        raise RnnArgumentError("a cell's input and hidden state have 2 dimensions (batch, features)")
    dtype, device = input.dtype, input.device
    if not dtype.is_floating_point:
        raise RnnArgumentError(f"an rnn cell runs on floating-point tensors, not {dtype}")
    batch, hidden = input.shape[0], hx[0].shape[1]
    gates = {0: 4, 1: 3}.get(kind, 1) * hidden
    want: list[tuple[torch.Tensor | None, tuple[int, ...]]] = [
        (w_ih, (gates, input.shape[1])), (w_hh, (gates, hidden)), (b_ih, (gates,)), (b_hh, (gates,)),
        *((h, (batch, hidden)) for h in hx),
    ]
    for t, shape in want:
        if t is None:
            continue
        if t.dtype != dtype or t.device != device:
            raise RnnArgumentError("every tensor of an rnn cell must have the input's dtype and device")
        if tuple(t.shape) != shape:
            raise RnnArgumentError(f"an rnn cell tensor of shape {tuple(t.shape)}, expected {shape}")
    if (b_ih is None) != (b_hh is None):
        raise RnnArgumentError("an rnn cell has both biases or neither")


def _call_cell(kind: int, input: torch.Tensor, hx: list[torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
               b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> tuple:
    if kind == LSTM:
        return tuple(torch.ops.aten.lstm_cell.default(input, hx, w_ih, w_hh, b_ih, b_hh))
    op = getattr(torch.ops.aten, KINDS[kind] + "_cell").default
    return (op(input, hx[0], w_ih, w_hh, b_ih, b_hh),)


def _call(kind: int, input: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor], has_biases: bool,
          num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> tuple:
    args = (params, has_biases, num_layers, float(dropout), train, bidirectional, batch_first)
    if kind == LSTM:
        return tuple(torch.ops.aten.lstm.input(input, hx, *args))
    op = getattr(torch.ops.aten, KINDS[kind]).input
    return tuple(op(input, hx[0], *args))


class _Graph:
    __slots__ = ("outputs", "inputs", "saved")

    def __init__(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
        self.outputs = outputs
        self.inputs = inputs
        self.saved = saved


#: The attribute of a context tensor's Python object that holds its graph (the server's side of
#: Note [Whole RNNs]): the graph lives exactly as long as the tensor object, which only the
#: session's handle table holds; a client cannot set attributes, and any other tensor has none.
_GRAPH = "_gpupool_rnn_graph"


def _graph_of(ctx: torch.Tensor) -> _Graph | None:
    g = getattr(ctx, _GRAPH, None)
    return g if type(g) is _Graph else None


def saved_tensors(ctx: torch.Tensor) -> list[torch.Tensor]:
    """What the graph behind a context tensor keeps alive ([] for any other tensor)."""
    g = _graph_of(ctx)
    return [] if g is None else g.saved


def _with_graph(tensors: list[torch.Tensor | None], need_grad: list[bool], run: Any) -> tuple[tuple, torch.Tensor]:
    """`run(leaves)` with autograd on for the tensors that need gradients; its results, and the
    context tensor that keeps its graph (`_GRAPH`)."""
    if len(need_grad) != len(tensors):
        raise RnnArgumentError(f"need_grad has {len(need_grad)} flags for {len(tensors)} tensors")
    leaves = [None if t is None else t.detach().requires_grad_(n and t.dtype.is_floating_point)
              for t, n in zip(tensors, need_grad)]
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Note: a saved result of the graph is kept detached, so that it holds no reference back
        # to its own graph (a cycle that Python's collector cannot see through autograd's C++
        # nodes); leaves have no graph to hold.
        d = t if t.grad_fn is None else t.detach()
        saved.append(d)
        return d

    inputs = [x for x, n in zip(leaves, need_grad) if n and x is not None and x.requires_grad]
    grad = bool(inputs)
    first = next(t for t in tensors if t is not None)
    # Only a CPU-backed server needs the list: on CUDA the caching allocator counts the graph.
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack) if grad and first.device.type != "cuda" else None
    with torch.set_grad_enabled(grad), hooks or contextlib.nullcontext():
        res = run(leaves)
    ctx = torch.empty(0, dtype=torch.uint8, device=first.device)
    if grad:
        setattr(ctx, _GRAPH, _Graph(list(res), inputs, saved))
    # Contiguous, as the client planned them (the meta kernels): fused kernels' own layouts differ.
    return tuple(r.detach().contiguous() for r in res), ctx


def _rnn(kind: int, input: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor], has_biases: bool,
         num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool,
         need_grad: list[bool]) -> tuple:
    check_rnn(kind, input, hx, params, has_biases, num_layers, bidirectional, batch_first)
    if not 0.0 <= dropout <= 1.0:
        raise RnnArgumentError(f"dropout must be in [0, 1], not {dropout}")
    n = len(hx)

    def run(v: list[Any]) -> tuple:
        return _call(kind, v[0], v[1:1 + n], v[1 + n:], has_biases, num_layers, dropout, train, bidirectional,
                     batch_first)

    res, ctx = _with_graph([input, *hx, *params], need_grad, run)
    return res[0], list(res[1:]), ctx


def _rnn_cell(kind: int, input: torch.Tensor, hx: list[torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, need_grad: list[bool]) -> tuple:
    check_cell(kind, input, hx, w_ih, w_hh, b_ih, b_hh)
    n = len(hx)

    def run(v: list[Any]) -> tuple:
        return _call_cell(kind, v[0], v[1:1 + n], *v[1 + n:])

    res, ctx = _with_graph([input, *hx, w_ih, w_hh, b_ih, b_hh], need_grad, run)
    return list(res), ctx


def _rnn_cell_meta(kind: int, input: torch.Tensor, hx: list[torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
                   b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, need_grad: list[bool]) -> tuple:
    check_cell(kind, input, hx, w_ih, w_hh, b_ih, b_hh)
    with torch.no_grad():
        res = _call_cell(kind, input, hx, w_ih, w_hh, b_ih, b_hh)
    return [r.contiguous() for r in res], torch.empty(0, dtype=torch.uint8, device=input.device)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _rnn_backward(ctx: torch.Tensor, grads: list[torch.Tensor | None], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = _graph_of(ctx)
    if g is None:
        raise RnnArgumentError("gpupool::rnn_backward takes the context of a gpupool::rnn that recorded gradients")
    if len(grads) != len(g.outputs) or len(inputs) != len(g.inputs):
        raise RnnArgumentError(f"gpupool::rnn_backward takes {len(g.outputs)} gradients and {len(g.inputs)} inputs")
    pairs = [(o, d) for o, d in zip(g.outputs, grads) if d is not None]
    found: tuple = (None,) * len(g.inputs)
    if pairs:
        # retain_graph: the client's autograd may run backward through the layer again
        # (retain_graph=True there); the graph goes when the context's handle is freed.
        found = torch.autograd.grad([o for o, _ in pairs], g.inputs, [d for _, d in pairs],
                                    retain_graph=True, allow_unused=True)
    # Contiguous, as the client planned them (`_rnn_backward_meta`).
    return [torch.zeros(x.shape, dtype=x.dtype, device=x.device) if r is None else r.contiguous()
            for r, x in zip(found, g.inputs)]


def _rnn_meta(kind: int, input: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor], has_biases: bool,
              num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool,
              need_grad: list[bool]) -> tuple:
    check_rnn(kind, input, hx, params, has_biases, num_layers, bidirectional, batch_first)
    with torch.no_grad():
        res = _call(kind, input, hx, params, has_biases, num_layers, dropout, False, bidirectional, batch_first)
    return res[0].contiguous(), [h.contiguous() for h in res[1:]], torch.empty(0, dtype=torch.uint8, device=input.device)


def _rnn_backward_meta(ctx: torch.Tensor, grads: list[torch.Tensor | None], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in inputs]


class _ListOf:
    """A `Tensor[]`, `Tensor?[]` or `bool[]` argument: a list of these types."""

    __slots__ = ("types",)

    def __init__(self, *types: type) -> None:
        self.types = types


def _typed(fn: Any, *kinds: Any) -> Any:
    """`fn` behind the type checks the dispatcher would make of its schema's arguments: the
    executor calls it directly (`OpSpec.call`), with arguments decoded from the network."""
    def ok(v: Any, kind: Any) -> bool:
        if type(kind) is _ListOf:
            return type(v) is list and all(isinstance(x, kind.types) for x in v)
        if kind is int or kind is bool:
            return type(v) is kind
        if kind is float:
            return type(v) is float or type(v) is int
        return isinstance(v, kind)

    def run(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise RnnArgumentError(f"{fn.__name__.lstrip('_')} takes its arguments by position")
        if len(args) != len(kinds) or not all(ok(v, k) for v, k in zip(args, kinds)):
            raise RnnArgumentError(f"arguments of the wrong types for {fn.__name__.lstrip('_')}")
        return fn(*args)

    return run


_T, _OPT = torch.Tensor, (torch.Tensor, type(None))
_TENSORS, _OPT_TENSORS, _BOOLS = _ListOf(torch.Tensor), _ListOf(*_OPT), _ListOf(bool)

#: The server's implementations by op name, called by the executor directly (`OpSpec.call`).
DIRECT = {
    "gpupool::rnn": _typed(_rnn, int, _T, _TENSORS, _TENSORS, bool, int, float, bool, bool, bool, _BOOLS),
    "gpupool::rnn_cell": _typed(_rnn_cell, int, _T, _TENSORS, _T, _T, _OPT, _OPT, _BOOLS),
    "gpupool::rnn_backward": _typed(_rnn_backward, _T, _OPT_TENSORS, _TENSORS),
}

for _key in ("CPU", "CUDA"):
    _lib.impl("rnn", _rnn, _key)
    _lib.impl("rnn_cell", _rnn_cell, _key)
    _lib.impl("rnn_backward", _rnn_backward, _key)
_lib.impl("rnn", _rnn_meta, "Meta")
_lib.impl("rnn_cell", _rnn_cell_meta, "Meta")
_lib.impl("rnn_backward", _rnn_backward_meta, "Meta")
