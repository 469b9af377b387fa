"""The kernel sweep: which allowed aten kernels read, write or spin out of bounds when given
hostile integer arguments (Note [Sanitisers] in server/sanitisers.py).

For every op on the allowlist that `tools/oprecord.py` sees real code call, each integer-like
argument of a recorded call — an integer tensor (indices, offsets, lengths), an `int`, an
`int[]`, a `Scalar` (a count such as a polynomial's degree) — is set, one at a time, to hostile
values: just past the largest value it held, -1, and ±2**40. Each mutated call runs in a forked
child of this process (one thread, a memory cap), twice, with the heap arranged and painted
differently each time:

  * canaries: before the call the child allocates blocks of the sizes small tensors use, paints
    them, frees every other one and clones the call's tensors, so its inputs and outputs sit
    between painted blocks; a canary that changed means the kernel wrote out of bounds;
  * the two runs paint with different bytes: a kernel whose result differs between them, though
    the unmutated call's does not, read memory it does not own (unless the difference goes away
    when PyTorch fills what it allocates: Note [Unwritten outputs]);
  * a child killed by a signal crashed; one still running after `TIMEOUT` seconds spins on a
    count; a refusal to allocate is recorded as `alloc` (a matter for the budget, not bounds);
    an exception means the kernel checked its arguments.

Findings (crash, hang, oob_write, oob_read) go to `src/gpupool/protocol/kernel_sweep.json`, the
reviewed data file the server's op policy reads: a listed op runs only with a sanitiser.
`--sanitised` runs the same mutations through the server's sanitisers instead: every finding
must then be gone (what `tests/test_kernel_sweep.py` checks in CI, in short form).

    .venv/bin/python tools/kernel_sweep.py                    # full sweep, writes the data file
    .venv/bin/python tools/kernel_sweep.py --ops aten::take,aten::gather -v
    .venv/bin/python tools/kernel_sweep.py --sources extra:inference --merge   # add to the data file
    .venv/bin/python tools/kernel_sweep.py --sanitised --findings   # re-run each finding sanitised
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import hashlib
import json
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "src"))

import oprecord  # noqa: E402

from gpupool.protocol import ops as oplist  # noqa: E402
from gpupool.server.sanitisers import SWEEP_FILE, Bound, SanitiserRefused  # noqa: E402

TIMEOUT = 5.0
HUGE = 1 << 40
#: Effects that make an op unsafe without a sanitiser, worst first.
UNSAFE = ("crash", "hang", "oob_write", "oob_read")
_RANK = {e: i for i, e in enumerate(("crash", "hang", "oob_write", "oob_read", "alloc", "refused", "error", "ok"))}
_CANARY_SIZES = (64, 256, 1024, 4096, 16384, 65536)
_CANARIES = 600


@dataclass(frozen=True)
class Attack:
    """One mutated call: `op` with argument `arg` set as `mutation` says."""

    op: str
    arg: str
    mutation: str
    source: str
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


# ---- mutations ---------------------------------------------------------------------------------


def _is_int_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.numel() > 0 and not x.is_floating_point() and not x.is_complex() \
        and x.dtype != torch.bool


def _values(x: Any) -> list[tuple[str, Any]]:
    """Hostile replacements for one integer-like argument value."""
    if _is_int_tensor(x):
        top = int(x.max())
        out = []
        for desc, v in (("past", top + 1), ("past+64", top + 64), ("-1", -1), ("huge", HUGE), ("-huge", -HUGE)):
            if x.dtype != torch.int64 and abs(v) >= 2**31:
                continue
            one = x.clone()
            one.view(-1)[-1] = v
            out.append((f"one={desc}", one))
        for desc, v in (("past", top + 1), ("huge", HUGE if x.dtype == torch.int64 else 2**31 - 1)):
            out.append((f"all={desc}", torch.full_like(x, v)))
        return out
    if type(x) is int:
        return [(f"={v}", v) for v in (x + 1, -1, 1 << 20, HUGE, -HUGE)]
    if isinstance(x, list) and x and all(type(v) is int for v in x):
        out = []
        for i in range(min(len(x), 3)):
            for v in (-1, HUGE):
                y = list(x)
                y[i] = v
                out.append((f"[{i}]={v}", y))
        return out
    if type(x) is float:
        return [("=1e13", 1e13), ("=-1e13", -1e13)]
    return []


def attacks(op_name: str, examples: list[oprecord.Example], func: Any) -> Iterator[Attack]:
    """Every mutation of every recorded call of `op_name`."""
    names = [a.name for a in func._schema.arguments]
    for ex in examples:
        bound = list(ex.args)
        for i, name in enumerate(names):
            value = bound[i] if i < len(bound) else ex.kwargs.get(name)
            if value is None or type(value) is bool:
                continue
            real = str(getattr(func._schema.arguments[i], "real_type", ""))
            if type(value) is float and "number" not in real:
                continue  # a float parameter (a learning rate), not a count
            for desc, v in _values(value):
                args, kwargs = list(ex.args), dict(ex.kwargs)
                if i < len(args):
                    args[i] = v
                else:
                    kwargs[name] = v
                yield Attack(op_name, name, desc, ex.source, func, tuple(args), kwargs)


# ---- running a call in a guarded child ---------------------------------------------------------


def _digest(tree: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for x in pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided:
                x = x.to_dense()
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        else:
            h.update(repr(x).encode())
    return h.hexdigest()


def _child(call: Callable[[], Any], paint: int, fill: bool = False) -> dict[str, Any]:
    """In the forked child: lay out canaries, run, report. With `fill`, PyTorch fills every
    tensor it allocates (inside kernels too) with NaN or the largest integer."""
    if fill:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    blocks = [torch.full((_CANARY_SIZES[i % len(_CANARY_SIZES)],), paint, dtype=torch.uint8) for i in range(_CANARIES)]
    canaries = blocks[::2]
    del blocks[1::2]
    blocks = None  # the freed ones keep their paint: the call's allocations land among them
    try:
        torch.manual_seed(0)
        out = call()
    except MemoryError:
        return {"effect": "alloc"}
    except Exception as e:  # noqa: BLE001 - the kernel refused: it checks its arguments
        text = str(e)
        if "alloc" in text.lower() and "bytes" in text:
            return {"effect": "alloc"}
        if isinstance(e, SanitiserRefused):
            return {"effect": "refused"}
        return {"effect": "error", "why": f"{type(e).__name__}: {text[:160]}"}
    wrote = any(bool((c != paint).any()) for c in canaries)
    return {"effect": "oob_write" if wrote else "ok", "digest": _digest(out)}


def _fork_run(call: Callable[[], Any], paint: int, timeout: float, fill: bool = False) -> dict[str, Any]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        faulthandler.disable()  # a crash is the expected finding, not a traceback to print
        try:
            soft = _vm_size() + (2 << 30)
            resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            res = _child(call, paint, fill)
            os.write(w, json.dumps(res).encode())
        except BaseException:  # noqa: BLE001 - anything else: report as an error
            os.write(w, b'{"effect": "error", "why": "harness"}')
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([r], [], [], max(0.0, left))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return {"effect": "hang"}
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"effect": "crash", "why": signal.Signals(os.WTERMSIG(status)).name}
    try:
        return dict(json.loads(data))
    except ValueError:
        return {"effect": "crash", "why": "no report"}


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def _caller(a: Attack, sanitised: bool) -> Callable[[], Any]:
    def call() -> Any:
        args = list(oprecord.copy_call(a.args, a.kwargs) or (a.args, a.kwargs))
        args_, kwargs_ = list(args[0]), dict(args[1])
        if sanitised:
            from gpupool.server.sanitisers import SANITISERS

            sanitise = SANITISERS.get(a.op)
            if sanitise is not None:
                names = [x.name for x in a.func._schema.arguments]
                fix = sanitise(Bound(names, args_, kwargs_))
                out = a.func(*args_, **kwargs_)
                return (fix(out) if fix else out), args_, kwargs_
        return a.func(*args_, **kwargs_), args_, kwargs_

    return call


def run_attack(a: Attack, sanitised: bool = False, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The effect of one mutated call (see the module's docstring)."""
    call = _caller(a, sanitised)
    first = _fork_run(call, 0xA5, timeout)
    if first["effect"] != "ok":
        return first
    second = _fork_run(call, 0x5A, timeout)
    if second["effect"] != "ok":
        return second
    if first["digest"] != second["digest"]:
        # Note [Unwritten outputs]: a kernel may leave parts of a result it allocated unwritten
        # (CTC's log_alpha past each target's end), which then show the paint: no worse than
        # `torch.empty`, and confined to the lease's own worker. Only a result that still
        # differs when PyTorch fills its allocations is a read out of bounds.
        filled = [_fork_run(call, paint, timeout, fill=True) for paint in (0xA5, 0x5A)]
        if all(f["effect"] == "ok" for f in filled) and filled[0]["digest"] == filled[1]["digest"]:
            return {"effect": "ok", "why": "unwritten output"}
        return {"effect": "oob_read"}
    return first


