"""Results as JSON and as the Markdown table of docs/benchmarks.md.

Note [Generated sections]: the table is written between marker comments, one pair per mode
(`cpu`, `gpu`), and the rest of docs/benchmarks.md — method, profile notes — is kept as written.
A file without the markers gets them appended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.specs import BY_NAME


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def met_text(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "skipped" if row.get("skipped") else "error"
    if row["target"] is None:
        return "report"
    if row["ratio"] is None:
        return "—"
    return "yes" if row["met"] else "**no**"


def target_text(row: dict[str, Any]) -> str:
    if row["target"] is None:
        return "report"
    return ("≤ " if row["better"] == "lower" else "≥ ") + f"{row['target']:g}"


def table(result: dict[str, Any]) -> str:
    lines = [
        "| benchmark | unit | gpupool | baseline | ratio | target | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in result["benchmarks"]:
        lines.append(
            f"| `{r['name']}` | {r['unit']} | {_num(r['value'])} | {_num(r['baseline'])} | "
            f"{_num(r['ratio'])} | {target_text(r)} | {met_text(r)} |"
        )
    notes = [f"- `{r['name']}`: {r['note']}" for r in result["benchmarks"] if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def machine_text(result: dict[str, Any]) -> str:
    m = result["machine"]
    fields = [
        ("when (UTC)", m.get("date")),
        ("command", f"`{m.get('command')}`"),
        ("host", f"{m.get('hostname')}: {m.get('platform')}"),
        ("CPU", f"{m.get('cpu')}, {m.get('cpus_usable')} usable of {m.get('cpu_count')} cores"),
        ("memory", f"{m.get('memory_gib')} GiB"),
        ("load average (start → end)", f"{m.get('loadavg_start')} → {m.get('loadavg_end')}"),
        ("Python / torch", f"{m.get('python')} / {m.get('torch')}"),
        ("gpupool", f"{m.get('gpupool')} at {m.get('git')}, from {m.get('gpupool_path')}"),
        ("torch threads per side", m.get("threads")),
        ("gpupool device", m.get("remote_device")),
        ("baseline device", m.get("local_device")),
        ("repetitions", f"{m.get('reps')} per side, alternating; medians"),
    ]
    return "\n".join(f"- {k}: {v}" for k, v in fields if v is not None)


def section(result: dict[str, Any]) -> str:
    mode = result["mode"]
    title = {"cpu": "CPU-backed server", "quick": "quick subset", "gpu": "GPU server"}.get(mode, mode)
    body = [
        f"### Latest run: {title}",
        "",
        machine_text(result),
        "",
        table(result),
        "",
        "What each row measures (gpupool side / baseline side):",
        "",
    ]
    for r in result["benchmarks"]:
        spec = BY_NAME.get(r["name"])
        if spec is not None:
            body.append(f"- `{r['name']}`: {spec.what} / {spec.baseline}.")
    return "\n".join(body)


def update_markdown(path: Path, result: dict[str, Any]) -> None:
    """Replace the mode's generated section of `path` (see Note [Generated sections])."""
    key = "gpu" if result["mode"] == "gpu" else "cpu"
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    block = f"{begin}\n{section(result)}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
