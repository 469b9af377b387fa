"""OpInfo conformance sweep: PyTorch's op database on the gpupool device against local CPU.

For every OpInfo in `torch.testing._internal.common_methods_invocations.op_db` that supports
float32, the first `DEFAULT_SAMPLES` float32 sample inputs run twice: on the CPU, and with every
tensor moved to a gpupool device (same values, same strides). Outputs must match exactly:
values, dtypes, shapes and significant strides, the same non-tensor results, and the same
values in the inputs the op wrote to. The server is CPU-backed and runs the very same kernels,
so there is no tolerance, except for ops whose CPU results vary from run to run (see
`CPU_NONDETERMINISTIC`). Random ops are compared after seeding the CPU generator and the
session's server-side generator identically. Then `EXTRA_DTYPES` (complex64, int64, bool) are
swept the same way with `EXTRA_SAMPLES` samples per op.

Besides the function variant, each op's in-place variant (`op.inplace_variant`) and out=
variant (`supports_out`, with zero-size outputs the op must resize) run on the same samples.

    .venv/bin/python tools/conformance.py                  # prints the summary (~50 s, 2 cores)
    .venv/bin/python tools/conformance.py --write          # regenerates docs/conformance.md
    .venv/bin/python tools/conformance.py --ops add,cat -v # a few ops, every failure shown
    .venv/bin/python tools/conformance.py --dtype complex64 --samples 1000 -v  # every sample

The headline pass rate counts OpInfos (function variant) with at least one float32 sample that
runs on the CPU; an OpInfo passes when all its samples match. A sample the CPU refuses (an
error input) is skipped, not counted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "conformance.md"
SEED = 20240917
#: Samples per op (in op_db's order). Measured on 2 cores: 20 take ~35 s and find every failing
#: op that all samples (~2 min, dominated by max-pooling's hundreds) find but `linalg.norm`'s
#: nuclear-norm samples, a failure class the list already shows (`norm.nuc`).
DEFAULT_SAMPLES = 20
DEFAULT_TIMEOUT = 30.0
VARIANTS = ("function", "inplace", "out")
#: Also swept, with fewer samples each: the dtypes whose handling differs most from float32's.
EXTRA_DTYPES = ("complex64", "int64", "bool")
EXTRA_SAMPLES = 6
#: CPU re-runs that decide whether a sample's CPU result varies from run to run.
CPU_RERUNS = 20

#: Why some ops fail, where the failure message alone does not say it; by (op, variant), or
#: (op, "*") for every variant. Shown in the document in place of the message.
_RANK_BUG = (
    "PyTorch bug: under any Python dispatch (also a TorchDispatchMode on plain CPU tensors) "
    "`matrix_rank(out=)` never writes `out`"
)
_SPARSE = "sparse layouts are not supported on a gpupool device"
NOTES: dict[tuple[str, str], str] = {
    ("linalg.matrix_rank", "out"): _RANK_BUG,
    ("linalg.matrix_rank.hermitian", "out"): _RANK_BUG,
    ("matmul", "out"): "a view's wrapper does not share its base's client-side storage, so "
    "`matmul(out=)`'s `is_alias_of` check fails and it copies a folded result into `out`",
    ("to_sparse", "*"): _SPARSE,
    ("sparse.sampled_addmm", "*"): _SPARSE,
    ("sparse.mm.reduce", "*"): _SPARSE,
}


def note_for(name: str, variant: str) -> str | None:
    return NOTES.get((name, variant)) or NOTES.get((name, "*"))


#: Ops whose CPU results vary between runs on the same input (measured: MKL's `gelsy` driver
#: gives other bits in 9 of 20 runs of one 3x3 float32 problem, and in a fresh process other
#: bits again), compared with tolerances where they differ; others join when a sweep sees their
#: CPU results vary (`Sweep._cpu_varies`).
CPU_NONDETERMINISTIC = frozenset({"linalg.lstsq", "linalg.lstsq.grad_oriented"})

#: Ops whose samples deliberately pass host tensors (by their contract: `tensor_split` takes
#: its split points as a CPU tensor): their `args` stay on the host.
HOST_ARGS = frozenset({"tensor_split"})

#: Ops whose results are uninitialized memory: only their metadata can be compared.
UNINITIALIZED = frozenset(
    {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"}
)


PYTHON_DISPATCH_PATH = (
    "(but equal to CPU under a TorchDispatchMode: PyTorch's tensor-subclass path)"
)


class _NoOpMode(TorchDispatchMode):
    """Runs every op unchanged; makes PyTorch's composites take their Python-dispatch paths."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class SampleTimeout(Exception):
    """A sample ran past the per-sample limit (the session is then replaced)."""


