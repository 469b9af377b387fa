"""Running an atheris harness for a set time: a child process per libFuzzer run, restarted after
anything that ends one early (a segfault, a hang, an out-of-memory), until the time is spent.

The harness module's `main()` calls `atheris.Setup` and `atheris.Fuzz` (which never returns:
libFuzzer exits the process). Python-level bugs the harness catches itself and records as
findings (Note [Findings] in common.py), so one bug does not stop the run; what only libFuzzer
sees (a deadly signal, `-timeout`, `-rss_limit_mb`) it writes as an artifact, counted here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tools.fuzz.common import Findings, Result

ROOT = Path(__file__).resolve().parents[2]
_DONE = re.compile(r"stat::number_of_executed_units: (\d+)")
_PROGRESS = re.compile(r"^#(\d+)\s", re.M)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
#: Artifact name prefix -> finding kind.
_KINDS = {"crash-": "crash", "timeout-": "hang", "oom-": "crash", "leak-": "crash", "slow-unit-": None}


def run(harness: str, module: str, seconds: float, workdir: Path,
        timeout: int = 20, rss_limit_mb: int = 6144, max_len: int = 65536, max_restarts: int = 50,
        env: dict[str, str] | None = None) -> Result:
    """Fuzz with `python -m module` for `seconds` in all; corpus and findings under `workdir`."""
    result = Result(harness, "inputs")
    corpus = workdir / "corpus"
    artifacts = workdir / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    findings = Findings(workdir / "findings")
    start = time.monotonic()
    child_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                     GPUPOOL_FUZZ_FINDINGS=str(findings.folder), PYTHONUNBUFFERED="1", **(env or {}))
    restarts = 0
    log_path = workdir / "libfuzzer.log"
    with open(log_path, "a") as log:
        while True:
            left = seconds - (time.monotonic() - start)
            if left < 1 or restarts > max_restarts:
                break
            before = set(artifacts.iterdir())
            cmd = [sys.executable, "-m", module, str(corpus), f"-max_total_time={max(1, int(left))}",
                   f"-artifact_prefix={artifacts}/", f"-timeout={timeout}", f"-rss_limit_mb={rss_limit_mb}",
                   f"-max_len={max_len}", "-print_final_stats=1", "-print_pcs=0", "-reload=0"]
            # Note: the child's own deadline is libFuzzer's; this one only stops a child that
            # hangs outside an input (at import, or in libFuzzer's exit).
            try:
                proc = subprocess.run(cmd, cwd=workdir, env=child_env, capture_output=True, text=True,
                                      timeout=left + timeout + 60, errors="replace")
                out, rc = proc.stderr + proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as e:
                out = (e.stderr or "") + (e.stdout or "") if isinstance(e.stderr, str) else ""
                rc = -9
                findings.add("hang", f"{harness}: child did not exit", f"the libFuzzer child ran {left + timeout + 60:.0f} s")
            log.write(out[-200_000:])
            done = _DONE.findall(out)
            progress = _PROGRESS.findall(out)
            result.count += int(done[-1]) if done else (int(progress[-1]) if progress else 0)
            new = [p for p in artifacts.iterdir() if p not in before]
            for p in new:
                # Note: an input that crashes as it is loaded from the corpus would end every run.
                data = p.read_bytes()
                for c in corpus.iterdir():
                    if c.stat().st_size == len(data) and c.read_bytes() == data:
                        c.unlink()
                kind = next((k for pre, k in _KINDS.items() if p.name.startswith(pre)), "crash")
                if kind is None:
                    continue
                tail = out[-3000:]
                findings.add(kind, f"{harness}: libFuzzer {p.name.split('-')[0]}: {_first_error(out)}", tail,
                             p.read_bytes(), suffix="")
            if not done and not new:
                if "INITED" not in out and "Done" not in out:
                    result.error = f"the harness did not start (exit {rc}): {out[-1500:]}"
                    break
                if rc != 0:
                    findings.add("crash", f"{harness}: child exited {rc} without an artifact", out[-3000:])
            restarts += 1 if (new or rc != 0) else 0
            if done and not new and rc == 0 and seconds - (time.monotonic() - start) < 2:
                break
    result.seconds = time.monotonic() - start
    result.extra["corpus"] = sum(1 for _ in corpus.iterdir())
    result.extra["libfuzzer runs"] = restarts + 1
    result.add_findings(findings)
    return result


def _first_error(out: str) -> str:
    for pat in (r"ERROR: libFuzzer: ([^\n]+)", r"==\d+== ERROR: ([^\n]+)", r"(ALARM: [^\n]+)",
                r"(out-of-memory[^\n]*)", r"(Uncaught Python exception[^\n]*)"):
        m = re.search(pat, out)
        if m:
            return re.sub(r"\d+", "N", m.group(1))[:120]
    return "unknown"


def findings_here() -> Findings:
    """In a harness child: where its findings go (set by `run`)."""
    return Findings(os.environ.get("GPUPOOL_FUZZ_FINDINGS") or "fuzz-findings")
