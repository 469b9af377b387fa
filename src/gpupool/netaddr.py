"""HOST:PORT addresses as the command line and the wire give them."""

from __future__ import annotations


def parse_host_port(text: str, what: str = "address") -> tuple[str, int]:
    """("host", port) from "HOST:PORT", "[::1]:PORT" or ":PORT" (host 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad {what} {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)
