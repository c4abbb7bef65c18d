"""Shared helpers of the integration tests that run real agents in the one-machine lab.

:class:`LabHolder` keeps ONE lab up for a whole test module and hands it to each test in a
known situation: every node powered on, every cable plugged, every module PRIM + SECOND. It
rebuilds the lab only when a test asks for another shape (modules, heartbeat profile,
templates) or a fresh one. The lab's namespace names are fixed (hksw, hkc, hkn1, hkn2), so
there is never more than one lab on the machine; the holder's owner (a module-scoped fixture)
always takes it down.

Every agent log is scanned after each test for the phrases the agent writes when it catches
an unexpected exception ("please report it"), and for a node yielding because both nodes were
primary (only a test that cuts the nodes apart may cause that): a test that provokes a bug
in the agent fails even if the states it checks look right.

Network rule: everything sent on the lab networks is sent from inside a lab namespace
(``lab.run_in``); the host only reads the agents' Unix sockets and files.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from hakit.lab import agents, faults, netns
from hakit.lab.cli import PROFILES, start_modules
from hakit.lab.lab import TEMPLATES, Lab
from hakit.lab.probe import Analysis

MODULE = "mirror-demo"
VIP = "192.0.2.100"
HEALTH_PORT = 9453
BUG_PHRASES = ("please report it", "Traceback (most recent call last)")
DUAL_PRIMARY = "its primary term is"  # what a node logs when it yields after both were primary


@dataclass(frozen=True)
class LabSpec:
    """The shape of a lab: what a test needs before it can run."""

    modules: tuple[str, ...] = (MODULE,)
    profile: str = "fast"  # a key of hakit.lab.cli.PROFILES: "fast" (100ms/500ms) or "default"
    templates: Path = TEMPLATES
    data_size: str | None = None  # each node's data on a tmpfs of that size (lab diskfull)
    networks: int = 1  # 1 (lan) or 2 (lan + backup heartbeat networks)
    witness: bool = False  # a witness on the client host, the nodes' arbiter

    @property
    def timeout(self) -> float:
        """Heartbeat timeout of the profile, in seconds."""
        text = PROFILES[self.profile][1]
        return float(text[:-2]) / 1000 if text.endswith("ms") else float(text[:-1])


class LabHolder:
    """One lab at a time at ``root``, reused between tests and restored to a healthy pair."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lab: Lab | None = None
        self.spec: LabSpec | None = None
        self.marks: dict[str, int] = {}

    def get(
        self,
        modules: Iterable[str] = (MODULE,),
        profile: str = "fast",
        templates: Path = TEMPLATES,
        *,
        fresh: bool = False,
        start: bool = True,
        data_size: str | None = None,
        networks: int = 1,
        witness: bool = False,
    ) -> Lab:
        """A lab of that shape with every module PRIM + SECOND (``start``: else agents only,
        modules STOP, which implies a fresh lab)."""
        spec = LabSpec(tuple(modules), profile, templates, data_size, networks, witness)
        if self.lab is not None and self.spec == spec and not fresh and start:
            try:
                self._restore(self.lab)
            except Exception as exc:  # a previous test left a mess: say so, start clean
                warnings.warn(f"could not restore the lab ({exc}): rebuilding it", stacklevel=2)
            else:
                self.marks = log_marks(self.lab)
                return self.lab
        self.lab = self._build(spec, start=start)
        self.spec = spec
        self.marks = log_marks(self.lab)
        return self.lab

    def _build(self, spec: LabSpec, *, start: bool) -> Lab:
        lab = Lab(self.root, templates=spec.templates)
        interval, timeout = PROFILES[spec.profile]
        self.lab = lab  # before up(): close() must take down a half-built lab too
        lab.up(
            nodes=2,
            modules=spec.modules,
            interval=interval,
            timeout=timeout,
            networks=spec.networks,
            data_size=spec.data_size,
            witness=spec.witness,
        )
        agents.wait_agents(lab)
        if start:
            start_modules(lab, Console(file=io.StringIO()))
        return lab

    def _restore(self, lab: Lab) -> None:
        """Heal every cable, power every node on, start every stopped module, wait for pairs."""
        lab.heal()
        for name, node in lab.state().nodes.items():
            if name in faults.paused_nodes(lab):
                faults.resume(lab, name)
            if node.powered and node.agent_pid is not None and not netns.pid_alive(node.agent_pid):
                warnings.warn(f"the agent of {name} died during the previous test", stacklevel=3)
            lab.poweron(name)  # idempotent: also restarts a dead agent
        agents.wait_agents(lab)
        # a client that starts afresh: no ARP entry left by the previous test's faults
        lab.run_in("client", ["ip", "neigh", "flush", "dev", "eth0"], check=True)
        for spec in lab.state().modules:
            # a node just powered on starts the modules it ran before by itself ("wanted")
            for node in lab.state().nodes:
                module = view(lab, node)["modules"][spec.name]
                if module["state"] == "STOP" and not module["wanted"]:
                    agents.client(lab, node).command(spec.name, "start")
            agents.wait_pair(lab, spec.name, timeout=30)

    def bugs(self, *, split_brain: bool = False) -> list[str]:
        """Lines the agents logged since the test began that report a bug in the agent, or
        (unless ``split_brain``: the test cut the nodes apart) that both nodes were primary."""
        if self.lab is None:
            return []
        phrases = BUG_PHRASES if split_brain else (*BUG_PHRASES, DUAL_PRIMARY)
        return [
            f"{node}: {line}"
            for node, lines in log_since(self.lab, self.marks).items()
            for line in lines
            if any(p in line for p in phrases)
        ]

    def close(self) -> None:
        if self.lab is not None:
            self.lab.down()
        else:
            Lab(self.root).down()
        self.lab = self.spec = None


