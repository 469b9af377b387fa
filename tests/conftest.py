"""Shared fixtures: real gpupool server processes on loopback, ports chosen at run time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token"


class ServerProc:
    """A `gpupool server` process started for real; `address` is its HOST:PORT."""

    def __init__(self, *extra: str, token: str = TOKEN) -> None:
        self.token = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool", "server", "--listen", "127.0.0.1:0", "--token", token, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited early:\n" + "".join(self.lines))
            self.lines.append(line)
            if "listening on" in line:
                self.address = line.rsplit(" ", 1)[1].strip()
                break
        else:
            raise RuntimeError("server did not start")
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProc]:
    s = ServerProc("--cpu-gpus", "1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def session(server: ServerProc):
    """A gpupool session in the test process itself (the server is another process)."""
    import gpupool

    s = gpupool.connect(server.address, token=server.token)
    yield s
    s.close()


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300, args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process (the client in its own process)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *(args or [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
