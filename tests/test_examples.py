"""The example training scripts, written for a local GPU, run unchanged under `gpupool run` and
print the same numbers as the same script run on the local CPU.

The server is CPU-backed (CPU kernels, CPU generator), and the examples take their data from
CPU generators and reseed before training, so the two runs must agree to the last digits: a
run that missed the device, a seed, or an op's semantics prints different numbers.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

#: example -> steps used here (fewer than the scripts' defaults, to keep the suite quick).
EXAMPLES = {"mlp_train.py": 40, "cnn_train.py": 20, "char_transformer.py": 10}


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, what: str, timeout: float = 300) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{what} exited {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def _results(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(device|final loss|accuracy|checksum): (\S+)$", out, re.M))


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_under_gpupool_run_matches_local_cpu(server, example: str) -> None:
    base = dict(os.environ, PYTHONUNBUFFERED="1", STEPS=str(EXAMPLES[example]))
    for k in ("GPUPOOL_SERVER", "GPUPOOL_TOKEN", "DEVICE"):
        base.pop(k, None)
    script = str(ROOT / "examples" / example)
    # Both at once: the two runs are independent, and each waits on its own start-up.
    remote = _start(
        [sys.executable, "-m", "gpupool", "run", "--server", server.address, "--token", server.token,
         "--", sys.executable, script],
        base,
    )
    local = _start([sys.executable, script], dict(base, DEVICE="cpu"))
    r, loc = _results(_finish(remote, "gpupool run")), _results(_finish(local, "local run"))

    assert loc["device"] == "cpu"
    assert r["device"] == "gpupool:0", "the example did not run on the pooled GPU"
    keys = {"final loss", "checksum"} | ({"accuracy"} if "accuracy" in loc else set())
    assert keys <= r.keys(), r
    for k in sorted(keys):
        a, b = float(r[k]), float(loc[k])
        assert math.isfinite(a) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (
            f"{example}: {k} on the pooled GPU {a!r} != local CPU {b!r}"
        )
