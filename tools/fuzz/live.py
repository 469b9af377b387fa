"""Harness: mutated frames against a live `python -m gpupool.server`, over real sockets.

Two kinds of connection run in parallel threads until the time or the frame count is spent:

- before the handshake (`_prehandshake`): a mutated `Hello` (a field changed, its bytes
  changed), garbage, a header whose lengths lie, a hello with buffers, several frames, nothing
  at all, or now and then a slow one that stops half-way. Each connection must end (a
  `Refused`, then the close) within the handshake deadline and a margin, whatever it sent.
  Each thread connects from its own loopback address (127.0.0.N), so the listener's per-peer
  limits (Note [Listener limits] in server/gate.py) stay out of the way of the count;
- after a valid handshake (`_session`): first a recorded real command stream (a small model's
  training steps, `corpus.record`, or the built seeds) replayed, then mutated frames built from
  it and generated ops (`mutate.py`), many per connection: a frame that the server's own decoder
  would refuse ends the session, so such frames are held back for the connection's last frame
  (`killer`), with a truncated frame, a lying header, a `Bye` or a plain close. Replies are
  drained by a thread; every `CHECKPOINT` frames the sender waits until the server has answered
  everything it sent, which bounds how long any frame may take (`HANG_S`).

After each session: its worker process exits (found by its pid in the server's log) and did not
die by a signal. After the run: the server is alive, a fresh well-formed client gets correct
answers, no worker is left beyond the warm spare, and the log has no internal error.

    python -m tools.fuzz.live replay REPRODUCER.bin   # a session's frames against a fresh server
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tools.fuzz import corpus, mutate
from tools.fuzz.common import Findings, Result, join_frames, split_frames, stop_process

from gpupool.errors import ProtocolError, ServerLost
from gpupool.protocol import messages as m
from gpupool.protocol.framing import FrameReader, encode_header
from gpupool.protocol.version import PROTOCOL_VERSION

TOKEN = "fuzz-token"
HANDSHAKE_TIMEOUT = 2.0
MEMORY_LIMIT = 64 * 1024 * 1024
HANG_S = 30.0  # longest a frame's answers, or a connection's end, may take
CHECKPOINT = 32
FRAMES_PER_SESSION = 20000


_SESSION_LINE = re.compile(r"session (\w+) for .* worker pid (\d+)")
_EXIT_LINE = re.compile(r"worker (\d+) exited \((-?\d+|None)\)")


# ---- the server --------------------------------------------------------------------------------


class Server:
    """A `python -m gpupool.server` process with one CPU-backed device; its log is kept."""

    def __init__(self, log_path: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", GPUPOOL_WORKER_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                               os.environ.get("PYTHONPATH", "")]))
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.server", "--listen", "127.0.0.1:0", "--token", TOKEN,
             "--cpu-gpus", "1", "--memory-limit", str(MEMORY_LIMIT), "--handshake-timeout", str(HANDSHAKE_TIMEOUT)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.workers: dict[str, int] = {}  # session -> worker pid, from the log
        self.exits: dict[int, str] = {}  # worker pid -> exit status, from the log
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited early:\n" + "".join(self.lines))
            self._keep(line)
            if "listening on" in line:
                self.address = line.rsplit(" ", 1)[1].strip()
                break
        else:
            raise RuntimeError("server did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _keep(self, line: str) -> None:
        found = _SESSION_LINE.search(line)
        if found:
            self.workers[found.group(1)] = int(found.group(2))
        found = _EXIT_LINE.search(line)
        if found:
            self.exits[int(found.group(1))] = found.group(2)
        self.lines.append(line)
        self._log.write(line)
        self._log.flush()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._keep(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        out: list[int] = []
        try:
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                    out += [int(p) for p in f.read().split()]
        except OSError:
            pass
        return out

    def worker_of(self, session: str, wait: float = 10.0) -> int | None:
        deadline = time.monotonic() + wait
        while session not in self.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.workers.get(session)

    def exit_status(self, pid: int, wait: float) -> str | None:
        """The worker's exit status as the listener logged it, once it has."""
        deadline = time.monotonic() + wait
        while pid not in self.exits and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.exits.get(pid)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


