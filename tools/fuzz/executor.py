"""Harness: a session's `Executor` (server/executor.py) on fuzzed command streams, in-process,
on the CPU device with a small share (`LIMIT`), as a worker runs it.

Each input is a stream of frames, read by a `FrameReader` and run by `serve_frame` until the
stream ends, after a fixed preamble that uploads a few tensors (corpus.PREAMBLE) so that every
input has handles to use. What counts as what (Note [Findings] in common.py):

- expected: `ProtocolError` and `ServerLost` (the worker ends the session with a `Refused` or
  silently) and `MemoryError` (the worker ends it with "out of host memory"), and every error
  the executor defers to the client (Note [Errors are deferred]);
- crash: any other exception out of `serve_frame` (the worker's "internal error"), a signal, or
  an input running past libFuzzer's `-timeout`;
- invariant: after the stream, the tensors the session keeps hold more than its share, or a
  storage the ledger counts less than it holds, or a kept view reaches outside its storage, or a
  reply the server sent does not decode with the client's decoder, or after `close()` the ledger
  still counts bytes;
- internal: a deferred op error raised by gpupool's own code (a sanitiser, an estimator, a check)
  rather than by torch's: reported, not failed on.

The process's data segment is capped as a worker's is (`memory.cap_process_data`), so an op that
allocates past the share fails the way it would on a server.
"""

from __future__ import annotations

import os
import random
import sys
import traceback

import atheris

with atheris.instrument_imports(include=["gpupool"]):
    import torch

    from gpupool.errors import ProtocolError, ServerLost
    from gpupool.protocol import messages as m
    from gpupool.protocol.framing import FrameReader, FrameWriter, Limits
    from gpupool.server.executor import Executor, OpFailed, _in_bounds
    from gpupool.server.memory import Budget, cap_process_data
    from gpupool.server.oppolicy import OpPolicy
    from gpupool.wholeops import RnnArgumentError

from tools.fuzz import corpus, mutate
from tools.fuzz.common import (
    FakeSocket,
    describe,
    exception_signature,
    join_frames,
    split_frames,
    write_seeds,
)

LIMIT = 16 * 1024 * 1024
DEVICE = torch.device("cpu")
PREAMBLE = join_frames([corpus.preamble_frame()])
MAX_FRAMES = 200
_policy: OpPolicy | None = None
_ctx: mutate.Context | None = None
_findings = None


def _sessions() -> list[list[tuple[bytes, list[bytes]]]]:
    out = corpus.seed_sessions()
    path = os.environ.get("GPUPOOL_FUZZ_RECORDED")
    if path and os.path.exists(path):
        out.append(corpus.load(path))
    return out


def context() -> mutate.Context:
    global _ctx
    if _ctx is None:
        sessions = _sessions()
        _ctx = mutate.Context(corpus.PREAMBLE_HANDLES + [h for s in sessions for h in mutate.handles_of(s)])
        _ctx.sessions = sessions
        _ctx.local = list(corpus.PREAMBLE_HANDLES)
    return _ctx


def _record(kind: str, sig: str, text: str, data: bytes) -> None:
    global _findings
    from tools.fuzz.libfuzzer import findings_here

    if _findings is None:
        _findings = findings_here()
    _findings.add(kind, sig, text, data)


#: Exception types that, raised by gpupool's own code, mean a check or a computation of ours
#: broke (torch's kernels raise RuntimeError, and the executor catches those on purpose).
BUG_TYPES = (TypeError, KeyError, AttributeError, IndexError, AssertionError, ZeroDivisionError,
             NameError, OverflowError, ValueError, RecursionError, LookupError)
#: Where the executor defers an error it expects, by the op name it records.
HANDLED = ("manual_seed", "set_rng_state")


