"""Network primitives of the agent: heartbeat wire format and transport, virtual IPs, ARP.

Modules:

- :mod:`hakit.net.wire` — PURE: the authenticated heartbeat envelope (encode/decode, HMAC)
  and the replay guard. No sockets, no clock.
- :mod:`hakit.net.heartbeat` — the asyncio UDP transport carrying envelopes on one or more
  heartbeat networks (thin shell around ``wire``).
- :mod:`hakit.net.vip` — add/remove/test a virtual IP address with netlink (pyroute2) and
  announce it with gratuitous ARP.
- :mod:`hakit.net.arp` — PURE ARP frame builder/parser and the farm's virtual MAC, plus the
  one raw-socket sender.
- :mod:`hakit.net.farm` — the farm data path: nftables bucket filter, VIP on ``lo``, sysctls,
  promiscuous mode, crash-safe set-up and tear-down.
- :mod:`hakit.net.arp_responder` — the farm's ARP responder thread.
- :mod:`hakit.net.vip_fence` — the kernel's half of a mirror module's lease: nftables
  tables that let VIP traffic through only until a deadline.

This package module only defines the shared errors and the naming rule of hakit's nftables
tables, so that submodules can import them without import cycles; it re-exports nothing.
"""

from __future__ import annotations

import re
import zlib

from hakit.errors import HakitError


class NetError(HakitError):
    """A network operation of the agent failed (interface missing, bind failed, ...)."""


class FarmError(NetError):
    """The farm data path could not be set up, changed or read."""


def nft_table_name(prefix: str, module: str) -> str:
    """Name of one of a module's nft tables: ``<prefix>_<module>``.

    Characters other than ``[A-Za-z0-9_]`` become ``_``; when any was replaced, a CRC of the
    original name is appended so that ``web-1`` and ``web_1`` get different tables.
    """
    safe = re.sub(r"[^A-Za-z0-9_]", "_", module)
    if safe != module:
        safe += f"_{zlib.crc32(module.encode()):08x}"
    return f"{prefix}_{safe}"
