"""Run the fuzzing harnesses, each for a set time, and print a summary line per harness.

    python -m tools.fuzz                                  # every harness, $FUZZ_SECONDS (60) each
    python -m tools.fuzz --seconds 10 framing executor    # some of them
    python -m tools.fuzz --seconds 600 --frames 500000 live
    python -m tools.fuzz framing=240 executor=600 live=900    # a time for each

Harnesses: framing, messages, executor (atheris, in child processes), live (a real server),
api (schemathesis against a real controller). Corpora, logs, findings and their reproducers
stay in the work folder (`--workdir`, else a new temporary one), printed at the end; the exit
status is 1 if any harness found a crash, a hang, a leftover worker or a broken invariant
(Note [Findings] in common.py), or could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.fuzz.common import Result

HARNESSES = ("framing", "messages", "live", "executor", "api")


def run_one(name: str, seconds: float, base: Path, args: argparse.Namespace) -> Result:
    workdir = base / name
    workdir.mkdir(parents=True, exist_ok=True)
    if name in ("framing", "messages", "executor"):
        from tools.fuzz import libfuzzer

        env = {}
        recorded = base / "live" / "recorded.msgpack"
        if name == "executor" and recorded.exists():
            env["GPUPOOL_FUZZ_RECORDED"] = str(recorded)
        return libfuzzer.run(name, f"tools.fuzz.{name}", seconds, workdir, env=env,
                             max_len=262_144 if name == "executor" else 65_536)
    if name == "live":
        from tools.fuzz import live

        return live.run(seconds, workdir, max_frames=args.frames or 10**12, sessions=args.live_sessions,
                        prehandshake=args.live_prehandshake, record=not args.no_record, seed=args.seed)
    if name == "api":
        from tools.fuzz import api

        return api.run(seconds, workdir, seed=args.seed)
    raise SystemExit(f"unknown harness {name!r}; choose from {', '.join(HARNESSES)}")


def report(results: list[Result], base: Path, wall: float) -> bool:
    failed = False
    print()
    for r in results:
        print(r.summary())
        failed |= r.failed
    for r in results:
        for f in r.findings:
            print(f"  [{r.harness}] {f['kind']} x{f['count']}: {f['signature']}")
            if f.get("reproducer"):
                print(f"      reproducer: {f['reproducer']}")
    decoder = sum(r.count for r in results if r.harness in ("framing", "messages", "executor"))
    frames = sum(r.count for r in results if r.harness == "live")
    cases = sum(r.count for r in results if r.harness == "api")
    print(f"fuzz total: {decoder} decoder/executor inputs, {frames} live frames, {cases} API cases "
          f"in {wall:.0f} s; work folder {base}")
    summary = [dict(vars(r), failed=r.failed) for r in results]
    (base / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return failed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("harnesses", nargs="*", default=list(HARNESSES),
                   help=f"of {', '.join(HARNESSES)}; NAME=SECONDS gives one its own time")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)),
                   help="time for each harness (default $FUZZ_SECONDS, else 60)")
    p.add_argument("--frames", type=int, default=int(os.environ.get("FUZZ_FRAMES", 0)),
                   help="live: stop at this many frames sent, if before --seconds")
    p.add_argument("--workdir", default=None, help="where corpora and findings go (default: a new temporary folder)")
    p.add_argument("--jobs", type=int, default=1, help="harnesses run at once")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--live-sessions", type=int, default=2, help="live: sessions fuzzed in parallel")
    p.add_argument("--live-prehandshake", type=int, default=2, help="live: handshake fuzzers in parallel")
    p.add_argument("--no-record", action="store_true", help="live: fuzz from built seeds, not a recorded client")
    args = p.parse_args(argv)
    seconds: dict[str, float] = {}
    for h in args.harnesses:
        name, _, own = h.partition("=")
        if name not in HARNESSES:
            p.error(f"unknown harness {name!r}; choose from {', '.join(HARNESSES)}")
        try:
            seconds[name] = float(own) if own else args.seconds
        except ValueError:
            p.error(f"{h!r}: expected NAME=SECONDS")
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpupool-fuzz-"))
    base.mkdir(parents=True, exist_ok=True)
    print("fuzzing " + ", ".join(f"{h} for {t:g} s" for h, t in seconds.items()) + f"; work folder {base}", flush=True)
    start = time.monotonic()

    def one(name: str) -> Result:
        r = run_one(name, seconds[name], base, args)
        print(r.summary(), flush=True)
        return r

    order = [h for h in HARNESSES if h in seconds]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, order))
    failed = report(results, base, time.monotonic() - start)
    sys.exit(1 if failed else 0)
