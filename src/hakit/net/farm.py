"""The node-local data path of a farm module: nftables bucket filter, VIP on ``lo``, ARP.

Every node of a farm accepts the VIP; exactly one node answers each packet. How:

1. ``setup`` puts the VIP (/32) on ``lo`` and sets ``arp_ignore=1``/``arp_announce=2`` on the
   module's interface, so the kernel neither answers ARP for the VIP nor announces it.
2. One node runs an :class:`ArpResponder`: ARP requests for the VIP are answered with the
   **virtual MAC** ``02:00:<VIP>`` (:func:`virtual_mac`), from the node's REAL MAC. No node
   ever sends from the virtual MAC, so switches never learn it and flood the frames for it
   to every node. The responders of all nodes would send identical replies, so a second one
   running for a moment during a handover is harmless, and a new responder needs no
   announcement: clients' caches already hold the same virtual MAC.
3. A ``netdev`` ingress chain on the interface (promiscuous mode) turns the frames for the
   virtual MAC into host packets (``meta pkttype set host``), and drops at once the packets
   of the module's ports whose bucket this node does not *keep* (owned, loose, or released
   but still holding connections this node tracks): most of the flooded traffic belongs to
   other nodes and never reaches the IP layer or conntrack here.
4. An ``inet`` prerouting chain at priority -150 (after conntrack, -200) keeps this node's
   share of the :attr:`FarmSpec.buckets` buckets (``jhash … mod B seed S``; the seed must
   be equal on all nodes, else the kernel picks a random one per rule):

   - TCP: ``ct state established`` → accept (this node's connections, also after their
     bucket moved to another node: established connections survive a rebalance); a SYN
     (``tcp flags & (fin|syn|rst|ack) == syn``) of an **owned** bucket → accept; any packet
     of a **loose** bucket → accept (a dead node's bucket: its clients' packets reach this
     TCP stack, which answers RST at once instead of letting them hang);
   - UDP: a datagram of an owned or loose bucket → accept. UDP is stateless on purpose: the
     ``ct state established`` rule would make the old owner AND the new owner accept the
     datagrams of a flow after a rebalance (the conntrack entry of a UDP flow lives 30-120 s),
     i.e. the VIP would answer twice;
   - ICMP errors related to a tracked flow (``ct state related``) → accept; an ICMP echo
     request → accept if ``jhash ip saddr`` of the sender is owned, so exactly one node
     answers a ping;
   - everything else to the VIP (other ports, other protocols) → drop, counted. Packets to
     the VIP from the node itself (``iif lo``) are not filtered.

Order of a rebalance (the agent's job): the old owner releases a bucket (:func:`apply`
without it) BEFORE the new owner acquires it; a SYN arriving in between is dropped and
retransmitted by the client 1 s later. ``loose`` is only for buckets whose previous owner is
dead: while the old owner lives, its connections must not be reset by the new owner.

Functions act on the network namespace of the calling process (like :mod:`hakit.net.vip`).
They are synchronous (they run ``nft``/``ip`` through :func:`hakit.system.run.run` and use
pyroute2's synchronous API): the agent calls them in a worker thread.

Counters (:func:`counters`) of the ``inet`` table survive :func:`apply`: it flushes the rules
and the bucket sets and re-adds them in one transaction but keeps the named counter objects;
:func:`setup` starts from fresh tables (counters at zero). The ``netdev`` table (one rule,
the ``flooded`` counter) is recreated by every :func:`apply`: declaring its chain again with
another interface would not fail but hook BOTH interfaces (kernel 6.x multi-device chains).

Caveats:

- IPv4 only (the farm VIP is IPv4; the config rejects anything else).
- One VIP belongs to one farm module: the chain drops everything to the VIP that is not in
  the module's rules, so two modules sharing a VIP would drop each other's ports
  (:func:`setup` refuses it when both state files are in the same ``state_dir``).
- nft 1.0.6 (Debian 12) crashes when LISTING a set declared ``typeof jhash …``; the bucket
  sets are declared ``typeof numgen inc mod B``, the same datatype (32-bit integer in host
  order), which lists fine.
- :func:`client_bucket` re-computes the kernel's ``jhash`` (lookup3, as in
  ``include/linux/jhash.h``) on a little-endian host, the only kind tested.
- :func:`apply` does not redo :func:`setup` (sysctls, VIP, promiscuous mode): a change of
  interface or VIP needs :func:`teardown` then :func:`setup`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hakit.errors import CommandError
from hakit.net import FarmError as FarmError  # noqa: PLC0414 (re-exported)
from hakit.net import nft_table_name
from hakit.net.arp import (
    mac_to_str,
    virtual_mac,
)
from hakit.net.arp_responder import ArpResponder as ArpResponder  # noqa: PLC0414
from hakit.net.vip import add_vip, del_vip, has_vip
from hakit.system.durable import write_atomic
from hakit.system.run import run

log = logging.getLogger(__name__)

BUCKETS = 256  # default number of buckets (the kernel rule computes ``mod 256``)
PRIORITY = -150  # prerouting priority of the bucket filter: after conntrack (-200)
COUNTERS = ("new", "established", "loose", "dropped")  # named counters of the inet table
SYSCTLS = {"arp_ignore": "1", "arp_announce": "2"}  # net.ipv4.conf.<interface>.<name>
STATE_VERSION = 1
NFT_TIMEOUT = 15.0  # seconds for one nft call
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_M32 = 0xFFFFFFFF

__all__ = [
    "ArpResponder",
    "FarmError",
    "FarmRule",
    "FarmSpec",
    "apply",
    "client_bucket",
    "counters",
    "established_count",
    "leftover_modules",
    "ruleset",
    "setup",
    "table_name",
    "teardown",
    "virtual_mac",
]


# --- the module's description (pure) ------------------------------------------------------


@dataclass(frozen=True)
class FarmRule:
    """Which packets to the VIP are load balanced, and by which key."""

    proto: Literal["tcp", "udp"]
    ports: tuple[int, ...]  # destination ports, 1-65535, at least one
    # client-ip: a client address always lands on the same node (affinity);
    # client-ip-port: each connection (source address and port) is placed on its own
    by: Literal["client-ip", "client-ip-port"] = "client-ip"

    def __post_init__(self) -> None:
        if self.proto not in ("tcp", "udp"):
            raise ValueError(f"farm rule: proto must be tcp or udp, not {self.proto!r}")
        if self.by not in ("client-ip", "client-ip-port"):
            raise ValueError(f"farm rule: by must be client-ip or client-ip-port, not {self.by!r}")
        if not self.ports or not all(isinstance(p, int) and 1 <= p <= 65535 for p in self.ports):
            raise ValueError(f"farm rule: ports must be 1-65535, at least one: {self.ports!r}")


@dataclass(frozen=True)
class FarmSpec:
    """Everything the data path of one farm module needs; equal on every node but ``interface``."""

    module: str  # module name; the nft tables are named after it (see table_name)
    vip: str  # the IPv4 VIP, without prefix length
    interface: str  # this node's interface on the VIP's network
    rules: tuple[FarmRule, ...]  # at least one
    seed: int  # jhash seed, 0 <= seed < 2**32, EQUAL ON ALL NODES
    buckets: int = BUCKETS  # 1-65536; owned/loose bucket numbers are < buckets

    def __post_init__(self) -> None:
        if not self.module:
            raise ValueError("farm: empty module name")
        if ipaddress.ip_address(self.vip).version != 4:  # ValueError for a non-address
            raise ValueError(f"farm module {self.module}: the VIP must be IPv4, not {self.vip}")
        if not _IFNAME.match(self.interface):
            raise ValueError(
                f"farm module {self.module}: invalid interface name {self.interface!r}"
            )
        if not self.rules:
            raise ValueError(f"farm module {self.module}: at least one rule is needed")
        if not 0 <= self.seed <= _M32:
            raise ValueError(f"farm module {self.module}: seed must be 0 to 2**32-1")
        if not 1 <= self.buckets <= 65536:
            raise ValueError(f"farm module {self.module}: buckets must be 1 to 65536")


def table_name(module: str) -> str:
    """Name of the module's nft tables (netdev and inet): ``hakit_farm_<module>`` (see
    :func:`hakit.net.nft_table_name`)."""
    return nft_table_name("hakit_farm", module)


def client_bucket(
    client_ip: str, seed: int, buckets: int = BUCKETS, sport: int | None = None
) -> int:
    """The bucket the kernel computes for a client: ``jhash ip saddr [. sport] mod B seed S``.

    ``sport`` (a ``client-ip-port`` rule): the client's source port. Pure; little-endian hosts.
    """
    key = ipaddress.IPv4Address(client_ip).packed
    if sport is not None:
        key += sport.to_bytes(2, "big") + b"\x00\x00"  # nft pads each concat field to 32 bits
    return (_jhash(key, seed) * buckets) >> 32  # the kernel's reciprocal_scale()


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _words(block: bytes) -> tuple[int, int, int]:
    """Three 32-bit words of up to 12 bytes, zero-padded, read little-endian (x86)."""
    block = block.ljust(12, b"\x00")
    return (
        int.from_bytes(block[0:4], "little"),
        int.from_bytes(block[4:8], "little"),
        int.from_bytes(block[8:12], "little"),
    )


def _jhash(key: bytes, initval: int) -> int:
    """Bob Jenkins' lookup3 hash exactly as the Linux kernel's ``jhash()``."""

    a = b = c = (0xDEADBEEF + len(key) + initval) & _M32
    rest = key
    while len(rest) > 12:  # __jhash_mix
        x, y, z = _words(rest[:12])
        a, b, c = (a + x) & _M32, (b + y) & _M32, (c + z) & _M32
        a = ((a - c) & _M32) ^ _rol32(c, 4)
        c = (c + b) & _M32
        b = ((b - a) & _M32) ^ _rol32(a, 6)
        a = (a + c) & _M32
        c = ((c - b) & _M32) ^ _rol32(b, 8)
        b = (b + a) & _M32
        a = ((a - c) & _M32) ^ _rol32(c, 16)
        c = (c + b) & _M32
        b = ((b - a) & _M32) ^ _rol32(a, 19)
        a = (a + c) & _M32
        c = ((c - b) & _M32) ^ _rol32(b, 4)
        b = (b + a) & _M32
        rest = rest[12:]
    if not rest:
        return c
    x, y, z = _words(rest)
    a, b, c = (a + x) & _M32, (b + y) & _M32, (c + z) & _M32
    c = ((c ^ b) - _rol32(b, 14)) & _M32  # __jhash_final
    a = ((a ^ c) - _rol32(c, 11)) & _M32
    b = ((b ^ a) - _rol32(a, 25)) & _M32
    c = ((c ^ b) - _rol32(b, 16)) & _M32
    a = ((a ^ c) - _rol32(c, 4)) & _M32
    b = ((b ^ a) - _rol32(a, 14)) & _M32
    return ((c ^ b) - _rol32(b, 24)) & _M32


# --- the ruleset (pure) -------------------------------------------------------------------


def ruleset(
    spec: FarmSpec,
    owned: Iterable[int],
    loose: Iterable[int],
    *,
    keep: Iterable[int] | None = None,
    fresh: bool = False,
) -> str:
    """The complete ``nft -f -`` script of the module: one atomic, idempotent transaction.

    ``owned``: buckets whose NEW connections this node accepts; ``loose``: buckets whose every
    packet it accepts (a dead node's buckets). ``keep`` (default: owned and loose): the buckets
    whose packets go past the ingress chain at all; every other packet of the module's ports is
    dropped there, before the IP layer and conntrack (the cheap path for the bulk of the
    flooded traffic, which belongs to other nodes). The agent adds the buckets this node
    released while it may still track connections in them (their packets must reach conntrack
    and the ``established`` rule). The ``netdev`` table is always deleted and
    recreated (a chain declared again with another interface would hook both). The ``inet``
    table: with ``fresh`` (for :func:`setup`) too, counters start at zero; otherwise its rules
    and bucket sets are flushed and re-added, and its named counters keep counting.
    """
    owned_set, loose_set = _buckets(spec, owned, "owned"), _buckets(spec, loose, "loose")
    keep_set = _buckets(spec, set(owned_set) | set(loose_set) | set(keep or ()), "keep")
    table = table_name(spec.module)
    vmac = mac_to_str(virtual_mac(spec.vip))
    reset = "delete" if fresh else "flush"
    typeof = f"typeof numgen inc mod {spec.buckets}"  # not `typeof jhash`: see Caveats
    lines = [
        f"# hakit farm module {json.dumps(spec.module)}: VIP {spec.vip} on {spec.interface},",
        f"# seed {spec.seed:#010x}, {len(owned_set)} owned and {len(loose_set)} loose buckets"
        f" of {spec.buckets}",
        f"table netdev {table}",
        f"delete table netdev {table}",  # always: redeclaring would ADD a device to the chain
        f"table netdev {table} {{",
        "\tcounter flooded {",
        "\t}",
        "",
        "\tcounter early {",
        "\t}",
        "",
        "\tset keep {",
        f"\t\t{typeof}",
        *([f"\t\telements = {{ {', '.join(str(b) for b in keep_set)} }}"] if keep_set else []),
        "\t}",
        "",
        "\tchain ingress {",
        f'\t\ttype filter hook ingress device "{spec.interface}" priority 0; policy accept;',
        f"\t\tether daddr != {vmac} return",
        '\t\tether type ip meta pkttype set host counter name "flooded"',
        *[f"\t\t{rule}" for rule in _early_rules(spec)],
        "\t}",
        "}",
        f"table inet {table}",
        f"{reset} table inet {table}",
        f"table inet {table} {{",
    ]
    for name in COUNTERS:
        lines += [f"\tcounter {name} {{", "\t}", ""]
    lines += [
        "\tset owned {",
        f"\t\t{typeof}",
        "\t}",
        "",
        "\tset loose {",
        f"\t\t{typeof}",
        "\t}",
        "",
        "\tchain prerouting {",
        f"\t\ttype filter hook prerouting priority {PRIORITY}; policy accept;",
        f'\t\tiif != "lo" ip daddr {spec.vip} jump vip',
        "\t}",
        "",
        "\tchain vip {",
    ]
    lines += [f"\t\t{rule}" for rule in _vip_rules(spec)]
    lines += ["\t}", "}"]
    if not fresh:  # `flush table` keeps set elements: empty the sets explicitly
        lines += [f"flush set inet {table} owned", f"flush set inet {table} loose"]
    for name, members in (("owned", owned_set), ("loose", loose_set)):
        if members:
            elements = ", ".join(str(b) for b in members)
            lines.append(f"add element inet {table} {name} {{ {elements} }}")
    return "\n".join(lines) + "\n"


def _early_rules(spec: FarmSpec) -> list[str]:
    """Ingress rules (frames for the virtual MAC): drop the module's packets whose bucket this
    node does not keep, before they cost an IP layer and a conntrack lookup."""
    rules = []
    for rule in spec.rules:
        ports = sorted(set(rule.ports))
        match = (
            f"{rule.proto} dport {ports[0]}"
            if len(ports) == 1
            else f"{rule.proto} dport {{ {', '.join(str(x) for x in ports)} }}"
        )
        key = "ip saddr" if rule.by == "client-ip" else f"ip saddr . {rule.proto} sport"
        bucket = f"jhash {key} mod {spec.buckets} seed {spec.seed:#010x}"
        rules.append(f'ip daddr {spec.vip} {match} {bucket} != @keep counter name "early" drop')
    return rules


def _vip_rules(spec: FarmSpec) -> list[str]:
    """The rules of the ``vip`` chain (packets to the VIP from outside), in order."""
    hash_ip = f"jhash ip saddr mod {spec.buckets} seed {spec.seed:#010x}"
    rules = []
    for rule in spec.rules:
        if len(rule.ports) == 1:
            match = f"{rule.proto} dport {rule.ports[0]}"
        else:
            match = f"{rule.proto} dport {{ {', '.join(str(p) for p in sorted(set(rule.ports)))} }}"
        key = "ip saddr" if rule.by == "client-ip" else f"ip saddr . {rule.proto} sport"
        bucket = f"jhash {key} mod {spec.buckets} seed {spec.seed:#010x}"
        if rule.proto == "tcp":
            rules += [
                # a pure SYN never passes as "established": the old owner of a moved bucket
                # may track a half-open connection whose SYN the client retransmits, which
                # the new owner answers (it owns the bucket) — only one node may
                f"{match} ct state established tcp flags & (fin | syn | rst | ack) != syn"
                ' counter name "established" accept',
                f"{match} {bucket} @owned tcp flags & (fin | syn | rst | ack) == syn"
                ' counter name "new" accept',
            ]
        else:
            rules.append(f'{match} {bucket} @owned counter name "new" accept')
        rules.append(f'{match} {bucket} @loose counter name "loose" accept')
    rules += [
        'ct state related counter name "established" accept',
        f"icmp type echo-request {hash_ip} @owned counter accept",
        'counter name "dropped" drop',
    ]
    return rules


def _buckets(spec: FarmSpec, buckets: Iterable[int], what: str) -> list[int]:
    result = sorted(set(buckets))
    bad = [b for b in result if not 0 <= b < spec.buckets]
    if bad:
        raise ValueError(
            f"farm module {spec.module}: {what} buckets out of 0-{spec.buckets - 1}: {bad}"
        )
    return result


# --- nftables -----------------------------------------------------------------------------


def apply(
    spec: FarmSpec,
    owned: Iterable[int],
    loose: Iterable[int],
    *,
    keep: Iterable[int] | None = None,
    fresh: bool = False,
) -> None:
    """Load :func:`ruleset` with ``nft -f -`` (one transaction: all of it or nothing).

    Raises :class:`CommandError` carrying nft's error lines when nft refuses it.
    """
    _nft_script(ruleset(spec, owned, loose, keep=keep, fresh=fresh))
    log.debug("farm %s: filter applied", spec.module)


def _nft_script(script: str) -> None:
    argv = ["nft", "-f", "-"]
    done = run(argv, timeout=NFT_TIMEOUT, check=False, input_text=script)
    if not done.ok:
        errors = [line.strip() for line in done.stderr.splitlines() if "Error:" in line]
        summary = "; ".join(errors) or done.stderr.strip() or done.describe()
        raise CommandError(argv, done.returncode, f"{done.stderr.rstrip()}\n{summary}")


def _tables_present(table: str) -> list[str]:
    """Which of ``netdev``/``inet`` tables named ``table`` exist in this namespace."""
    out = run(["nft", "list", "tables"], timeout=NFT_TIMEOUT).stdout
    present = {tuple(line.split()[1:3]) for line in out.splitlines() if line.startswith("table")}
    return [family for family in ("netdev", "inet") if (family, table) in present]


def counters(module: str) -> dict[str, int]:
    """Packet counters of this node's filter for ``module``; {} when it has none.

    Keys: ``new`` (TCP SYNs and UDP datagrams accepted by owned bucket), ``established``
    (packets of this node's tracked connections, related ICMP included), ``loose`` (packets
    accepted by loose bucket), ``dropped`` (packets to the VIP left to other nodes or not
    served), ``flooded`` (frames for the virtual MAC taken in by the ingress chain) and
    ``early`` (packets of buckets not kept, dropped at ingress) — these two since the last
    :func:`apply`.
    """
    table = table_name(module)
    out = run(["nft", "-j", "list", "counters"], timeout=NFT_TIMEOUT).stdout
    result: dict[str, int] = {}
    for item in json.loads(out or "{}").get("nftables", []):
        counter = item.get("counter")
        if (
            counter
            and counter.get("table") == table
            and counter.get("family") in ("inet", "netdev")
        ):
            result[str(counter["name"])] = int(counter.get("packets", 0))
    return result


def established_count(vip: str, ports: Iterable[int]) -> int:
    """Number of ESTABLISHED TCP connections tracked to ``vip`` on ``ports`` (for draining).

    Read from ``/proc/net/nf_conntrack`` (present on this platform's kernel; cheap, no
    process); where the kernel lacks it (no CONFIG_NF_CONNTRACK_PROCFS), from netlink with
    pyroute2's conntrack dump. The ``conntrack`` tool is not used: it is not installed here
    and would only be a third way to read the same table.
    """
    wanted = {int(p) for p in ports}
    path = Path("/proc/net/nf_conntrack")
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return _established_netlink(vip, wanted)
    except OSError as exc:
        raise FarmError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return count_established(text, vip, wanted)


def count_established(text: str, vip: str, ports: Iterable[int]) -> int:
    """ESTABLISHED TCP entries to ``vip``:``ports`` in ``/proc/net/nf_conntrack`` text. Pure."""
    wanted = {str(int(p)) for p in ports}
    count = 0
    for line in text.splitlines():
        words = line.split()
        if len(words) < 6 or words[2] != "tcp" or words[5] != "ESTABLISHED":
            continue
        fields: dict[str, str] = {}
        for word in words[6:]:  # the original direction comes first: keep first occurrences
            name, _, value = word.partition("=")
            fields.setdefault(name, value)
        if fields.get("dst") == vip and fields.get("dport") in wanted:
            count += 1
    return count


def tracked_buckets(spec: FarmSpec) -> set[int]:
    """Buckets of the TCP connections to the VIP this node tracks and that are not over yet: a
    released bucket must stay past the ingress chain while it holds one of them."""
    try:
        text = Path("/proc/net/nf_conntrack").read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise FarmError(f"cannot read /proc/net/nf_conntrack: {exc.strerror or exc}") from exc
    return buckets_in_conntrack(text, spec)


def buckets_in_conntrack(text: str, spec: FarmSpec) -> set[int]:
    """The buckets of the TCP entries to ``spec.vip`` on its TCP ports in ``text``, but for
    connections already over (TIME_WAIT, CLOSE). Pure; cheap on big tables (a substring test
    first, one hash per client address or address and port)."""
    by_port = {p: r.by for r in spec.rules if r.proto == "tcp" for p in r.ports}
    out: set[int] = set()
    seen: dict[tuple[str, int | None], int] = {}
    needle = f"dst={spec.vip} "
    for line in text.splitlines():
        if needle not in line:
            continue
        words = line.split()
        if len(words) < 6 or words[2] != "tcp" or words[5] in ("TIME_WAIT", "CLOSE"):
            continue
        fields: dict[str, str] = {}
        for word in words[5:]:  # the original direction comes first: keep first occurrences
            name, _, value = word.partition("=")
            fields.setdefault(name, value)
        try:
            dport, src, sport = int(fields["dport"]), fields["src"], int(fields["sport"])
        except (KeyError, ValueError):
            continue
        if fields.get("dst") != spec.vip or dport not in by_port:
            continue
        key = (src, sport if by_port[dport] == "client-ip-port" else None)
        if key not in seen:
            seen[key] = client_bucket(src, spec.seed, spec.buckets, key[1])
        out.add(seen[key])
    return out


def _established_netlink(vip: str, ports: set[int]) -> int:
    from pyroute2 import Conntrack  # noqa: PLC0415 — only where /proc lacks the table
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # noqa: PLC0415

    count = 0
    try:
        with Conntrack() as ct:
            for entry in ct.dump_entries(
                tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_TCP, daddr=vip)
            ):
                info = entry.protoinfo
                if entry.tuple_orig.dport in ports and info and info.state_name() == "ESTABLISHED":
                    count += 1
    except OSError as exc:
        raise FarmError(f"cannot read the conntrack table over netlink: {exc}") from exc
    return count


# --- setup and teardown: what hakit changed, remembered on disk ---------------------------

_LOCK = threading.Lock()  # setup/teardown of two modules read each other's state files


def state_path(module: str, state_dir: Path) -> Path:
    """The JSON file remembering what :func:`setup` changed for ``module``."""
    return state_dir / f"farm-{table_name(module).removeprefix('hakit_farm_')}.json"


def setup(spec: FarmSpec, state_dir: Path) -> None:
    """Prepare this node for ``spec``: VIP on ``lo``, ARP sysctls, promiscuous mode, filter.

    ``state_dir``: the agent's directory shared by ALL farm modules (one file per module):
    modules sharing an interface restore its settings only when the last one leaves.

    Persist, then act: the previous values (sysctls, promiscuous mode, whether the VIP was
    on ``lo``) are written durably BEFORE anything changes, so :func:`teardown` after a crash
    undoes exactly what hakit changed. A state file left by a crashed run is undone first.
    Order of the changes: ARP sysctls, filter accepting nothing (owned = loose = ∅), VIP on
    ``lo``, promiscuous mode; so the VIP never answers before the filter is there. If a step
    fails, what was done is undone before the error is raised (FarmError, VipError,
    CommandError); if even that fails, the state file stays for the next :func:`teardown`.
    """
    with _LOCK:
        path = state_path(spec.module, state_dir)
        if path.exists():
            for sentence in _teardown(spec.module, state_dir):
                log.info("farm %s: left by a previous run: %s", spec.module, sentence)
        others = _other_states(spec.module, state_dir)
        for other in others:
            if other["vip"] == spec.vip:
                raise FarmError(
                    f"farm modules {other['module']} and {spec.module} both use VIP {spec.vip}:"
                    " give each farm module its own VIP"
                )
        sharing = next((o for o in others if o["interface"] == spec.interface), None)
        if sharing is not None:  # the true originals are in the other module's file
            sysctls, promisc = dict(sharing["sysctl_before"]), bool(sharing["promisc_before"])
        else:
            sysctls = {name: _read_sysctl(spec.interface, name) for name in SYSCTLS}
            promisc = _promisc(spec.interface)
        state = {
            "version": STATE_VERSION,
            "module": spec.module,
            "table": table_name(spec.module),
            "vip": spec.vip,
            "interface": spec.interface,
            "vip_on_lo_before": has_vip("lo", f"{spec.vip}/32"),
            "sysctl_before": sysctls,
            "promisc_before": promisc,
        }
        write_atomic(path, json.dumps(state, indent=2) + "\n")
        try:
            for name, value in SYSCTLS.items():
                _write_sysctl(spec.interface, name, value)
            apply(spec, (), (), fresh=True)
            add_vip("lo", f"{spec.vip}/32")
            if not _promisc(spec.interface):
                _set_promisc(spec.interface, True)
        except Exception:
            try:
                _teardown(spec.module, state_dir)
            except Exception as exc:  # keep the first error; the state file remains
                log.warning("farm %s: could not undo a failed set-up: %s", spec.module, exc)
            raise
    log.debug("farm %s: data path set up on %s", spec.module, spec.interface)


def fail_closed(spec: FarmSpec) -> bool:
    """Take the VIP off ``lo`` so that this node accepts nothing for it, whatever its nft
    rules say (for when a ruleset change fails). True if it was there. :func:`teardown`
    later finds it gone, which is fine."""
    return del_vip("lo", f"{spec.vip}/32")


def teardown(module: str, state_dir: Path) -> list[str]:
    """Undo what :func:`setup` did for ``module``, from its state file alone; idempotent.

    Removes the module's nft tables (even without a state file), the VIP from ``lo`` (unless
    it was there before), restores the sysctls and promiscuous mode (unless another farm
    module still uses the interface), then deletes the state file — last, so that a failure
    half-way leaves it for the next attempt. Returns one sentence per thing undone.
    """
    with _LOCK:
        return _teardown(module, state_dir)


def _teardown(module: str, state_dir: Path) -> list[str]:
    done: list[str] = []
    table = table_name(module)
    present = _tables_present(table)
    if present:
        _nft_script("".join(f"table {f} {table}\ndelete table {f} {table}\n" for f in present))
        done.append(f"removed the nftables tables {' and '.join(present)} {table}")
    path = state_path(module, state_dir)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return done
    except (OSError, ValueError) as exc:
        raise FarmError(f"farm module {module}: unreadable state file {path}: {exc}") from exc
    vip, interface = str(state["vip"]), str(state["interface"])
    if not state["vip_on_lo_before"] and del_vip("lo", f"{vip}/32"):
        done.append(f"removed VIP {vip}/32 from lo")
    sharing = [o["module"] for o in _other_states(module, state_dir) if o["interface"] == interface]
    if sharing:
        done.append(
            f"left the ARP settings and promiscuous mode of {interface}: farm module"
            f" {sharing[0]} still uses it"
        )
    elif not Path(f"/proc/sys/net/ipv4/conf/{interface}").exists():
        done.append(f"interface {interface} is gone: no settings to restore")
    else:
        for name, before in state["sysctl_before"].items():
            if _read_sysctl(interface, name) != before:
                _write_sysctl(interface, name, before)
                done.append(f"restored net.ipv4.conf.{interface}.{name} to {before}")
        if not state["promisc_before"] and _promisc(interface):
            _set_promisc(interface, False)
            done.append(f"turned promiscuous mode off on {interface}")
    path.unlink()
    done.append(f"deleted the state file {path}")
    return done


def leftover_modules(state_dir: Path) -> list[str]:
    """Modules whose state file is in ``state_dir``: set up and not torn down (e.g. a crash).

    The agent calls :func:`teardown` at start for each of them that it does not run.
    """
    return sorted(str(state["module"]) for state in _other_states("", state_dir))


def _other_states(module: str, state_dir: Path) -> list[dict[str, Any]]:
    """State files of the OTHER farm modules in ``state_dir`` (unreadable ones skipped)."""
    mine = state_path(module, state_dir) if module else None
    result = []
    for path in sorted(state_dir.glob("farm-*.json")) if state_dir.is_dir() else []:
        if path == mine:
            continue
        try:
            result.append(dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            log.warning("farm: ignoring unreadable state file %s: %s", path, exc)
    return result


def _sysctl_path(interface: str, name: str) -> Path:
    if not _IFNAME.match(interface):
        raise FarmError(f"invalid interface name {interface!r}")
    return Path("/proc/sys/net/ipv4/conf") / interface / name


def _read_sysctl(interface: str, name: str) -> str:
    path = _sysctl_path(interface, name)
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise FarmError(f"cannot read {path} (does {interface} exist?): {exc.strerror}") from exc


def _write_sysctl(interface: str, name: str, value: str) -> None:
    path = _sysctl_path(interface, name)
    try:
        path.write_text(f"{value}\n", encoding="ascii")
    except OSError as exc:
        raise FarmError(f"cannot set {path} to {value}: {exc.strerror}") from exc


def _promisc(interface: str) -> bool:
    """True if promiscuous mode was REQUESTED on ``interface`` (``ip link set … promisc on``).

    The PROMISC flag netlink reports is the requested one; a bridge port or a capture raises
    only the promiscuity count, which this does not look at.
    """
    out = run(["ip", "-j", "link", "show", "dev", interface], timeout=10).stdout
    links = json.loads(out or "[]")
    return bool(links) and "PROMISC" in links[0].get("flags", [])


def _set_promisc(interface: str, on: bool) -> None:
    run(["ip", "link", "set", "dev", interface, "promisc", "on" if on else "off"], timeout=10)


# --- the ARP responder --------------------------------------------------------------------