# ---- raw connections ---------------------------------------------------------------------------


def connect(address: str, source: str | None = None, timeout: float = HANG_S) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def hello_bytes(token: str = TOKEN, protocol: int = PROTOCOL_VERSION, **fields: Any) -> bytes:
    return m.plain_encoder.encode(m.Hello(protocol=protocol, token=token, client="fuzz", **fields))


def read_replies(sock: socket.socket, deadline: float, stop_at_welcome: bool = False) -> tuple[list[Any], str]:
    """Every reply until the server closes; and how it ended: "closed", "timeout", "undecodable"
    (or "welcome", with `stop_at_welcome`)."""
    reader = FrameReader(sock, deadline=deadline)
    out: list[Any] = []
    while True:
        try:
            raw, _ = reader.read_message()
        except ServerLost as e:
            return out, "timeout" if "timed out" in str(e) else "closed"
        except ProtocolError:
            return out, "undecodable"
        try:
            out.append(m.decode(m.server_message_decoder, raw, "reply"))
        except ProtocolError:
            return out, "undecodable"
        if stop_at_welcome and isinstance(out[-1], m.Welcome):
            return out, "welcome"


def _admissible(payload: bytes) -> bool:
    """Whether `payload` starts with a hello that opens a session (right token and version)."""
    frames = split_frames(payload[:8 + int.from_bytes(payload[4:8], "little")]) if len(payload) >= 8 else None
    if not frames:
        return False
    try:
        h = m.decode(m.hello_decoder, frames[0][0], "hello")
    except ProtocolError:
        return False
    return h.token == TOKEN and h.protocol == PROTOCOL_VERSION


def healthy(address: str) -> str | None:
    """A well-formed session's answers are right; None, or what went wrong."""
    try:
        s = connect(address)
        s.sendall(join_frames([(hello_bytes(), [])]))
        reader = FrameReader(s)
        welcome = m.decode(m.server_message_decoder, reader.read_message()[0], "reply")
        if not isinstance(welcome, m.Welcome):
            return f"no welcome: {welcome}"
        data = struct.pack("<12f", *range(12))
        up, buf = corpus.upload(1, 1, "float32", [3, 4], data)
        s.sendall(join_frames([corpus.frame([up, m.Op(2, "aten::add.Tensor", [corpus.ref(1), corpus.ref(1)], {}, [2]),
                                             m.Fetch(2)], [buf])]))
        reply = m.decode(m.server_message_decoder, reader.read_message()[0], "reply")
        if not isinstance(reply, m.Data) or reply.error is not None:
            return f"fetch failed: {reply}"
        got = struct.unpack("<12f", reader.read_buffer())
        if list(got) != [2.0 * i for i in range(12)]:
            return f"wrong answer {got}"
        s.sendall(join_frames([corpus.frame([m.Bye()])]))
        s.close()
        return None
    except (OSError, ProtocolError, ServerLost) as e:
        return f"{type(e).__name__}: {e}"


# ---- the fuzzer --------------------------------------------------------------------------------


