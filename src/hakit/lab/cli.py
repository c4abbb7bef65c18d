"""`hakit lab …`: a whole cluster on this machine (network namespaces on an isolated bridge).

hakit lab up [--nodes 2] [--module TEMPLATE[:NAME]]… [--profile default|fast]
hakit lab status | down | heal
hakit lab exec NODE -- CMD…           (NODE may be "client")
hakit lab poweroff|poweron|cut|pause|resume|diskfull|diskfree NODE
hakit lab partition NODE_A NODE_B
hakit lab probe [--seconds S] [--json]
hakit lab demo                         the guided tour `make demo` runs
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hakit.lab import agents, chaos, faults
from hakit.lab.lab import DEFAULT_ROOT, Lab
from hakit.lab.probe import Analysis, format_summary

PROFILES = {"default": ("500ms", "3s"), "fast": ("100ms", "500ms")}


def add_lab_parser(sub: Any) -> None:
    lab = sub.add_parser("lab", help="a whole cluster on this machine, for trying hakit and tests")
    lab.add_argument(
        "--root", default=str(DEFAULT_ROOT), help="lab directory (default %(default)s)"
    )
    ls = lab.add_subparsers(dest="lab_command", required=True, metavar="SUBCOMMAND")
    up = ls.add_parser("up", help="build the lab, start the agents and the modules")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument(
        "--module",
        action="append",
        dest="modules",
        metavar="TEMPLATE[:NAME]",
        help="module template (repeatable; default mirror-demo)",
    )
    up.add_argument("--networks", type=int, default=1, choices=(1, 2))
    up.add_argument(
        "--data-size",
        default=None,
        metavar="SIZE",
        help="each node's data on its own tmpfs of SIZE (e.g. 256M), for `lab diskfull`",
    )
    up.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="default",
        help="heartbeat timing: default (500ms/3s) or fast (100ms/500ms)",
    )
    up.add_argument(
        "--no-start", action="store_true", help="start the agents only, not the modules"
    )
    up.add_argument(
        "--witness",
        action="store_true",
        help="run a witness on the client host and use it as the nodes' arbiter",
    )
    ls.add_parser("status", help="hosts, links and module states")
    ls.add_parser("down", help="remove everything the lab created (also after a crash)")
    ls.add_parser("heal", help="plug every cut cable back and remove every partition")
    ex = ls.add_parser("exec", help="run a command in a node's namespace (or 'client')")
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    for verb, text in (
        ("poweroff", "pull the plug of a node (SIGKILL everything, links down)"),
        ("poweron", "boot a node again (its agent starts as at boot)"),
        ("cut", "unplug a node's network cable(s); processes keep running"),
    ):
        p = ls.add_parser(verb, help=text)
        p.add_argument("node")
    pa = ls.add_parser(
        "partition", help="cut the traffic between two nodes only (both still reach the client)"
    )
    pa.add_argument("node_a")
    pa.add_argument("node_b")
    for verb, text in (
        ("pause", "SIGSTOP a node's agent (its application keeps running)"),
        ("resume", "SIGCONT a paused agent"),
        ("diskfull", "fill a node's data file system (lab built with --data-size)"),
        ("diskfree", "give a node's data file system its space back"),
    ):
        p = ls.add_parser(verb, help=text)
        p.add_argument("node")
    cj = ls.add_parser("clockjump", help="step a node's wall clock by SECONDS (negative: back)")
    cj.add_argument("node")
    cj.add_argument("seconds", type=float)
    pr = ls.add_parser("probe", help="the client calls the VIP every 10 ms and reports outages")
    pr.add_argument("--seconds", type=float, default=10.0)
    pr.add_argument("--target", default=None, help="ADDRESS:PORT (default: first module's VIP)")
    pr.add_argument(
        "--sources",
        type=int,
        default=0,
        help="send from N client addresses in turn (farm: shows the share of each node)",
    )
    pr.add_argument("--json", action="store_true")
    ls.add_parser("demo", help="guided tour: failover, rejoin, swap (what `make demo` runs)")
    ch = ls.add_parser(
        "chaos",
        help="build a lab with a witness, inject random faults under load, check nothing is lost",
    )
    ch.add_argument("--seed", type=int, default=1)
    ch.add_argument("--faults", type=int, default=10)
    ch.add_argument("--kinds", default=",".join(chaos.KINDS), help="comma-separated fault kinds")
    ch.add_argument("--json", type=Path, default=None, help="also write the report here")
    ch.add_argument("--keep", action="store_true", help="leave the lab up afterwards")


def run_lab(args: argparse.Namespace, console: Console) -> int:
    lab = Lab(args.root)
    cmd = args.lab_command
    if cmd == "up":
        interval, timeout = PROFILES[args.profile]
        modules = args.modules or ["mirror-demo"]
        with console.status("building the lab (namespaces, bridge, agents)…"):
            state = lab.up(
                nodes=args.nodes,
                modules=modules,
                networks=args.networks,
                interval=interval,
                timeout=timeout,
                data_size=args.data_size,
                witness=args.witness,
            )
            agents.wait_agents(lab)
        console.print(
            f"lab up: nodes {', '.join(state.nodes)}, client 192.0.2.50, "
            f"modules {', '.join(m.name for m in state.modules)}"
        )
        if not args.no_start:
            start_modules(lab, console)
        print_states(lab, console)
        return 0
    if cmd == "down":
        removed = lab.down()
        console.print(f"lab down ({len(removed)} namespaces removed)")
        return 0
    if cmd == "status":
        status = lab.status()
        if not status.up:
            console.print(
                f"no lab at {lab.root}"
                + (f"; stray namespaces: {status.namespaces}" if status.namespaces else "")
            )
            return 1
        print_hosts(status.to_dict(), console)
        print_states(lab, console)
        return 0
    if cmd == "heal":
        lab.heal()
        console.print("every cable plugged back")
        return 0
    if cmd == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            console.print("[red]give a command after --[/red]")
            return 2
        return lab.exec(args.node, argv)
    if cmd == "partition":
        faults.partition(lab, args.node_a, args.node_b)
        console.print(f"{args.node_a} and {args.node_b} no longer reach each other (`lab heal`)")
        return 0
    if cmd in ("pause", "resume"):
        pid = getattr(faults, cmd)(lab, args.node)
        console.print(f"{args.node}: agent (pid {pid}) {cmd}d")
        return 0
    if cmd == "clockjump":
        offset = faults.clockjump(lab, args.node, args.seconds)
        console.print(f"{args.node}: wall clock stepped by {args.seconds:+g} s (now {offset:+g} s)")
        return 0
    if cmd == "diskfull":
        taken = faults.diskfull(lab, args.node)
        console.print(f"{args.node}: data file system full ({taken / 1e6:.0f} MB taken)")
        return 0
    if cmd == "diskfree":
        freed = faults.diskfree(lab, args.node)
        console.print(f"{args.node}: " + ("space given back" if freed else "was not full"))
        return 0
    if cmd in ("poweroff", "poweron", "cut"):
        getattr(lab, cmd)(args.node)
        console.print(f"{args.node}: {cmd} done")
        return 0
    if cmd == "probe":
        analysis = lab.probe(args.seconds, target=args.target, sources=args.sources)
        if args.json:
            print(json.dumps(analysis.to_dict(), indent=2))
        else:
            console.print(format_summary(analysis), markup=False)
        return 0
    if cmd == "chaos":
        kinds = tuple(k for k in args.kinds.split(",") if k)
        unknown = sorted(set(kinds) - set(chaos.KINDS))
        if unknown:
            console.print(f"[red]unknown fault kinds {unknown}[/red] (known: {chaos.KINDS})")
            return 2
        report = run_chaos_lab(lab, args.seed, args.faults, kinds, console, keep=args.keep)
        chaos.print_report(report, console.file)
        if args.json:
            args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        return 0 if report.ok else 1
    if cmd == "demo":
        from hakit.lab.demo import run_demo  # noqa: PLC0415

        return int(run_demo(lab, console))
    raise AssertionError(cmd)  # pragma: no cover


def run_chaos_lab(
    lab: Lab,
    seed: int,
    count: int,
    kinds: tuple[str, ...],
    console: Console,
    *,
    keep: bool = False,
) -> chaos.Report:
    """Build the chaos lab (2 nodes, fast timing, a witness, data on 128 MB tmpfs), run the
    faults, take it down (unless ``keep``, or the run failed: its logs are for reading)."""
    interval, timeout = PROFILES["fast"]
    with console.status("building the lab (2 nodes, a witness)…"):
        lab.up(nodes=2, interval=interval, timeout=timeout, witness=True, data_size="128M")
        agents.wait_agents(lab)
    report = None
    try:
        start_modules(lab, console)
        report = chaos.run_chaos(lab, seed, count, kinds, progress=console.print)
        return report
    finally:
        if keep or (report is not None and not report.ok):
            console.print(f"the lab is left up at {lab.root} (logs under it); `lab down` ends it")
        else:
            lab.down()


def start_modules(lab: Lab, console: Console) -> None:
    """`hakit start -m M` on every node at the same instant, then wait for PRIM + SECOND
    (mirror modules) or for every node UP with all buckets placed (farm modules)."""
    state = lab.state()
    for spec in state.modules:
        agents.command_all(lab, spec.name, "start")
    for spec in state.modules:
        if spec.template.startswith("farm"):
            with console.status(f"waiting for {spec.name} to be UP on every node…"):
                agents.wait_farm(lab, spec.name, list(state.nodes), timeout=30)
            continue
        with console.status(f"waiting for {spec.name} to be PRIM + SECOND…"):
            agents.wait_pair(lab, spec.name, timeout=30)


def print_states(lab: Lab, console: Console) -> None:
    table = Table(title="module states", title_justify="left")
    state = lab.state()
    table.add_column("module")
    for node in state.nodes:
        table.add_column(node)
    table.add_column("reason (primary side)", overflow="fold")
    views = {n: agents.view(lab, n) for n in state.nodes}
    for spec in state.modules:
        cells, reason = [], ""
        for node in state.nodes:
            v = views[node]
            m = v["modules"].get(spec.name) if v else None
            if m is None:
                cells.append("[grey50]down[/]" if v is None else "-")
                continue
            cells.append(f"[{m['colour']}]{m['state']}[/]")
            if m["state"] in ("PRIM", "ALONE") or not reason:
                reason = m["reason"]
        table.add_row(spec.name, *cells, reason)
    console.print(table)


def print_hosts(status: dict[str, Any], console: Console) -> None:
    table = Table(title=f"lab at {status['root']}", title_justify="left")
    for col in ("host", "namespace", "power", "agent", "links", "addresses"):
        table.add_column(col, overflow="fold")
    for h in status["hosts"]:
        links = ", ".join(
            f"{link['interface']} "
            + ("up" if link["admin_up"] and link["bridge_port_up"] else "[red]down[/]")
            for link in h["links"]
        )
        addrs = ", ".join(a for link in h["links"] for a in link["addresses"])
        agent = (
            ""
            if h["name"] == "client"
            else ("running" if h["agent_alive"] else "[red]not running[/]")
        )
        power = "on" if h["powered"] else "[red]off[/]"
        table.add_row(h["name"], h["namespace"], power, agent, links, addrs)
    console.print(table)


def probe_during(lab: Lab, seconds: float, action: Any, delay: float = 1.0) -> Analysis:
    """Run the prober for ``seconds`` and call ``action()`` ``delay`` s after it started."""
    result: dict[str, Analysis] = {}
    thread = threading.Thread(target=lambda: result.update(a=lab.probe(seconds)))
    thread.start()
    time.sleep(delay)
    action()
    thread.join()
    return result["a"]
