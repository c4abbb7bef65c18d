"""Network-namespace plumbing for the one-machine lab: a switch, hosts, their links.

Contract:

* Every object this module creates lives in a namespace whose name starts with ``hk``
  (:data:`PREFIX`); the lab's own are ``hksw``, ``hkc`` and ``hkn<i>`` (:data:`LAB_NAMESPACE`),
  and only those are ever removed wholesale by :func:`teardown`. The bridges live in their own
  namespace (:data:`SWITCH_NS`), so the root namespace never joins them; nothing here creates
  an uplink or a default route.
* Hosts get addresses only in :data:`TEST_NETWORKS` (192.0.2.0/24 and 198.51.100.0/24).
  Every namespace has IPv6 disabled and an nftables table ``inet hkguard`` whose output chain
  drops anything not sent to those networks or to 127.0.0.0/8.
* Processes are only ever killed by PID, and only PIDs that ``ip netns pids`` reports for a
  namespace named ``hk*`` that the caller names (teardown: the lab's own namespaces).
* Every ``ip``/``nft`` call goes through :func:`hakit.system.run.run` (argv lists, no shell)
  and raises :class:`~hakit.errors.CommandError` when it fails, unless stated otherwise.

Caveats: ``ip netns del`` only removes the name; the kernel frees a namespace (and the veths
in it) once its last process is gone, which is why :func:`teardown` kills first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hakit.errors import LabError
from hakit.system.run import run

log = logging.getLogger(__name__)

PREFIX = "hk"
SWITCH_NS = "hksw"
CLIENT_NS = "hkc"
_NS_NAME = re.compile(r"^hk[\w.-]*$")
LAB_NAMESPACE = re.compile(r"^hk(?:sw|c|n[0-9]+)$")
"""The names the lab creates (and so may remove): hksw, hkc, hkn1, hkn2, ..."""


@dataclass(frozen=True)
class Network:
    """One lab network: a bridge in the switch namespace and a /24 of test addresses."""

    name: str  # name used in the cluster file (`addresses = { lan = ... }`)
    bridge: str  # bridge device in SWITCH_NS
    prefix: str  # first three octets, e.g. "192.0.2"

    def address(self, host: int) -> str:
        """The address ``prefix.host`` with its /24, e.g. ``192.0.2.11/24``."""
        return f"{self.prefix}.{host}/24"

    @property
    def cidr(self) -> str:
        return f"{self.prefix}.0/24"


NETWORKS = (Network("lan", "hkbr0", "192.0.2"), Network("backup", "hkbr1", "198.51.100"))
TEST_NETWORKS = tuple(ipaddress.IPv4Network(n.cidr) for n in NETWORKS)

GUARD_TABLE = """\
table inet hkguard {
  chain output {
    type filter hook output priority 0; policy drop;
    ip daddr { 192.0.2.0/24, 198.51.100.0/24, 127.0.0.0/8 } accept
    counter drop
  }
}
"""


def in_test_networks(address: str) -> bool:
    """True if ``address`` (no prefix length) is inside one of the lab's test networks."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in TEST_NETWORKS)


def check_namespace_name(ns: str) -> str:
    """Return ``ns`` if it is a lab namespace name (starts with ``hk``), else raise LabError."""
    if not _NS_NAME.match(ns):
        raise LabError(f"{ns!r} is not a lab namespace name (hk followed by [A-Za-z0-9_.-])")
    return ns


