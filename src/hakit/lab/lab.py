"""The one-machine lab: a whole hakit cluster in network namespaces, plus a client.

``Lab(root).up(nodes=2, modules=["mirror-demo"])`` builds::

    hksw   (switch namespace)  hkbr0 = lan 192.0.2.0/24   [hkbr1 = backup 198.51.100.0/24]
    hkn1   eth0 192.0.2.11/24  [eth1 198.51.100.11/24]     agent: hakit agent --node n1
    hkn2   eth0 192.0.2.12/24  [eth1 198.51.100.12/24]     agent: hakit agent --node n2
    hkc    eth0 192.0.2.50/24  [eth1 198.51.100.50/24]     the client (prober)

and writes, per node, ``<root>/<node>/etc/cluster.toml``, ``etc/cluster.key`` (0600, same
key everywhere), ``etc/modules/<module>/`` (rendered template), ``state/``, ``run/``,
``data/<module>/`` and ``agent.log``. The lab's own state (nodes, modules, agent PIDs, which
node is powered off or cut) is ``<root>/lab.json``, so every operation works from a fresh
``Lab`` object (one CLI call each).

Contracts:

* Network rules (see :mod:`hakit.lab.netns`): only ``hk*`` namespaces, only the two test
  networks, no uplink, no default route, IPv6 off and the ``hkguard`` output filter everywhere.
* :meth:`Lab.down` kills every process in every lab namespace (``hksw``, ``hkc``,
  ``hkn<i>``) by PID, deletes those namespaces (also ones left by a crashed run) and removes
  the root directory; it never touches a process outside those namespaces, nor another
  suite's ``hk*`` namespaces (e.g. ``hkt-vip-a``). :meth:`Lab.up` calls it first, and again if
  building fails half-way.
* The root directory is removed only if it holds a ``lab.json`` (or is empty): pointing the
  lab at a directory of other files never deletes them.
* Module ``k`` (0-based) gets VIP ``192.0.2.(100+k)/24`` on ``eth0``, application port
  ``8080+k`` and preferred primary ``n{k % nodes + 1}``.

Caveats: the namespace names are fixed, so there is one lab per machine: ``up``/``down`` with
any root destroy the lab (and the test network of the integration tests) that exists.
Agents and ``exec`` are started with :mod:`subprocess` directly, because :func:`run` waits
and captures output; every ``ip``/``nft`` call goes through :func:`run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template

from hakit.config import parse_duration
from hakit.errors import LabError
from hakit.lab import faults, netns
from hakit.lab import witness as lab_witness
from hakit.lab.probe import Analysis, Record, analyze, check_target
from hakit.system.run import Completed, run

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/lib/hakit-lab")
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
HEARTBEAT_PORT = 7410  # UDP port of the heartbeat, written into cluster.toml
API_PORT = 9453  # TCP port of the agent's API, written into cluster.toml
CLIENT = "client"  # name of the client host in exec/run/status (namespace hkc)
CLIENT_HOST = 50  # last octet of the client's addresses
WITNESS_PORT = 7430  # UDP port of the lab's witness, on the client host (hakit.lab.witness)
MAX_NODES = 39  # node i has host number 10+i, below the client's 50
MAX_MODULES = 100  # VIPs 192.0.2.100 .. 192.0.2.199
FIRST_VIP_HOST = 100
FIRST_SOURCE_HOST = 200  # extra client addresses for farm probes: 192.0.2.200 ..
MAX_CLIENT_SOURCES = 50
FIRST_APP_PORT = 8080
FIRST_REPLICATION_PORT = 7420  # module k's secondary listens on 7420 + k
_DURATION = re.compile(r"^\d+(\.\d+)?(ms|s)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")

AgentArgv = Callable[[str, Path], list[str]]
"""``(node, config_path) -> argv`` of the agent, run inside the node's namespace."""


def default_agent_argv(node: str, config: Path) -> list[str]:
    """``<this python> -m hakit agent --config CONFIG --node NODE``."""
    return [sys.executable, "-m", "hakit", "agent", "--config", str(config), "--node", node]


