"""The exceptions gpupool raises, as one tree a user can catch.

Grouped by what the user can do about them: fix the connection or credentials, fix the program,
ask for a bigger share, or report a bug.
"""

from __future__ import annotations


class GpupoolError(Exception):
    """Base of every error gpupool raises."""


class ConnectError(GpupoolError):
    """Could not reach or open a session on a gpupool server: check the address and that it runs."""


class AuthError(ConnectError):
    """The server refused the token: check --token / GPUPOOL_TOKEN."""


class ProtocolError(GpupoolError):
    """The peer sent bytes that are not valid gpupool protocol (malformed, oversize, wrong version)."""


class VersionMismatch(ProtocolError):
    """Client and server speak different protocol versions: install the same gpupool on both."""


class ServerLost(GpupoolError):
    """The connection to the server broke mid-session; tensors on it are gone."""


class SessionClosed(GpupoolError):
    """The session was closed; tensors that lived on it can no longer be used."""


class RemoteOpError(GpupoolError, RuntimeError):
    """An operation failed on the server. The message names the op and the line that issued it."""

    def __init__(self, message: str, op: str = "", location: str = "") -> None:
        super().__init__(message)
        self.op = op
        self.location = location


class ShareExceeded(RemoteOpError, MemoryError):
    """The session's memory share on the GPU is used up: free tensors or ask for a bigger share."""


class UnsupportedError(GpupoolError, NotImplementedError):
    """A CUDA feature that cannot work on a remote GPU (streams, events, graphs, extensions, NCCL)."""
