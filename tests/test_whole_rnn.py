"""Recurrent layers and cells run whole on the server (Note [Whole RNNs] in gpupool/wholeops.py):
one op forward, one backward, with the server's own kernels, so the results equal a CPU run."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gpupool
from gpupool.errors import ShareExceeded
from tests import test_bad_input as bad
from tests.test_bad_input import assert_healthy

# The hostile tests share test_bad_input's server (a 512 MiB share) and its bystander session.
srv = bad.srv
healthy = bad.healthy
victim = bad.victim


class Ops(TorchDispatchMode):
    """The names of the ops that reach the device's dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


LAYERS = [
    (nn.LSTM, {}),
    (nn.LSTM, {"bidirectional": True}),
    (nn.LSTM, {"proj_size": 6}),
    (nn.GRU, {}),
    (nn.RNN, {"nonlinearity": "relu", "bias": False}),
]


@pytest.mark.parametrize("cls, kw", LAYERS, ids=["lstm", "lstm-bidirectional", "lstm-proj", "gru", "rnn-relu-nobias"])
def test_layers_run_whole_and_equal_the_cpu(session, cls, kw) -> None:
    torch.manual_seed(0)
    cpu = cls(8, 16, num_layers=2, batch_first=True, **kw)
    dev = copy.deepcopy(cpu).to(session.device)
    x = torch.randn(3, 5, 8)
    out_c, h_c = cpu(x)
    with Ops() as ops:
        out_d, h_d = dev(x.to(session.device))
    assert ops.names.count("gpupool.rnn.default") == 1, ops.names
    assert not any("sigmoid" in n or "tanh" in n or "cell" in n for n in ops.names), ops.names
    assert torch.equal(out_d.cpu(), out_c)
    for a, b in zip(h_d if isinstance(h_d, tuple) else (h_d,), h_c if isinstance(h_c, tuple) else (h_c,)):
        assert torch.equal(a.cpu(), b)
    # A loss on the output and on the final state: gradients flow into every input of the layer.
    def loss_of(model: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        out, h = model(inp)
        return out.pow(2).sum() + (h[0] if isinstance(h, tuple) else h).sum()

    xd = x.to(session.device).requires_grad_()
    xc = x.clone().requires_grad_()
    loss_of(cpu, xc).backward()
    with Ops() as ops:
        loss_of(dev, xd).backward()
    assert ops.names.count("gpupool.rnn_backward.default") == 1, ops.names
    assert torch.equal(xd.grad.cpu(), xc.grad)
    for (name, pc), pd in zip(cpu.named_parameters(), dev.parameters()):
        assert torch.equal(pd.grad.cpu(), pc.grad), name


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cells_in_a_loop_run_whole(session, cls, dtype) -> None:
    """time_sequence_prediction's shape: a cell stepped over a sequence, then backward."""
    torch.manual_seed(0)
    cpu = cls(8, 16).to(dtype)
    dev = copy.deepcopy(cpu).to(session.device)
    x = torch.randn(6, 3, 8, dtype=dtype)

    def run(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
        state = None
        outs = []
        for t in range(xs.shape[0]):
            state = model(xs[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs)

    out_c = run(cpu, x)
    with Ops() as ops:
        out_d = run(dev, x.to(session.device))
    assert ops.names.count("gpupool.rnn_cell.default") == 6, ops.names
    assert torch.equal(out_d.cpu(), out_c)
    out_c.pow(2).sum().backward()
    out_d.pow(2).sum().backward()
    for (name, pc), pd in zip(cpu.named_parameters(), dev.parameters()):
        if cls is nn.GRUCell:
            # A GRU cell uses its hidden state twice: the server sums those two gradients
            # before the client adds the next step's, locally all three are summed in one go.
            torch.testing.assert_close(pd.grad.cpu(), pc.grad, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(pd.grad.cpu(), pc.grad), name


def test_an_lstm_language_model_trains_exactly_with_replay(session) -> None:
    """Truncated BPTT (word_language_model's loop): the steps replay, the numbers equal the CPU's."""

    def train(device: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        emb, lstm, head = nn.Embedding(50, 16), nn.LSTM(16, 32, num_layers=2, dropout=0.0), nn.Linear(32, 50)
        model = nn.ModuleList([emb, lstm, head]).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(1)
        hidden = (torch.zeros(2, 4, 32, device=device), torch.zeros(2, 4, 32, device=device))
        losses = []
        for _ in range(10):
            x = torch.randint(0, 50, (7, 4), generator=g)
            y = torch.randint(0, 50, (7, 4), generator=g)
            hidden = tuple(h.detach() for h in hidden)
            opt.zero_grad()
            out, hidden = lstm(emb(x.to(device)), hidden)
            loss = F.cross_entropy(head(out).reshape(-1, 50), y.to(device).reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            losses.append(loss.item())
        return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}

    before = session.replay_stats()["segments_replayed"]
    remote = train(session.device)
    assert session.replay_stats()["segments_replayed"] - before >= 5
    local = train("cpu")
    assert remote[0] == local[0]
    for k in local[1]:
        assert torch.equal(remote[1][k], local[1][k]), k


def test_inference_keeps_no_graph(session) -> None:
    """Under no_grad the layer records nothing on the server: memory returns to where it was."""
    lstm = nn.LSTM(32, 64).to(session.device)
    x = torch.randn(50, 8, 32).to(session.device)
    base = session.memory_stats().memory_used
    with torch.no_grad():
        outs = [lstm(x)[0] for _ in range(3)]
    held = session.memory_stats().memory_used - base
    assert held == 3 * 50 * 8 * 64 * 4  # the kept outputs, nothing more (their states died)
    del outs
    assert session.memory_stats().memory_used == base


# ---- a hostile client: the ops check their arguments, and what the graph keeps is counted ----------


def test_malformed_rnn_ops_fail_cleanly(srv, healthy, victim) -> None:
    conn = victim.conn
    d = victim.device
    x, h = torch.randn(5, 3, 8).to(d), torch.zeros(1, 3, 16).to(d)
    w_ih, w_hh, b = torch.randn(64, 8).to(d), torch.randn(64, 16).to(d), torch.randn(64).to(d)
    bad_cases = [
        # A weight of the wrong shape: a kernel that trusted it would read past its storage.
        ([0, x, [h, h], [w_ih, torch.randn(64, 3).to(d), b, b], True, 1, 0.0, True, False, False,
          [False] * 7], "an rnn weight of shape (64, 3), expected (64, 16)"),
        ([7, x, [h], [w_ih, w_hh, b, b], True, 1, 0.0, True, False, False, [False] * 6], "rnn kind 7"),
        ([0, x, [h, h], [w_ih, w_hh, b, b], True, 1, 0.0, True, False, False, [False] * 2], "need_grad has 2 flags"),
        ([0, x, [h, h], [w_ih, w_hh, b, b], True, 1, 5.0, True, False, False, [False] * 7], "dropout must be in"),
        ([0, x, [h, h], [w_ih, w_hh, b, b], True, 100, 0.0, True, False, False, [False] * 7], "num_layers must be"),
        # Types the schema would refuse (the server calls the implementation directly).
        (["lstm", x, [h, h], [w_ih, w_hh, b, b], True, 1, 0.0, True, False, False, [False] * 7], "wrong types"),
        ([0, x, [h, h], [w_ih, w_hh, b, b], True, 1, 0.0, True, False, False, [0] * 7], "wrong types"),
        ([0, x, h, [w_ih, w_hh, b, b], True, 1, 0.0, True, False, False, [False] * 7], "wrong types"),
    ]
    for args, expect in bad_cases:
        conn.op("gpupool::rnn", args, {}, [conn.new_handle(), conn.new_handle(), conn.new_handle(), conn.new_handle()])
        with pytest.raises(gpupool.RemoteOpError, match=_escape(expect)):
            victim.synchronize()
    # A backward on a tensor that is no rnn context (here the input itself).
    conn.op("gpupool::rnn_backward", [x, [x], [x]], {}, [conn.new_handle()])
    with pytest.raises(gpupool.RemoteOpError, match="takes the context of a gpupool::rnn"):
        victim.synchronize()
    bad._still_works(victim)
    assert_healthy(srv, healthy)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_what_an_rnn_keeps_for_backward_counts_against_the_share(srv, healthy, victim) -> None:
    """Graphs kept alive past the share: refused (the ledger counts the saved tensors), not
    allowed to grow the server's memory unseen; freeing them gives the share back."""
    d = victim.device
    base = victim.memory_stats().memory_used
    lstm = nn.LSTM(64, 256).to(d)
    x = torch.randn(100, 64, 64).to(d)
    kept = []
    # Each forward keeps ~105 MiB for its backward (its outputs die: `sum` needs only their
    # shape). The share is 512 MiB: without the saved tensors counted, 8 would fit in the
    # worker's memory backstop (the share plus 768 MiB) and nothing would be refused.
    with pytest.raises(ShareExceeded, match="out of memory: this lease's share is 512.0 MiB"):
        for _ in range(8):
            kept.append(lstm(x)[0].sum())
            victim.synchronize()
    assert 2 <= len(kept) <= 5  # the first ones fit
    del kept
    victim.synchronize()
    assert victim.memory_stats().memory_used <= base + sum(p.numel() * 4 for p in lstm.parameters()) + x.numel() * 4
    bad._still_works(victim)
    assert_healthy(srv, healthy)


def test_packed_sequences_still_run_their_cells(session) -> None:
    """`lstm.data` (a PackedSequence) is not sent whole: its cells run as ops (client/rnn.py)."""
    torch.manual_seed(0)
    cpu = nn.LSTM(4, 8)
    dev = copy.deepcopy(cpu).to(session.device)
    x = torch.randn(5, 3, 4)
    lengths = [5, 3, 2]
    out_c, _ = cpu(nn.utils.rnn.pack_padded_sequence(x, lengths))
    # Packed on the host, then moved (`_pack_padded_sequence` itself is not on the allowlist).
    out_d, _ = dev(nn.utils.rnn.pack_padded_sequence(x, lengths).to(session.device))
    torch.testing.assert_close(out_d.data.cpu(), out_c.data, rtol=1e-5, atol=1e-6)
    out_c.data.sum().backward()
    out_d.data.sum().backward()
    for (name, pc), pd in zip(cpu.named_parameters(), dev.parameters()):
        torch.testing.assert_close(pd.grad.cpu(), pc.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_whole_rnn_off_decomposes_and_still_trains(server) -> None:
    """GPUPOOL_WHOLE_RNN=0: the layer runs cell by cell (many ops), with the CPU's results."""
    from tests.conftest import run_python

    code = """
import copy, sys, torch, gpupool
from torch import nn
s = gpupool.connect(sys.argv[1], token=sys.argv[2])
torch.manual_seed(0)
cpu = nn.GRU(4, 8, num_layers=2)
dev = copy.deepcopy(cpu).to(s.device)
from torch.utils._python_dispatch import TorchDispatchMode
names = []
class Ops(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        names.append(str(func))
        return func(*args, **(kwargs or {}))
x = torch.randn(6, 2, 4)
cpu(x)[0].pow(2).sum().backward()
xd = x.to(s.device)
with Ops():
    dev(xd)[0].pow(2).sum().backward()
worst = max((pd.grad.cpu() - pc.grad).abs().max().item() for pc, pd in zip(cpu.parameters(), dev.parameters()))
print(sum("gpupool" in n for n in names), len(names), worst)
"""
    done = run_python(code, args=[server.address, server.token], env={"GPUPOOL_WHOLE_RNN": "0"})
    assert done.returncode == 0, done.stderr
    whole, ops, worst = done.stdout.split()[-3:]
    assert int(whole) == 0 and int(ops) > 100, done.stdout  # cell by cell
    assert float(worst) < 1e-5
