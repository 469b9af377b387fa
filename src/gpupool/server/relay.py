"""Carries a TLS session's bytes between its client and its worker.

Note [TLS relay]: a session runs in a sandboxed worker process that is handed its client's
socket (Note [What the listener trusts] in listener.py). A TLS connection cannot be handed on:
its keys live in this process's OpenSSL state, and the worker is assumed compromisable, so it
must never hold the server's private key either. So over TLS the worker gets one end of a Unix
socket pair and this relay, in the listener process, decrypts into it and encrypts out of it.
One thread per session drives both directions with non-blocking I/O: an `SSLSocket` must not
be read and written from two threads at once. Each direction moves one buffer at a time and
stops reading while its buffer is not yet written (back-pressure, so a fast sender cannot grow
the listener). The worker sees an ordinary stream; when either side closes or the TLS stream
breaks, both are closed, and the worker ends the session as for any client that hung up.
"""

from __future__ import annotations

import logging
import select
import selectors
import socket
import ssl
import threading

log = logging.getLogger("gpupool.server")

#: Bytes moved per step and direction; TLS records are at most 16 KiB, so several per step.
CHUNK = 1 << 18
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Relay:
    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self._inner, self.worker_end = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="gpupool-tls-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._pump()
        except (OSError, ValueError) as e:  # a broken TLS stream, a reset: the session is over
            log.info("TLS relay ended: %s", e)
        finally:
            for s in (self._inner, self.tls):
                try:
                    s.close()
                except OSError:
                    pass

    def _pump(self) -> None:
        """Move bytes both ways until one side closes. Each pass tries every step that has
        something to do; only when no step made progress does it wait, on exactly what the
        blocked steps need."""
        tls, inner = self.tls, self._inner
        tls.setblocking(False)
        inner.setblocking(False)
        up_buf, down_buf = bytearray(CHUNK), bytearray(CHUNK)
        up = memoryview(up_buf)[:0]  # decrypted client bytes not yet given to the worker
        down = memoryview(down_buf)[:0]  # worker bytes not yet sent to the client
        # Note: select() on two descriptors each wait: one call, no registrations to keep up.
        while True:
            progress = False
            tls_wait = inner_wait = 0
            # ---- client -> worker
            if not up:
                n = _fill_from_tls(tls, up_buf)
                if n is None:
                    tls_wait |= selectors.EVENT_READ
                elif n == 0:
                    return  # the client closed
                else:
                    up, progress = memoryview(up_buf)[:n], True
            if up:
                try:
                    k = inner.send(up)
                    up, progress = up[k:], progress or k > 0
                except BlockingIOError:
                    pass
                if up:
                    inner_wait |= selectors.EVENT_WRITE
            # ---- worker -> client
            if not down:
                try:
                    n = inner.recv_into(down_buf)
                except BlockingIOError:
                    inner_wait |= selectors.EVENT_READ
                else:
                    if n == 0:
                        return  # the worker ended the session (its farewell is sent)
                    down, progress = memoryview(down_buf)[:n], True
            if down:
                try:
                    k = tls.send(down)
                    down, progress = down[k:], progress or k > 0
                except ssl.SSLWantWriteError:
                    pass
                except ssl.SSLWantReadError:
                    tls_wait |= selectors.EVENT_READ
                if down:
                    tls_wait |= selectors.EVENT_WRITE
            if progress:
                continue
            reads = [s for s, w in ((tls, tls_wait), (inner, inner_wait)) if w & _READ]
            writes = [s for s, w in ((tls, tls_wait), (inner, inner_wait)) if w & _WRITE]
            select.select(reads, writes, [])


def _fill_from_tls(tls: ssl.SSLSocket, buf: bytearray) -> int | None:
    """Read what TLS has ready into `buf` (several records); None: nothing yet; 0: closed."""
    view, filled = memoryview(buf), 0
    while filled < len(buf):
        try:
            n = tls.recv_into(view[filled:])
        except _WANT:
            break
        except ssl.SSLZeroReturnError:
            n = 0
        if n == 0:
            return filled or 0
        filled += n
    return filled or None
