"""One budget per lease (Note [One budget per lease] in server/memory.py), end to end: a real
controller and GPU server, `gpupool run` starting a program whose child processes open their
own sessions on the same lease."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from tests.pool_fixtures import cli, start_controller, start_server

MiB = 1024**2

# The parent takes 60% of its share, then a child process (its own session on the lease)
# asks for 60% more: before, every session got the whole lease, so both fit.
PROGRAM = textwrap.dedent(
    """
    import json, subprocess, sys, torch
    share = torch.cuda.get_device_properties(0).total_memory
    n = int(share * 0.6)
    x = torch.ones(n, dtype=torch.uint8, device="cuda")
    assert x[-1].item() == 1
    child = '''
    import json, sys, torch
    n = int(sys.argv[1])
    try:
        y = torch.ones(n, dtype=torch.uint8, device="cuda")
        y[-1].item()
        print(json.dumps({"child": "fit"}))
    except torch.cuda.OutOfMemoryError as e:
        print(json.dumps({"child": "refused", "why": str(e)[:300]}))
    small = torch.ones(1024, device="cuda")
    print(json.dumps({"child_small": small.sum().item()}))
    '''
    out = subprocess.run([sys.executable, "-c", child, str(n)], capture_output=True, text=True, timeout=300)
    print(out.stdout, out.stderr[-2000:], flush=True)
    print(json.dumps({"parent_still": x[0].item(), "share": share}))
    """
)


def test_child_processes_draw_on_their_parents_lease(tmp_path: Path) -> None:
    """The attack: a `-p 0.25` program that started subprocesses took 0.5 of the GPU."""
    ctl, url = start_controller(tmp_path)
    srv, _ = start_server(tmp_path, url, "gpu-host-1", memory="1GiB")
    try:
        (tmp_path / "prog.py").write_text(PROGRAM)
        r = cli(tmp_path, url, "run", "-n", "1", "-p", "0.25", "--", sys.executable, str(tmp_path / "prog.py"), timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        got = {k: v for d in lines for k, v in d.items()}
        assert got["share"] == 256 * MiB
        assert got["child"] == "refused", got
        assert "out of memory" in got["why"] and "256.0 MiB" in got["why"]
        assert got["child_small"] == 1024  # the child's session works within what is left
        assert got["parent_still"] == 1
    finally:
        srv.stop()
        ctl.stop()
