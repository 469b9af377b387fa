"""A short run of every fuzzing harness (tools/fuzz, issue 10): each finds nothing, and each
really ran: a harness that silently did nothing fails here on its count.

`make fuzz` runs the same harnesses for a minute each; a finding's reproducer stays in the
temporary folder named in the failure message (Note [Findings] in tools/fuzz/common.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tools.fuzz import api, libfuzzer, live
from tools.fuzz.common import Result


def _check(r: Result, at_least: int, folder: Path) -> None:
    found = "\n".join(f"  {f['kind']} x{f['count']}: {f['signature']}\n    {f.get('reproducer') or f['message'][:500]}"
                      for f in r.findings)
    where = f"{r.summary()}\nwork folder {folder}\n{found}"
    assert not r.error, where
    assert (r.crashes, r.hangs, r.leftover_workers, r.invariants) == (0, 0, 0, 0), where
    assert r.count >= at_least, where


@pytest.mark.parametrize("harness, seconds, at_least", [
    ("framing", 3, 2_000),
    ("messages", 3, 2_000),
    ("executor", 4, 150),
])
def test_libfuzzer_harness(tmp_path: Path, harness: str, seconds: float, at_least: int) -> None:
    pytest.importorskip("atheris")
    r = libfuzzer.run(harness, f"tools.fuzz.{harness}", seconds, tmp_path)
    _check(r, at_least, tmp_path)
    assert r.extra["corpus"] > 10, r.summary()  # coverage feedback grew the seeds


def test_framing_oracle_catches_a_planted_bug() -> None:
    """The reference reader is a real oracle: with a bug put into `FrameReader`, seeds alone fail."""
    pytest.importorskip("atheris")
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "tools.fuzz.framing", "--self-check"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_live_server(tmp_path: Path) -> None:
    r = live.run(7, tmp_path, sessions=1, prehandshake=2, record=False, seed=1, short_sessions=0)
    _check(r, 500, tmp_path)
    assert r.extra["sessions"] >= 1 and r.extra["session frames"] >= 300, r.summary()
    assert r.extra["pre-handshake frames"] >= 100, r.summary()


def test_controller_api(tmp_path: Path) -> None:
    # Note: under load, starting `st` alone ate most of a 6 s budget (0 cases ran).
    r = api.run(15, tmp_path, seed=1)
    _check(r, 10, tmp_path)
    assert r.extra["operations"] >= 10, r.summary()