class Live:
    def __init__(self, server: Server, findings: Findings, frames: list[tuple[bytes, list[bytes]]],
                 deadline: float, max_frames: int, seed: int, frames_per_session: int = FRAMES_PER_SESSION,
                 short_sessions: float = 0.2) -> None:
        import torch

        from gpupool.server.executor import Executor

        self.server = server
        self.findings = findings
        self.pool = frames
        self.deadline = deadline
        self.max_frames = max_frames
        self.seed = seed
        self.frames_per_session = frames_per_session
        self.short_sessions = short_sessions
        self.lock = threading.Lock()
        self.pre_frames = 0
        self.post_frames = 0
        self.connections = 0
        self.sessions = 0
        self.session_ends: dict[str, int] = {}
        self.pre_outcomes: dict[str, int] = {}
        self.harness_errors: dict[str, int] = {}
        self.handles = mutate.handles_of(frames) + corpus.PREAMBLE_HANDLES
        self.judged: set[int] = set()  # workers whose exit `_judge` checked
        # The server's own decoder, to hold back frames it would refuse (they end a session).
        self.decoder = Executor(torch.device("cpu"), 1).decoder

    def done(self) -> bool:
        return time.monotonic() > self.deadline or self.pre_frames + self.post_frames >= self.max_frames

    def _count(self, table: dict[str, int], key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1

    # -- before the handshake --

    def prehandshake(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        source = f"127.0.0.{10 + index}"
        while not self.done():
            try:
                self._one_hello(rng, source)
            except Exception as e:  # noqa: BLE001 - the harness's own bug: counted, not hidden
                self._count(self.harness_errors, f"{type(e).__name__}: {e}"[:120])

    def _one_hello(self, rng: random.Random, source: str) -> None:
        payload, frames, slow = self._hello_payload(rng)
        try:
            s = connect(self.server.address, source)
        except OSError as e:
            self._count(self.pre_outcomes, f"connect failed: {type(e).__name__}")
            time.sleep(0.05)
            return
        start = time.monotonic()
        try:
            s.sendall(payload)
            if not slow:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # A mutation may have made a valid hello: its Welcome waits for a worker to start.
        limit = HANG_S if _admissible(payload) else HANDSHAKE_TIMEOUT + (5.0 if slow else 3.0)
        replies, how = read_replies(s, start + limit, stop_at_welcome=True)
        s.close()
        with self.lock:
            self.pre_frames += frames
            self.connections += 1
        kinds = ",".join(type(r).__name__ + (f":{r.code}" if isinstance(r, m.Refused) else "") for r in replies)
        self._count(self.pre_outcomes, f"{kinds or 'nothing'} then {how}")
        if how == "welcome":  # a mutation that made a valid hello: the session ends at the close
            return
        if how == "timeout":
            self.findings.add("hang", f"live: handshake not ended within {HANDSHAKE_TIMEOUT:g} s + margin",
                              f"sent {len(payload)} bytes, slow={slow}; got {kinds}", payload)
        elif how == "undecodable":
            self.findings.add("invariant", "live: undecodable reply before the handshake", repr(payload[:200]), payload)

    def _hello_payload(self, rng: random.Random) -> tuple[bytes, int, bool]:
        """(bytes to send, frames they hold, whether to leave the connection open half-way)."""
        r = rng.random()
        # Note: never the right token (a session costs a worker process); the protocol version
        # is checked first, so a wrong one with the right token reaches that refusal.
        base = rng.choice([hello_bytes(token="wrong"), hello_bytes(token="wrong", lease="x.y.z"),
                           hello_bytes(token="wrong", hold=True), hello_bytes(token=TOKEN[:-1], gpu=3),
                           hello_bytes(token=""), hello_bytes(token="wrong", protocol=PROTOCOL_VERSION + 1)])
        if r < 0.45:
            msg = mutate.mutate_message(base, rng, None, typed=rng.random() < 0.6) or base
            return join_frames([(msg, [])]), 1, False
        if r < 0.7:
            return join_frames([(mutate.mutate_bytes(base, rng), [])]), 1, False
        if r < 0.78:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))), 1, False
        if r < 0.9:
            head = bytearray(encode_header(len(base), []))
            kind = rng.randrange(5)
            if kind == 0:  # the message is longer than announced, or shorter
                struct.pack_into("<I", head, 4, max(0, len(base) + rng.choice((-5, -1, 1, 7, 1000, 1 << 20))) & 0xFFFFFFFF)
            elif kind == 1:  # buffers, which a hello may not carry
                head = bytearray(encode_header(len(base), [rng.choice((0, 1, 1 << 30))] * rng.randrange(1, 4)))
            elif kind == 2:
                head[0:2] = rng.choice((b"PG", b"\x00\x00", b"GE"))
            elif kind == 3:
                return bytes(head)[: rng.randrange(1, 8)], 1, False  # a truncated header
            else:
                struct.pack_into("<H", head, 2, 0xFFFF)
            return bytes(head) + base, 1, False
        if r < 0.96:
            n = rng.randrange(2, 5)
            return join_frames([(base, [])] * n) + mutate.mutate_bytes(base, rng), n, False
        if r < 0.995:
            return b"", 0, False  # connect and close
        return join_frames([(base, [])])[: rng.randrange(1, len(base))], 1, True  # stops half-way

    # -- sessions --

    def session_loop(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + 500 + index)
        while not self.done():
            try:
                self._session(rng)
            except Exception as e:  # noqa: BLE001 - the harness's own bug: counted, not hidden
                self._count(self.harness_errors, f"{type(e).__name__}: {e}"[:120])

    def _session(self, rng: random.Random) -> None:
        try:
            s = connect(self.server.address)
            s.sendall(join_frames([(hello_bytes(), [])]))
            reader = FrameReader(s, deadline=time.monotonic() + HANG_S)
            welcome = m.decode(m.server_message_decoder, reader.read_message()[0], "reply")
        except (OSError, ProtocolError, ServerLost) as e:
            self.findings.add("hang" if "timed out" in str(e) else "crash", f"live: a valid hello got no welcome: {type(e).__name__}",
                              str(e))
            time.sleep(0.5)
            return
        if not isinstance(welcome, m.Welcome):
            self._count(self.session_ends, f"no session: {welcome}"[:80])
            time.sleep(0.2)
            return
        with self.lock:
            self.sessions += 1
        reader.deadline = None
        s.settimeout(None)
        drain = _Drainer(s, reader)
        drain.start()
        sent: list[tuple[bytes, list[bytes]]] = []
        expected = 0
        ctx = mutate.Context(self.handles)
        ctx.local = list(self.handles)
        ctx.sessions = []
        ended_by_us = ""
        # Note: mostly long sessions: each costs a worker process, and its first ops import
        # parts of torch (seconds); a few short ones end sooner, through their last frame.
        per_session = self.frames_per_session if rng.random() >= self.short_sessions else rng.choice((20, 200))

        def send(frame: tuple[bytes, list[bytes]]) -> bool:
            nonlocal expected
            try:
                s.sendall(join_frames([frame]))
            except OSError:
                return False
            sent.append(frame)
            del sent[:-400]
            with self.lock:
                self.post_frames += 1
            expected += mutate.replies_expected(mutate.commands(frame[0]) or [])
            return True

        # 1: the real stream, as recorded, sets up tensors the mutations then work on
        for f in self.pool:
            if drain.ended.is_set() or not send(f):
                break
        # 2: frames the server's decoder accepts, many per connection
        n = 0
        while not drain.ended.is_set() and n < per_session and not self.done():
            n += 1
            frame = self._session_frame(rng, ctx)
            if frame is None:
                continue
            if not send(frame):
                break
            if n % CHECKPOINT == 0 or expected - drain.replies > 64:
                if not drain.wait_for(expected, HANG_S):
                    self._hang(sent, f"no answer to {expected - drain.replies} requests within {HANG_S:g} s")
                    ended_by_us = "hang"
                    break
        if drain.ended.is_set() and not ended_by_us:
            ended_by_us = "mid-session"  # before any frame meant to end it
        # 3: the last frame: anything at all. The server ends the session, or answers a sync
        # after it (a mutation it took), or (after a half-close) sees the client hang up.
        if not drain.ended.is_set() and not ended_by_us:
            ended_by_us = self._last_frame(s, rng, send)
            if ended_by_us in ("mutated frame", "mutated bytes"):
                send(corpus.frame([m.Sync()]))
                if not drain.wait_for(expected, HANG_S):
                    self._hang(sent, f"no answer or end after the last frame within {HANG_S:g} s ({ended_by_us})")
        # Note: shutdown before close: a close alone, while the drainer is blocked in recv on
        # the socket, neither wakes it nor sends the FIN (the kernel keeps the socket open).
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if not drain.ended.wait(HANG_S):
            self._hang(sent, f"the session did not end within {HANG_S:g} s of the client closing ({ended_by_us})")
        s.close()
        self._judge(welcome.session, drain, ended_by_us, sent)

    def _session_frame(self, rng: random.Random, ctx: mutate.Context) -> tuple[bytes, list[bytes]] | None:
        r = rng.random()
        if r < 0.35:
            frame = mutate.gen_frame(rng, ctx)
        elif r < 0.45 or not self.pool:
            frame = rng.choice(self.pool) if self.pool else mutate.gen_frame(rng, ctx)
        else:
            frame = mutate.mutate_frame(rng.choice(self.pool), rng, ctx, typed=True)
        return frame if self._accepted(frame) else None

    def _accepted(self, frame: tuple[bytes, list[bytes]]) -> bool:
        """Whether the server's decoder takes the frame and its uploads match its buffers."""
        msg, bufs = frame
        try:
            batch = m.decode(self.decoder, msg, "batch")
        except ProtocolError:
            return False
        ups = [c.nbytes for c in batch.cmds if isinstance(c, m.Upload)]
        if [len(b) for b in bufs] != ups:
            return False
        for c in batch.cmds:
            if isinstance(c, m.Bye):
                return False  # the end of a session is for the last frame
        return True

    def _last_frame(self, s: socket.socket, rng: random.Random, send: Any) -> str:
        r = rng.random()
        frame = rng.choice(self.pool) if self.pool else corpus.frame([m.Sync()])
        try:
            if r < 0.35:
                send((mutate.mutate_message(frame[0], rng, None, typed=False) or mutate.mutate_bytes(frame[0], rng), frame[1]))
                return "mutated frame"
            if r < 0.5:
                send((mutate.mutate_bytes(frame[0], rng), frame[1]))
                return "mutated bytes"
            if r < 0.6:
                raw = join_frames([frame])
                s.sendall(raw[: rng.randrange(1, max(2, len(raw)))])
                s.shutdown(socket.SHUT_WR)
                return "truncated frame, then close"
            if r < 0.7:
                head = bytearray(encode_header(len(frame[0]), [len(b) for b in frame[1]]))
                struct.pack_into("<I", head, 4, rng.choice((0, 1, 0xFFFFFFFF, len(frame[0]) + 3)))
                s.sendall(bytes(head) + frame[0] + b"".join(frame[1]))
                s.shutdown(socket.SHUT_WR)
                return "lying header"
            if r < 0.85:
                send(corpus.frame([m.Sync(), m.Bye()]))
                return "bye"
            s.shutdown(socket.SHUT_WR)
            return "close"
        except OSError:
            return "send failed"

    def _hang(self, sent: list[tuple[bytes, list[bytes]]], why: str) -> None:
        self.findings.add("hang", f"live: {why.split(' within')[0]}", why, join_frames(sent))

    def _judge(self, session: str, drain: _Drainer, ended_by_us: str, sent: list[tuple[bytes, list[bytes]]]) -> None:
        refused = drain.refused
        key = (f"refused {refused.code}" if refused is not None else "closed") + f" ({ended_by_us or 'by the server'})"
        self._count(self.session_ends, key)
        if ended_by_us == "mid-session" and refused is not None and refused.code not in ("oom",):
            # Every frame before the last one passed the server's own decoder and buffer checks.
            self.findings.add("invariant", f"live: a frame the decoder accepts ended the session: {_shape(refused.message)}",
                              refused.message, join_frames(sent))
        if refused is not None and refused.code == "internal":
            self.findings.add("crash", f"live: internal error: {_shape(refused.message)}", refused.message, join_frames(sent))
        if drain.undecodable:
            self.findings.add("invariant", "live: a reply the client cannot decode", drain.undecodable, join_frames(sent))
        pid = self.server.worker_of(session)
        if pid is None:
            self.findings.add("invariant", "live: no worker logged for a session", session)
            return
        self.judged.add(pid)
        status = self.server.exit_status(pid, HANG_S)
        if status is None:
            self.findings.add("leftover", "live: a worker outlived its session", f"worker {pid} of session {session}",
                              join_frames(sent))
        elif status.startswith("-"):
            self.findings.add("crash", f"live: worker killed by signal {-int(status)}", f"worker {pid}: {ended_by_us}",
                              join_frames(sent))
        elif status not in ("0", "None"):
            self.findings.add("crash", f"live: worker exited {status}", f"worker {pid}", join_frames(sent))


