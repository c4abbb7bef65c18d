#!/usr/bin/env python3
"""Client-observed outage when the primary of a mirror module is powered off.

A two-node lab (``hakit lab``) runs the demo module; the client in its own namespace calls
the VIP over HTTP every 10 ms (a new TCP connection each time). For each run, the current
primary is powered off 1 s + U(0, interval) after probing starts (every process SIGKILLed,
links down, addresses lost), then powered on again once the other node has taken over, so the
next run powers off the other node.

Per run: **outage** = send time of the first answered request after the gap − send time of
the last answered request before it (10 ms = nothing lost); **takeover** = send time of the
first request answered by the new primary − time of the power-off. Both profiles run in one
invocation: default (interval 500 ms, timeout 3 s) and fast (100 ms, 500 ms).

With ``--keepalived`` the anchor ``../shared/bench-anchors/bench_keepalived.py`` runs right
after, in the same invocation, for its ``kill9svc`` (daemon and service die) and ``linkdown``
(cable) cases at advert 1 s and 0.1 s, so the figures compare on one machine at one time.

    .venv/bin/python bench/failover.py [--runs 5] [--keepalived]

Prints median [min–max] per profile and the exact command; writes bench/results/failover.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from hakit.config import parse_duration
from hakit.lab import agents
from hakit.lab.cli import PROFILES, probe_during, start_modules
from hakit.lab.lab import Lab

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "bench-anchors"
MODULE = "mirror-demo"


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.0f} [{min(values):.0f}–{max(values):.0f}]"


def run_profile(lab: Lab, profile: str, runs: int, console: Console) -> list[dict[str, object]]:
    interval, timeout = PROFILES[profile]
    lab.up(nodes=2, modules=[MODULE], interval=interval, timeout=timeout)
    agents.wait_agents(lab)
    start_modules(lab, console)
    interval_s, timeout_s = parse_duration(interval), parse_duration(timeout)
    results = []
    for i in range(runs):
        primary, secondary = agents.wait_pair(lab, MODULE, timeout=60)
        fault_at: dict[str, float] = {}

        def poweroff(node: str = primary, mark: dict[str, float] = fault_at) -> None:
            mark["t"] = time.monotonic()
            lab.poweroff(node)

        seconds = 4.0 + 1.5 * timeout_s  # long enough to see the takeover and answers after it
        analysis = probe_during(lab, seconds, poweroff, delay=1.0 + random.uniform(0, interval_s))
        outage = analysis.outage.seconds * 1000 if analysis.outage else None
        first_new = None
        if analysis.outage and analysis.outage.after == secondary:
            first_new = (analysis.outage.end - fault_at["t"]) * 1000
        row = {
            "profile": profile,
            "run": i + 1,
            "powered_off": primary,
            "outage_ms": outage,
            "takeover_ms": first_new,
            "switches": analysis.switches,
            "interleaved": analysis.interleaved,
            "ok": analysis.ok,
            "total": analysis.total,
        }
        results.append(row)
        console.print(
            f"  {profile} run {i + 1}: powered off {primary}: outage {outage:.0f} ms, "
            f"takeover {first_new or float('nan'):.0f} ms, answers "
            f"{' -> '.join(analysis.switches)}{' INTERLEAVED' if analysis.interleaved else ''}"
        )
        lab.poweron(primary)
        agents.wait_states(lab, MODULE, {primary: "SECOND", secondary: "PRIM"}, timeout=60)
    lab.down()
    return results


def run_keepalived(runs: int, console: Console) -> dict[str, object] | None:
    script = ANCHORS / "bench_keepalived.py"
    if not script.exists():
        console.print(f"[red]{script} not found: keepalived not measured[/red]")
        return None
    out = HERE / "results" / "keepalived.json"
    argv = [
        sys.executable,
        str(script),
        "--reps",
        str(runs),
        "--adverts",
        "1,0.1",
        "--scenarios",
        "kill9svc,linkdown",
        "--out",
        str(out),
    ]
    console.print(f"running the keepalived anchor: {' '.join(argv)}")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
    for line in proc.stdout.splitlines():
        if "outage_ms" in line or line.startswith("RESULT"):
            console.print(f"  {line}", markup=False)
    if proc.returncode != 0:
        console.print(
            f"[red]keepalived anchor failed ({proc.returncode}): {proc.stderr[-500:]}[/red]"
        )
        return None
    summary: dict[str, object] = json.loads(out.read_text())
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profiles", default="default,fast")
    ap.add_argument("--keepalived", action="store_true", help="also run the keepalived anchor")
    ap.add_argument("--root", default="/var/lib/hakit-lab-bench")
    args = ap.parse_args()
    console = Console(highlight=False)
    command = " ".join([".venv/bin/python", "bench/failover.py", *sys.argv[1:]])
    lab = Lab(args.root)
    rows: list[dict[str, object]] = []
    try:
        for profile in args.profiles.split(","):
            console.print(
                f"[bold]profile {profile}[/] (interval/timeout {'/'.join(PROFILES[profile])})"
            )
            rows += run_profile(lab, profile, args.runs, console)
    finally:
        lab.down()
    keepalived = run_keepalived(args.runs, console) if args.keepalived else None
    console.print(
        f"\n[bold]hakit failover on primary power-off[/] "
        f"(n={args.runs} per profile; ms, median \\[min–max])"
    )
    summary: dict[str, object] = {"command": command, "runs": rows, "hakit": {}}
    for profile in args.profiles.split(","):
        mine = [r for r in rows if r["profile"] == profile]
        outage = [float(r["outage_ms"]) for r in mine if r["outage_ms"] is not None]  # type: ignore[arg-type]
        takeover = [float(r["takeover_ms"]) for r in mine if r["takeover_ms"] is not None]  # type: ignore[arg-type]
        bad = sum(1 for r in mine if r["interleaved"])
        summary["hakit"][profile] = {
            "outage_ms": outage,
            "takeover_ms": takeover,
            "interleaved": bad,
        }  # type: ignore[index]
        console.print(
            f"  {profile:8} outage {spread(outage)}   takeover {spread(takeover)}   "
            f"interleaved runs {bad}"
        )
    if keepalived is not None:
        summary["keepalived"] = keepalived
        trials = keepalived.get("trials", {})
        assert isinstance(trials, dict)
        for key, res in trials.items():
            outage = [float(r["outage_ms"]) for r in res if r.get("outage_ms") is not None]
            takeover = [float(r["takeover_ms"]) for r in res if r.get("takeover_ms") is not None]
            console.print(
                f"  keepalived {key:22} outage {spread(outage)}   takeover {spread(takeover)}"
            )
    console.print(f"\ncommand: {command}")
    out = HERE / "results" / "failover.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
