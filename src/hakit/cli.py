"""`hakit` — the command line.

    hakit agent                          run this node's agent (normally a service)
    hakit state [-m M] [--json]          states of every module (or one, with an exit code)
    hakit start|stop|restart|stopstart|swap|prim|second -m M
    hakit log -m M [-n LINES]            the module's log (transitions and script output)
    hakit config check                   validate the configuration, list every problem
    hakit lab …                          a whole cluster on this machine (see `hakit lab -h`)

The configuration file is ``--config``, else ``$HAKIT_CONFIG``, else /etc/hakit/cluster.toml.
`hakit state -m M` exits with STOP=0, WAIT=1, ALONE=2, UP=2, PRIM=3, SECOND=4 (5: error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hakit import config as configmod
from hakit.agent.heartbeat_size import heartbeat_problems
from hakit.api.client import AgentClient, CommandRefusedByAgent
from hakit.errors import ConfigError, HakitError
from hakit.model import State

EXIT_ERROR = 5
VERBS = ("start", "stop", "restart", "stopstart", "swap", "prim", "second")
VERB_HELP = {
    "start": "start the module on this node (it becomes PRIM, SECOND or ALONE)",
    "stop": "stop the module on this node (a primary hands over to the secondary)",
    "restart": "on the primary: stop_prim then start_prim, without failover",
    "stopstart": "stop the module on this node, then start it again",
    "swap": "exchange the roles of primary and secondary",
    "prim": "start, or switch, this node as primary",
    "second": "start, or switch, this node as secondary",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hakit",
        description=__doc__.split("\n\n")[0].split("—")[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="cluster file (default: $HAKIT_CONFIG or /etc/hakit/cluster.toml)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # --config is accepted before or after the command (`hakit agent --config F`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub_add = sub.add_parser
    sub.add_parser = lambda *a, **k: sub_add(*a, parents=[common], **k)  # type: ignore[method-assign]

    a = sub.add_parser("agent", help="run this node's agent in the foreground")
    a.add_argument(
        "--node",
        default=None,
        help="this node's name (default: $HAKIT_NODE, the hostname, or the node owning "
        "a local address)",
    )

    s = sub.add_parser("state", help="module states on this node")
    s.add_argument("-m", "--module")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    for verb in VERBS:
        c = sub.add_parser(verb, help=VERB_HELP[verb])
        c.add_argument("-m", "--module", required=True)
        if verb == "prim":
            c.add_argument(
                "--force",
                action="store_true",
                help="start as primary on data that cannot be proven up to date: changes "
                "the peer made alone are lost, the peer is fully resynchronised from this node "
                "(asks for confirmation)",
            )
            c.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    for name, what in (
        ("verify", "compare both copies block by block and report differences (on the primary)"),
        ("diff", "estimate what a resync would send: differing files and bytes (on the primary)"),
    ):
        v = sub.add_parser(name, help=what)
        v.add_argument("-m", "--module", required=True)
        v.add_argument("--json", action="store_true")

    fs = sub.add_parser(
        "fullsync",
        help="resynchronise the secondary completely: compare both trees block by block and "
        "send every difference, while the application runs (on the primary)",
    )
    fs.add_argument("-m", "--module", required=True)

    lg = sub.add_parser("log", help="the module's log on this node")
    lg.add_argument("-m", "--module", required=True)
    lg.add_argument("-n", "--lines", type=int, default=50)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cfg_sub.add_parser("check", help="validate the cluster file and module folders")

    w = sub.add_parser("witness", help="run a witness (arbiter) for this cluster, on a third host")
    w.add_argument("--listen", required=True, metavar="ADDRESS:PORT")
    w.add_argument("--lease", type=float, default=None, help="lease duration (default: config)")
    w.add_argument("--state", type=Path, default=None, help="state file (default: state_dir)")
    w.add_argument("--new", action="store_true", help="first start: create the state file")

    from hakit.lab.cli import add_lab_parser  # noqa: PLC0415 - keeps `hakit state` start-up light

    add_lab_parser(sub)
    return p


def config_path(args: argparse.Namespace) -> Path:
    return args.config or Path(os.environ.get("HAKIT_CONFIG", configmod.DEFAULT_CLUSTER_FILE))


def client_for(args: argparse.Namespace) -> AgentClient:
    cfg = configmod.load(config_path(args))
    return AgentClient(Path(cfg.cluster.run_dir) / "agent.sock")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    console = Console(stderr=False, highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        return _dispatch(args, console)
    except ConfigError as exc:
        err.print(f"[red]configuration problems ({len(exc.problems)}):[/red]")
        for problem in exc.problems:
            err.print(f"  - {problem}", markup=False)
        return EXIT_ERROR
    except HakitError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "agent":
        return _agent(args)
    if args.command == "state":
        return _state(args, console)
    if args.command in VERBS:
        return _verb(args, console)
    if args.command in ("verify", "diff"):
        return _compare(args, console)
    if args.command == "fullsync":
        try:
            answer = client_for(args).fullsync(args.module)
        except CommandRefusedByAgent as exc:
            Console(stderr=True).print(f"[red]refused:[/red] {exc}")
            return EXIT_ERROR
        console.print(f"{args.module}: {answer['detail']}; follow it with `hakit state`")
        return 0
    if args.command == "log":
        sys.stdout.write(client_for(args).log(args.module, args.lines))
        return 0
    if args.command == "config":
        cfg = configmod.load(config_path(args))
        problems = heartbeat_problems(cfg)
        if problems:
            raise ConfigError(problems)
        console.print(
            f"[green]configuration OK[/green]: cluster {cfg.cluster.name!r}, "
            f"nodes {', '.join(sorted(cfg.cluster.nodes))}, "
            f"modules {', '.join(sorted(cfg.modules)) or '(none)'}"
        )
        if not cfg.cluster.arbitration.arbiters and any(not m.farm for m in cfg.modules.values()):
            console.print(
                "[yellow]warning: no arbiter[/yellow]: if the nodes lose each other but keep "
                "running, both become primary until the network heals; add [arbitration] "
                "witnesses = [...] (docs/split-brain.md)"
            )
        return 0
    if args.command == "witness":
        from hakit.net import witness  # noqa: PLC0415

        argv = ["-c", str(config_path(args)), "--listen", args.listen]
        argv += ["--duration", str(args.lease)] if args.lease else []
        argv += ["--state", str(args.state)] if args.state else []
        return witness.main(argv + (["--new"] if args.new else []))
    if args.command == "lab":
        from hakit.lab.cli import run_lab  # noqa: PLC0415

        return run_lab(args, console)
    raise HakitError(f"unknown command {args.command}")  # pragma: no cover


def _agent(args: argparse.Namespace) -> int:
    from hakit.agent.driver import Agent  # noqa: PLC0415

    cfg = configmod.load(config_path(args))
    node = args.node or os.environ.get("HAKIT_NODE") or _guess_node(cfg)
    asyncio.run(Agent(cfg, node).run())
    return 0


def _guess_node(cfg: configmod.Config) -> str:
    host = socket.gethostname().split(".")[0]
    if host in cfg.cluster.nodes:
        return host
    from hakit.system.run import run  # noqa: PLC0415

    out = run(["ip", "-j", "addr", "show"], timeout=5).stdout
    local = {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}
    node = cfg.node_for_local_addresses(local)
    if node is None:
        raise HakitError("cannot tell which node this is: pass --node NAME or set HAKIT_NODE")
    return node


def _state(args: argparse.Namespace, console: Console) -> int:
    view = client_for(args).state()
    modules = view["modules"]
    if args.module:
        if args.module not in modules:
            raise HakitError(f"no module {args.module!r} on node {view['node']}")
        modules = {args.module: modules[args.module]}
    if args.json:
        print(json.dumps({**view, "modules": modules}, indent=2, sort_keys=True))
    else:
        console.print(state_table(view["node"], modules, view.get("peers", {})))
    if args.module:
        return State(modules[args.module]["state"]).exit_code
    return 0


def state_table(node: str, modules: dict[str, Any], peers: dict[str, Any]) -> Table:
    """The coloured state table of one node (used by `hakit state` and the lab)."""
    table = Table(title=f"node {node}", title_justify="left", expand=False)
    farm = any(m.get("mode") == "farm" for m in modules.values())
    cols = ("peer / members", "data / packets") if farm else ("peer", "data")
    for col in ("module", "state", "since", *cols, "reason"):
        table.add_column(col, overflow="fold")
    for name, m in sorted(modules.items()):
        if m.get("mode") == "farm":
            table.add_row(name, *farm_cells(m))
            continue
        peer = m.get("peer") or ""
        alive = peers.get(peer, {}).get("alive")
        peer_text = f"{peer} {m.get('peer_state') or ('lost' if alive is False else '?')}"
        arb = m.get("arbitration")
        if arb:
            peer_text += f"\nlease (term {arb['term']})" if arb["lease"] else "\nno lease"
        since = time.strftime("%H:%M:%S", time.localtime(m["since"])) if m.get("since") else ""
        table.add_row(
            name,
            f"[{m['colour']}]{m['state']}[/]",
            since,
            peer_text,
            data_text(m.get("replication")),
            m.get("reason", ""),
        )
    return table


def farm_cells(m: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """state, since, peer, data and reason cells of a farm module: ``UP 86/256``, the
    members, and the packet counters of this node's filter."""
    farm = m.get("farm", {})
    since = time.strftime("%H:%M:%S", time.localtime(m["since"])) if m.get("since") else ""
    shares = farm.get("shares", {})
    members = " ".join(f"{n}:{k}" for n, k in sorted(shares.items())) or "none"
    per_node = farm.get("node_counters") or {}
    packets = (
        "\n".join(
            f"{node}: new {c.get('new', 0)}, est {c.get('established', 0)}, "
            f"drop {c.get('dropped', 0) + c.get('early', 0)}"
            for node, c in sorted(per_node.items())
            if c
        )
        or "-"
    )
    arp = " (answers ARP)" if farm.get("arp") else ""
    state = f"[{m['colour']}]{m['state']} {farm.get('buckets', 0)}/256[/]{arp}"
    return state, since, f"members {members}", packets, m.get("reason", "")