def _shape(message: str) -> str:
    return re.sub(r"\d+", "N", message)[:100]


class _Drainer(threading.Thread):
    """Reads a session's replies as they come, counting them, until the server ends it."""

    def __init__(self, sock: socket.socket, reader: FrameReader) -> None:
        super().__init__(daemon=True)
        self.sock, self.reader = sock, reader
        self.replies = 0
        self.refused: m.Refused | None = None
        self.undecodable = ""
        self.ended = threading.Event()
        self._cond = threading.Condition()

    def run(self) -> None:
        try:
            while True:
                raw, _ = self.reader.read_message()
                try:
                    r = m.decode(m.server_message_decoder, raw, "reply")
                except ProtocolError as e:
                    self.undecodable = f"{e}: {bytes(raw[:200])!r}"
                    break
                if isinstance(r, m.Refused):
                    self.refused = r
                with self._cond:
                    self.replies += 1
                    self._cond.notify_all()
        except (ServerLost, ProtocolError, OSError):
            pass
        finally:
            self.ended.set()
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        """Until `n` replies came or the session ended; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.replies < n and not self.ended.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


# ---- a run -------------------------------------------------------------------------------------


def recorded_frames(server: Server, workdir: Path) -> list[tuple[bytes, list[bytes]]] | None:
    """A real client's training steps through this server (recorded once per work folder)."""
    path = workdir / "recorded.msgpack"
    if not path.exists():
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "src"), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "tools.fuzz.corpus", "record", server.address, TOKEN, str(path)],
                              capture_output=True, text=True, timeout=180, env=env)
        if proc.returncode != 0 or not path.exists():
            return None
    return corpus.load(path)


