"""The one wire format that client and server speak. Imports neither torch nor client/server code."""

from gpupool.protocol.framing import FrameReader, FrameWriter
from gpupool.protocol.version import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "FrameReader", "FrameWriter"]
