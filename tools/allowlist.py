"""Generate the op allowlist (`src/gpupool/protocol/allowlist.txt`) from what real work sends.

Note [Deny by default] (protocol/ops.py): a server runs only the ops on that list. This tool
makes the list for a torch release: it writes a *candidate* list (every aten overload whose
schema the server can check, string arguments limited to the reviewed values in
`STRING_VALUES`, nothing in `DENIED`), runs real work against servers that use it
($GPUPOOL_ALLOWLIST) and record the ops their sessions ran ($GPUPOOL_OPS_SEEN):

  1. the OpInfo conformance sweep (`tools/conformance.py`: function, in-place and out=
     variants in float32, complex64, int64 and bool);
  2. a gradient sweep: each OpInfo that supports autograd, forward and backward on the device,
     so the backward kernels autograd calls are listed, and a training corpus: common layers
     stepped with every optimizer implementation (for-loop, foreach, fused), GradScaler,
     clipping and autocast;
  3. the suites that train and use the device (`SUITES`);

and writes what they ran, sorted, one op per line. Review the diff before committing it: each
new line is code a stranger may run on the pool's GPUs; an op the kernel sweep
(`tools/kernel_sweep.py`) finds trusting its arguments needs a sanitiser first.

    .venv/bin/python tools/allowlist.py            # full run (~20 min on 2 cores), writes the list
    .venv/bin/python tools/allowlist.py --no-suites --samples 2   # quicker, sweeps only
    .venv/bin/python tools/allowlist.py --candidates /tmp/c.txt   # only write the candidates
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "src"))

from gpupool.protocol import ops as oplist  # noqa: E402
from gpupool.protocol.version import PROTOCOL_VERSION  # noqa: E402
from gpupool.server.oppolicy import OpDenied, build_spec  # noqa: E402
from gpupool.torchcodec import op_name  # noqa: E402

OUT = ROOT / "src" / "gpupool" / "protocol" / "allowlist.txt"

#: The values a string argument may take, by argument name (reviewed: each is a mode switch
#: that the kernel itself validates; free-form text such as `einsum`'s equation, `from_file`'s
#: filename or `_assert_async`'s message is never listed).
STRING_VALUES: dict[str, tuple[str, ...]] = {
    "approximate": ("none", "tanh"),
    "rounding_mode": ("trunc", "floor"),
    "reduce": ("sum", "prod", "mean", "amax", "amin", "add", "multiply", "max", "min"),
    "side": ("left", "right"),
    "interpolation": ("linear", "lower", "higher", "midpoint", "nearest"),
    "mode": ("reduced", "complete", "r", "constant", "reflect", "replicate", "circular"),
    "pad_mode": ("constant", "reflect", "replicate", "circular"),
    "padding": ("same", "valid"),
    "padding_side": ("left", "right"),
    "norm": ("forward", "backward", "ortho"),
    "ord": ("fro", "nuc"),
    "p": ("fro", "nuc"),
    "driver": ("gels", "gelsy", "gelsd", "gelss", "gesvd", "gesvdj", "gesvda"),
    "UPLO": ("L", "U"),
    "indexing": ("ij", "xy"),
    # The function a linalg kernel names in its error message (`_linalg_check_errors`).
    "api_name": (
        "inv", "linalg.cholesky", "linalg.inv", "linalg.inv_ex", "linalg.cholesky_ex",
        "torch.linalg.ldl_factor", "torch.linalg.lu_factor", "torch.linalg.solve",
        "torch.linalg.lu", "torch.linalg.cholesky_ex", "linalg.solve_ex", "linalg.lu_factor_ex",
    ),
}

#: Test files whose servers' sessions are recorded: the training, semantics and
#: transparency suites, the examples, and the basic remote-tensor tests.
SUITES = (
    "tests/test_training.py", "tests/test_semantics.py", "tests/test_transparency.py",
    "tests/test_ops.py", "tests/test_remote_basics.py", "tests/test_examples.py",
    "tests/test_hostmem.py",
)


#: Ops that only a CUDA server is sent (gpupool's SDPA routing picks the fused kernels CUDA
#: has), so no CPU-backed run records them. Reviewed: their backward ops have shape
#: sanitisers (server/sanitisers.py), since the CPU kernel sweep cannot reach them.
CUDA_ONLY = (
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_backward",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward",
)

#: OpInfos whose backward on the device ends the client process (std::terminate inside the
#: autograd engine, seen with torch 2.13): skipped by the gradient sweep.
GRADIENT_SKIP = frozenset({"linalg.eig", "linalg.eigvals"})


def render(ops: set[str], strings: dict[str, tuple[str, ...]], how: str) -> str:
    lines = [
        "# gpupool op allowlist: the aten overloads a server runs (Note [Deny by default] in ops.py).",
        f"# protocol {PROTOCOL_VERSION}, torch {torch.__version__}, generated {datetime.date.today()} by",
        f"# {how}. Review every added line: it is code strangers may run on the pool's GPUs.",
        "",
        "[strings]",
        *(f"{k} = {' '.join(v)}" for k, v in sorted(strings.items())),
        "",
        "[ops]",
        *sorted(ops),
        "",
    ]
    return "\n".join(lines)


def _overloads() -> list[Any]:
    out = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue
        base, _, overload = name[len("aten::"):].partition(".")
        try:
            out.append(getattr(getattr(torch.ops.aten, base), overload or "default"))
        except (AttributeError, RuntimeError):
            continue
    return out


def candidates() -> set[str]:
    """Every aten overload the server's op policy could allow."""
    everything = oplist.Allowlist(frozenset(op_name(f) for f in _overloads()),
                                  {k: frozenset(v) for k, v in STRING_VALUES.items()}, "<candidates>")
    found = set()
    for fn in _overloads():
        name = op_name(fn)
        with contextlib.suppress(OpDenied):
            build_spec(name, fn, everything, frozenset())
            found.add(name)
    return found