def in_namespace(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``ns`` (``ip netns exec``)."""
    return ["ip", "netns", "exec", check_namespace_name(ns), *argv]


# --- namespaces ---------------------------------------------------------------------------


def list_namespaces(pattern: re.Pattern[str] = LAB_NAMESPACE) -> list[str]:
    """Existing namespaces whose name matches ``pattern`` (default: the lab's own names).

    Other test suites may create ``hk``-prefixed namespaces of their own (``hkt-vip-a``);
    the default pattern leaves those alone.
    """
    out = run(["ip", "netns", "list"], timeout=10).stdout
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return sorted(n for n in names if pattern.match(n))


def add_namespace(ns: str) -> None:
    """Create ``ns`` with ``lo`` up, IPv6 disabled and the hkguard output filter."""
    check_namespace_name(ns)
    run(["ip", "netns", "add", ns], timeout=10)
    run(["ip", "-n", ns, "link", "set", "lo", "up"], timeout=10)
    run(
        in_namespace(
            ns,
            [
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        ),
        timeout=10,
    )
    run(in_namespace(ns, ["nft", "-f", "-"]), timeout=10, input_text=GUARD_TABLE)


def has_guard(ns: str) -> bool:
    """True if the ``inet hkguard`` table is installed in ``ns``."""
    return run(in_namespace(ns, ["nft", "list", "table", "inet", "hkguard"]), check=False).ok


def namespace_pids(ns: str) -> list[int]:
    """PIDs of the live processes in ``ns`` (zombies are not listed); [] if ``ns`` is gone."""
    done = run(["ip", "netns", "pids", check_namespace_name(ns)], timeout=10, check=False)
    if not done.ok:
        return []
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def kill_namespace(ns: str, *, wait: float = 2.0) -> list[int]:
    """SIGKILL every process in ``ns`` by PID and wait up to ``wait`` s for them to go.

    Repeats the listing so that children forked during the kill are caught too. Returns the
    PIDs killed. Never kills this process or PID 1, whatever the namespace reports.
    """
    check_namespace_name(ns)
    killed: list[int] = []
    deadline = time.monotonic() + wait
    while True:
        pids = [p for p in namespace_pids(ns) if p not in (1, os.getpid())]
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                log.debug("killed pid %d in %s", pid, ns)
            if pid not in killed:
                killed.append(pid)
        reap(pids)
        time.sleep(0.02)
    if pids:
        log.warning("processes still alive in %s after SIGKILL: %s", ns, pids)
    return killed


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of any of ``pids`` that are our own finished children."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (reaping it first if it is our child)."""
    reap([pid])
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def teardown() -> list[str]:
    """Kill every process in every lab namespace (:data:`LAB_NAMESPACE`), then delete them.

    Also removes lab namespaces left by a crashed earlier run (any number of nodes), but no
    other ``hk*`` namespace. Returns the names deleted.
    """
    names = list_namespaces()
    for ns in names:
        kill_namespace(ns)
    for ns in names:
        run(["ip", "netns", "del", ns], timeout=10, check=False)
    left = list_namespaces()
    if left:
        raise LabError(f"could not delete lab namespaces: {', '.join(left)}")
    return names


# --- switch and hosts ---------------------------------------------------------------------


def add_switch(networks: int) -> None:
    """Create SWITCH_NS with one bridge per network (no STP, no forward delay), all up."""
    add_namespace(SWITCH_NS)
    for net in NETWORKS[:networks]:
        run(
            [
                "ip",
                "-n",
                SWITCH_NS,
                "link",
                "add",
                net.bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
            timeout=10,
        )
        run(["ip", "-n", SWITCH_NS, "link", "set", net.bridge, "up"], timeout=10)


def interface(index: int) -> str:
    """Host-side interface name for network ``index`` (0 = lan): ``eth0``, ``eth1``."""
    return f"eth{index}"


def bridge_port(ns: str, index: int) -> str:
    """Bridge-side veth name for host ``ns`` on network ``index``: ``hkn1-p0``."""
    return f"{ns}-p{index}"


def add_host(ns: str, addresses: Sequence[str]) -> None:
    """Create host namespace ``ns`` with one veth per address, plugged into the bridges.

    ``addresses[i]`` (with /24) goes on ``eth{i}`` inside ``ns``; its peer ``{ns}-p{i}`` is
    enslaved to ``NETWORKS[i].bridge`` in SWITCH_NS. The veth is created from inside ``ns``,
    so nothing ever appears in the root namespace.
    """
    for address in addresses:
        if not in_test_networks(address.partition("/")[0]):
            raise LabError(f"refusing address {address} outside the lab's test networks")
    add_namespace(ns)
    for i, address in enumerate(addresses):
        dev, port = interface(i), bridge_port(ns, i)
        veth = ["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", port]
        run([*veth, "netns", SWITCH_NS], timeout=10)
        run(["ip", "-n", ns, "addr", "add", address, "dev", dev], timeout=10)
        run(["ip", "-n", ns, "link", "set", dev, "up"], timeout=10)
        run(
            ["ip", "-n", SWITCH_NS, "link", "set", port, "master", NETWORKS[i].bridge, "up"],
            timeout=10,
        )


def set_link(ns: str, dev: str, up: bool) -> None:
    """Bring ``dev`` in ``ns`` administratively up or down."""
    run(["ip", "-n", ns, "link", "set", dev, "up" if up else "down"], timeout=10)


# --- reading and changing addresses -------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One interface as ``ip -j addr`` reports it."""

    name: str
    admin_up: bool  # set up by us (IFF_UP)
    carrier: bool  # operstate UP: admin up and the peer/cable is there too
    addresses: tuple[str, ...]  # IPv4 addresses with prefix length, e.g. "192.0.2.11/24"


def links(ns: str) -> dict[str, Link]:
    """Interfaces of ``ns`` (loopback excluded) by name; {} if ``ns`` does not exist."""
    done = run(["ip", "-j", "-n", ns, "addr", "show"], timeout=10, check=False)
    if not done.ok:
        return {}
    result: dict[str, Link] = {}
    for item in json.loads(done.stdout or "[]"):
        name = str(item.get("ifname", ""))
        if not name or name == "lo":
            continue
        addrs = tuple(
            f"{a['local']}/{a['prefixlen']}"
            for a in item.get("addr_info", [])
            if a.get("family") == "inet"
        )
        result[name] = Link(
            name=name,
            admin_up="UP" in item.get("flags", []),
            carrier=item.get("operstate") == "UP",
            addresses=addrs,
        )
    return result


def add_address(ns: str, dev: str, address: str) -> None:
    """Add ``address`` (with prefix length) to ``dev`` in ``ns`` unless it is already there."""
    current = links(ns).get(dev)
    if current is not None and address in current.addresses:
        return
    run(["ip", "-n", ns, "addr", "add", address, "dev", dev], timeout=10)


def flush_addresses(ns: str, dev: str, keep: Iterable[str]) -> list[str]:
    """Delete every IPv4 address on ``dev`` in ``ns`` not in ``keep``; return those deleted."""
    kept = set(keep)
    current = links(ns).get(dev)
    removed = [a for a in (current.addresses if current else ()) if a not in kept]
    for address in removed:
        run(["ip", "-n", ns, "addr", "del", address, "dev", dev], timeout=10, check=False)
    return removed
