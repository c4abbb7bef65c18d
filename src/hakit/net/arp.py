"""ARP frames: a PURE builder and parser, and the one raw-socket sender.

:func:`gratuitous_arp` builds the Ethernet frame announcing that an IPv4 address now lives at
a MAC address. Form chosen: a broadcast ARP **request** whose sender and target protocol
addresses are both the announced IP and whose target hardware address is zero — the "ARP
Announcement" of RFC 5227 §2.3, the form keepalived and ``arping -U`` send. Why a request:
Linux (and most stacks) update an existing neighbour entry from either a gratuitous request
or a gratuitous reply, but some routers and older stacks ignore replies they did not ask
for, whereas every host processes broadcast requests. Neither form creates NEW entries on
Linux unless ``net.ipv4.conf.*.arp_accept`` is set: a GARP refreshes caches that already
know the VIP, which is exactly the failover case.

:func:`parse_arp` decodes an Ethernet/IPv4 ARP frame (padding allowed) into an
:class:`ArpPacket`, or returns None for anything else; it never raises on bad input. It is
meant to be reused by the farm mode that answers ARP for the VIP in user space.

:func:`send_frames` is the only function with I/O: it opens an ``AF_PACKET``/``SOCK_RAW``
socket bound to one interface (protocol 0: it receives nothing), sends the frames in order
and closes it. The calls are synchronous and take microseconds (a raw send never waits for
the wire), so the agent may call it from its event loop.

Caveats:

- IPv4 only: IPv6 needs unsolicited neighbour advertisements (ICMPv6), not done yet.
- No VLAN tags are built or parsed: frames are sent on (and read from) the VLAN interface
  itself, where the kernel adds or strips the tag.
- Frames are padded to the Ethernet minimum of 60 bytes (without FCS) so that drivers that
  do not pad still put a valid frame on the wire.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from hakit.net import NetError

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ETH_HEADER = struct.Struct("!6s6sH")  # destination, source, ethertype
ARP_BODY = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa
ARP_FRAME_SIZE = ETH_HEADER.size + ARP_BODY.size  # 42 bytes
MIN_FRAME_SIZE = 60  # Ethernet minimum without the FCS


@dataclass(frozen=True)
class ArpPacket:
    """One Ethernet/IPv4 ARP packet; MACs as 6 bytes, IPs in dotted-quad strings."""

    eth_dst: bytes
    eth_src: bytes
    op: int  # ARPOP_REQUEST (1) or ARPOP_REPLY (2); other values are kept as they came
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str

    @property
    def is_gratuitous(self) -> bool:
        """True for an announcement: the sender announces its own address."""
        return self.sender_ip == self.target_ip


def mac_to_str(mac: bytes) -> str:
    """``b'\\x02\\x00...'`` -> ``'02:00:...'``."""
    return ":".join(f"{b:02x}" for b in mac)


def mac_from_str(text: str) -> bytes:
    """``'02:00:00:00:00:01'`` -> 6 bytes; raise ValueError for anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def virtual_mac(vip: str) -> bytes:
    """The virtual MAC of a farm VIP: ``02:00`` + the 4 bytes of the IPv4 address.

    ``02`` = locally administered, unicast. No node ever uses it as an Ethernet source.
    """
    return b"\x02\x00" + ipaddress.IPv4Address(vip).packed


def gratuitous_arp(mac: bytes, ip: str) -> bytes:
    """Broadcast gratuitous ARP request announcing that ``ip`` (IPv4) is at ``mac``."""
    if len(mac) != 6:
        raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
    addr = ipaddress.IPv4Address(ip).packed  # raises AddressValueError (a ValueError)
    frame = ETH_HEADER.pack(BROADCAST_MAC, mac, ETH_P_ARP) + ARP_BODY.pack(
        ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, mac, addr, ZERO_MAC, addr
    )
    return frame.ljust(MIN_FRAME_SIZE, b"\x00")


def arp_reply(
    src_mac: bytes, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str
) -> bytes:
    """Unicast ARP reply ``sender_ip is at sender_mac`` to ``target_mac``/``target_ip``.

    ``src_mac`` is the Ethernet source (the farm mode answers from its real MAC while
    announcing a virtual one as ``sender_mac``).
    """
    for mac in (src_mac, sender_mac, target_mac):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
    frame = ETH_HEADER.pack(target_mac, src_mac, ETH_P_ARP) + ARP_BODY.pack(
        ARPHRD_ETHER,
        ETH_P_IP,
        6,
        4,
        ARPOP_REPLY,
        sender_mac,
        ipaddress.IPv4Address(sender_ip).packed,
        target_mac,
        ipaddress.IPv4Address(target_ip).packed,
    )
    return frame.ljust(MIN_FRAME_SIZE, b"\x00")


def parse_arp(frame: bytes) -> ArpPacket | None:
    """Decode an Ethernet/IPv4 ARP frame; None for anything else (never raises)."""
    if len(frame) < ARP_FRAME_SIZE:
        return None
    eth_dst, eth_src, ethertype = ETH_HEADER.unpack_from(frame, 0)
    if ethertype != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_BODY.unpack_from(frame, ETH_HEADER.size)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4):
        return None
    return ArpPacket(
        eth_dst=eth_dst,
        eth_src=eth_src,
        op=op,
        sender_mac=sha,
        sender_ip=str(ipaddress.IPv4Address(spa)),
        target_mac=tha,
        target_ip=str(ipaddress.IPv4Address(tpa)),
    )


def send_frames(ifname: str, frames: Iterable[bytes]) -> int:
    """Send complete Ethernet ``frames`` on ``ifname``, in order; return how many were sent.

    Raises :class:`NetError` naming the interface if it does not exist, is down, or a send
    fails (needs CAP_NET_RAW).
    """
    sent = 0
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
            sock.bind((ifname, 0))
            for frame in frames:
                sock.send(frame)
                sent += 1
    except OSError as exc:
        raise NetError(
            f"cannot send raw frames on interface {ifname!r} (sent {sent}): {exc.strerror or exc}"
        ) from exc
    return sent
