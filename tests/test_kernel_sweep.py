"""The kernel sweep finds kernels that trust their integer arguments, and the server's
sanitisers remove every finding (Note [Sanitisers]).

Short form of `tools/kernel_sweep.py`: the attacks run for real, each in a forked child with
painted canaries, on a few ops; the full sweep is `make kernel-sweep`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import kernel_sweep  # noqa: E402

from gpupool.server.sanitisers import SANITISERS, SWEEP_FILE, family  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def _in_child(expr: str) -> Any:
    """Evaluate `expr` (with `kernel_sweep` imported) in a fresh interpreter; its JSON value.

    The sweep forks, sets torch to one thread and runs kernels with hostile arguments: none of
    that may touch the test process (other tests compare results bit for bit), and nothing an
    earlier test left in this process (threads, torch modes) may change what the sweep sees."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import torch; "
            f"torch.set_num_threads(1); import kernel_sweep; print(json.dumps({expr}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sweep(ops: set[str], sources: list[str], sanitised: bool) -> Any:
    return _in_child(f"kernel_sweep.sweep(set({sorted(ops)!r}), {sources!r}, {sanitised}, False)")


def test_the_raw_sweep_finds_the_kernels_that_write_out_of_bounds() -> None:
    ops = {"aten::max_pool2d_with_indices_backward", "aten::embedding_dense_backward", "aten::index_select"}
    data = _sweep(ops, ["model:cnn", "model:embeddings", "model:indexing"], sanitised=False)
    unsafe = {f["op"] for f in data["unsafe"]}
    assert {"aten::max_pool2d_with_indices_backward", "aten::embedding_dense_backward"} <= unsafe
    # index_select checks its indices: swept, and clean
    assert "aten::index_select" in data["swept"]
    assert "aten::index_select" not in unsafe


def test_sanitised_the_same_attacks_find_nothing() -> None:
    ops = {"aten::max_pool2d_with_indices_backward", "aten::embedding_dense_backward",
           "aten::_embedding_bag_backward"}
    data = _sweep(ops, ["model:cnn", "model:embeddings"], sanitised=True)
    assert data["unsafe"] == [], data["unsafe"]
    assert set(data["swept"]) == ops


def test_every_recorded_finding_is_gone_through_the_sanitisers() -> None:
    """Each finding of the shipped data file, re-run as recorded but sanitised."""
    results = _in_child("kernel_sweep.replay_findings(sanitised=True)")
    assert len(results) >= 30
    still = [r for r in results if r["now"] in kernel_sweep.UNSAFE or r["now"].startswith("not reproduced")]
    assert not still, still
    assert {r["now"] for r in results} <= {"ok", "refused", "error"}


def test_the_data_file_is_current_and_every_finding_has_a_sanitiser() -> None:
    import torch

    data = json.loads(SWEEP_FILE.read_text())
    assert data["torch"].split("+")[0] == torch.__version__.split("+")[0]
    for f in data["unsafe"]:
        assert set(f) == {"op", "arg", "mutation", "effect", "source"}
        assert f["effect"] in kernel_sweep.UNSAFE
        assert f["op"] in SANITISERS, f"{f['op']} was found unsafe and has no sanitiser"
    families = {family(f["op"]) for f in data["unsafe"]}
    assert "aten::_ctc_loss" in families and "aten::grid_sampler_2d" in families


def test_the_command_line_replays_findings_and_says_what_it_found() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "kernel_sweep.py"), "--ops", "aten::embedding_dense_backward",
         "--sources", "model:embeddings"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "UNSAFE aten::embedding_dense_backward: indices" in out
    assert "1 unsafe" in out
