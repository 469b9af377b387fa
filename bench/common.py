"""Pieces the driver and the worker processes share: the line protocol, statistics, processes.

Note [Worker protocol]: the driver talks to each worker over its stdin/stdout, one JSON object a
line. Worker replies start with `REPLY_PREFIX`, so stray prints (torch warnings, user code) on
the worker's stdout can never be mistaken for a reply.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
REPLY_PREFIX = "@@bench "


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the same gpupool and bench the driver imports."""
    paths = [str(ROOT)]
    try:
        import gpupool

        paths.insert(0, str(Path(gpupool.__file__).resolve().parent.parent))
    except ImportError:
        paths.insert(0, str(ROOT / "src"))
    old = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])))
    env.update(extra or {})
    return env


def send_reply(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(REPLY_PREFIX + json.dumps(obj) + "\n")
    out.flush()


class LineProc:
    """A child process whose stdout lines are collected by a thread, read with a timeout."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, stdin: bool = True) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.other: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def readline(self, timeout: float) -> str:
        """The next stdout line; raises TimeoutError, or EOFError when the process ended."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from {' '.join(self.argv[-3:])} within {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)
                raise EOFError(f"process exited (rc {self.proc.poll()}): {self.stderr_tail()}")
            return line

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            self._log.flush()
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-n:].strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except OSError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Worker(LineProc):
    """A benchmark worker (`python -m bench.worker`): one side of every comparison."""

    def __init__(self, side: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__([sys.executable, "-m", "bench.worker", side, *args], env, log_path)
        self.side = side
        self.hello: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        """Wait for the worker's hello (it imports torch and, remote, opens its session)."""
        self.hello = self._reply(timeout)
        return self.hello

    def _reply(self, timeout: float) -> dict[str, Any]:
        while True:
            line = self.readline(timeout)
            if line.startswith(REPLY_PREFIX):
                obj: dict[str, Any] = json.loads(line[len(REPLY_PREFIX):])
                if "error" in obj:
                    raise WorkerError(obj["error"], skip=bool(obj.get("skip")))
                return obj
            self.other.append(line)

    def call(self, timeout: float, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise EOFError(f"worker {self.side} is gone: {e}: {self.stderr_tail()}") from None
        return self._reply(timeout)


class WorkerError(Exception):
    """A benchmark failed inside a worker; the message is the worker's explanation.

    `skip`: the benchmark cannot run on this machine (e.g. torchvision missing), not a failure.
    """

    def __init__(self, message: str, skip: bool = False) -> None:
        super().__init__(message)
        self.skip = skip


class ServerProc(LineProc):
    """A gpupool server subprocess on loopback with a port chosen by the OS.

    Started as `python -m gpupool.server` (argparse), not the typer CLI, so that the GPU host
    needs no package beyond torch and msgspec.
    """

    def __init__(self, token: str, env: dict[str, str], log_path: Path, cpu: bool, timeout: float = 120) -> None:
        argv = [sys.executable, "-m", "gpupool.server", "--listen", "127.0.0.1:0", "--token", token]
        if cpu:
            argv += ["--cpu-gpus", "1"]
        super().__init__(argv, env, log_path, stdin=False)
        self.token = token
        self.banner: list[str] = []
        while True:
            try:
                line = self.readline(timeout)
            except (EOFError, TimeoutError) as e:
                self.stop()
                raise RuntimeError(f"the gpupool server did not start: {e}\n{''.join(self.banner)}") from None
            self.banner.append(line)
            if "listening on" in line:
                self.address = line.rsplit(" ", 1)[1].strip()
                break
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        while True:
            line = self.lines.get()
            if line is None:
                return