def without_bye(frames: list[tuple[bytes, list[bytes]]]) -> list[tuple[bytes, list[bytes]]]:
    out = []
    for msg, bufs in frames:
        cmds = mutate.commands(msg)
        if cmds is not None and any(isinstance(c, list) and c and c[0] == "bye" for c in cmds):
            cmds = [c for c in cmds if not (isinstance(c, list) and c and c[0] == "bye")]
            if not cmds:
                continue
            msg = mutate.batch(cmds)
        out.append((msg, bufs))
    return out


def run(seconds: float, workdir: Path, max_frames: int = 10**12, sessions: int = 2, prehandshake: int = 2,
        record: bool = True, seed: int | None = None, frames_per_session: int = FRAMES_PER_SESSION,
        short_sessions: float = 0.2) -> Result:
    result = Result("live", "frames")
    findings = Findings(workdir / "findings")
    start = time.monotonic()
    seed = seed if seed is not None else int(time.time())
    server = Server(workdir / "server.log")
    try:
        frames = recorded_frames(server, workdir) if record else None
        result.extra["stream"] = f"recorded ({len(frames)} frames)" if frames else "built seeds"
        if not frames:
            frames = [f for s in corpus.seed_sessions() for f in s]
        frames = without_bye(frames)
        fuzz_start = time.monotonic()
        live = Live(server, findings, frames, fuzz_start + max(1.0, seconds - (fuzz_start - start)), max_frames, seed,
                    frames_per_session, short_sessions)
        threads = [threading.Thread(target=live.prehandshake, args=(i,), daemon=True) for i in range(prehandshake)]
        threads += [threading.Thread(target=live.session_loop, args=(i,), daemon=True) for i in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 4 * HANG_S + 60)
            if t.is_alive():
                findings.add("hang", "live: a fuzzing connection never finished", t.name)
        fuzz_seconds = time.monotonic() - fuzz_start
        _final_checks(server, findings, live.judged)
        result.count = live.pre_frames + live.post_frames
        result.extra.update({
            "pre-handshake frames": live.pre_frames, "session frames": live.post_frames,
            "connections": live.connections, "sessions": live.sessions,
            "fuzzing s": round(fuzz_seconds, 1), "seed": seed,
        })
        result.extra["session ends"] = dict(sorted(live.session_ends.items(), key=lambda kv: -kv[1]))
        result.extra["handshake outcomes"] = dict(sorted(live.pre_outcomes.items(), key=lambda kv: -kv[1])[:8])
        if live.harness_errors:
            result.error = f"the harness itself failed: {live.harness_errors}"
    except Exception as e:  # noqa: BLE001 - the harness could not run: say so, do not hide it
        result.error = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
    result.seconds = time.monotonic() - start
    result.add_findings(findings)
    return result