def _from_gpupool(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "/gpupool/" in frames[-1].filename and isinstance(exc, BUG_TYPES)


def run_stream(data: bytes, policy: OpPolicy) -> tuple[Executor, FakeSocket, list[tuple[str, BaseException]]]:
    """Serve `PREAMBLE + data` as one session; returns the executor (not closed yet), what it
    sent, and the exceptions that are findings: ("crash", e) or ("internal", e)."""
    found: list[tuple[str, BaseException]] = []
    reader = FrameReader(FakeSocket(PREAMBLE + data), Limits(max_buffer_bytes=LIMIT + (1 << 20)))  # type: ignore[arg-type]
    out = FakeSocket()
    writer = FrameWriter(out)  # type: ignore[arg-type]
    ex = Executor(DEVICE, Budget(DEVICE, LIMIT), policy)
    record = ex._record

    def watched(seq: int, op: str, exc: BaseException, at: int = -1) -> None:
        if (op not in HANDLED and not isinstance(exc, (OpFailed, MemoryError, RnnArgumentError))
                and _from_gpupool(exc)):
            found.append(("internal", exc))
        record(seq, op, exc, at)

    ex._record = watched  # type: ignore[method-assign]
    try:
        for _ in range(MAX_FRAMES):
            if ex.serve_frame(reader, writer):
                break
    except (ProtocolError, ServerLost, MemoryError):
        pass
    except Exception as e:  # noqa: BLE001 - the worker's "internal error": a crash
        found.append(("crash", e))
    return ex, out, found


def check_after(ex: Executor, out: FakeSocket) -> list[str]:
    """The invariants of a served session (and of closing it); each broken one, described."""
    broken = []
    storages: dict[int, int] = {}
    for h, t in ex.table.items():
        if not _in_bounds(t):
            broken.append(f"handle kept with a view outside its storage: {h} {tuple(t.shape)} {t.stride()} +{t.storage_offset()}")
        s = t.untyped_storage()
        storages[s._cdata] = s.nbytes()
    held = sum(storages.values())
    if held > LIMIT:
        broken.append(f"session holds more than its share: {held} > {LIMIT} bytes")
    if held > ex.ledger.used:
        broken.append(f"ledger counts less than the session holds: {ex.ledger.used} < {held} bytes")
    frames = split_frames(out.sent)
    if frames is None:
        broken.append("the executor's replies are not whole frames")
    else:
        for msg, _ in frames:
            try:
                m.decode(m.server_message_decoder, msg, "reply")
            except ProtocolError as e:
                broken.append(f"a reply the client cannot decode: {str(e)[:120]}")
                break
    ex.close()
    if ex.ledger.used or len(ex.ledger):
        broken.append(f"ledger still counts {ex.ledger.used} bytes in {len(ex.ledger)} storages after close")
    return broken


def test_one(data: bytes) -> None:
    global _policy
    if _policy is None:
        _policy = OpPolicy()
    ex, out, found = run_stream(data, _policy)
    for kind, e in found:
        _record(kind, exception_signature(e, "executor: "), describe(e), data)
    try:
        broken = check_after(ex, out)
    except Exception as e:  # noqa: BLE001 - closing or measuring failed: a crash too
        _record("crash", exception_signature(e, "executor close: "), describe(e), data)
        return
    for b in broken:
        _record("invariant", "executor: " + b.split(":")[0], b, data)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    # Note: an exception here would end libFuzzer (it is the harness's, not the code's): a bug
    # of the mutator falls back to libFuzzer's own mutation.
    try:
        return _mutate(data, max_size, seed)
    except Exception:  # noqa: BLE001
        return atheris.Mutate(data, max_size)


def _mutate(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    frames = split_frames(data, max_frames=MAX_FRAMES)
    if frames is None or rng.random() < 0.1:
        return atheris.Mutate(data, max_size)
    out = join_frames(mutate.mutate_frames(frames, rng, context(), typed=rng.random() < 0.85))
    while len(out) > max_size and frames:
        frames = frames[:-1]
        out = join_frames(frames)
    return out[:max_size]


def seeds() -> list[bytes]:
    out = []
    for s in _sessions():
        out.append(join_frames(s))
        out.extend(join_frames([f]) for f in s[:40])
    rng = random.Random(0)
    ctx = context()
    out.extend(join_frames([mutate.gen_frame(rng, ctx) for _ in range(3)]) for _ in range(30))
    return out


def main() -> None:
    global _policy
    torch.set_num_threads(1)
    _policy = OpPolicy()
    context()
    cap_process_data(LIMIT)
    write_seeds(sys.argv, seeds())
    atheris.Setup(sys.argv, test_one, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