def _gradient_sweep(samples: int) -> None:
    """Forward and backward of every autograd OpInfo on the device (run in a child process
    whose environment points at the candidate list)."""
    import conformance as conf
    from torch.testing._internal.common_methods_invocations import op_db

    import gpupool

    srv = conf.LocalServer()
    try:
        s = gpupool.connect(srv.address, token=srv.token)
        for op in op_db:
            if op.name in GRADIENT_SKIP or not op.supports_autograd or torch.float32 not in op.supported_dtypes("cpu"):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    inputs = []
                    for sample in op.sample_inputs_func(op, "cpu", torch.float32, True):
                        inputs.append(sample)
                        if len(inputs) >= samples:
                            break
            except Exception:  # noqa: BLE001 - no samples
                continue
            for sample in inputs:
                if s.conn.closed or s.conn.lost is not None:
                    s = gpupool.connect(srv.address, token=srv.token)
                _forward_backward(op, sample, s.device, conf)
        _training_corpus(s.device)
        s.close()
    finally:
        srv.stop()


def _training_corpus(device: torch.device) -> None:
    """Training steps of common building blocks with every optimizer implementation, so the
    ops a real program's step sends (fused and foreach optimizers, GradScaler, clipping,
    normalisation and recurrent layers, losses) are listed even where no OpInfo covers them."""
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    blocks: list[tuple[nn.Module, Any]] = [
        (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                       nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                       nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 10)),
         lambda m, x: F.cross_entropy(m(x), torch.tensor([1, 2], device=device), label_smoothing=0.1)),
        (nn.Sequential(nn.Embedding(50, 16, padding_idx=0), nn.LayerNorm(16), nn.GELU(approximate="tanh"),
                       nn.Linear(16, 50)),
         lambda m, x: F.nll_loss(F.log_softmax(m(x).flatten(0, 1), -1), torch.ones(12, dtype=torch.long, device=device))),
        (nn.EmbeddingBag(50, 8, mode="mean"), lambda m, x: m(x).pow(2).mean()),
        (nn.EmbeddingBag(50, 8, mode="max"), lambda m, x: m(x).pow(2).mean()),
        (nn.LSTM(8, 16, batch_first=True), lambda m, x: m(x)[0].mean()),
        (nn.GRU(8, 16, num_layers=2, batch_first=True), lambda m, x: m(x)[0].mean()),
        (nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.1), lambda m, x: m(x).mean()),
        (nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.InstanceNorm2d(4), nn.LeakyReLU(),
                       nn.Upsample(scale_factor=2, mode="bilinear")), lambda m, x: F.mse_loss(m(x), m(x).detach() + 1)),
    ]
    inputs = [
        lambda: torch.randn(2, 3, 8, 8, device=device),
        lambda: torch.randint(0, 50, (2, 6), device=device),
        lambda: torch.randint(0, 50, (3, 4), device=device),
        lambda: torch.randint(0, 50, (3, 4), device=device),
        lambda: torch.randn(2, 5, 8, device=device),
        lambda: torch.randn(2, 5, 8, device=device),
        lambda: torch.randn(2, 5, 16, device=device),
        lambda: torch.randn(2, 3, 4, 4, device=device),
    ]
    optimizers = [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=False),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
        lambda p: torch.optim.Adam(p, foreach=False),
        lambda p: torch.optim.Adam(p, foreach=True, amsgrad=True),
        lambda p: torch.optim.Adam(p, fused=True),
        lambda p: torch.optim.AdamW(p, foreach=True),
        lambda p: torch.optim.AdamW(p, fused=True),
        lambda p: torch.optim.RMSprop(p, foreach=True),
        lambda p: torch.optim.Adagrad(p, foreach=True),
    ]
    for (block, loss_fn), make in zip(blocks, inputs):
        model = block.to(device)
        for make_opt in optimizers:
            try:
                opt = make_opt(model.parameters())
                for _ in range(2):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model, make())
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                float(loss)
            except Exception as e:  # noqa: BLE001 - reported; the rest of the corpus still runs
                print(f"corpus: {type(block).__name__}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        try:
            with torch.autocast(device.type if device.type != "gpupool" else "cpu", dtype=torch.bfloat16):
                float(loss_fn(model, make()))
        except Exception as e:  # noqa: BLE001
            print(f"corpus autocast: {type(block).__name__}: {str(e)[:200]}", flush=True)
    try:
        scaler = torch.amp.GradScaler("cuda")
        model = nn.Linear(4, 4).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler.scale(model(torch.randn(2, 4, device=device)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    except Exception as e:  # noqa: BLE001
        print(f"corpus GradScaler: {str(e)[:200]}", flush=True)


def _forward_backward(op: Any, sample: Any, device: torch.device, conf: Any) -> None:
    try:
        with conf.time_limit(30):
            memo: dict[int, Any] = {}
            x = conf.to_device(sample.input, device, memo)
            args = conf.to_device(sample.args, device, memo)
            kwargs = conf.to_device(sample.kwargs, device, memo)
            leaves = [t for t in conf._leaves((x, args, kwargs)) if isinstance(t, torch.Tensor)
                      and t.is_floating_point()]
            leaves = [t.detach().requires_grad_(True) for t in leaves]
            it = iter(leaves)
            swap = {id(t): next(it) for t in conf._leaves((x, args, kwargs))
                    if isinstance(t, torch.Tensor) and t.is_floating_point()}
            x, args, kwargs = torch.utils._pytree.tree_map(lambda t: swap.get(id(t), t), (x, args, kwargs))
            out = op(x, *args, **kwargs)
            outs = [t for t in conf._leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs:
                sum(o.float().sum() for o in outs).backward()  # type: ignore[union-attr]
            for t in leaves:
                if t.grad is not None:
                    t.grad.cpu()
    except Exception:  # noqa: BLE001 - a sample the device or CPU refuses records nothing new
        pass


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    t0 = time.monotonic()
    print(f"-- {what}: {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT)
    print(f"-- {what}: exit {r.returncode} in {time.monotonic() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help="the list to write (default: %(default)s)")
    p.add_argument("--candidates", type=Path, help="only write the candidate list to this file")
    p.add_argument("--samples", type=int, default=6, help="gradient-sweep samples per op")
    p.add_argument("--no-suites", action="store_true", help="skip the test suites")
    p.add_argument("--no-conformance", action="store_true", help="skip the conformance sweep")
    p.add_argument("--gradient-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.gradient_child:
        _gradient_sweep(a.samples)
        return 0
    cands = candidates()
    if a.candidates:
        a.candidates.write_text(render(cands, STRING_VALUES, "tools/allowlist.py --candidates"))
        print(f"{len(cands)} candidate ops written to {a.candidates}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cand_file, seen_file = Path(tmp) / "candidates.txt", Path(tmp) / "seen.txt"
        cand_file.write_text(render(cands, STRING_VALUES, "candidates"))
        env = dict(os.environ, GPUPOOL_ALLOWLIST=str(cand_file), GPUPOOL_OPS_SEEN=str(seen_file),
                   PYTHONPATH=str(ROOT / "src"))
        py = sys.executable
        if not a.no_conformance:
            _run([py, "tools/conformance.py"], env, "conformance sweep")
        _run([py, "tools/allowlist.py", "--gradient-child", "--samples", str(a.samples)], env, "gradient sweep")
        if not a.no_suites:
            _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES], env, "suites")
        seen = set(seen_file.read_text().split()) if seen_file.exists() else set()
    listed = (seen | set(CUDA_ONLY)) & cands
    used = {k: v for k, v in STRING_VALUES.items()}
    how = "tools/allowlist.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    a.out.write_text(render(listed, used, how))
    print(f"{len(listed)} ops written to {a.out} ({len(cands)} candidates, {len(seen - cands)} seen but not candidates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
