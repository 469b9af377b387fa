"""The GPU host agent: listener, per-session worker processes, the op executor."""
