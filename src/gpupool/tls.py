"""TLS for both planes (data plane and controller) and both sides, built in one place.

Note [When TLS is required]: a token or lease is a bearer secret, and tensors are the user's
data, so neither crosses a network in clear. A server or controller listening on anything but
a loopback address needs a certificate (or an explicit `--insecure`), and a client refuses to
send a token without TLS to anything but a loopback address (unless GPUPOOL_INSECURE=1). On
loopback, plain TCP stays the default: the bytes never leave the host, and TLS there would only
cost time.

Note [Certificate rotation]: a server context re-reads its certificate and key files when
their modification time changes (checked at most once a second, at the next connection or by
the controller's watcher): connections made after that use the new certificate, connections
already open keep theirs, so running jobs are not interrupted. Clients verify the chain against
the pool's CA, not a pinned leaf, so a renewed certificate from the same CA is accepted by a
client that reconnects (a hold, a new session, a child process).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpupool.errors import ConnectError

#: Set to 1 to allow sending a token in clear to a non-loopback address (a trusted network).
INSECURE_ENV = "GPUPOOL_INSECURE"
#: A CA certificate file (PEM) that clients verify servers and the controller against.
CA_ENV = "GPUPOOL_CA"
#: Set to 1 to use TLS to a loopback server (off loopback it is always on).
TLS_ENV = "GPUPOOL_TLS"


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def insecure_allowed() -> bool:
    return os.environ.get(INSECURE_ENV, "") == "1"


# ---- servers -----------------------------------------------------------------------------------


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path

    def stamp(self) -> tuple[int, int]:
        return (self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns)


class ServerTls:
    """A server's TLS context, renewed when its files change (Note [Certificate rotation]).

    `context()` (data plane: called per connection) returns a new context after a change;
    `reload_in_place()` (controller: called on its event loop's thread, where every handshake
    runs) loads the new certificate into the same context object, which its server keeps."""

    def __init__(self, files: CertFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp = files.stamp()
        self._ctx = server_context(files.cert, files.key)
        self._checked = time.monotonic()

    def _changed(self) -> tuple[int, int] | None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return None
        self._checked = now
        try:
            stamp = self.files.stamp()
        except OSError:
            return None  # mid-rotation (a file renamed away): keep the old one
        return stamp if stamp != self._stamp else None

    def context(self) -> ssl.SSLContext:
        with self._lock:
            stamp = self._changed()
            if stamp is not None:
                try:
                    self._ctx = server_context(self.files.cert, self.files.key)
                    self._stamp = stamp
                except (OSError, ssl.SSLError):
                    pass  # a half-written pair: the next check tries again
            return self._ctx

    def reload_in_place(self) -> bool:
        with self._lock:
            stamp = self._changed()
            if stamp is None:
                return False
            try:
                self._ctx.load_cert_chain(str(self.files.cert), str(self.files.key))
            except (OSError, ssl.SSLError):
                return False
            self._stamp = stamp
            return True


def listen_tls(host: str, cert: str | None, key: str | None, insecure: bool, what: str) -> ServerTls | None:
    """The TLS a server or controller listening on `host` uses (Note [When TLS is required]).

    Raises ValueError with a sentence saying what to do when a non-loopback listener has no
    certificate and is not told `--insecure`."""
    if bool(cert) != bool(key):
        raise ValueError(f"{what}: --tls-cert and --tls-key go together")
    if cert and key:
        return ServerTls(CertFiles(Path(cert), Path(key)))
    if not is_loopback(host) and not insecure:
        raise ValueError(
            f"{what}: listening on {host} (not loopback) needs TLS: pass --tls-cert and --tls-key "
            "(`gpupool up` makes a CA and certificates; `gpupool cert` issues more), or --insecure "
            "on a network you trust, which sends tokens and tensors in clear")
    return None


# ---- clients -----------------------------------------------------------------------------------


def pool_ca() -> Path | None:
    """The CA file clients trust: $GPUPOOL_CA, else the one `gpupool up` made on this machine."""
    if os.environ.get(CA_ENV):
        return Path(os.environ[CA_ENV])
    from gpupool import home

    local = home.home() / "ca.pem"
    return local if local.exists() else None


def client_context(ca: str | Path | None = None) -> ssl.SSLContext:
    """Verifies the peer's chain and name against `ca` (PEM file), else `pool_ca()`, else the
    system's trusted CAs (a controller with a public certificate)."""
    ca = ca or pool_ca()
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_wants_tls(host: str, tls: bool | None, what: str) -> bool:
    """Whether a client uses TLS to `host` (None: on by default off loopback or with
    $GPUPOOL_TLS=1); raises ConnectError rather than send a secret in clear off loopback."""
    if tls is None:
        tls = os.environ.get(TLS_ENV, "") == "1" or not is_loopback(host)
    if not tls and not is_loopback(host) and not insecure_allowed():
        raise ConnectError(
            f"refusing to send a token in clear to {what} at {host}, which is not loopback: use TLS "
            f"(the default), or set {INSECURE_ENV}=1 on a network you trust")
    return tls


def connect(address: str, timeout: float, tls: bool | None = None, what: str = "gpupool server") -> socket.socket:
    """A connected socket to a data-plane server at HOST:PORT, TLS-wrapped and verified where
    TLS is on; ConnectError with what to do otherwise."""
    from gpupool.netaddr import parse_host_port

    try:
        host, port = parse_host_port(address, "server address")
    except ValueError as e:
        raise ConnectError(str(e)) from None
    secure = client_wants_tls(host, tls, f"the {what}")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectError(f"cannot reach {what} at {address}: {e}") from e
    if not secure:
        return sock
    try:
        return client_context().wrap_socket(sock, server_hostname=host.strip("[]"))
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise ConnectError(f"{address}'s TLS certificate is not trusted: {e.verify_message}; set "
                           f"{CA_ENV} to the pool's CA file (`gpupool up` writes ca.pem)") from None
    except (OSError, ValueError) as e:
        sock.close()
        raise ConnectError(f"TLS handshake with {address} failed: {e}") from None
