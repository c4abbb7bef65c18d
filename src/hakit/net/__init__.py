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

This package module only defines the shared errors, so that submodules can import them
without import cycles; it re-exports nothing.
"""

from __future__ import annotations

from hakit.errors import HakitError


class NetError(HakitError):
    """A network operation of the agent failed (interface missing, bind failed, ...)."""


class FarmError(NetError):
    """The farm data path could not be set up, changed or read."""
