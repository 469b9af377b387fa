"""Record the aten calls real PyTorch code makes: each distinct overload with a few concrete
argument lists, for `tools/kernel_sweep.py` to mutate.

Sources of calls (each a named, seeded, self-contained function, so any one can be re-run on its
own and gives the same calls again):

* `opinfo:<name>:<dtype>`: the first samples of an OpInfo of PyTorch's `op_db`, forward and, for
  float32 samples of ops that support autograd, backward (the sum of the outputs).
* `model:<name>`: a few training-style models (a CNN, embeddings, RNNs, losses, CTC, a small
  transformer, pooling, resampling, indexing, counting ops), forward and backward. They reach
  backward kernels that no OpInfo calls directly (`max_pool2d_with_indices_backward`,
  `_embedding_bag_dense_backward`, `_ctc_loss_backward`, ...).
* `extra:<name>`: inference-mode, optimizer and `out=` calls that nothing above reaches.

A `Recorder` (a `TorchDispatchMode`) sees every aten call below autograd and keeps, per overload,
up to `per_source` calls with distinct argument signatures, as copies: tensors keep their strides,
storage offset and the bytes of their whole storage, and arguments that shared a storage still
share one (an in-place op on a view sees the same aliasing again).

Examples of an op are merged from its sources in canonical order (models first, then op_db order),
distinct by signature, so recording only the sources the kernel sweep's data file names for an op
gives that op the very same examples as a full recording.

    .venv/bin/python tools/oprecord.py --list             # the source names
    .venv/bin/python tools/oprecord.py model:cnn -v       # what one source calls
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gpupool.torchcodec import op_name  # noqa: E402

#: Distinct examples kept per overload and source.
PER_SOURCE = 3
#: OpInfo samples per op and dtype.
SAMPLES = {torch.float32: 3, torch.int64: 2}
#: A tensor whose storage is bigger than this is not recorded (an example must stay cheap).
MAX_STORAGE_BYTES = 16 << 20


@dataclass
class Example:
    """One recorded call: `func(*args, **kwargs)` ran on these (copied) values."""

    source: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    signature: str


def canonical(name: str) -> str:
    """`aten::x.default` and `aten::x` are one overload: the name `op_name` gives it."""
    return name[: -len(".default")] if name.endswith(".default") else name


# ---- recording ---------------------------------------------------------------------------------


def _plain(t: torch.Tensor) -> bool:
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and not t.is_mkldnn
    )


def _signature(args: Any, kwargs: Any) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"T{str(x.dtype)[6:]}{list(x.shape)}{list(x.stride())}"
        if isinstance(x, float):
            return "f"  # float values rarely change the code path; do not multiply examples
        return repr(x)

    leaves = pytree.tree_leaves((args, kwargs))
    return ",".join(one(x) for x in leaves)


def copy_call(args: Any, kwargs: Any) -> tuple[Any, Any] | None:
    """A copy of a call's arguments that keeps each tensor's layout and its storage's bytes,
    and aliasing between arguments; None if some tensor cannot be copied that way."""
    storages: dict[int, torch.UntypedStorage] = {}
    ok = True

    def copy(x: Any) -> Any:
        nonlocal ok
        if not isinstance(x, torch.Tensor):
            return x
        if not _plain(x):
            ok = False
            return x
        st = x.untyped_storage()
        if st.nbytes() > MAX_STORAGE_BYTES:
            ok = False
            return x
        key = st.data_ptr() if st.nbytes() else -id(st)
        new = storages.get(key)
        if new is None:
            new = torch.empty(st.nbytes(), dtype=torch.uint8).untyped_storage()
            if st.nbytes():
                new.copy_(st)
            storages[key] = new
        out = torch.empty(0, dtype=x.dtype)
        out.set_(new, x.storage_offset(), x.size(), x.stride())
        return out

    with torch.no_grad():
        copied = pytree.tree_map(copy, (tuple(args), dict(kwargs or {})))
    return copied if ok else None


class Recorder(TorchDispatchMode):
    """Records each aten overload called under it with up to `per_source` distinct calls."""

    def __init__(self, per_source: int = PER_SOURCE) -> None:
        super().__init__()
        self.per_source = per_source
        self.source = ""
        self.examples: dict[str, list[Example]] = {}
        self._seen: dict[str, set[str]] = {}
        self.funcs: dict[str, torch._ops.OpOverload] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "aten":
            name = op_name(func)
            self.funcs.setdefault(name, func)
            key = f"{name}@{self.source}"
            kept = self.examples.setdefault(key, [])
            if len(kept) < self.per_source:
                sig = _signature(args, kwargs)
                seen = self._seen.setdefault(key, set())
                if sig not in seen:
                    seen.add(sig)
                    copied = copy_call(args, kwargs)
                    if copied is not None:
                        kept.append(Example(self.source, copied[0], copied[1], sig))
        return func(*args, **kwargs)




# ---- sources -----------------------------------------------------------------------------------


def _models() -> dict[str, Callable[[], None]]:
    """Training-style code that reaches backward kernels no OpInfo calls directly."""

    def backward(*outs: Any) -> None:
        sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad).backward()

    def cnn() -> None:
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        y = F.max_pool2d(F.relu(nn.Conv2d(3, 4, 3, padding=1)(x)), 2)
        z = F.adaptive_max_pool2d(y, 2)
        w = F.fractional_max_pool2d(y, 2, output_size=2)
        backward(z, w, F.max_pool3d(x.unsqueeze(0), (1, 2, 2)), F.adaptive_max_pool3d(x.unsqueeze(0), 2))
        v, idx = F.max_pool2d(x, 2, return_indices=True)
        backward(F.max_unpool2d(v, idx, 2))
        v3, idx3 = F.max_pool3d(x.unsqueeze(0), 2, return_indices=True)
        backward(F.max_unpool3d(v3, idx3, 2))

    def embeddings() -> None:
        for mode in ("sum", "mean", "max"):
            bag = nn.EmbeddingBag(10, 3, mode=mode)
            backward(bag(torch.tensor([1, 2, 4, 5, 4, 3]), torch.tensor([0, 3])))
        emb = nn.Embedding(10, 3, padding_idx=0, scale_grad_by_freq=True)
        backward(emb(torch.tensor([[0, 2, 2, 5]])))

    def losses() -> None:
        logits = torch.randn(4, 5, requires_grad=True)
        target = torch.tensor([0, 4, 2, -100])
        backward(F.cross_entropy(logits, target), F.nll_loss(F.log_softmax(logits, 1), target.clamp(0)))
        img = torch.randn(2, 3, 4, 4, requires_grad=True)
        backward(F.nll_loss(F.log_softmax(img, 1), torch.randint(0, 3, (2, 4, 4))))
        backward(F.multi_margin_loss(logits, target.clamp(0)), F.multilabel_margin_loss(logits, torch.tensor([[1, 2, -1, 0, 0]] * 4)))
        lp = torch.randn(6, 2, 4).log_softmax(2).requires_grad_()
        backward(F.ctc_loss(lp, torch.tensor([[1, 2], [3, 1]]), torch.tensor([6, 5]), torch.tensor([2, 2])))

    def recurrent() -> None:
        for cls in (nn.LSTM, nn.GRU, nn.RNN):
            backward(cls(3, 4, batch_first=True)(torch.randn(2, 5, 3, requires_grad=True))[0])

    def resampling() -> None:
        x = torch.randn(1, 2, 4, 4, requires_grad=True)
        grid = torch.rand(1, 3, 3, 2, requires_grad=True) * 2 - 1
        backward(F.grid_sample(x, grid, align_corners=False), F.interpolate(x, scale_factor=2, mode="nearest"),
                 F.interpolate(x, size=(5, 7), mode="bilinear"), F.pixel_shuffle(x.repeat(1, 2, 1, 1), 2))

    def indexing() -> None:
        x = torch.randn(5, 4, requires_grad=True)
        i = torch.tensor([0, 2, 4])
        backward(x[i], x.index_select(0, i), x.gather(1, torch.tensor([[0, 1]] * 5)), x.take(torch.tensor([1, 7])))
        y = torch.zeros(5, 4)
        y.index_add_(0, i, torch.ones(3, 4))
        y.index_put_((i,), torch.ones(3, 4), accumulate=True)
        y.scatter_add_(0, torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4))
        y.scatter_reduce_(1, torch.tensor([[0, 1]] * 5), torch.ones(5, 2), "amax")
        y.index_fill_(0, i, 2.0)
        y.masked_scatter_(y > 1, torch.ones(20))
        torch.bincount(torch.tensor([1, 1, 3]), minlength=5)
        torch.histc(torch.rand(10), bins=4)
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 3]))
        torch.searchsorted(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.5]), sorter=torch.tensor([0, 1, 2]))
        torch.unique(torch.tensor([3, 1, 3]), return_inverse=True, return_counts=True)
        torch.segment_reduce(torch.randn(6, requires_grad=True), "sum", lengths=torch.tensor([2, 4])).sum().backward()
        torch.nonzero(y)
        torch.special.legendre_polynomial_p(torch.rand(3), torch.tensor([1.0, 2.0, 3.0]))
        torch.special.hermite_polynomial_h(torch.rand(3), 3)

    def transformer() -> None:
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        backward(layer(torch.randn(2, 4, 8, requires_grad=True)))

    return {"cnn": cnn, "embeddings": embeddings, "losses": losses, "recurrent": recurrent,
            "resampling": resampling, "indexing": indexing, "transformer": transformer}


def _extras() -> dict[str, Callable[[], None]]:
    """Allowed ops that neither the models above nor any OpInfo sample reaches on the CPU.

    Run after every other source, so that they add examples only to ops no other source calls
    (an op's first examples, the ones the sweep mutates, stay what they were)."""

    def inference() -> None:
        with torch.no_grad():
            nn.EmbeddingBag(10, 3, mode="mean")(torch.tensor([1, 2, 4, 5]), torch.tensor([0, 2]))
        emb = nn.Embedding(10, 3, max_norm=1.0)
        emb(torch.tensor([1, 2, 2, 7])).sum().backward()
        x = torch.randn(1, 2, 4, 4, requires_grad=True)
        x5 = torch.randn(1, 2, 3, 4, 4, requires_grad=True)
        outs = [F.pad(x, (1, 1, 2, 0), mode="reflect"), F.pad(x5, (1, 1, 1, 0, 1, 1), mode="reflect"),
                F.pad(x5, (1, 1, 1, 0, 1, 1), mode="replicate"), F.interpolate(x5, size=(4, 5, 6), mode="nearest"),
                F.interpolate(x, size=(5, 7), mode="nearest-exact"),
                F.interpolate(x5, size=(4, 5, 6), mode="nearest-exact"), F.dropout(x, 0.5, training=True)]
        sum(o.sum() for o in outs).backward()
        torch.empty(6, dtype=torch.int64).random_(2, 9)
        # what a CUDA server's inference and dropout paths receive (the CPU takes others)
        torch.ops.aten._embedding_bag_forward_only(torch.randn(10, 3), torch.tensor([1, 2, 4, 5]), torch.tensor([0, 2]))
        torch.ops.aten.native_dropout(x, 0.5, True)
        seg = torch.randn(6, requires_grad=True)
        torch.segment_reduce(seg, "mean", offsets=torch.tensor([0, 2, 6])).sum().backward()

    def optimizers() -> None:
        params = [torch.randn(4, 3), torch.randn(5)]
        grads = [torch.randn_like(p) for p in params]
        for fused in ("adam", "adamw", "sgd"):
            ps = [p.clone() for p in params]
            cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[fused]
            opt = cls([p.requires_grad_() for p in ps], lr=0.1, fused=True, **({"momentum": 0.9} if fused == "sgd" else {}))
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
            opt = cls(ps, lr=0.1, foreach=True, **({"momentum": 0.9} if fused == "sgd" else {}))
            opt.step()
        scale = torch.full((), 1024.0)
        found, tracker = torch.zeros(()), torch.zeros((), dtype=torch.int32)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, scale.reciprocal())
        torch._amp_update_scale_(scale, tracker, found, 2.0, 0.5, 3)
        torch._foreach_norm(grads, 2.0)
        torch.nn.utils.clip_grad_norm_([p.requires_grad_() for p in params], 1.0, foreach=True)

    def out_variants() -> None:
        x = torch.randn(4, 6)
        torch.zeros(3, 2, out=torch.empty(0))
        torch.ones(3, out=torch.empty(0))
        torch.full((2, 2), 3.0, out=torch.empty(0))
        torch.arange(5, out=torch.empty(0, dtype=torch.int64))
        torch.arange(1, 9, 2, out=torch.empty(0))
        torch.eye(3, out=torch.empty(0))
        torch.eye(3, 4, out=torch.empty(0))
        torch.softmax(x, 1, out=torch.empty(0))
        torch.log_softmax(x, 1, out=torch.empty(0))
        torch.fft.fft(x.to(torch.complex64), dim=1, out=torch.empty(0, dtype=torch.complex64))
        torch.fft.rfft(x, dim=1, out=torch.empty(0, dtype=torch.complex64))
        torch.fft.irfft(torch.fft.rfft(x, dim=1), n=6, dim=1, out=torch.empty(0))
        torch.linalg.eigvals(torch.randn(3, 3), out=torch.empty(0, dtype=torch.complex64))
        F.linear(x, torch.randn(2, 6), torch.randn(2))
        torch._C._nn.linear(x, torch.randn(2, 6), None, out=torch.empty(0))
        x.to(torch.complex64).conj_physical_()
        torch.conj_physical(x.to(torch.complex64), out=torch.empty(0, dtype=torch.complex64))

    return {"inference": inference, "optimizers": optimizers, "out_variants": out_variants}