# --- the plan (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSpec:
    """One module of the lab, the same on every node."""

    template: str  # folder name under hakit/templates
    name: str
    vip: str  # with prefix length, e.g. "192.0.2.100/24"
    port: int  # the application's TCP port
    preferred: str  # node that should be primary when both are up
    interface: str = "eth0"

    @property
    def vip_address(self) -> str:
        return self.vip.partition("/")[0]


def plan_modules(entries: Sequence[str], nodes: int) -> list[ModuleSpec]:
    """Turn ``TEMPLATE`` / ``TEMPLATE:NAME`` entries into module specs. Pure.

    A repeated template without an explicit name gets ``-2``, ``-3`` … suffixes.
    """
    if len(entries) > MAX_MODULES:
        raise LabError(f"at most {MAX_MODULES} modules in the lab, not {len(entries)}")
    specs: list[ModuleSpec] = []
    used: set[str] = set()
    for k, entry in enumerate(entries):
        template, sep, name = entry.partition(":")
        if not sep:
            name, n = template, 1
            while name in used:
                n += 1
                name = f"{template}-{n}"
        for what, value in (("template", template), ("module name", name)):
            if not _NAME.match(value):
                raise LabError(f"{what} {value!r} in {entry!r}: use [a-z0-9_-], 1-31 characters")
        if name in used:
            raise LabError(f"module name {name!r} is used twice")
        used.add(name)
        specs.append(
            ModuleSpec(
                template=template,
                name=name,
                vip=netns.NETWORKS[0].address(FIRST_VIP_HOST + k),
                port=FIRST_APP_PORT + k,
                preferred=f"n{k % nodes + 1}",
            )
        )
    return specs


def boot_addresses(host: int, networks: int) -> list[str]:
    """The addresses (with /24) a host numbered ``host`` gets at boot, one per network."""
    return [net.address(host) for net in netns.NETWORKS[:networks]]


@dataclass
class NodeState:
    """What the lab remembers about one node."""

    name: str  # "n1"
    index: int  # 1-based; host number 10+index
    agent_pid: int | None = None  # None while powered off
    powered: bool = True
    cut: list[str] = field(default_factory=list)  # networks whose bridge port is down

    @property
    def namespace(self) -> str:
        return f"hk{self.name}"

    def boot_addresses(self, networks: int) -> list[str]:
        return boot_addresses(10 + self.index, networks)


@dataclass
class LabState:
    """The content of ``<root>/lab.json``."""

    root: str
    networks: int  # 1 (lan) or 2 (lan + backup)
    interval: str  # heartbeat interval, e.g. "500ms"
    timeout: str  # heartbeat timeout, e.g. "3s"
    nodes: dict[str, NodeState]
    modules: list[ModuleSpec]
    data_size: str | None = None  # each node's data on its own tmpfs of this size (diskfull)
    witness: bool = False  # a witness runs on the client host; the nodes use it as arbiter
    witness_pid: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LabState:
        data = json.loads(text)
        return cls(
            root=data["root"],
            networks=int(data["networks"]),
            interval=data["interval"],
            timeout=data["timeout"],
            nodes={k: NodeState(**v) for k, v in data["nodes"].items()},
            modules=[ModuleSpec(**m) for m in data["modules"]],
            data_size=data.get("data_size"),
            witness=bool(data.get("witness", False)),
            witness_pid=data.get("witness_pid"),
        )


def _toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string of printable ASCII is a TOML basic string


def cluster_toml(state: LabState, node: str) -> str:
    """The cluster file of ``node``. Pure."""
    base = Path(state.root) / node
    lines = [
        'name = "lab"',
        f"key_file = {_toml_str(base / 'etc' / 'cluster.key')}",
        f"state_dir = {_toml_str(base / 'state')}",
        f"run_dir = {_toml_str(base / 'run')}",
        f"modules_dir = {_toml_str(base / 'etc' / 'modules')}",
        "",
        "[heartbeat]",
        f"interval = {_toml_str(state.interval)}",
        f"timeout = {_toml_str(state.timeout)}",
        f"port = {HEARTBEAT_PORT}",
        "",
        "[api]",
        f"port = {API_PORT}",
        "",
    ]
    if state.witness:  # lease ~ the heartbeat timeout (at least 1.5 s): failover stays fast
        client = boot_addresses(CLIENT_HOST, 1)[0].partition("/")[0]
        lease = max(1.5, parse_duration(state.timeout))
        lines += [
            "[arbitration]",
            f'witnesses = ["{client}:{WITNESS_PORT}"]',
            f"lease = {lease:g}",
            f"margin = {lease / 6:.3g}",
            f"renew = {lease / 4:.3g}",
            f"timeout = {min(0.5, lease / 5):.3g}",
            "",
        ]
    for n in state.nodes.values():
        pairs = [
            f"{net.name} = {_toml_str(addr.partition('/')[0])}"
            for net, addr in zip(netns.NETWORKS, n.boot_addresses(state.networks), strict=False)
        ]
        lines += [f"[nodes.{n.name}]", f"addresses = {{ {', '.join(pairs)} }}"]
    return "\n".join(lines) + "\n"


