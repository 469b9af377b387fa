"""A session's worker process: owns one device context, runs one session, then exits.

Started ahead of time by the listener (a warm spare, with torch already imported) and handed the
client's connection over a Unix socket (`socket.send_fds`). When the session ends — cleanly, or
because the client died or sent garbage — the process exits and the OS frees all its memory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

log = logging.getLogger("gpupool.worker")


def _setup_device(info: dict) -> tuple[object, int]:
    import torch

    limit = int(info["memory_limit"])
    if info["kind"] == "cuda":
        dev = torch.device("cuda", int(info["index"]))
        torch.cuda.set_device(dev)
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), dev)
        return dev, limit
    from gpupool.server.memory import cap_process_data

    cap_process_data(limit)
    return torch.device("cpu"), limit


def run_session(conn: socket.socket, info: dict) -> None:
    import torch

    from gpupool.errors import ProtocolError, ServerLost
    from gpupool.protocol import messages as m
    from gpupool.protocol.framing import FrameReader, FrameWriter, Limits
    from gpupool.protocol.version import PROTOCOL_VERSION
    from gpupool.server.executor import Executor

    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(None)
    writer = FrameWriter(conn)
    device, limit = _setup_device(info)
    reader = FrameReader(conn, Limits(max_buffer_bytes=max(limit, 1) + (1 << 20)))
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    ex = Executor(device, limit)  # type: ignore[arg-type]
    writer.send(
        m.plain_encoder.encode(
            m.Welcome(
                protocol=PROTOCOL_VERSION,
                session=info["session"],
                device_kind=info["kind"],
                device_name=info["name"],
                memory_limit=limit,
                memory_total=int(info["memory_total"]),
                torch_version=str(torch.__version__),
            )
        )
    )
    try:
        ex.serve(reader, writer)
    except ProtocolError as e:
        log.warning("session %s: protocol error: %s", info["session"], e)
        try:
            writer.send(m.plain_encoder.encode(m.Refused(code="protocol", message=str(e))))
        except ServerLost:
            pass
    except ServerLost:
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


def main() -> None:
    logging.basicConfig(level=os.environ.get("GPUPOOL_LOG", "WARNING"), format="%(asctime)s %(name)s %(message)s")
    ctl = socket.socket(fileno=int(sys.argv[1]))
    import torch  # noqa: F401 - warm the import before a session arrives

    try:
        msg, fds, _, _ = socket.recv_fds(ctl, 65536, 1)
    except OSError:
        return
    if not fds:
        return  # the listener shut down before handing us a session
    info = json.loads(msg)
    ctl.close()
    conn = socket.socket(fileno=fds[0])
    run_session(conn, info)
    os._exit(0)


if __name__ == "__main__":
    main()