def deterministic(op: str, func: Any, ex: oprecord.Example) -> bool:
    """Whether the unmutated call gives the same result whatever the heap holds."""
    a = Attack(op, "", "none", ex.source, func, ex.args, ex.kwargs)
    first, second = _fork_run(_caller(a, False), 0xA5, TIMEOUT), _fork_run(_caller(a, False), 0x5A, TIMEOUT)
    return first.get("digest") is not None and first.get("digest") == second.get("digest")


# ---- the sweep ---------------------------------------------------------------------------------


def sweep(ops: set[str] | None, sources: list[str] | None, sanitised: bool, verbose: bool) -> dict[str, Any]:
    listed = oplist.load().ops
    rec = oprecord.record(sources, verbose=False)
    by_op = oprecord.examples_by_op(rec)
    names = sorted((ops or listed) & set(by_op))
    findings: list[dict[str, Any]] = []
    swept, plain = [], []
    t0 = time.monotonic()
    for op in names:
        func = rec.funcs[op]
        exs = by_op[op][:2]
        tried = list(attacks(op, exs, func))
        if not tried:
            plain.append(op)
            continue
        swept.append(op)
        reads_ok = {ex.source: deterministic(op, func, ex) for ex in exs}
        worst: dict[tuple[str, str], dict[str, Any]] = {}
        for a in tried:
            res = run_attack(a, sanitised)
            if res["effect"] == "oob_read" and not reads_ok.get(a.source, False):
                res = {"effect": "ok"}  # the unmutated call varies too: not evidence
            if res["effect"] in UNSAFE:
                key = (a.arg, res["effect"])
                if key not in worst:
                    worst[key] = {"op": op, "arg": a.arg, "mutation": a.mutation, "effect": res["effect"],
                                  "source": a.source}
                    if verbose:
                        print(f"UNSAFE {op} {a.arg} {a.mutation}: {res}", flush=True)
        findings.extend(sorted(worst.values(), key=lambda f: (f["arg"], _RANK[f["effect"]])))
        if verbose:
            print(f"{op}: {len(tried)} mutations, {len(worst)} finding(s)", flush=True)
    return {
        "torch": str(torch.__version__),
        "generated": str(datetime.date.today()),
        "seconds": round(time.monotonic() - t0),
        "unsafe": findings,
        "swept": sorted(set(swept) - {f["op"] for f in findings}),
        "no_integer_args": plain,
        "not_recorded": sorted((ops or listed) - set(by_op)),
    }


