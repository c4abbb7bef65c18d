"""Talking to the lab's agents from the host: states, commands, waiting for a situation.

The agents' control sockets live in the lab root (``<root>/<node>/run/agent.sock``), so the
host reaches them without entering a namespace. Used by ``hakit lab``, the demo, the
integration tests and the benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hakit.api.client import AgentClient
from hakit.errors import AgentUnreachable, LabError
from hakit.lab.lab import Lab

States = dict[str, str]  # node -> state of one module ("DOWN" when the agent does not answer)


def client(lab: Lab, node: str, timeout: float = 5.0) -> AgentClient:
    return AgentClient(lab.root / node / "run" / "agent.sock", timeout=timeout)


def view(lab: Lab, node: str) -> dict[str, Any] | None:
    """The node's `hakit state --json` view, or None if its agent does not answer."""
    try:
        return client(lab, node, timeout=2.0).state()
    except AgentUnreachable:
        return None


def module_states(lab: Lab, module: str) -> States:
    out: States = {}
    for node in lab.state().nodes:
        v = view(lab, node)
        out[node] = "DOWN" if v is None else v["modules"].get(module, {}).get("state", "ABSENT")
    return out


def wait_for(
    what: str, cond: Callable[[], bool], timeout: float = 30.0, period: float = 0.05
) -> float:
    """Poll ``cond`` until true; return the seconds it took; LabError naming ``what`` if not."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)
    return time.monotonic() - start


def wait_agents(lab: Lab, timeout: float = 20.0) -> None:
    """Wait until every powered-on node's agent answers on its socket."""
    nodes = [n for n, s in lab.state().nodes.items() if s.powered]
    wait_for("the agents to answer", lambda: all(view(lab, n) is not None for n in nodes), timeout)


def wait_states(lab: Lab, module: str, expected: States, timeout: float = 30.0) -> float:
    """Wait until the module is in ``expected`` (node -> state) on those nodes."""

    def reached() -> bool:
        now = module_states(lab, module)
        return all(now.get(n) == s for n, s in expected.items())

    try:
        return wait_for(f"{module} to be {expected}", reached, timeout)
    except LabError as exc:
        raise LabError(f"{exc}; now {module_states(lab, module)}") from None


def wait_pair(lab: Lab, module: str, timeout: float = 30.0) -> tuple[str, str]:
    """Wait until one node is PRIM and another SECOND; return (primary, secondary), as seen
    by the same look that found the pair (states may move on right after)."""
    found: list[tuple[str, str]] = []

    def pair() -> bool:
        now = module_states(lab, module)
        prim = [n for n, s in now.items() if s == "PRIM"]
        second = [n for n, s in now.items() if s == "SECOND"]
        if len(prim) == 1 and len(second) == 1:
            found.append((prim[0], second[0]))
            return True
        return False

    try:
        wait_for(f"{module} to be PRIM + SECOND", pair, timeout)
    except LabError as exc:
        raise LabError(f"{exc}; now {module_states(lab, module)}") from None
    return found[-1]


def farm_buckets(lab: Lab, module: str) -> dict[str, int]:
    """Buckets each answering node's filter accepts now (farm modules), by node."""
    out: dict[str, int] = {}
    for node in lab.state().nodes:
        v = view(lab, node)
        m = v["modules"].get(module) if v else None
        if m is not None and m["state"] == "UP":
            out[node] = int(m["farm"]["buckets"])
    return out


def wait_farm(lab: Lab, module: str, nodes: list[str], timeout: float = 30.0) -> float:
    """Wait until exactly ``nodes`` are UP and together own all 256 buckets."""

    def placed() -> bool:
        shares = farm_buckets(lab, module)
        return (
            sorted(shares) == sorted(nodes) and sum(shares.values()) == 256 and all(shares.values())
        )

    try:
        return wait_for(f"{module} UP on {nodes} with 256 buckets placed", placed, timeout)
    except LabError as exc:
        raise LabError(f"{exc}; now {farm_buckets(lab, module)}") from None


def command_all(lab: Lab, module: str, verb: str, nodes: list[str] | None = None) -> None:
    """Send ``verb`` to every node at the same instant (one thread each)."""
    targets = nodes or [n for n, s in lab.state().nodes.items() if s.powered]
    with ThreadPoolExecutor(len(targets)) as pool:
        for fut in [pool.submit(client(lab, n).command, module, verb) for n in targets]:
            fut.result()


def vip_holders(lab: Lab, vip_address: str) -> list[str]:
    """Nodes whose eth0 carries the VIP right now (read with `ip` in each namespace)."""
    holders = []
    for node, st in lab.state().nodes.items():
        if not st.powered:
            continue
        out = lab.run_in(node, ["ip", "-o", "-4", "addr", "show"], timeout=5, check=False).stdout
        if f" {vip_address}/" in out:
            holders.append(node)
    return holders
