"""Serving a controller: in the foreground (`gpupool controller`) or on a thread (`gpupool up`, tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from gpupool.controller.app import Settings, create_app
from gpupool.tls import ServerTls


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Note: proto=IPPROTO_TCP, not 0: asyncio only turns Nagle off (TCP_NODELAY) on sockets that say
    # they are TCP, and with Nagle on, each keep-alive request waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 7700, log_level: str = "info",
          access_log: bool = False, tls: ServerTls | None = None) -> None:
    """Serve the controller until SIGINT/SIGTERM (blocking). Port 0 picks a free port.

    `access_log`: a line per HTTP request on stdout. Off by default: at a few thousand requests a
    second, writing it cost the controller as much as answering a health check."""
    app = create_app(settings)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    scheme = "https" if tls is not None else "http"
    print(f"gpupool controller listening on {scheme}://{_url_host(host)}:{bound}", flush=True)
    server = _uvicorn(app, tls, log_level=log_level, lifespan="on", access_log=access_log)
    server.run(sockets=[sock])


def _uvicorn(app: Any, tls: ServerTls | None, **kw: Any) -> uvicorn.Server:
    """A uvicorn server whose TLS context is ours (built in gpupool/tls.py, like the data
    plane's), so that it can be reloaded in place (Note [Certificate rotation])."""
    config = uvicorn.Config(app, **kw)
    config.load()
    if tls is not None:
        config.ssl = tls.context()
    return _Server(config, tls)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, tls: ServerTls | None) -> None:
        super().__init__(config)
        self._tls = tls
        self._watcher: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self._tls is not None:
            self._watcher = asyncio.get_running_loop().create_task(_watch(self._tls))


async def _watch(tls: ServerTls) -> None:
    """Reload the certificate when its files change, on the event loop's thread: every TLS
    handshake runs there too, so none sees a half-loaded context."""
    while True:
        await asyncio.sleep(1.0)
        tls.reload_in_place()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ControllerThread:
    """A real controller (uvicorn + the app) served on a background thread of this process.

        with ControllerThread(Settings(db_url=...)) as c:
            httpx.get(c.url + "/v1/status", headers={"Authorization": f"Bearer {token}"})
    """

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0,
                 tls: ServerTls | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        # Note: a wildcard address is not one a client can name (nor a certificate): this host's
        # own clients use loopback, which every certificate `gpupool up` makes names.
        local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        self.url = f"{'https' if tls is not None else 'http'}://{_url_host(local)}:{self.port}"
        self.server = _uvicorn(self.app, tls, log_level="warning", lifespan="on")
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"gpupool-controller-{self.port}", daemon=True)

    @property
    def controller(self):  # type: ignore[no-untyped-def]
        return self.app.state.controller

    def start(self, timeout: float = 30) -> ControllerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the controller failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the controller did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ControllerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
