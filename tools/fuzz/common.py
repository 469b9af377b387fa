"""What every harness shares: its result, the findings it keeps, in-memory sockets, frames.

Note [Findings]: a finding is something the code under test must never do, with the input that
made it do it, written at once (a harness may die on the next input) as a reproducer file under
the run's work directory and one JSON line in `findings.jsonl` beside it. Findings are kept once
per signature (kind, exception type and where it was raised), counted every time. Kinds:

- `crash`: an exception a caller does not expect (not `gpupool.errors`' own, nor the documented
  `MemoryError` of a full share), a segfault, or a worker that died by a signal;
- `hang`: an input that ran past its deadline (libFuzzer's `-timeout`, or a live connection
  that did not finish in time);
- `leftover`: worker processes still running after every session closed;
- `invariant`: the code ran but broke a property the harness checks (a differential mismatch,
  a budget overrun, a reply the client cannot decode, a server error answer);
- `internal`: an op error the executor reported to the client that came from gpupool's own
  code rather than torch's (deferred, so not a crash, but a check that should have refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Kinds that fail a run (`internal` is reported, not failed on: Note [Findings]).
FAILING = ("crash", "hang", "leftover", "invariant")


@dataclass
class Result:
    """One harness run: how much it did and what it found."""

    harness: str
    unit: str  # what `count` counts: "inputs", "frames", "cases"
    count: int = 0
    seconds: float = 0.0
    crashes: int = 0
    hangs: int = 0
    leftover_workers: int = 0
    invariants: int = 0
    internal: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)  # one per signature
    error: str = ""  # the harness itself failed to run (not a finding)

    @property
    def failed(self) -> bool:
        return bool(self.crashes or self.hangs or self.leftover_workers or self.invariants or self.error)

    def summary(self) -> str:
        rate = self.count / self.seconds if self.seconds else 0.0
        extra = "".join(f", {k} {v}" for k, v in self.extra.items())
        line = (f"fuzz {self.harness}: {self.count} {self.unit} in {self.seconds:.1f} s ({rate:.0f}/s), "
                f"crashes {self.crashes}, hangs {self.hangs}, leftover workers {self.leftover_workers}, "
                f"invariants {self.invariants}, internal {self.internal}{extra}")
        return line + (f"; HARNESS ERROR: {self.error}" if self.error else "")

    def add_findings(self, store: Findings) -> None:
        """Count the findings `store` kept into this result."""
        for f in store.load():
            self.findings.append(f)
            n = int(f.get("count", 1))
            kind = f["kind"]
            if kind == "crash":
                self.crashes += n
            elif kind == "hang":
                self.hangs += n
            elif kind == "leftover":
                self.leftover_workers += n
            elif kind == "invariant":
                self.invariants += n
            elif kind == "internal":
                self.internal += n


class Findings:
    """The findings of one harness, in `folder` (Note [Findings]); safe to share across threads
    of one process, and across processes appending to the same `findings.jsonl`."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "findings.jsonl"
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}

    def add(self, kind: str, signature: str, message: str, reproducer: bytes | None = None,
            suffix: str = ".bin") -> bool:
        """Record one occurrence; the first of its signature also writes its reproducer.
        Returns True for a new signature."""
        with self._lock:
            n = self._seen.get(signature, 0)
            self._seen[signature] = n + 1
            repro = ""
            if n == 0 and reproducer is not None:
                name = f"{kind}-{hashlib.sha1(reproducer).hexdigest()[:16]}{suffix}"
                (self.folder / name).write_bytes(reproducer)
                repro = str(self.folder / name)
            line = {"kind": kind, "signature": signature, "message": message[:4000], "reproducer": repro,
                    "first": n == 0, "pid": os.getpid(), "time": time.time()}
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
            return n == 0

    def load(self) -> list[dict[str, Any]]:
        """Every signature recorded (by any process), with `count` occurrences and its reproducer."""
        if not self.path.exists():
            return []
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for raw in self.path.read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            key = (line["kind"], line["signature"])
            if key not in merged:
                merged[key] = dict(line, count=0)
            merged[key]["count"] += 1
            if line.get("reproducer") and not merged[key].get("reproducer"):
                merged[key]["reproducer"] = line["reproducer"]
        return list(merged.values())