class Mismatch(Exception):
    """The device result differs from the CPU result."""


@dataclass
class Outcome:
    """One OpInfo variant's result: `failure` is None when every compared sample matched."""

    op: str
    variant: str
    samples: int = 0
    failure: str | None = None
    seconds: float = 0.0
    dtype: str = "float32"

    @property
    def passed(self) -> bool:
        return self.samples > 0 and self.failure is None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_op: int = DEFAULT_SAMPLES
    tolerated: list[str] = field(default_factory=list)

    def variant(self, name: str, dtype: str = "float32") -> list[Outcome]:
        """Outcomes of one variant and dtype that compared at least one sample."""
        return [o for o in self.outcomes if o.variant == name and o.dtype == dtype and o.samples > 0]

    def pass_rate(self, variant: str = "function", dtype: str = "float32") -> float:
        ran = self.variant(variant, dtype)
        return sum(o.passed for o in ran) / max(len(ran), 1)

    def dtypes(self) -> list[str]:
        return list(dict.fromkeys(o.dtype for o in self.outcomes))

    def failures(self) -> dict[tuple[str, str, str], str]:
        """Failing (op, variant, dtype) and why."""
        return {(o.op, o.variant, o.dtype): o.failure for o in self.outcomes if o.samples and o.failure}


# ---- moving samples to the device -------------------------------------------------------------


def to_device(tree: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """Every CPU tensor in `tree` as a gpupool tensor with the same values *and strides*.

    Note: a non-contiguous sample (a slice, a transpose, an expanded tensor) is rebuilt on the
    device as the same `as_strided` view of its storage, so ops see exactly the layout they saw
    on the CPU. The same host tensor appearing twice maps to the same device tensor (aliasing).
    """

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) in memo:
                return memo[id(x)]
            memo[id(x)] = r = _move_tensor(x, device)
            return r
        if (isinstance(x, torch.device) and x.type == "cpu") or x == "cpu":
            return device
        return x

    return pytree.tree_map(move, tree)


def _move_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.layout != torch.strided or t.is_contiguous() or t.numel() == 0:
        return t.to(device)
    span = t.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    flat = t.as_strided((span,), (1,), 0).to(device)
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


# ---- comparing -------------------------------------------------------------------------------


def _leaves(x: Any) -> list[Any]:
    return pytree.tree_leaves(x)


def describe(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device.type, t.dtype, tuple(t.shape), t.stride() if t.layout == torch.strided else None)


def snapshot(result: Any) -> list[Any]:
    """The result's leaves with device tensors' metadata recorded and their values fetched."""
    out = []
    for leaf in _leaves(result):
        if isinstance(leaf, torch.Tensor):
            meta = describe(leaf)
            host = leaf.detach().cpu() if leaf.device.type != "cpu" else leaf.detach().clone()
            out.append((meta, host))
        else:
            out.append(leaf)
    return out


def compare(actual: list[Any], expected: list[Any], values: bool = True, tolerant: bool = False) -> None:
    """Raise `Mismatch` unless the device leaves equal the CPU leaves exactly.

    With `tolerant`, values are compared with `assert_close`'s default tolerances: only for
    samples whose CPU results differ from run to run (see `Sweep.run_sample`).
    """
    if len(actual) != len(expected):
        raise Mismatch(f"{len(actual)} results, expected {len(expected)}")
    for i, (a, e) in enumerate(zip(actual, expected)):
        where = f"result {i}: " if len(expected) > 1 else ""
        if isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], torch.Tensor):
            if not (isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], torch.Tensor)):
                raise Mismatch(f"{where}got {type(a).__name__}, expected a tensor")
            (adev, adt, ashape, astride), av = a
            (_, edt, eshape, estride), ev = e
            if adev != "gpupool":
                raise Mismatch(f"{where}result on {adev}, expected the gpupool device")
            if adt != edt:
                raise Mismatch(f"{where}dtype {adt}, expected {edt}")
            if ashape != eshape:
                raise Mismatch(f"{where}shape {list(ashape)}, expected {list(eshape)}")
            if astride is not None and estride is not None and math.prod(eshape):
                sig_a = [st for s, st in zip(ashape, astride) if s > 1]
                sig_e = [st for s, st in zip(eshape, estride) if s > 1]
                if sig_a != sig_e:
                    raise Mismatch(f"{where}strides {astride}, expected {estride}")
            if values:
                try:
                    if tolerant:
                        torch.testing.assert_close(av, ev, equal_nan=True, check_stride=False)
                    else:
                        torch.testing.assert_close(av, ev, rtol=0, atol=0, equal_nan=True, check_stride=False)
                except AssertionError as err:
                    raise Mismatch(f"{where}values differ: {_first_line(str(err), 1)}") from None
        elif isinstance(e, float) and isinstance(a, float):
            if not (a == e or (math.isnan(a) and math.isnan(e))):
                raise Mismatch(f"{where}{a!r}, expected {e!r}")
        elif type(a) is not type(e) or a != e:
            raise Mismatch(f"{where}{a!r} ({type(a).__name__}), expected {e!r} ({type(e).__name__})")


