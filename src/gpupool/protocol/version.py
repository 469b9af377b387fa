"""Protocol version: bumped on any incompatible change to framing or messages."""

PROTOCOL_VERSION = 4  # 2: `op` carries `frees`; 3: op allowlist, `hello.hold`, one worker per lease;
# 4: step replay (`trace`, `replay`, `forget`), gpupool::rnn ops