def render_template(source: Path, dest: Path, values: Mapping[str, str]) -> list[Path]:
    """Copy template folder ``source`` to ``dest``; ``*.in`` files go through
    ``string.Template.substitute(values)`` and lose their ``.in``. Modes are kept.

    Returns the files written. A placeholder without a value raises LabError naming it.
    """
    written: list[Path] = []
    for src in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = src.relative_to(source)
        if src.name.endswith(".in"):
            out = dest / rel.parent / src.name[: -len(".in")]
            try:
                text = Template(src.read_text(encoding="utf-8")).substitute(values)
            except KeyError as exc:
                raise LabError(
                    f"template {src}: no value for placeholder ${{{exc.args[0]}}}"
                ) from None
            except ValueError as exc:
                raise LabError(f"template {src}: {exc}") from None
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        else:
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
        shutil.copymode(src, out)
        written.append(out)
    return written


# --- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkStatus:
    """One interface of a host and its port on the bridge."""

    interface: str  # "eth0"
    network: str  # "lan"
    admin_up: bool  # interface set up inside the host
    carrier: bool  # it can talk: both ends up
    bridge_port: str  # "hkn1-p0" in hksw
    bridge_port_up: bool
    addresses: list[str]  # IPv4 with prefix length; VIPs show up here


@dataclass(frozen=True)
class HostStatus:
    """One node (or the client) as seen from the root namespace."""

    name: str  # "n1" … or "client"
    namespace: str
    exists: bool  # the namespace exists
    powered: bool  # False after poweroff
    cut: list[str]  # networks cut with Lab.cut
    agent_pid: int | None  # None for the client and powered-off nodes
    agent_alive: bool  # the agent process lives in the node's namespace
    links: list[LinkStatus]


@dataclass(frozen=True)
class LabStatus:
    """Everything ``hakit lab status`` shows (the lead adds module states from the agents)."""

    up: bool  # a lab.json exists at root
    root: str
    namespaces: list[str]  # existing lab namespaces, including strays of a crashed lab
    networks: int
    hosts: list[HostStatus]  # nodes in order, then the client
    modules: list[ModuleSpec]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- the lab --------------------------------------------------------------------------------