def _identical(a: list[Any], b: list[Any]) -> bool:
    """Whether two CPU snapshots agree bit for bit (NaNs equal)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor):
            if not (isinstance(y, tuple) and x[0] == y[0]):
                return False
            try:
                torch.testing.assert_close(x[1], y[1], rtol=0, atol=0, equal_nan=True)
            except AssertionError:
                return False
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            return False
    return True


def _first_line(text: str, skip: int = 0) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[min(skip, len(lines) - 1)]


def reason(exc: BaseException) -> str:
    """One line naming what went wrong: the exception type and its message's first line."""
    if isinstance(exc, Mismatch):
        text = str(exc)
    else:
        msg = _first_line(str(exc))
        # Drop the "issued at <file>:<line>" tail and object addresses: they change every run.
        text = f"{type(exc).__name__}: {msg}"
    text = re.sub(r" at 0x[0-9a-f]+", "", text)
    text = text.replace("|", "/")
    return text if len(text) <= 160 else text[:157] + "..."


# ---- running one sample ----------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `SampleTimeout` in the main thread after `seconds` (no-op in other threads)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise SampleTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _clone_tree(tree: Any) -> Any:
    """A copy of the sample with every tensor cloned (strides kept), aliasing preserved."""
    memo: dict[int, torch.Tensor] = {}

    def c(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) not in memo:
                memo[id(x)] = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x) if x.layout == torch.strided else x.clone()
            return memo[id(x)]
        return x

    return pytree.tree_map(c, tree)


def _seed(session: Any) -> None:
    """Seed the CPU generator, and the session's server-side one when given, identically.

    Note: not `torch.manual_seed`, which on a CPU-only build queues a lazy CUDA seeding call with
    a formatted stack each time (~1 ms); the sweep seeds twice per sample.
    """
    torch.random.default_generator.manual_seed(SEED)
    if session is not None:
        session.manual_seed(SEED)


def _call(variant: str, op: Any, sample: Any, session: Any, factory: bool = False) -> Any:
    """Run one variant of `op` on `sample` (on the device when `device` is given).

    Returns what to compare: the variant's results, then the sample's tensors after the call
    (in-place ops and ops that write to their inputs are judged by them too).
    """
    device = None if session is None else session.device
    inp, args, kwargs = _clone_tree((sample.input, sample.args, sample.kwargs))
    host_args = op.name in HOST_ARGS
    if device is not None:
        memo: dict[int, Any] = {}
        inp, kwargs = to_device((inp, kwargs), device, memo)
        if not host_args:
            args = to_device(args, device, memo)
    if device is not None and factory and "device" not in kwargs:
        if not any(isinstance(x, torch.Tensor) for x in _leaves((inp, args, kwargs))):
            # A factory sample that relies on the default device (`arange(2)`): name ours.
            kwargs = dict(kwargs, device=device)
    written = [x for x in _leaves((inp, () if host_args else args)) if isinstance(x, torch.Tensor)]
    _seed(session)
    if variant == "function":
        ret = op(inp, *args, **kwargs)
        return ret, written
    if variant == "inplace":
        ret = op.inplace_variant(inp, *args, **kwargs)
        return (ret, ret is inp), written
    # out=: zero-size outputs of the reference's dtypes, which the op must resize.
    ref = op(inp, *args, **kwargs)
    if isinstance(ref, torch.Tensor):
        out: Any = _empty_like0(ref)
    elif isinstance(ref, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in ref):
        out = tuple(_empty_like0(r) for r in ref)
    else:
        raise _NotApplicable()
    _seed(session)
    ret = op(inp, *args, **kwargs, out=out)
    same = ret is out if isinstance(out, torch.Tensor) else all(r is o for r, o in zip(ret, out))
    return (out, same), written