# --- agent logs -------------------------------------------------------------------------------


def agent_log(lab: Lab, node: str) -> Path:
    return lab.root / node / "agent.log"


def log_marks(lab: Lab) -> dict[str, int]:
    """Current size of every node's agent log: read what comes after with :func:`log_since`."""
    marks = {}
    for node in lab.state().nodes:
        try:
            marks[node] = agent_log(lab, node).stat().st_size
        except FileNotFoundError:
            marks[node] = 0
    return marks


def log_since(lab: Lab, marks: dict[str, int]) -> dict[str, list[str]]:
    """Lines every node's agent logged after ``marks``."""
    out = {}
    for node in lab.state().nodes:
        try:
            with agent_log(lab, node).open("rb") as f:
                f.seek(marks.get(node, 0))
                data = f.read()
        except FileNotFoundError:
            data = b""
        out[node] = data.decode("utf-8", "replace").splitlines()
    return out


def stamp(line: str) -> datetime:
    """Time of an agent log line (``2026-11-23 09:22:05,786 INFO …``), millisecond precision."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def first_line(lines: list[str], text: str) -> str:
    """The first line containing ``text``; AssertionError listing the lines if none."""
    for line in lines:
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(lines))


def last_line(lines: list[str], text: str) -> str:
    return first_line(lines[::-1], text)


# --- the pair ---------------------------------------------------------------------------------


def view(lab: Lab, node: str) -> dict[str, Any]:
    """The node's `hakit state --json` view; AssertionError if its agent does not answer."""
    answer = agents.view(lab, node)
    assert answer is not None, f"the agent of {node} does not answer"
    return answer


def ensure_primary(lab: Lab, module: str, node: str) -> str:
    """Make ``node`` the primary of ``module`` (swap if needed); return the secondary."""
    prim, second = agents.wait_pair(lab, module)
    if prim != node:
        agents.client(lab, prim).command(module, "swap")
        agents.wait_states(lab, module, {node: "PRIM", prim: "SECOND"})
        return prim
    return second


def address(lab: Lab, node: str) -> str:
    """The node's boot address on the lan (no prefix length)."""
    return lab.state().nodes[node].boot_addresses(1)[0].partition("/")[0]


def vip_on(lab: Lab, node: str, vip: str = VIP) -> bool:
    """True if the node's eth0 carries ``vip`` (read in its namespace, also when powered off)."""
    out = lab.run_in(node, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=True).stdout
    return f" {vip}/" in out


def health(lab: Lab, node: str, module: str = MODULE) -> int:
    """HTTP status of the node's health URL for ``module``, asked by the client (0: no answer)."""
    url = f"http://{address(lab, node)}:{HEALTH_PORT}/modules/{module}/ready"
    done = lab.run_in(
        "client",
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url],
        timeout=10,
    )
    return int(done.stdout.strip() or 0)


# --- the demo application ---------------------------------------------------------------------


def app_pid(lab: Lab, node: str, module: str = MODULE) -> int | None:
    """PID in the module's pid file on ``node`` if that process is alive, else None."""
    try:
        pid = int((lab.root / node / "run" / f"{module}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if netns.pid_alive(pid) else None


def kill_app(lab: Lab, node: str, module: str = MODULE) -> int:
    """SIGKILL the demo application of ``module`` on ``node``, by the PID of its pid file only
    (after checking that PID is that node's demo application). Returns the PID."""
    pid = app_pid(lab, node, module)
    assert pid is not None, f"no live demo application in {node}'s pid file"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"hakit.lab.demo_app" in cmdline, cmdline
    assert cmdline[cmdline.index(b"--node") + 1] == node.encode(), cmdline
    os.kill(pid, signal.SIGKILL)
    agents.wait_for(f"pid {pid} to die", lambda: not netns.pid_alive(pid), timeout=5)
    return pid


# --- probing ----------------------------------------------------------------------------------


def probe_while(
    lab: Lab, seconds: float, action: Callable[[], object], target: str, delay: float = 1.0
) -> Analysis:
    """Like :func:`hakit.lab.cli.probe_during`, against any ``target`` ADDRESS:PORT."""
    result: dict[str, Analysis] = {}
    thread = threading.Thread(target=lambda: result.update(a=lab.probe(seconds, target=target)))
    thread.start()
    try:
        time.sleep(delay)
        action()
    finally:
        thread.join()
    return result["a"]