def exception_signature(e: BaseException, prefix: str = "") -> str:
    """Type and the innermost frames of `e`: one finding per distinct place a bug raises from."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/gpupool/" in f.filename or "/tools/fuzz/" in f.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    at = f"{Path(where.filename).name}:{where.lineno}:{where.name}" if where else "?"
    inner = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{prefix}{type(e).__name__} at {at} (innermost {inner})"


def describe(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]


# ---- in-memory sockets -------------------------------------------------------------------------


class FakeSocket:
    """The socket calls `FrameReader` and `FrameWriter` make, over bytes in memory.

    Receives hand out at most the next of `chunks` bytes each (cycling), so short reads happen
    where a real socket would make them; at the end of `data` the peer has closed (0 bytes), or
    with `reset`, the connection breaks (`ConnectionResetError`). Sent bytes are kept in `sent`.
    """

    def __init__(self, data: bytes = b"", chunks: list[int] | tuple[int, ...] = (), reset: bool = False) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._chunks = [c for c in chunks if c > 0] or [1 << 30]
        self._i = 0
        self._reset = reset
        self.sent = bytearray()
        self.recvs = 0

    def settimeout(self, t: float | None) -> None:
        pass

    def recv_into(self, view: memoryview, nbytes: int = 0) -> int:
        self.recvs += 1
        n = nbytes or view.nbytes
        left = len(self._data) - self._pos
        if left == 0:
            if self._reset:
                raise ConnectionResetError("connection reset by fuzzed peer")
            return 0
        n = min(n, left, self._chunks[self._i % len(self._chunks)])
        self._i += 1
        view[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def sendall(self, b: Any) -> None:
        self.sent += b

    @property
    def consumed(self) -> int:
        return self._pos


def split_frames(stream: bytes | bytearray | memoryview, max_frames: int = 10_000) -> list[tuple[bytes, list[bytes]]] | None:
    """A byte stream of whole, well-formed frames as (message, buffers); None if it is not one."""
    from gpupool.protocol.framing import _HEAD, _LEN, MAGIC

    out: list[tuple[bytes, list[bytes]]] = []
    view = memoryview(bytes(stream))
    pos = 0
    while pos < len(view):
        if len(out) >= max_frames or len(view) - pos < _HEAD.size:
            return None
        magic, nbufs, msglen = _HEAD.unpack_from(view, pos)
        pos += _HEAD.size
        if magic != MAGIC or len(view) - pos < 8 * nbufs:
            return None
        sizes = [n for (n,) in _LEN.iter_unpack(view[pos:pos + 8 * nbufs])]
        pos += 8 * nbufs
        if len(view) - pos < msglen + sum(sizes):
            return None
        msg = bytes(view[pos:pos + msglen])
        pos += msglen
        bufs = []
        for n in sizes:
            bufs.append(bytes(view[pos:pos + n]))
            pos += n
        out.append((msg, bufs))
    return out


def join_frames(frames: list[tuple[bytes, list[bytes]]]) -> bytes:
    """The byte stream of `frames` (each a message and its buffers), as `FrameWriter` sends it."""
    from gpupool.protocol.framing import encode_header

    parts: list[bytes] = []
    for msg, bufs in frames:
        parts.append(encode_header(len(msg), [len(b) for b in bufs]))
        parts.append(msg)
        parts.extend(bufs)
    return b"".join(parts)


def work_dir(base: str | os.PathLike[str] | None, harness: str) -> Path:
    """The folder a harness keeps its corpus and findings in, under the run's `base`."""
    import tempfile

    root = Path(base) if base else Path(tempfile.mkdtemp(prefix="gpupool-fuzz-"))
    d = root / harness
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_seeds(argv: list[str], seeds: list[bytes]) -> None:
    """In a libFuzzer child: put `seeds` in its corpus folder (the first argument) if it is empty."""
    folders = [a for a in argv[1:] if not a.startswith("-")]
    if not folders:
        return
    corpus = Path(folders[0])
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    for s in seeds:
        (corpus / f"seed-{hashlib.sha1(s).hexdigest()[:16]}").write_bytes(s)


def stop_process(proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