def _empty_like0(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=t.dtype, device=t.device)


class _NotApplicable(Exception):
    """The sample cannot exercise this variant (e.g. no tensor result for out=)."""


# ---- the sweep --------------------------------------------------------------------------------


class Sweep:
    """Runs OpInfos on a gpupool session from `connect`, replacing it if a sample breaks it."""

    def __init__(
        self,
        connect: Callable[[], Any],
        samples: int = DEFAULT_SAMPLES,
        timeout: float = DEFAULT_TIMEOUT,
        verbose: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._connect = connect
        self.dtype = dtype
        self.session = connect()
        self.samples = samples
        self.timeout = timeout
        self.verbose = verbose
        self.reconnects = 0
        #: Ops compared with tolerances because the CPU itself varies between runs.
        self.tolerated: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self.session.device  # type: ignore[no-any-return]

    def _renew(self) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
        self.session = self._connect()
        self.reconnects += 1

    def _healthy(self) -> bool:
        conn = self.session.conn
        return not conn.closed and conn.lost is None

    def run(self, ops: list[Any]) -> Report:
        """Sweep `ops` in this sweep's dtype; see `sweep_all` for the documented set."""
        t0 = time.monotonic()
        report = Report(samples_per_op=self.samples)
        dtype = str(self.dtype).removeprefix("torch.")
        for op in ops:
            t1 = time.monotonic()
            samples = self.samples_of(op)
            for variant in VARIANTS:
                if variant == "inplace" and op.inplace_variant is None:
                    continue
                if variant == "out" and not op.supports_out:
                    continue
                o = self.run_variant(op, variant, samples)
                o.dtype = dtype
                report.outcomes.append(o)
                if self.verbose and o.failure:
                    print(f"FAIL {o.op} [{variant}, {dtype}]: {o.failure}", flush=True)
            if self.verbose and time.monotonic() - t1 > 2:
                print(f"slow: {full_name(op)} {time.monotonic() - t1:.1f} s", flush=True)
        report.seconds = time.monotonic() - t0
        report.tolerated = sorted(self.tolerated)
        return report

    def samples_of(self, op: Any) -> list[Any]:
        """The op's first samples in this sweep's dtype, the same on every run.

        Note: `op.sample_inputs` seeds by crawling the stack for a unittest method (slow, and
        the seed would depend on the caller); the sample function is called directly here and
        seeded from the op's name.
        """
        torch.random.default_generator.manual_seed(zlib.crc32(full_name(op).encode()))
        out: list[Any] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for sample in op.sample_inputs_func(op, "cpu", self.dtype, False):
                    out.append(sample)
                    if len(out) >= self.samples:
                        break
        except Exception:  # noqa: BLE001 - an op without (more) samples in this dtype
            pass
        return out

    def run_variant(self, op: Any, variant: str, samples: list[Any]) -> Outcome:
        o = Outcome(full_name(op), variant)
        t0 = time.monotonic()
        for sample in samples:
            if variant == "inplace" and sample.broadcasts_input:
                continue
            verdict = self.run_sample(op, variant, sample)
            if verdict is None:
                continue  # the CPU refuses this sample too: nothing to compare
            o.samples += 1
            if verdict:
                o.failure = verdict
                break
        o.seconds = time.monotonic() - t0
        return o

    def _cpu_varies(self, op: Any, variant: str, sample: Any, expected: list[Any]) -> bool:
        """Whether the CPU itself gives other bits on other runs (MKL's `gelsy` does, about one
        run in two): then no exact answer exists and the comparison uses tolerances. Up to
        `CPU_RERUNS` more runs, stopping at the first that differs."""
        deadline = time.monotonic() + 5
        for _ in range(CPU_RERUNS):
            try:
                with time_limit(self.timeout), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    again = snapshot(_call(variant, op, sample, None))
            except Exception:  # noqa: BLE001
                return False
            if not _identical(again, expected):
                return True
            if time.monotonic() > deadline:
                break
        return False

    def _matches_python_dispatch(self, op: Any, variant: str, sample: Any, actual: list[Any]) -> bool:
        """Whether the device result equals the CPU's under a do-nothing `TorchDispatchMode`.

        Note: PyTorch's composite ops take other paths when any Python dispatch is involved
        (`isTensorSubclassLike`): `svdvals` computes singular vectors, `matmul` folds batches
        into one `mm`. A gpupool tensor always is such a tensor, so these differ from eager CPU
        in the last bits, and the same op on plain CPU tensors under a mode shows it.
        """
        try:
            with time_limit(self.timeout), warnings.catch_warnings(), _NoOpMode():
                warnings.simplefilter("ignore")
                under_mode = snapshot(_call(variant, op, sample, None))
            compare(actual, under_mode)
        except Exception:  # noqa: BLE001
            return False
        return True

    def run_sample(self, op: Any, variant: str, sample: Any) -> str | None:
        """'' when the sample matches, a reason when not, None when the CPU cannot run it."""
        try:
            with time_limit(self.timeout), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = _call(variant, op, sample, None)
                expected_snap = snapshot(expected)
        except Exception:  # noqa: BLE001 - an error-input sample, or one the variant refuses
            return None
        try:
            with time_limit(self.timeout), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory = any(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor) for x in expected_snap)
                actual = _call(variant, op, sample, self.session, factory)
                actual_snap = snapshot(actual)
                del actual
                self.session.synchronize()
            values = op.name not in UNINITIALIZED
            try:
                compare(actual_snap, expected_snap, values=values)
            except Mismatch as e:
                if "values differ" not in str(e):
                    raise
                name = full_name(op)
                varies = name in CPU_NONDETERMINISTIC or name in self.tolerated
                if not varies and not self._cpu_varies(op, variant, sample, expected_snap):
                    if self._matches_python_dispatch(op, variant, sample, actual_snap):
                        raise Mismatch(f"{e} {PYTHON_DISPATCH_PATH}") from None
                    raise
                compare(actual_snap, expected_snap, values=values, tolerant=True)
                self.tolerated.add(full_name(op))
            return ""
        except _NotApplicable:
            return None
        except SampleTimeout as e:
            self._renew()
            return reason(e)
        except Exception as e:  # noqa: BLE001 - recorded as this op's failure
            text = reason(e)
            if not self._healthy():
                self._renew()
            else:
                try:
                    with time_limit(self.timeout):
                        self.session.synchronize()  # drop a deferred error: it is this op's
                except Exception:  # noqa: BLE001
                    self._renew()
            return text


