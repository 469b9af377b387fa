"""A benchmark worker process: `python -m bench.worker remote|local [options]`.

It prepares one benchmark at a time and runs repetitions when the driver asks, so the driver can
alternate the two sides of a comparison rep by rep (see Note [Worker protocol] in common.py).

    {"op": "setup", "family": "train", "cfg": {...}}  -> {"ok": true, "info": {...}}
    {"op": "run"}                                      -> {"value": 4.2}
    {"op": "teardown"}                                 -> {"ok": true}
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import send_reply


def _families() -> dict[str, Callable[..., Any]]:
    from bench import lease, ops, training, transfer

    return {
        "lease": lease.setup,
        "train": training.setup,
        "op_add": ops.setup_op_add,
        "rtt": ops.setup_rtt,
        "transfer": transfer.setup,
    }


def _explain(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(text) > 240:
        text = text[:240] + "..."
    return f"{type(e).__name__}: {text}{where}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.worker")
    p.add_argument("side", choices=["remote", "local"])
    p.add_argument("--server", help="gpupool server HOST:PORT (remote side)")
    p.add_argument("--token", default="")
    p.add_argument("--device", default="cpu", help="native device (local side): cpu or cuda")
    p.add_argument("--sockbase", help="plain-socket baseline server HOST:PORT (local side)")
    a = p.parse_args(argv)
    out = sys.stdout
    # Note: replies go to the real stdout; anything else printing there is harmless (prefix).
    try:
        side = _make_side(a)
    except Exception as e:  # noqa: BLE001 - reported to the driver
        send_reply(out, {"error": _explain(e)})
        return
    import torch

    hello: dict[str, Any] = {
        "side": side.name,
        "device": str(side.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
    if side.session is not None:
        s = side.session
        hello.update(device_kind=s.kind, device_name=s.device_name, server_torch=s.server_torch)
    elif side.device.type == "cuda":
        hello.update(device_kind="cuda", device_name=torch.cuda.get_device_name(side.device))
    else:
        hello.update(device_kind="cpu", device_name=platform.processor() or platform.machine())
    send_reply(out, hello)
    families = _families()
    measure = None
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        op = msg.get("op")
        try:
            if op == "setup":
                if measure is not None:
                    measure.close()
                measure = None
                _collect(side)
                measure = families[msg["family"]](side, msg["cfg"])
                send_reply(out, {"ok": True, "info": measure.info})
            elif op == "run":
                assert measure is not None, "run before setup"
                c0 = time.process_time()  # all threads: backward runs on the autograd device thread
                value = measure.run()
                cpu = (time.process_time() - c0) * measure.cpu_scale if measure.cpu_scale else None
                send_reply(out, {"value": value, "cpu": cpu, "cpu_scale": measure.cpu_scale, "info": measure.info})
            elif op == "teardown":
                if measure is not None:
                    measure.close()
                measure = None
                _collect(side)
                send_reply(out, {"ok": True})
            else:
                send_reply(out, {"error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the driver, the worker goes on
            from bench.training import Skip

            measure = None
            if isinstance(e, Skip):
                send_reply(out, {"error": str(e), "skip": True})
            else:
                traceback.print_exc()
                send_reply(out, {"error": _explain(e)})
            _collect(side)
    if side.session is not None:
        side.session.close()


def _collect(side: Any) -> None:
    """Free the previous benchmark's tensors before the next one (and their server memory)."""
    gc.collect()
    if side.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    try:
        side.sync()
    except Exception:  # noqa: BLE001 - a failed op of the last benchmark; already reported
        pass


def _make_side(a: argparse.Namespace) -> Any:
    import torch

    from bench.side import Side

    if a.side == "remote":
        import gpupool

        s = gpupool.connect(a.server, token=a.token)
        return Side("remote", s.device, s.synchronize, session=s)
    device = torch.device(a.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", 0)
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this process")
        torch.cuda.set_device(device)

        def sync() -> None:
            torch.cuda.synchronize(device)

        return Side("local", device, sync, sockbase=a.sockbase)
    return Side("local", device, lambda: None, sockbase=a.sockbase)


if __name__ == "__main__":
    main()
