"""Protocol version: bumped on any incompatible change to framing or messages."""

PROTOCOL_VERSION = 2  # 2: `op` carries `frees`