def _opinfo_sources() -> dict[str, Callable[[], None]]:
    from torch.testing._internal.common_methods_invocations import op_db

    out: dict[str, Callable[[], None]] = {}
    for op in op_db:
        for dtype, n in SAMPLES.items():
            if dtype not in op.supported_dtypes("cpu"):
                continue
            name = f"opinfo:{op.name}.{op.variant_test_name}:{str(dtype)[6:]}".replace(".:", ":")
            out[name] = _opinfo_runner(op, dtype, n)
    return out


def _opinfo_runner(op: Any, dtype: torch.dtype, n: int) -> Callable[[], None]:
    def run() -> None:
        grad = dtype == torch.float32 and op.supports_autograd
        for i, sample in enumerate(op.sample_inputs_func(op, "cpu", dtype, grad)):
            if i >= n:
                break
            with contextlib.suppress(Exception):
                out = op(sample.input, *sample.args, **sample.kwargs)
                outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
                if outs:
                    sum(o.float().sum() for o in outs).backward()

    return run


def sources() -> dict[str, Callable[[], None]]:
    """Every source by name: models first, then op_db order, then the extras."""
    return {**{f"model:{k}": v for k, v in _models().items()}, **_opinfo_sources(),
            **{f"extra:{k}": v for k, v in _extras().items()}}