def sweep_all(sweep: Sweep, names: set[str] | None = None) -> Report:
    """The documented sweep: float32 with `sweep.samples` per op, then `EXTRA_DTYPES` with
    `EXTRA_SAMPLES` each, in one report."""
    t0 = time.monotonic()
    report = sweep.run(float32_ops(names))
    base = (sweep.dtype, sweep.samples)
    try:
        for name in EXTRA_DTYPES:
            sweep.dtype, sweep.samples = getattr(torch, name), EXTRA_SAMPLES
            extra = sweep.run(float32_ops(names, sweep.dtype))
            report.outcomes += extra.outcomes
            report.tolerated = sorted(set(report.tolerated) | set(extra.tolerated))
    finally:
        sweep.dtype, sweep.samples = base
    report.seconds = time.monotonic() - t0
    return report


def full_name(op: Any) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def float32_ops(names: set[str] | None = None, dtype: torch.dtype = torch.float32) -> list[Any]:
    """The OpInfos that support `dtype` on the CPU (optionally only those named)."""
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [op for op in op_db if dtype in op.supported_dtypes("cpu")]
    if names:
        ops = [op for op in ops if full_name(op) in names or op.name in names]
    return ops


# ---- the document -----------------------------------------------------------------------------

_ROW = re.compile(r"^\| `([^`]+)` \| (function|inplace|out) \| (\w+) \| (.*) \|$")