class Lab:
    """A hakit cluster on this machine, driven through ``<root>/lab.json``.

    ``agent_argv(node, config_path)`` gives the agent's argv (default: ``python -m hakit
    agent``); tests pass e.g. ``lambda node, cfg: ["sleep", "1000"]``. ``python`` is the
    interpreter written into templates (``${python}``) and used for the prober.
    Every operation needs root.
    """

    def __init__(
        self,
        root: Path | str = DEFAULT_ROOT,
        *,
        agent_argv: AgentArgv = default_agent_argv,
        templates: Path = TEMPLATES,
        python: str = sys.executable,
    ) -> None:
        path = Path(root).absolute()
        if not _SAFE_PATH.match(str(path)) or path == Path("/"):
            raise LabError(f"lab root {str(path)!r}: use an absolute path of [A-Za-z0-9._/-]")
        self.root = path
        self.agent_argv = agent_argv
        self.templates = templates
        self.python = python
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- paths and state

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    def config_path(self, node: str) -> Path:
        """``<root>/<node>/etc/cluster.toml``."""
        return self.root / node / "etc" / "cluster.toml"

    def module_dir(self, node: str, module: str) -> Path:
        """``<root>/<node>/etc/modules/<module>``: the rendered template (scripts live here)."""
        return self.root / node / "etc" / "modules" / module

    def data_dir(self, node: str, module: str) -> Path:
        """``<root>/<node>/data/<module>``: the module's data (demo: records.log, app.log)."""
        return self.root / node / "data" / module

    def state(self) -> LabState:
        """The lab's state from lab.json; LabError if no lab is up at this root."""
        try:
            return LabState.from_json(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LabError(f"no lab at {self.root} (run `hakit lab up`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(f"{self.state_file} is damaged ({exc}); run `hakit lab down`") from exc

    def _save(self, state: LabState) -> None:
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(state.to_json(), encoding="utf-8")
        tmp.replace(self.state_file)

    def _node(self, state: LabState, node: str) -> NodeState:
        try:
            return state.nodes[node]
        except KeyError:
            known = ", ".join(state.nodes)
            raise LabError(f"no node {node!r} in the lab (nodes: {known})") from None

    def _namespace(self, state: LabState, host: str) -> str:
        return netns.CLIENT_NS if host == CLIENT else self._node(state, host).namespace

    # -- up and down

    def up(
        self,
        nodes: int = 2,
        modules: Sequence[str] = ("mirror-demo",),
        networks: int = 1,
        interval: str = "500ms",
        timeout: str = "3s",
        *,
        data_size: str | None = None,
        witness: bool = False,
    ) -> LabState:
        """Build the lab from scratch and start one agent per node; return its state.

        ``data_size`` (e.g. "256M"): each node's ``data`` directory is a tmpfs of that size, so
        that :func:`hakit.lab.faults.diskfull` can fill one node's file system without
        touching the host's disk. ``witness``: a witness runs on the client host and every
        node's cluster file names it as arbiter (:mod:`hakit.lab.witness`).

        ``nodes``: 1..39. ``modules``: ``TEMPLATE`` or ``TEMPLATE:NAME`` entries (templates
        under hakit/templates). ``networks``: 1 (lan) or 2 (lan + backup). ``interval`` and
        ``timeout``: heartbeat durations like "500ms" or "3s", written into cluster.toml.
        Calls :meth:`down` first; if building fails, tears everything down again and raises.
        """
        if not 1 <= nodes <= MAX_NODES:
            raise LabError(f"nodes must be 1..{MAX_NODES}, not {nodes}")
        if networks not in (1, 2):
            raise LabError(f"networks must be 1 or 2, not {networks}")
        for what, value in (("interval", interval), ("timeout", timeout)):
            if not _DURATION.match(value):
                raise LabError(f"{what} {value!r}: write a duration like '500ms' or '3s'")
        specs = plan_modules(modules, nodes)
        for spec in specs:
            if not (self.templates / spec.template).is_dir():
                have = sorted(p.name for p in self.templates.iterdir() if p.is_dir())
                raise LabError(f"no template {spec.template!r} (have: {', '.join(have)})")
        _check_tools()

        self.down()
        if self.root.exists() and any(self.root.iterdir()):
            raise LabError(f"{self.root} exists, is not empty and holds no lab.json")
        self.root.mkdir(parents=True, exist_ok=True)
        state = LabState(
            root=str(self.root),
            networks=networks,
            interval=interval,
            timeout=timeout,
            nodes={f"n{i}": NodeState(f"n{i}", i) for i in range(1, nodes + 1)},
            modules=specs,
            data_size=data_size,
            witness=witness,
        )
        self._save(state)  # first, so that down() can clean up after a crash from here on
        faults.build_clockshift(self)
        try:
            netns.add_switch(networks)
            for node in state.nodes.values():
                netns.add_host(node.namespace, node.boot_addresses(networks))
            netns.add_host(netns.CLIENT_NS, boot_addresses(CLIENT_HOST, networks))
            (self.root / CLIENT).mkdir(exist_ok=True)
            self._write_config(state)
            if witness:
                state.witness_pid = lab_witness.start(self)
            for node in state.nodes.values():
                node.agent_pid = self._start_agent(node.name)
            self._save(state)
        except BaseException:
            log.error("lab up failed: tearing down what was built")
            try:
                self.down()
            except Exception:
                log.exception("tearing down the half-built lab failed too")
            raise
        log.info("lab up: %d nodes, modules %s, at %s", nodes, [m.name for m in specs], self.root)
        return state

    def _write_config(self, state: LabState) -> None:
        key = secrets.token_hex(32)  # 32 random bytes as 64 hex digits, no newline
        for node in state.nodes:
            base = self.root / node
            for sub in ("etc/modules", "state", "run", "data"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            if state.data_size is not None:  # before the module folders are made in it
                opts = f"size={state.data_size},mode=0755"
                run(["mount", "-t", "tmpfs", "-o", opts, "hakit-lab-data", str(base / "data")])
            self.config_path(node).write_text(cluster_toml(state, node), encoding="utf-8")
            fd = os.open(base / "etc" / "cluster.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(key)
            for spec in state.modules:
                data = self.data_dir(node, spec.name)
                data.mkdir(parents=True, exist_ok=True)
                values = {
                    "module": spec.name,
                    "node": node,
                    "vip": spec.vip,
                    "vip_address": spec.vip_address,
                    "interface": spec.interface,
                    "port": str(spec.port),
                    "replication_port": str(FIRST_REPLICATION_PORT + spec.port - FIRST_APP_PORT),
                    "preferred": spec.preferred,
                    "data_dir": str(data),
                    "run_dir": str(base / "run"),
                    "python": self.python,
                    "templates": str(self.templates),
                }
                render_template(
                    self.templates / spec.template, self.module_dir(node, spec.name), values
                )

    def down(self) -> list[str]:
        """Kill every process in every lab namespace (hksw, hkc, hkn<i>; by PID), delete the
        namespaces, remove the lab root. Idempotent; returns the namespaces deleted."""
        removed = netns.teardown()
        self._reap()
        detach_mounts_under(self.root)
        if self.state_file.exists() or (self.root.is_dir() and not any(self.root.iterdir())):
            shutil.rmtree(self.root)
        elif self.root.exists():
            log.warning("%s holds no lab.json: left in place", self.root)
        if removed:
            log.info("lab down: removed %s", ", ".join(removed))
        return removed

    # -- agents and commands

    def env(self, host: str) -> dict[str, str]:
        """Environment for commands on ``host``: ours plus HAKIT_CONFIG and HAKIT_NODE."""
        env = {k: v for k, v in os.environ.items() if k not in ("HAKIT_CONFIG", "HAKIT_NODE")}
        if host != CLIENT:
            env["HAKIT_CONFIG"] = str(self.config_path(host))
            env["HAKIT_NODE"] = host
            env.update(faults.clock_env(self, host))  # `lab clockjump` moves its wall clock
        return env

    def _start_agent(self, node: str) -> int:
        argv = self.agent_argv(node, self.config_path(node))
        pid = self.spawn(f"hk{node}", argv, self.root / node, "agent.log", self.env(node))
        log.info("agent of %s started: pid %d", node, pid)
        return pid

    def spawn(
        self,
        namespace: str,
        argv: Sequence[str],
        home: Path,
        log_name: str,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Start a detached process in ``namespace`` (cwd ``home``, output appended to
        ``home/log_name``); its PID, remembered so that it is reaped once it ends."""
        with (home / log_name).open("ab") as out:
            # Not run(): the process is detached and outlives this call (and this process).
            proc = subprocess.Popen(
                netns.in_namespace(namespace, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=home,
                start_new_session=True,
            )
        self._children[proc.pid] = proc
        return proc.pid

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def exec(self, host: str, argv: Sequence[str]) -> int:
        """Run ``argv`` in ``host``'s namespace (a node, or ``"client"``) with :meth:`env`;
        its output goes to our stdout/stderr. Returns its exit code (negative: signal).

        For ``hakit lab exec n1 -- hakit state``.
        """
        ns = self._namespace(self.state(), host)
        # Not run(): the output streams to the terminal instead of being captured.
        return subprocess.call(netns.in_namespace(ns, argv), env=self.env(host))

    def run_in(
        self, host: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = False
    ) -> Completed:
        """Run ``argv`` in ``host``'s namespace with :meth:`env`; captured, for programs."""
        ns = self._namespace(self.state(), host)
        return run(netns.in_namespace(ns, argv), timeout=timeout, check=check, env=self.env(host))

    # -- faults

    def poweroff(self, node: str) -> None:
        """Pull the plug of ``node``: its bridge ports go down, every process in its
        namespace gets SIGKILL (by PID), its interfaces go down and lose every address but
        their boot address (VIPs vanish as on a real power cut). Idempotent."""
        state = self.state()
        n = self._node(state, node)
        for i in range(state.networks):
            netns.set_link(netns.SWITCH_NS, netns.bridge_port(n.namespace, i), up=False)
        netns.kill_namespace(n.namespace)
        self._reap()
        for i, boot in enumerate(n.boot_addresses(state.networks)):
            dev = netns.interface(i)
            netns.set_link(n.namespace, dev, up=False)
            gone = netns.flush_addresses(n.namespace, dev, keep=[boot])
            if gone:
                log.info("poweroff %s: %s lost %s", node, dev, ", ".join(gone))
        n.powered, n.agent_pid = False, None
        self._save(state)
        log.info("node %s powered off", node)

    def poweron(self, node: str) -> int:
        """Boot ``node`` again: boot addresses back, interfaces up, bridge ports up (except
        networks still cut with :meth:`cut`), agent started as at boot. Returns the agent's
        PID. Idempotent: a running agent is left alone."""
        state = self.state()
        n = self._node(state, node)
        if n.namespace not in netns.list_namespaces():
            raise LabError(f"namespace {n.namespace} is gone: run `hakit lab up` again")
        for i, boot in enumerate(n.boot_addresses(state.networks)):
            dev = netns.interface(i)
            netns.add_address(n.namespace, dev, boot)
            netns.set_link(n.namespace, dev, up=True)
            if netns.NETWORKS[i].name not in n.cut:
                netns.set_link(netns.SWITCH_NS, netns.bridge_port(n.namespace, i), up=True)
        if n.agent_pid is None or not self._agent_alive(n):
            n.agent_pid = self._start_agent(node)
        n.powered = True
        self._save(state)
        log.info("node %s powered on (agent pid %d)", node, n.agent_pid)
        return n.agent_pid

    def cut(self, node: str, network: str | None = None) -> None:
        """Unplug ``node``'s cable(s): its bridge-side port on ``network`` ("lan",
        "backup"; default: all) goes down. Processes keep running. Undo with :meth:`heal`."""
        state = self.state()
        n = self._node(state, node)
        nets = list(netns.NETWORKS[: state.networks])
        chosen = [net for net in nets if network in (None, net.name)]
        if not chosen:
            raise LabError(f"no network {network!r} (lab has: {', '.join(x.name for x in nets)})")
        for net in chosen:
            netns.set_link(netns.SWITCH_NS, netns.bridge_port(n.namespace, nets.index(net)), False)
            if net.name not in n.cut:
                n.cut.append(net.name)
        self._save(state)
        log.info("node %s cut from %s", node, ", ".join(net.name for net in chosen))

    def heal(self) -> None:
        """Plug every cable back: all bridge ports up, for the client and every powered-on
        node (a powered-off node's ports come back with :meth:`poweron`), and remove every
        partition (:func:`hakit.lab.faults.partition`)."""
        state = self.state()
        ports = [netns.CLIENT_NS]
        for n in state.nodes.values():
            n.cut = []
            if n.powered:
                ports.append(n.namespace)
        for ns in ports:
            for i in range(state.networks):
                netns.set_link(netns.SWITCH_NS, netns.bridge_port(ns, i), up=True)
        if faults.heal_partitions():
            log.info("partitions removed")
        self._save(state)
        log.info("lab healed")

    # -- observation

    def _agent_alive(self, n: NodeState) -> bool:
        self._reap()
        return (
            n.agent_pid is not None
            and netns.pid_alive(n.agent_pid)
            and n.agent_pid in netns.namespace_pids(n.namespace)
        )

    def status(self) -> LabStatus:
        """Namespaces, links (both ends), addresses and agent liveness of every host.

        Works without a lab too (``up`` False), listing stray lab namespaces."""
        namespaces = netns.list_namespaces()
        try:
            state = self.state()
        except LabError:
            return LabStatus(False, str(self.root), namespaces, 0, [], [])
        switch = netns.links(netns.SWITCH_NS)
        hosts: list[HostStatus] = []
        entries: list[tuple[str, str, NodeState | None]] = [
            (n.name, n.namespace, n) for n in state.nodes.values()
        ]
        entries.append((CLIENT, netns.CLIENT_NS, None))
        for name, ns, n in entries:
            inside = netns.links(ns)
            link_status = []
            for i, net in enumerate(netns.NETWORKS[: state.networks]):
                dev, port = netns.interface(i), netns.bridge_port(ns, i)
                here, there = inside.get(dev), switch.get(port)
                link_status.append(
                    LinkStatus(
                        interface=dev,
                        network=net.name,
                        admin_up=bool(here and here.admin_up),
                        carrier=bool(here and here.carrier),
                        bridge_port=port,
                        bridge_port_up=bool(there and there.admin_up),
                        addresses=list(here.addresses) if here else [],
                    )
                )
            hosts.append(
                HostStatus(
                    name=name,
                    namespace=ns,
                    exists=ns in namespaces,
                    powered=n.powered if n else True,
                    cut=list(n.cut) if n else [],
                    agent_pid=n.agent_pid if n else None,
                    agent_alive=self._agent_alive(n) if n else False,
                    links=link_status,
                )
            )
        return LabStatus(True, str(self.root), namespaces, state.networks, hosts, state.modules)

    def client_sources(self, count: int) -> list[str]:
        """``count`` extra client addresses (192.0.2.200 upwards, at most 50), added to the
        client's interface if missing: many clients for a farm's load balancing."""
        if not 0 < count <= MAX_CLIENT_SOURCES:
            raise LabError(f"sources: 1 to {MAX_CLIENT_SOURCES} client addresses")
        net = netns.NETWORKS[0]
        have = {a.partition("/")[0] for a in netns.links(netns.CLIENT_NS)["eth0"].addresses}
        out = []
        for k in range(count):
            cidr = net.address(FIRST_SOURCE_HOST + k)
            if cidr.partition("/")[0] not in have:
                netns.add_address(netns.CLIENT_NS, "eth0", cidr)
            out.append(cidr.partition("/")[0])
        return out

    def probe(
        self,
        seconds: float,
        target: str | None = None,
        period: float = 0.01,
        request_timeout: float = 1.0,
        sources: int = 0,
    ) -> Analysis:
        """Probe from the client: one new-connection ``GET /`` every ``period`` for
        ``seconds`` against ``target`` (``ADDRESS:PORT``; default: the first module's VIP and
        port); return the analysis. Blocks; call it from a thread to inject faults meanwhile
        (record times are CLOCK_MONOTONIC, comparable with ``time.monotonic()`` here).
        ``sources``: send from that many client addresses in turn (:meth:`client_sources`)."""
        state = self.state()
        if target is None:
            if not state.modules:
                raise LabError("the lab has no module: give a target ADDRESS:PORT")
            target = f"{state.modules[0].vip_address}:{state.modules[0].port}"
        check_target(target)
        client_dir = self.root / CLIENT
        client_dir.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="probe-", suffix=".jsonl", dir=client_dir)
        os.close(fd)
        records_file = Path(name)
        argv = [self.python, "-m", "hakit.lab.probe", "--target", target]
        argv += ["--seconds", str(seconds), "--period", str(period)]
        argv += ["--timeout", str(request_timeout), "--records", str(records_file), "--json"]
        if sources:
            argv += ["--sources", ",".join(self.client_sources(sources))]
        try:
            self.run_in(CLIENT, argv, timeout=seconds + request_timeout + 30, check=True)
            records = _read_records(records_file.read_text(encoding="utf-8").splitlines())
        finally:
            with contextlib.suppress(OSError):
                records_file.unlink()
        return analyze(records, period)


def detach_mounts_under(root: Path) -> list[str]:
    """Lazily unmount everything mounted below ``root`` (replicated directories' FUSE mounts
    and read-only binds left by killed nodes), deepest first; returns the mount points."""
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    done = []
    for mp in sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True):
        while run(["umount", "-l", mp], timeout=10, check=False).ok:
            done.append(mp)
    return done


def _read_records(lines: Iterable[str]) -> list[Record]:
    return [Record.from_dict(json.loads(line)) for line in lines if line.strip()]


def _check_tools() -> None:
    missing = [
        f"{tool} (Debian package {package})"
        for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("ss", "iproute2"))
        if shutil.which(tool) is None
    ]
    if missing:
        raise LabError(f"the lab needs {', '.join(missing)}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces)")
