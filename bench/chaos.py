#!/usr/bin/env python3
"""Long fault-injection runs (issue 5): ``hakit lab chaos`` with many faults, for the record.

    .venv/bin/python bench/chaos.py --faults 300 [--seed 5] [--kinds poweroff,cut,...]

Builds the chaos lab (2 nodes, fast heartbeat profile 100 ms / 500 ms, a witness on the
client host, each node's data on a 128 MB tmpfs), runs the seeded schedule of faults of
:mod:`hakit.lab.chaos` while the client writes records through the VIP, then checks: records
lost (must be 0), unexpected (0), dual primaries from the client and the agent logs (0),
differences between the copies (0), pairs that did not come back (0). Prints the table of
faults by kind with the client-observed outage median [min–max] and the exact command;
writes the whole report to bench/results/chaos-<date>-seed<S>-<N>.json. Root only; takes the
lab namespaces (hksw, hkc, hkn1, hkn2): run nothing else in the lab meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console

from hakit.lab import chaos
from hakit.lab.cli import run_chaos_lab
from hakit.lab.lab import Lab

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", type=int, default=300)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(chaos.KINDS))
    ap.add_argument("--root", default="/var/lib/hakit-lab-bench")
    args = ap.parse_args()
    console = Console(highlight=False)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    report = run_chaos_lab(Lab(args.root), args.seed, args.faults, kinds, console)
    chaos.print_report(report, console.file)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"chaos-{time.strftime('%Y-%m-%d')}-seed{args.seed}-{args.faults}.json"
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    console.print(f"report: {out}")
    if not report.ok:  # every request, to find the faults around what went wrong
        lines = out.with_suffix(".requests.jsonl")
        lines.write_text("".join(json.dumps(r) + "\n" for r in report.requests))
        console.print(f"requests: {lines}")
    console.print(f"command: .venv/bin/python bench/chaos.py {shlex.join(sys.argv[1:])}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
