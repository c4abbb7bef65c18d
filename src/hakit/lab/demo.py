"""The guided tour `make demo` runs: a two-node mirror module fails over and comes back.

Steps: lab up → both nodes started (PRIM + SECOND) → the client stores records through the
VIP (replicated synchronously) → the client probes the VIP every 10 ms while the primary's
plug is pulled → takeover, the client-measured outage, every acknowledged record present on
the new primary → power back on: the node rejoins as SECOND, resynced → swap back → lab down
(always, also on error or Ctrl-C).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.panel import Panel

from hakit.lab import agents
from hakit.lab.cli import print_states, probe_during, start_modules
from hakit.lab.lab import Lab
from hakit.lab.probe import Analysis

MODULE = "mirror-demo"


def run_demo(lab: Lab, console: Console) -> int:
    try:
        _tour(lab, console)
    finally:
        with console.status("taking the lab down…"):
            lab.down()
        console.print("lab removed (namespaces, processes, files).")
    return 0


def _step(console: Console, title: str, text: str) -> None:
    console.print()
    console.print(Panel(text, title=title, title_align="left", border_style="cyan"))


def _tour(lab: Lab, console: Console) -> None:
    _step(
        console,
        "1. a two-node cluster on this machine",
        "Nodes n1 (192.0.2.11) and n2 (192.0.2.12) and a client (192.0.2.50), each in its own\n"
        "network namespace on an isolated bridge. Each node runs a hakit agent; the module\n"
        "'mirror-demo' is a small HTTP service behind the virtual IP 192.0.2.100.",
    )
    with console.status("building the lab and starting the agents…"):
        state = lab.up(nodes=2, modules=[MODULE])
        agents.wait_agents(lab)
    start_modules(lab, console)
    print_states(lab, console)
    vip = f"{state.modules[0].vip_address}:{state.modules[0].port}"
    primary, secondary = agents.wait_pair(lab, MODULE)
    console.print(
        f"The client asks http://{vip}/ and gets the answer from: [bold]{_who_answers(lab, vip)}[/]"
    )
    acked = _append(lab, vip, 200)
    console.print(
        f"The client stored {acked} records through the VIP (each acknowledged once written to\n"
        f"records.log on {primary} — which returns only when {secondary} has it too)."
    )

    _step(
        console,
        f"2. power failure of the primary {primary}",
        f"The client calls the VIP every 10 ms. After 1 s we pull {primary}'s plug (every\n"
        f"process SIGKILLed, links down). {secondary} misses its heartbeats for 3 s, takes the\n"
        "VIP, announces it with gratuitous ARP and starts the application.",
    )
    analysis = probe_during(lab, 7.0, lambda: lab.poweroff(primary))
    _report_outage(console, analysis)
    kept = len(_records(lab, secondary))
    console.print(
        f"Acknowledged records on the new primary {secondary}: [bold]{kept}/{acked}[/]"
        + ("" if kept >= acked else " [red]RECORDS LOST[/]")
    )
    print_states(lab, console)

    _step(
        console,
        f"3. {primary} comes back",
        f"Powered on, {primary}'s agent starts as at boot, hears {secondary} running as primary\n"
        "and joins as SECOND: no failback unless configured.",
    )
    lab.poweron(primary)
    with console.status(f"waiting for {primary} to rejoin…"):
        agents.wait_states(lab, MODULE, {primary: "SECOND", secondary: "PRIM"}, timeout=30)
    print_states(lab, console)
    same = _records(lab, primary) == _records(lab, secondary)
    console.print(
        f"{primary}'s copy was brought up to date (only what changed is sent): "
        + ("[bold]identical[/] to " if same else "[red]DIFFERENT from[/] ")
        + f"{secondary}'s."
    )

    _step(
        console,
        "4. swap back",
        f"`hakit swap -m {MODULE}` on {secondary}: the application stops there first, then\n"
        f"{primary} takes the VIP and starts it. A planned switch costs a fraction of a second.",
    )
    analysis = probe_during(
        lab, 4.0, lambda: agents.client(lab, secondary).command(MODULE, "swap"), delay=1.0
    )
    agents.wait_states(lab, MODULE, {primary: "PRIM", secondary: "SECOND"}, timeout=20)
    _report_outage(console, analysis)
    print_states(lab, console)
    console.print(f"\nModule log on {primary} (last lines, `hakit log -m {MODULE}`):")
    console.print(agents.client(lab, primary).log(MODULE, 12), markup=False, highlight=False)


def _append(lab: Lab, target: str, count: int) -> int:
    """The client appends ``count`` records through the VIP; returns how many were acked."""
    code = (
        "import urllib.request as u\n"
        "n = 0\n"
        f"for i in range({count}):\n"
        f"    req = u.Request('http://{target}/append', data=b'rec-%d\\n' % i)\n"
        "    r = u.urlopen(req, timeout=2)\n"
        "    n += r.status == 200\n"
        "print(n)\n"
    )
    out = lab.run_in("client", [sys.executable, "-c", code], timeout=60)
    return int(out.stdout.strip() or 0)


def _records(lab: Lab, node: str) -> list[str]:
    path = lab.data_dir(node, MODULE) / "replicated" / "records.log"
    return path.read_text().split() if path.exists() else []


def _who_answers(lab: Lab, target: str) -> str:
    out = lab.run_in("client", ["curl", "-s", "-m", "2", f"http://{target}/"], timeout=5)
    return out.stdout.strip() or "(no answer)"


def _report_outage(console: Console, a: Analysis) -> None:
    if a.outage is None:
        console.print("[red]the client got fewer than two answers[/red]")
        return
    o = a.outage
    interleaved = " [red]INTERLEAVED: two nodes answered at once[/]" if a.interleaved else ""
    console.print(
        f"Client view: {a.ok}/{a.total} requests answered; "
        f"[bold]outage {o.seconds * 1000:.0f} ms[/] (last answer from {o.before}, "
        f"first answer after from {o.after}); answering nodes: {' -> '.join(a.switches)}"
        f"{interleaved}"
    )
