"""The benchmark suite's own code: every benchmark runs once, tiny, against a real server.

No timing is asserted (benchmarks are not tests); the rows must be produced with every field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from bench.report import update_markdown
from bench.specs import SPECS

if TYPE_CHECKING:
    from tests.conftest import ServerProc

ROOT = Path(__file__).resolve().parent.parent

FIELDS = {"name", "unit", "value", "baseline", "ratio", "target", "better", "met", "note", "cpu"}


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def test_every_benchmark_runs_tiny(server: ServerProc, tmp_path: Path) -> None:
    out, md = tmp_path / "tiny.json", tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nHand-written text that must survive.\n")
    names = [s.name for s in SPECS]
    r = _bench(
        "--tiny", "--only", *names, "--server", server.address, "--token", server.token,
        "--out", str(out), "--md", str(md),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert result["tiny"] is True
    assert {"hostname", "cpu", "torch", "remote_device", "local_device", "date"} <= set(result["machine"])
    rows = {row["name"]: row for row in result["benchmarks"]}
    assert list(rows) == names
    for spec in SPECS:
        row = rows[spec.name]
        assert FIELDS <= set(row), row
        assert row["unit"] == spec.unit and row["better"] == spec.better
        assert spec.family is not None, f"{spec.name} is a placeholder"
        if row.get("skipped"):  # an optional package missing here (torchvision)
            assert row["note"], row
            continue
        assert not row.get("error"), row
        assert row["value"] > 0 and row["baseline"] > 0, row
        assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
        assert len(row["samples"]["value"]) == len(row["samples"]["baseline"]) == 1
        if row["target"] is not None:
            assert isinstance(row["met"], bool)
    text = md.read_text()
    assert "Hand-written text that must survive." in text
    assert "<!-- bench:cpu:begin -->" in text and "`mlp_adam_step`" in text


def test_markdown_section_is_replaced_not_appended(tmp_path: Path) -> None:
    md = tmp_path / "b.md"
    md.write_text("# B\n\nintro\n\n<!-- bench:cpu:begin -->\nold\n<!-- bench:cpu:end -->\n\noutro\n")
    result = {
        "mode": "cpu",
        "machine": {"hostname": "h", "reps": 3},
        "benchmarks": [
            {"name": "sync_rtt", "unit": "us", "value": 100.0, "baseline": 50.0, "ratio": 2.0,
             "target": 2.0, "better": "lower", "met": True, "note": ""},
        ],
    }
    update_markdown(md, result)
    update_markdown(md, result)
    text = md.read_text()
    assert "old" not in text and text.count("bench:cpu:begin") == 1
    assert text.index("intro") < text.index("`sync_rtt`") < text.index("outro")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this host has CUDA")
def test_gpu_mode_without_cuda_says_why(tmp_path: Path) -> None:
    r = _bench("--gpu", "--out", str(tmp_path / "gpu.json"), timeout=120)
    assert r.returncode != 0
    assert "CUDA is not available" in r.stderr
    assert not (tmp_path / "gpu.json").exists()