def record(names: Iterable[str] | None = None, verbose: bool = False) -> Recorder:
    """Run the named sources (default: all) under one recorder."""
    everything = sources()
    rec = Recorder()
    for name in names or everything:
        fn = everything.get(name)
        if fn is None:
            raise KeyError(f"no source {name!r} (see --list)")
        rec.source = name
        torch.manual_seed(zlib.crc32(name.encode()))
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with rec:
                    fn()
            except Exception as e:  # noqa: BLE001 - a source that fails records what it reached
                if verbose:
                    print(f"{name}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        if verbose:
            print(f"{name}: {time.monotonic() - t0:.2f} s", file=sys.stderr)
    return rec


def examples_by_op(rec: Recorder) -> dict[str, list[Example]]:
    """Each overload's examples, merged over sources in the order they ran."""
    out: dict[str, list[Example]] = {}
    for key, exs in rec.examples.items():
        name = key.split("@", 1)[0]
        out.setdefault(name, []).extend(exs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", help="source names (default: all)")
    p.add_argument("--list", action="store_true", help="print the source names")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(sources()))
        return 0
    torch.set_num_threads(1)
    rec = record(a.sources or None, a.verbose)
    for name, exs in sorted(examples_by_op(rec).items()):
        print(f"{name}: {len(exs)} example(s) from {sorted({e.source for e in exs})[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