def _final_checks(server: Server, findings: Findings, judged: set[int]) -> None:
    if not server.alive():
        findings.add("crash", "live: the server process died", server.log[-3000:])
        return
    problem = healthy(server.address)
    if problem is not None:
        findings.add("crash", "live: a fresh well-formed client failed", problem)
    # Every session is closed: only the warm spare may remain (it may be starting again).
    deadline = time.monotonic() + HANG_S
    kids = server.children()
    while len(kids) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        kids = server.children()
    if len(kids) > 1:
        findings.add("leftover", "live: workers left after every session closed", f"children {kids}")
    log = server.log
    for pat, what in [(r"internal error", "internal error in the log"), (r"Traceback", "traceback in the log")]:
        for found in re.finditer(pat, log):
            findings.add("crash", f"live: {what}", log[max(0, found.start() - 500):found.end() + 1500])
    for pid, status in server.exits.items():  # workers of sessions `_judge` did not see (a mutated hello's)
        if pid not in judged and status.startswith("-"):
            findings.add("crash", f"live: worker killed by signal {-int(status)}", f"worker {pid}")


# ---- replaying a reproducer --------------------------------------------------------------------


def replay(path: str) -> None:
    """Send a session reproducer (its frames, after a valid hello) to a fresh server, then a
    sync; print the last replies, close, and say whether the session's worker exited."""
    import tempfile

    stream = Path(path).read_bytes()
    frames = split_frames(stream)
    print(f"{len(stream)} bytes, {len(frames) if frames is not None else 'not whole'} frames")
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "server.log")
        try:
            s = connect(server.address)
            s.sendall(join_frames([(hello_bytes(), [])]))
            reader = FrameReader(s)
            welcome = m.decode(m.server_message_decoder, reader.read_message()[0], "reply")
            print("welcome:", welcome)
            drain = _Drainer(s, reader)
            drain.start()
            # Note: no half-close: a worker ends a session whose client shut its side down at once
            # (the hang-up watcher in worker.py), frames still unread or not.
            s.sendall(stream + join_frames([corpus.frame([m.Sync()])]))
            expected = sum(mutate.replies_expected(mutate.commands(f[0]) or []) for f in frames or []) + 1
            answered = drain.wait_for(expected, HANG_S)
            print(f"{drain.replies} of {expected} replies{'' if answered else f' after {HANG_S:g} s'};"
                  f" refused: {drain.refused}; session ended: {drain.ended.is_set()}")
            s.shutdown(socket.SHUT_RDWR)
            s.close()
            pid = server.worker_of(welcome.session)
            status = server.exit_status(pid, HANG_S) if pid else None
            print(f"worker {pid}: exit status {status}" + ("  <- STILL RUNNING after the close" if status is None else ""))
            print("".join(line for line in server.lines if "handshake from" not in line)[-3000:])
        finally:
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "replay":
        replay(sys.argv[2])
    else:
        raise SystemExit(__doc__)