def write(data: dict[str, Any], path: Path, command: str) -> None:
    """Diff-friendly: one finding or op per line."""
    lines = ["{", f'  "torch": {json.dumps(data["torch"])},', f'  "generated": {json.dumps(data["generated"])},',
             f'  "command": {json.dumps(command)},', '  "unsafe": [']
    lines += [f"    {json.dumps(f, sort_keys=True)}," for f in data["unsafe"]]
    if data["unsafe"]:
        lines[-1] = lines[-1].rstrip(",")
    lines.append("  ],")
    for i, key in enumerate(("swept", "no_integer_args", "not_recorded")):
        items = [f"    {json.dumps(x)}," for x in data[key]]
        if items:
            items[-1] = items[-1].rstrip(",")
        lines += [f'  "{key}": [', *items, "  ]" + ("," if i < 2 else "")]
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with the results for the ops `new` swept (or found without integer arguments)
    replacing `old`'s for them; an op is `not_recorded` only if neither run recorded it."""
    redone = set(new["swept"]) | set(new["no_integer_args"]) | {f["op"] for f in new["unsafe"]}
    unsafe = [f for f in old["unsafe"] if f["op"] not in redone] + new["unsafe"]
    return {
        "torch": new["torch"],
        "generated": new["generated"],
        "unsafe": sorted(unsafe, key=lambda f: (f["op"], f["arg"], _RANK[f["effect"]])),
        "swept": sorted((set(old["swept"]) - redone) | set(new["swept"])),
        "no_integer_args": sorted((set(old["no_integer_args"]) - redone) | set(new["no_integer_args"])),
        "not_recorded": sorted(set(old["not_recorded"]) - redone),
    }


