"""Network primitives of the agent: heartbeat wire format and transport, virtual IPs, ARP.

Modules:

- :mod:`hakit.net.wire` — PURE: the authenticated heartbeat envelope (encode/decode, HMAC)
  and the replay guard. No sockets, no clock.
- :mod:`hakit.net.heartbeat` — the asyncio UDP transport carrying envelopes on one or more
  heartbeat networks (thin shell around ``wire``).
- :mod:`hakit.net.vip` — add/remove/test a virtual IP address with netlink (pyroute2) and
  announce it with gratuitous ARP.
- :mod:`hakit.net.arp` — PURE ARP frame builder/parser, plus the one raw-socket sender.

This package module only defines the shared error base, so that submodules can import it
without import cycles; it re-exports nothing.
"""

from __future__ import annotations

from hakit.errors import HakitError


class NetError(HakitError):
    """A network operation of the agent failed (interface missing, bind failed, ...)."""
