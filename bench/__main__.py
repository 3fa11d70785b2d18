"""``python -m bench``: start what the scenarios need, run them, print tables, stop everything."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import peers, report, scenarios, soak, streams, wrk
from bench.procs import Layout, interrupt_on_signals, pin_self
from bench.report import Outcome
from bench.settings import Settings

SCENARIOS: dict[str, Callable[[Settings], Outcome]] = {
    "overhead": scenarios.overhead,
    "relay": scenarios.relay,
    "streams": streams.streams,
    "anthropic": scenarios.anthropic,
    "peers": peers.scenario,
    "soak": soak.soak,
}
DEFAULT = ("overhead", "relay", "streams", "anthropic", "peers")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load tests of cortex against a direct connection, nginx and peer gateways.",
    )
    ap.add_argument("--quick", action="store_true", help="short run (< ~3 minutes)")
    ap.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable); default: all but soak",
    )
    ap.add_argument("--soak", action="store_true", help="also run the soak (long)")
    ap.add_argument("--soak-requests", type=int, default=1_000_000, metavar="N")
    ap.add_argument("--profile", action="store_true", help="py-spy cortex under the relay load")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--install-peers", action="store_true", help="install vllm-router and LiteLLM")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    return ap.parse_args(argv)


def chosen(args: argparse.Namespace) -> list[str]:
    names = list(args.scenario or DEFAULT)
    if args.soak and "soak" not in names:
        names.append("soak")
    if args.profile and "relay" not in names:
        names.insert(0, "relay")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.install_peers:
        return 0 if all(v == "ok" for v in peers.install().values()) else 1
    if not wrk.available():
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    interrupt_on_signals()
    layout = Layout.choose(pin=not args.no_pin)
    pin_self(layout.client)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"cortex-bench-{stamp}-"))
    settings = Settings.make(
        quick=args.quick,
        layout=layout,
        workdir=workdir,
        stamp=stamp,
        profile=args.profile,
        soak_requests=args.soak_requests,
    )
    run = {
        "machine": report.machine(),
        "pinning": layout.describe(),
        "quick": args.quick,
        "cortex_source": report.cortex_source(),
    }
    print(f"cortex bench {stamp}: {'quick' if args.quick else 'full'} run", flush=True)
    print(f"machine: {run['machine']}", flush=True)
    print(f"pinned: {layout.describe()}", flush=True)
    print(f"cortex source: {run['cortex_source']}", flush=True)
    print(f"logs: {workdir}", flush=True)
    outcomes: list[Outcome] = []
    interrupted = False
    try:
        for name in chosen(args):
            outcomes.append(_run_one(name, settings))
            outcomes[-1].print()
    except KeyboardInterrupt:
        print("\ninterrupted: every process was stopped", file=sys.stderr)
        interrupted = True
    finally:
        if outcomes:
            path = report.write_json(stamp, run, outcomes)
            _summary(outcomes)
            print(f"\nresults: {path}", flush=True)
    failed = interrupted or any(o.skipped.startswith("failed") for o in outcomes)
    if args.keep_logs or failed:
        print(f"logs kept: {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _run_one(name: str, s: Settings) -> Outcome:
    source = report.cortex_source()
    print(f"\n--- {name} --- (cortex source: {source})", flush=True)
    started = time.monotonic()
    try:
        outcome = SCENARIOS[name](s)
    except Exception as exc:  # one broken scenario must not hide the others' results
        traceback.print_exc()
        outcome = Outcome(name, skipped=f"failed: {type(exc).__name__}: {exc}")
    outcome.data["seconds"] = round(time.monotonic() - started, 1)
    outcome.data["cortex_source"] = source
    return outcome


def _summary(outcomes: list[Outcome]) -> None:
    checks = [c for o in outcomes for c in o.checks]
    if checks:
        print("\n" + report.checks_table("=== all targets ===", checks).render())
    for o in outcomes:
        if o.skipped:
            print(f"  {o.name}: {o.skipped.splitlines()[0]}")


if __name__ == "__main__":
    sys.exit(main())