def replay_findings(path: Path = SWEEP_FILE, sanitised: bool = True, ops: set[str] | None = None) -> list[dict[str, Any]]:
    """Re-run each recorded finding (its op, argument and mutation); returns each result."""
    data = json.loads(path.read_text())
    findings = [f for f in data["unsafe"] if ops is None or f["op"] in ops]
    rec = oprecord.record(sorted({f["source"] for f in findings}))
    by_op = oprecord.examples_by_op(rec)
    out = []
    for f in findings:
        exs = by_op.get(f["op"], [])
        match = [a for a in attacks(f["op"], exs[:2], rec.funcs[f["op"]]) if (a.arg, a.mutation) == (f["arg"], f["mutation"])] if exs else []
        if not match:
            out.append({**f, "now": "not reproduced (the recorded call changed)"})
            continue
        out.append({**f, "now": run_attack(match[0], sanitised)["effect"]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="", help="comma-separated canonical op names (default: the allowlist)")
    p.add_argument("--sources", default="", help="comma-separated oprecord sources (default: all)")
    p.add_argument("--sanitised", action="store_true", help="run the calls through the server's sanitisers")
    p.add_argument("--findings", action="store_true", help="only re-run the findings of the data file")
    p.add_argument("--out", type=Path, default=None, help=f"write the data file (default with no --ops: {SWEEP_FILE})")
    p.add_argument("--merge", action="store_true",
                   help="sweep only --ops/--sources and merge the results into the data file")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # Note: a forked child of a process with a thread pool may hang
    if a.findings:
        results = replay_findings(sanitised=a.sanitised)
        bad = [r for r in results if r["now"] in UNSAFE]
        for r in results:
            print(f"{r['op']} {r['arg']} {r['mutation']}: was {r['effect']}, now {r['now']}")
        print(f"{len(results)} findings re-run, {len(bad)} still unsafe")
        return 1 if bad else 0
    ops = {o.strip() for o in a.ops.split(",") if o.strip()} or None
    sources = [s.strip() for s in a.sources.split(",") if s.strip()] or None
    data = sweep(ops, sources, a.sanitised, a.verbose)
    for f in data["unsafe"]:
        print(f"UNSAFE {f['op']}: {f['arg']} {f['mutation']} -> {f['effect']}")
    print(f"{len(data['swept']) + len({f['op'] for f in data['unsafe']})} ops swept in {data['seconds']} s: "
          f"{len({f['op'] for f in data['unsafe']})} unsafe, {len(data['no_integer_args'])} without integer "
          f"arguments, {len(data['not_recorded'])} listed but never called by the sources")
    out = a.out or (SWEEP_FILE if (a.merge or (ops is None and sources is None)) and not a.sanitised else None)
    command = "tools/kernel_sweep.py" + "".join(" " + x for x in (argv or sys.argv[1:]))
    if a.merge and out is not None:
        old = json.loads(out.read_text())
        data, command = merge(old, data), f"{old['command']}; {command}"
    if out is not None:
        write(data, out, command)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
