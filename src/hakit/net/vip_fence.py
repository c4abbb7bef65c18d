"""The kernel's half of a mirror module's lease: VIP traffic only until a deadline.

A primary that holds its role by a lease (an arbiter is configured) must stop serving when
the lease lapses, even if nothing of hakit runs any more on it: the agent paused (SIGSTOP) or
stuck, and the replication process — whose watchdog removes the VIPs otherwise — dead too.
So, before the VIPs are added, the agent installs two nftables tables per module (one
transaction) and then keeps pushing the deadline forward at every ``FenceAt`` of its machine:

- ``table inet hakit_fence_<module>``: packets to a VIP (input hook) and from a VIP (output
  hook) are dropped unless the VIP is in the set ``live``;
- ``table arp hakit_fence_<module>``: ARP requests for an IPv4 VIP are dropped unless it is
  in ``live``, so the kernel stops answering them too.

Each element of ``live`` carries the kernel timeout ``deadline - now``: once the deadline has
passed without a renewal, the kernel itself drops the element, and with it every packet of the
VIPs — no process needs to run for that. A renewal replaces the elements in one transaction
(``flush set`` + ``add element``): packets see the old or the new deadline, never none.

Contracts: :func:`install_script` is applied before the addresses are added, :func:`remove`
after they are removed; :func:`remove` of absent tables succeeds (agent start clears what a
crashed run left, after removing the addresses). ``timeout_ms`` None: no deadline (the element
never expires); 0 or less: fenced at once (``live`` empty). The builders are pure.

Caveats: the kernel counts set timeouts in jiffies, which stop during a suspend; a node that
was suspended keeps its VIP traffic for as long past the deadline as it was suspended (the
replication process's watchdog, on ``CLOCK_BOOTTIME``, removes the addresses then). IPv6 VIPs
are fenced for traffic but the kernel may still answer neighbour solicitations for them. The
renewal is an ``nft`` process: the deadline the kernel holds is late by that process's start
(milliseconds), far less than the grace the machine adds (docs/split-brain.md).
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Iterable

from hakit.errors import CommandError
from hakit.net import nft_table_name
from hakit.system.run import run_async

NFT_TIMEOUT = 10.0  # seconds an nft transaction may take
PRIORITY = -400  # before the farm filter and anything a distribution loads


def table_name(module: str) -> str:
    """Name of the module's two fence tables (``inet`` and ``arp``)."""
    return nft_table_name("hakit_fence", module)


def _split(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 addresses of ``addresses`` (CIDRs or bare), without prefixes, sorted."""
    v4: set[str] = set()
    v6: set[str] = set()
    for cidr in addresses:
        ip = ipaddress.ip_interface(cidr).ip
        (v4 if ip.version == 4 else v6).add(str(ip))
    return sorted(v4), sorted(v6)


def _element(address: str, timeout_ms: int | None) -> str:
    return address if timeout_ms is None else f"{address} timeout {timeout_ms}ms"


def renew_script(module: str, addresses: Iterable[str], timeout_ms: int | None) -> str:
    """Replace the elements of every ``live`` set: the VIPs pass for ``timeout_ms`` more."""
    table = table_name(module)
    v4, v6 = _split(addresses)
    lines = []
    for family, sets in (("inet", (("live4", v4), ("live6", v6))), ("arp", (("live4", v4),))):
        for name, members in sets:
            if not members:
                continue
            lines.append(f"flush set {family} {table} {name}")
            if timeout_ms is None or timeout_ms > 0:
                elements = ", ".join(_element(a, timeout_ms) for a in members)
                lines.append(f"add element {family} {table} {name} {{ {elements} }}")
    return "\n".join(lines) + "\n"


def install_script(module: str, addresses: Iterable[str], timeout_ms: int | None) -> str:
    """The tables of the module, created afresh, with ``live`` holding the VIPs for
    ``timeout_ms``. One transaction: all of it or nothing."""
    table = table_name(module)
    addresses = list(addresses)
    v4, v6 = _split(addresses)
    lines = [f"# hakit: VIPs of mirror module {module} pass only while their lease is valid"]
    lines += [f"table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    in_rules, out_rules = [], []
    for ver, members, key in (("4", v4, "ip"), ("6", v6, "ip6")):
        if not members:
            continue
        kind = "ipv4_addr" if ver == "4" else "ipv6_addr"
        lines += _sets(ver, kind, members)
        in_rules.append(f"{key} daddr @vips{ver} {key} daddr != @live{ver} counter drop")
        out_rules.append(f"{key} saddr @vips{ver} {key} saddr != @live{ver} counter drop")
    lines += _chain("input", in_rules) + _chain("output", out_rules) + ["}"]
    lines += [f"table arp {table}", f"delete table arp {table}"]
    if v4:
        arp = "arp operation request arp daddr ip @vips4 arp daddr ip != @live4 counter drop"
        lines += [f"table arp {table} {{", *_sets("4", "ipv4_addr", v4), *_chain("input", [arp])]
        lines.append("}")
    return "\n".join(lines) + "\n" + renew_script(module, addresses, timeout_ms)


def _sets(ver: str, kind: str, members: list[str]) -> list[str]:
    return [
        f"\tset vips{ver} {{",
        f"\t\ttype {kind}",
        f"\t\telements = {{ {', '.join(members)} }}",
        "\t}",
        f"\tset live{ver} {{",
        f"\t\ttype {kind}",
        "\t\tflags timeout",
        "\t}",
    ]


def _chain(hook: str, rules: list[str]) -> list[str]:
    return [
        f"\tchain {hook} {{",
        f"\t\ttype filter hook {hook} priority {PRIORITY}; policy accept;",
        *[f"\t\t{rule}" for rule in rules],
        "\t}",
    ]


def remove_script(module: str) -> str:
    """Delete both tables; absent ones are no error (declared first, then deleted)."""
    table = table_name(module)
    return "".join(f"table {f} {table}\ndelete table {f} {table}\n" for f in ("inet", "arp"))


async def apply(script: str) -> None:
    """Run ``script`` as one nft transaction; CommandError with nft's message if refused, or
    naming the package if nft is not installed."""
    argv = ["nft", script]
    try:
        done = await run_async(argv, timeout=NFT_TIMEOUT)
    except OSError as exc:
        raise CommandError(["nft"], 127, f"{exc} (install the nftables package)") from None
    if not done.ok:
        errors = [line.strip() for line in done.stderr.splitlines() if "Error:" in line]
        raise CommandError(
            ["nft", "<fence script>"], done.returncode, "; ".join(errors) or done.describe()
        )


async def remove(module: str) -> None:
    """Delete the module's fence tables (nothing to do if they are absent, or if nft is not
    installed: then no table can have been made)."""
    if shutil.which("nft") is None:
        return
    await apply(remove_script(module))