def render(report: Report) -> str:
    """docs/conformance.md: the pass rates and every failing op with its reason."""
    lines = [
        "# OpInfo conformance",
        "",
        "Generated by `tools/conformance.py --write`; checked by `tests/test_conformance.py`.",
        "Do not edit by hand.",
        "",
        "Every OpInfo of PyTorch's `op_db` that supports float32 runs its first "
        f"{report.samples_per_op} float32 sample inputs on a gpupool device (a CPU-backed "
        "server in another process) and on the local CPU. Results must match exactly: values, "
        "dtypes, shapes, significant strides, non-tensor results, and the inputs an op writes "
        "to. Random ops are seeded identically on both sides. An op passes when all its samples "
        f"match. torch {torch.__version__}.",
        "",
        "| variant | ops with float32 samples | pass | rate |",
        "|---|---|---|---|",
    ]
    for v in VARIANTS:
        ran = report.variant(v)
        ok = sum(o.passed for o in ran)
        lines.append(f"| {v} | {len(ran)} | {ok} | {100 * ok / max(len(ran), 1):.1f}% |")
    lines += [
        "",
        "The headline is the function variant. `inplace` is `op.inplace_variant` on samples "
        "that do not broadcast the input; `out` passes zero-size `out=` tensors the op must "
        "resize.",
    ]
    extra = [d for d in report.dtypes() if d != "float32"]
    if extra:
        lines += [
            "",
            f"Other dtypes, first {EXTRA_SAMPLES} samples per op:",
            "",
            "| dtype | function | inplace | out |",
            "|---|---|---|---|",
        ]
        for d in extra:
            cells = []
            for v in VARIANTS:
                ran = report.variant(v, d)
                cells.append(f"{sum(o.passed for o in ran)}/{len(ran)}")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += ["", "## Failing", "", "| op | variant | dtype | reason |", "|---|---|---|---|"]
    for (name, variant, dtype), why in sorted(report.failures().items()):
        why = note_for(name, variant) or why
        lines.append(f"| `{name}` | {variant} | {dtype} | {why} |")
    lines += [
        "",
        "What they are: ops whose reason ends \"PyTorch's tensor-subclass path\" give on the "
        "device exactly what plain CPU tensors give under a no-op `TorchDispatchMode`: any Python "
        "dispatch makes PyTorch's composites take other kernels (`svdvals` computes singular "
        "vectors, `matmul` folds a batch into one `mm`), which differ in the last bits. They "
        "would need overrides above the dispatcher. Whether the two CPU paths agree depends on "
        "the machine's BLAS kernels, so such rows come and go between machines; the test allows "
        "that. `matmul(out=)` needs views to share their "
        "base's client-side storage (measured at ~25 µs per view op against ~2 µs now, so not "
        "done). Sparse layouts are refused on purpose.",
    ]
    if report.tolerated:
        lines += [
            "",
            "## Compared with tolerances",
            "",
            "These ops' CPU results differ from run to run on the same input (MKL's LAPACK "
            "drivers), so they have no exact answer: where the device result differed from the "
            "CPU's, it was compared with `torch.testing.assert_close`'s default tolerances.",
            "",
        ]
        lines += [f"- `{name}`" for name in report.tolerated]
    lines.append("")
    return "\n".join(lines)


def parse_failures(text: str) -> dict[tuple[str, str, str], str]:
    """The failing (op, variant, dtype) rows of a rendered document."""
    out = {}
    for line in text.splitlines():
        mt = _ROW.match(line)
        if mt:
            out[(mt.group(1), mt.group(2), mt.group(3))] = mt.group(4)
    return out


# ---- running it -------------------------------------------------------------------------------


class LocalServer:
    """A `gpupool server` process on loopback for the sweep (CPU-backed)."""

    def __init__(self, token: str = "conformance") -> None:
        self.token = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool", "server", "--listen", "127.0.0.1:0", "--token", token, "--cpu-gpus", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "listening on" in line:
                self.address = line.rsplit(" ", 1)[1].strip()
                break
        else:
            raise RuntimeError("the gpupool server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout or ()], daemon=True).start()
        atexit.register(self.stop)  # never leave a server behind, however the sweep ends

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(ROOT)}")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--dtype", default="", help="sweep only this dtype (default: the documented set)")
    a = p.parse_args(argv)
    import gpupool

    srv = LocalServer()
    try:
        names = {n.strip() for n in a.ops.split(",") if n.strip()} or None
        if a.write and (a.dtype or names or a.samples != DEFAULT_SAMPLES):
            p.error("--write documents the default sweep: no --dtype, --ops or --samples")
        dtype = getattr(torch, a.dtype or "float32")
        sweep = Sweep(lambda: gpupool.connect(srv.address, token=srv.token), a.samples, a.timeout, a.verbose, dtype)
        report = sweep.run(float32_ops(names, dtype)) if a.dtype else sweep_all(sweep, names)
        sweep.session.close()
    finally:
        srv.stop()
    for d in report.dtypes():
        for v in VARIANTS:
            ran = report.variant(v, d)
            print(f"{d} {v}: {sum(o.passed for o in ran)}/{len(ran)} pass ({100 * report.pass_rate(v, d):.1f}%)")
    print(f"{report.seconds:.0f} s, {sweep.reconnects} reconnects")
    slow = sorted(report.outcomes, key=lambda o: -o.seconds)[:5]
    print("slowest: " + ", ".join(f"{o.op}[{o.variant}] {o.seconds:.1f}s" for o in slow))
    if a.write:
        DOC.write_text(render(report))
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
