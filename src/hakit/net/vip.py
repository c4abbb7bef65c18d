"""Virtual IP addresses: add, remove, test (netlink via pyroute2) and announce (gratuitous ARP).

All functions act on the network namespace of the CALLING process (pyroute2 ``IPRoute``
semantics); to act on a lab node, run the caller inside that namespace
(``ip netns exec``), as the integration tests do.

Sync or async — which to call from where:

- In the agent's event loop use the coroutines :func:`add_vip_async`, :func:`del_vip_async`,
  :func:`has_vip_async`, :func:`interface_mac_async` and :func:`announce`. They use pyroute2's
  ``AsyncIPRoute`` on the running loop: a netlink round trip takes microseconds and never
  blocks the loop.
- Everywhere else (CLI, lab, scripts, tests) use :func:`add_vip`, :func:`del_vip`,
  :func:`has_vip`: each runs its coroutine in a private event loop. pyroute2 >= 0.9's
  synchronous API cannot run inside a running loop, so these raise RuntimeError there
  (a programming error) instead of failing obscurely.

Contracts:

- ``cidr`` is ``"address/prefix"`` (``"192.0.2.199/24"``); a bare address means /32 (/128).
  Identity is (address, prefix) as for the kernel: the same address with another prefix is
  another address.
- :func:`add_vip` returns False when the address was already there (kernel EEXIST), True
  when it added it; :func:`del_vip` returns False when it was not there (EADDRNOTAVAIL).
  Both are idempotent and race-free (no check-then-act).
- Any failure raises :class:`VipError` (a :class:`hakit.errors.HakitError`) whose message
  names the interface and the address: missing interface, missing privilege, invalid CIDR.
- Ordering on takeover: :func:`add_vip` first, then :func:`announce` (the kernel answers ARP
  for the address only once it is configured). On release, :func:`del_vip` only; nothing
  is announced (the new owner announces).
- :func:`announce` sends ``count`` gratuitous ARPs, the first immediately, then one every
  ``interval`` seconds; a failing send (link down) is logged at WARNING and skipped, the
  return value is how many were sent.

Caveats:

- IPv6: addresses can be added and removed, but go through duplicate address detection
  (tentative for about a second) and are not announced — unsolicited neighbour
  advertisements are not done yet; :func:`announce` raises VipError for an IPv6 address.
- If the VIP is the FIRST address of its subnet on the interface it becomes the primary
  address of that subnet, and addresses added later in the subnet become its secondaries:
  deleting the VIP then deletes them too unless ``net.ipv4.conf.<if>.promote_secondaries=1``.
  Give the interface its own fixed address in the VIP's subnet, or use a /32 VIP.
- Gratuitous ARP only refreshes neighbour entries that exist; Linux neighbours do not
  create new entries from it unless ``arp_accept`` is set (see :mod:`hakit.net.arp`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hakit.net import NetError
from hakit.net.arp import gratuitous_arp, mac_from_str, mac_to_str, send_frames

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1  # link type of Ethernet-like interfaces (veth, bridge, macvlan, NICs)

T = TypeVar("T")


class VipError(NetError):
    """A virtual IP could not be added, removed, tested or announced."""


# --- coroutines: for the agent's event loop -----------------------------------------------


async def add_vip_async(ifname: str, cidr: str) -> bool:
    """Add ``cidr`` to ``ifname``; False if it was already there."""
    return await _change_address("add", ifname, cidr)


async def del_vip_async(ifname: str, cidr: str) -> bool:
    """Remove ``cidr`` from ``ifname``; False if it was not there."""
    return await _change_address("del", ifname, cidr)


_CHANGES = {
    # op: (errno meaning "nothing to do", error wording)
    "add": (errno.EEXIST, "cannot add VIP {cidr} on {ifname}"),
    "del": (errno.EADDRNOTAVAIL, "cannot remove VIP {cidr} from {ifname}"),
}


async def _change_address(op: str, ifname: str, cidr: str) -> bool:
    """Add or delete one address over netlink; False when it was already (not) there."""
    unchanged, wording = _CHANGES[op]
    what = wording.format(cidr=cidr, ifname=ifname)
    iface = _parse_cidr(ifname, cidr)
    try:
        async with AsyncIPRoute() as ipr:
            index = await _index(ipr, ifname, what.rsplit(" ", 2)[0])
            await ipr.addr(
                op,
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                family=_family(iface),
            )
    except NetlinkError as exc:
        if exc.code == unchanged:
            log.debug("VIP %s: nothing to %s on %s", cidr, op, ifname)
            return False
        raise VipError(f"{what}: {_strerror(exc)}") from exc
    except OSError as exc:
        raise VipError(f"{what}: {exc}") from exc
    log.debug("VIP %s: %s done on %s", cidr, op, ifname)
    return True


async def has_vip_async(ifname: str, cidr: str) -> bool:
    """True if ``ifname`` carries exactly ``cidr`` (same address and prefix)."""
    iface = _parse_cidr(ifname, cidr)
    address, prefixlen = str(iface.ip), iface.network.prefixlen
    try:
        async with AsyncIPRoute() as ipr:
            index = await _index(ipr, ifname, f"cannot look for VIP {cidr}")
            async for msg in await ipr.addr("dump", index=index, family=_family(iface)):
                local = msg.get("local") or msg.get("address")
                if local == address and msg.get("prefixlen") == prefixlen:
                    return True
    except (NetlinkError, OSError) as exc:
        raise VipError(f"cannot look for VIP {cidr} on {ifname}: {_strerror(exc)}") from exc
    return False


async def interface_mac_async(ifname: str) -> bytes:
    """The Ethernet address of ``ifname``; VipError if missing or not Ethernet-like."""
    try:
        async with AsyncIPRoute() as ipr:
            index = await _index(ipr, ifname, "cannot read its MAC address")
            links = await ipr.link("get", index=index)
    except (NetlinkError, OSError) as exc:
        raise VipError(f"cannot read the MAC address of {ifname}: {_strerror(exc)}") from exc
    link = links[0]
    text = link.get("address")
    if link["ifi_type"] != ARPHRD_ETHER or not isinstance(text, str):
        raise VipError(f"interface {ifname!r} is not an Ethernet interface: cannot send ARP")
    return mac_from_str(text)


async def announce(ifname: str, ip: str, count: int = 3, interval: float = 0.2) -> int:
    """Send ``count`` gratuitous ARPs for ``ip`` from ``ifname``'s MAC, the first immediately.

    ``ip``: IPv4 address, bare or with a prefix (``"192.0.2.199/24"``).
    ``interval``: seconds between two announcements, >= 0.
    Returns the number of frames sent; a failed send is logged at WARNING, not raised.
    """
    if count < 1 or interval < 0:
        raise ValueError("announce needs count >= 1 and interval >= 0")
    try:
        address = ipaddress.ip_interface(ip).ip
    except ValueError as exc:
        raise VipError(f"cannot announce {ip!r} on {ifname}: {exc}") from exc
    if address.version != 4:
        raise VipError(
            f"cannot announce {address} on {ifname}: IPv6 unsolicited neighbour "
            "advertisements are not implemented yet"
        )
    mac = await interface_mac_async(ifname)
    frame = gratuitous_arp(mac, str(address))
    sent = 0
    for i in range(count):
        if i:
            await asyncio.sleep(interval)
        try:
            sent += send_frames(ifname, [frame])
        except NetError as exc:
            log.warning("gratuitous ARP %d/%d for %s not sent: %s", i + 1, count, address, exc)
    log.debug(
        "announced %s at %s on %s (%d/%d gratuitous ARP)",
        address,
        mac_to_str(mac),
        ifname,
        sent,
        count,
    )
    return sent


# --- synchronous wrappers: CLI, lab, scripts, tests ---------------------------------------


def add_vip(ifname: str, cidr: str) -> bool:
    """Synchronous :func:`add_vip_async` (not inside a running event loop)."""
    return _run_sync(add_vip_async(ifname, cidr), "add_vip")


def del_vip(ifname: str, cidr: str) -> bool:
    """Synchronous :func:`del_vip_async` (not inside a running event loop)."""
    return _run_sync(del_vip_async(ifname, cidr), "del_vip")


def has_vip(ifname: str, cidr: str) -> bool:
    """Synchronous :func:`has_vip_async` (not inside a running event loop)."""
    return _run_sync(has_vip_async(ifname, cidr), "has_vip")


# --- helpers ------------------------------------------------------------------------------


def _run_sync(coro: Coroutine[Any, Any, T], name: str) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError(f"{name}() called inside an event loop: use `await {name}_async(...)`")


def _parse_cidr(ifname: str, cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError as exc:
        raise VipError(f"invalid VIP {cidr!r} for interface {ifname}: {exc}") from exc


def _family(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> int:
    return socket.AF_INET if iface.version == 4 else socket.AF_INET6


async def _index(ipr: Any, ifname: str, doing: str) -> int:
    indexes = await ipr.link_lookup(ifname=ifname)
    if not indexes:
        raise VipError(f"interface {ifname!r} does not exist: {doing}")
    return int(indexes[0])


def _strerror(exc: Exception) -> str:
    if isinstance(exc, NetlinkError):
        return os.strerror(exc.code) if exc.code else str(exc)
    return str(exc)
