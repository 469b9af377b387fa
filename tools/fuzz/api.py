"""Harness: schemathesis (`st run`, 4.x) against a real controller's served OpenAPI spec.

A `python -m gpupool.controller` process with its own SQLite database and an admin token, with
a registered server (two GPUs), a user and a lease, so that the operations on ids have
something to find. `st run` generates requests for every operation (coverage, fuzzing and
stateful phases) for the set time, as the admin, and checks each response: no 5xx, a documented
status code, content type, headers and body schema. Each failing check becomes a finding with
the request and response as its reproducer (a JSON file); a traceback in the controller's log,
or the controller not answering afterwards, is a crash.

Note: `DELETE /v1/tokens/{token_id}` is left out: the stateful phase finds the admin token's
own id and revokes it, and every later request is then a 401 that tests nothing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tools.fuzz.common import Findings, Result, stop_process

ADMIN_TOKEN = "gpp_fuzz-admin-token"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")
GiB = 1024**3


class Controller:
    def __init__(self, folder: Path) -> None:
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, GPUPOOL_HOME=str(folder), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
        self.log_path = folder / "controller.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.controller", "--listen", "127.0.0.1:0",
             "--db", f"sqlite:///{folder / 'controller.db'}", "--admin-token", ADMIN_TOKEN, "--max-wait", "0.2"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", self.log_path.read_text())
            if found:
                self.url = found.group(1)
                break
            if self.proc.poll() is not None:
                raise RuntimeError("controller exited early:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.05)
        else:
            raise RuntimeError("controller did not start")
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.admin.get("/healthz")
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def populate(self) -> None:
        """A server with two GPUs, a user with a token, and a lease of theirs."""
        gpus = [{"index": i, "uuid": f"fuzz-uuid-{i}", "model": "CPU-backed device", "memory_bytes": 8 * GiB,
                 "kind": "cpu"} for i in range(2)]
        self.admin.post("/v1/servers", json={"name": "gpu1", "address": "127.0.0.1:7001", "gpus": gpus}).raise_for_status()
        r = self.admin.post("/v1/tokens", json={"user": "alice", "role": "user"})
        r.raise_for_status()
        alice = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {r.json()['token']}"}, timeout=30)
        alice.post("/v1/leases", json={"fraction": 0.5})
        alice.close()
        self.admin.post("/v1/leases", json={"fraction": 0.25})

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.admin.close()
        stop_process(self.proc)
        self._log.close()


def run(seconds: float, workdir: Path, max_examples: int | None = None, seed: int | None = None,
        workers: int = 2) -> Result:
    result = Result("api", "cases")
    findings = Findings(workdir / "findings")
    start = time.monotonic()
    seed = seed if seed is not None else int(time.time()) % 100_000
    ctl = None
    try:
        ctl = Controller(workdir)
        ctl.populate()
        report, ndjson = workdir / "report.json", workdir / "report.ndjson"
        st = str(Path(sys.executable).with_name("st"))
        budget = max(3, int(seconds))  # st's own time; starting the controller comes on top
        cmd = [st, "--no-color", "run", ctl.url + "/openapi.json", "--checks", CHECKS, "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
               "--max-time", str(budget), "--workers", str(workers), "--seed", str(seed),
               "--exclude-path", "/v1/tokens/{token_id}", "--request-timeout", "30",
               "--report", "json,ndjson", "--report-json-path", str(report), "--report-ndjson-path", str(ndjson)]
        if max_examples:
            cmd += ["--max-examples", str(max_examples)]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=budget + 300,
                              env=dict(os.environ, NO_COLOR="1"))
        (workdir / "st.log").write_text(proc.stdout + proc.stderr)
        if not report.exists():
            raise RuntimeError(f"st run wrote no report (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        summary = json.loads(report.read_text())
        result.count = int(summary.get("test_cases", {}).get("generated", 0))
        result.extra["operations"] = summary.get("operations", {}).get("tested", 0)
        result.extra["seed"] = seed
        errors = summary.get("errors") or []
        if errors:
            result.extra["st errors"] = len(errors)
        warnings = {k: v for k, v in (summary.get("warnings") or {}).items() if v}
        if warnings:
            result.extra["st warnings"] = ", ".join(f"{k} ({len(v)})" for k, v in warnings.items())
        _failures(ndjson, findings)
        if ctl.proc.poll() is not None:
            findings.add("crash", "api: the controller died", ctl.log[-3000:])
        else:
            try:
                ctl.admin.get("/v1/status").raise_for_status()
            except httpx.HTTPError as e:
                findings.add("crash", "api: the controller stopped answering", str(e))
        log = ctl.log
        for found in re.finditer(r"Traceback|Exception in ASGI application", log):
            findings.add("crash", "api: traceback in the controller's log", log[max(0, found.start() - 300):found.end() + 3000])
    except Exception as e:  # noqa: BLE001 - the harness could not run: say so
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if ctl is not None:
            ctl.stop()
    result.seconds = time.monotonic() - start
    result.add_findings(findings)
    return result


def _failures(ndjson: Path, findings: Findings) -> None:
    """A finding per failing check, with the request and the response it got."""
    if not ndjson.exists():
        return
    for line in ndjson.read_text().splitlines():
        try:
            event = json.loads(line).get("ScenarioFinished")
        except ValueError:
            continue
        if not event or event.get("status") != "failure":
            continue
        rec = event.get("recorder") or {}
        for case_id, checks in (rec.get("checks") or {}).items():
            for check in checks:
                if check.get("status") != "failure":
                    continue
                failure = (check.get("failure_info") or {}).get("failure") or {}
                inter = (rec.get("interactions") or {}).get(case_id) or {}
                status = ((inter.get("response") or {}).get("status_code"))
                kind = "invariant"
                sig = f"api: {failure.get('code', '?')} {failure.get('title', check.get('name'))} on {failure.get('operation', rec.get('label'))}"
                if status is not None and int(status) >= 500:
                    sig += f" ({status})"
                repro = json.dumps({"check": check.get("name"), "failure": failure,
                                    "request": _decoded(inter.get("request") or {}),
                                    "response": _decoded(inter.get("response") or {})}, indent=1, default=str)
                findings.add(kind, sig, str(failure.get("message", ""))[:2000], repro.encode(), suffix=".json")


def _decoded(part: dict[str, Any]) -> dict[str, Any]:
    out = dict(part)
    for key in ("body", "content"):
        v = out.get(key)
        if isinstance(v, dict) and "$base64" in v:
            raw = base64.b64decode(v["$base64"])
            try:
                out[key] = raw.decode()
            except UnicodeDecodeError:
                out[key] = repr(raw[:2000])
    return out