def data_text(repl: dict[str, Any] | None) -> str:
    """``up to date g7 in sync`` / ``resync 45 % ETA 12 s`` for the state table."""
    if not repl:
        return "-"
    text = f"{repl['data']} g{repl['generation']}"
    progress = repl.get("resync") or {}
    if repl.get("mode") == "resync" and "percent" in progress:
        text += f", resync {progress['percent']:.0f} % ({progress['bytes_sent'] / 1e6:.0f} MB"
        text += f", ETA {progress['eta_s']:.0f} s)"
    elif repl.get("in_sync"):
        text += ", in sync"
    elif repl.get("mode") == "alone":
        text += ", tracking changes"
    return text


def _compare(args: argparse.Namespace, console: Console) -> int:
    """verify / diff: exit 0 when the copies are the same, 1 when they differ."""
    try:
        report = client_for(args).compare(args.module, checksums=args.command == "verify")
    except CommandRefusedByAgent as exc:
        Console(stderr=True).print(f"[red]refused:[/red] {exc}")
        return EXIT_ERROR
    if args.json:
        console.print_json(data=report)
    else:
        console.print(
            f"{args.module}: {report['checked_paths']} paths compared"
            + (
                f", {report['checked_bytes'] / 1e6:.1f} MB checksummed"
                if report["checksums"]
                else ""
            )
            + f" in {report['seconds']} s: [bold]{report['differences']}[/] difference(s), "
            f"{report['bytes_to_send'] / 1e6:.1f} MB a full resync would send"
            + (
                f"; journal holds {report['journal_paths']} path(s)"
                if report["journal_paths"]
                else ""
            )
        )
        for line in report["examples"]:
            console.print(f"  {line}")
    return 0 if report["differences"] == 0 else 1


def _verb(args: argparse.Namespace, console: Console) -> int:
    force = bool(getattr(args, "force", False))
    if force and not args.yes:
        console.print(
            f"[bold red]prim --force[/]: {args.module} becomes primary on this node's data even "
            "if the peer has newer changes; those are lost and the peer is fully resynced."
        )
        if input("Type 'yes' to go on: ").strip() != "yes":
            console.print("nothing done")
            return EXIT_ERROR
    try:
        answer = client_for(args).command(args.module, args.command, force=force)
    except CommandRefusedByAgent as exc:
        Console(stderr=True).print(f"[red]refused:[/red] {exc}")
        return EXIT_ERROR
    console.print(
        f"{args.module}: {args.command} accepted — now [bold]{answer['state']}[/] "
        f"({answer['reason']})"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
