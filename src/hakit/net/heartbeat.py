"""Heartbeat transport: authenticated envelopes over UDP on one or more networks (asyncio).

A thin shell around :mod:`hakit.net.wire`: it owns the sockets and the clock used for
log rate limiting; all decisions about peers (lost, alive, states) belong to the caller.

Contracts and orderings:

- :meth:`HeartbeatTransport.start` binds one UDP socket per heartbeat network on
  ``(local address, port)`` with ``SO_REUSEADDR`` and returns only once ALL are bound
  ("started"); if one cannot be bound, those already bound are closed and :class:`NetError`
  names the network, the address and the cause.
- :meth:`HeartbeatTransport.send` encodes the envelope ONCE and sends the same bytes to every
  peer on every network it shares with us. It never blocks and never raises for the
  network: a send that fails (``ENETUNREACH`` when a link is down, a full socket buffer)
  is counted in ``send_errors`` and logged at DEBUG. It does raise for a bad envelope
  (:class:`~hakit.net.wire.WireError` ``too_big``, ValueError): that is the caller's bug.
- Every incoming datagram goes through, in this order: source address must be a known peer
  address ON THAT network (``dropped_unknown_source``); :func:`~hakit.net.wire.decode`
  (``dropped_too_big``/``garbage``/``bad_mac``/``wrong_cluster``); the authenticated
  sender must be the peer owning that source address (``dropped_unknown_source``); the
  shared :class:`~hakit.net.wire.ReplayGuard` (``duplicate``, ``dropped_replay``,
  ``dropped_old_incarnation``). Only ``"new"`` envelopes reach ``on_envelope(network,
  env)``, exactly once whatever the number of networks. A ``duplicate`` (the first copy of
  a recent envelope arriving over another network, maybe after newer ones when a burst was
  read from the first network's socket) is counted and refreshes :meth:`last_heard` for
  that network, which is how a caller tells that one heartbeat network is down.
- Every drop is counted; a WARNING per drop reason is logged at most once per second (with
  the number of drops it summarises), the rest at DEBUG. Nothing a datagram contains can
  raise out of the reader: an exception from ``on_envelope`` is logged as a BUG and the
  transport keeps running.

Caveats:

- A local address that is not configured yet makes :meth:`start` fail (no ``IP_FREEBIND``):
  a typo in the cluster file should not look like a silent network.
- IPv6 link-local addresses (which need a scope id) are not supported; global or ULA
  IPv6 addresses and IPv4 are.
- No DSCP marking yet: heartbeats share queues with the application traffic.
- Source addresses can be spoofed on the local network; the MAC, not the address check,
  is what authenticates. The address check only sorts foreign traffic out early, before
  any HMAC is computed, and names it precisely in the counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import TracebackType

from hakit.net import NetError
from hakit.net.wire import Envelope, ReplayGuard, WireError, decode, encode

log = logging.getLogger(__name__)

RECV_SIZE = 65536  # bytes read per datagram: anything above MAX_DATAGRAM is refused as too_big
READ_BATCH = 64  # datagrams drained per readiness event before yielding to the loop
WARN_EVERY = 1.0  # seconds between two WARNINGs for the same drop reason

OnEnvelope = Callable[[str, Envelope], None]


@dataclass
class Counters:
    """Datagram counters since start (monotonic; exposed for metrics)."""

    sent: int = 0  # datagrams handed to the kernel
    send_errors: int = 0  # datagrams the kernel refused (link down, buffer full, ...)
    received: int = 0  # datagrams read, before any check
    accepted: int = 0  # new envelopes given to on_envelope
    duplicate: int = 0  # copies of the last accepted envelope (another network): not dropped
    dropped_unknown_source: int = 0
    dropped_too_big: int = 0
    dropped_garbage: int = 0
    dropped_bad_mac: int = 0
    dropped_wrong_cluster: int = 0
    dropped_replay: int = 0
    dropped_old_incarnation: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class HeartbeatTransport:
    """UDP sockets of one node on its heartbeat networks.

    ``key``, ``cluster`` and ``local_node`` are positional, the rest keyword-only.
    ``key``: the cluster key (>= 16 bytes). ``cluster``: the cluster name carried in every
    envelope. ``networks``: heartbeat network name -> local address on it. ``peers``: peer
    node -> network name -> its address there (a peer may lack some networks). ``port``:
    the UDP port, the same on every node and network. ``on_envelope(network, env)``: called
    from the event loop for every new, authenticated envelope; must not block.
    ``clock``: monotonic seconds, for rate limiting logs and :meth:`last_heard`.
    """

    def __init__(
        self,
        key: bytes,
        cluster: str,
        local_node: str,
        *,
        networks: Mapping[str, str],
        peers: Mapping[str, Mapping[str, str]],
        port: int,
        on_envelope: OnEnvelope,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if local_node in peers:
            raise ValueError(f"peers must not include the local node {local_node!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"heartbeat port {port} is not in [1, 65535]")
        self._key = key
        self._cluster = cluster
        self._local_node = local_node
        self._networks = {name: _normalize(addr) for name, addr in networks.items()}
        self._port = port
        self._on_envelope = on_envelope
        self._clock = clock
        # network -> peer address -> peer node
        self._by_source: dict[str, dict[str, str]] = {name: {} for name in self._networks}
        for node, addresses in peers.items():
            for network, address in addresses.items():
                if network not in self._by_source:
                    raise ValueError(f"peer {node!r}: unknown heartbeat network {network!r}")
                addr = _normalize(address)
                if _family(addr) != _family(self._networks[network]):
                    raise ValueError(f"peer {node!r}: {addr} is not of the family of {network}")
                other = self._by_source[network].setdefault(addr, node)
                if other != node:
                    raise ValueError(f"{addr} on {network} given to both {other!r} and {node!r}")
        self._guard = ReplayGuard()
        self._sockets: dict[str, socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heard: dict[tuple[str, str], float] = {}
        self._last_warning: dict[str, float] = {}
        self._unreported: dict[str, int] = {}
        self.counters = Counters()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every network's socket and start reading; return once all are bound."""
        if self._loop is not None:
            raise RuntimeError("heartbeat transport already started")
        loop = asyncio.get_running_loop()
        try:
            for network, address in self._networks.items():
                self._sockets[network] = self._bind(network, address)
        except NetError:
            self._close_sockets()
            raise
        self._loop = loop
        for network, sock in self._sockets.items():
            loop.add_reader(sock.fileno(), self._on_readable, network, sock)
        log.info(
            "heartbeat started on %s (UDP port %d)",
            ", ".join(f"{n} {a}" for n, a in self._networks.items()),
            self._port,
        )

    def close(self) -> None:
        """Stop reading and close the sockets; idempotent."""
        if self._loop is not None and not self._loop.is_closed():
            for sock in self._sockets.values():
                self._loop.remove_reader(sock.fileno())
        self._close_sockets()
        self._loop = None

    async def __aenter__(self) -> HeartbeatTransport:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._loop is not None

    # --- sending --------------------------------------------------------------------------

    def send(self, env: Envelope) -> int:
        """Send ``env`` to every peer on every shared network; return datagrams sent."""
        if self._loop is None:
            raise RuntimeError("heartbeat transport not started")
        data = encode(self._key, env)
        sent = 0
        for network, sock in self._sockets.items():
            for address, node in self._by_source[network].items():
                try:
                    sock.sendto(data, (address, self._port))
                except OSError as exc:  # BlockingIOError included: never wait, drop
                    self.counters.send_errors += 1
                    log.debug(
                        "heartbeat to %s on %s (%s) not sent: %s", node, network, address, exc
                    )
                else:
                    sent += 1
        self.counters.sent += sent
        return sent

    # --- receiving ------------------------------------------------------------------------

    def last_heard(self, peer: str, network: str) -> float | None:
        """Clock time of the last authenticated new or duplicate envelope of ``peer`` there."""
        return self._heard.get((peer, network))

    def _on_readable(self, network: str, sock: socket.socket) -> None:
        for _ in range(READ_BATCH):
            try:
                data, source = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. a queued ICMP error: nothing to read this time
                log.debug("heartbeat read on %s failed: %s", network, exc)
                return
            try:
                self._handle(network, data, str(source[0]))
            except Exception:
                log.exception(
                    "heartbeat: datagram on %s from %s crashed the handler; "
                    "please report it as a BUG",
                    network,
                    source[0],
                )

    def _handle(self, network: str, data: bytes, source: str) -> None:
        self.counters.received += 1
        node = self._by_source[network].get(source)
        if node is None:
            self._drop("unknown_source", network, f"{source} is not a peer address there")
            return
        try:
            env = decode(self._key, data, cluster=self._cluster)
        except WireError as exc:
            self._drop(exc.reason, network, f"from {node} ({source}): {exc.detail}")
            return
        if env.sender != node:
            self._drop(
                "unknown_source",
                network,
                f"envelope signed by sender {env.sender!r} came from {source}, "
                f"the address of {node!r}",
            )
            return
        verdict = self._guard.check(env, network)
        if verdict == "new":
            self.counters.accepted += 1
            self._heard[(node, network)] = self._clock()
            self._on_envelope(network, env)
        elif verdict == "duplicate":
            self.counters.duplicate += 1
            self._heard[(node, network)] = self._clock()
        else:
            self._drop(
                verdict,
                network,
                f"from {node} ({source}): incarnation {env.incarnation} seq {env.seq}, "
                f"newest accepted {self._guard.last_accepted(node)}",
            )

    def _drop(self, reason: str, network: str, detail: str) -> None:
        """Count a dropped datagram; WARNING at most once per second per reason."""
        counter = f"dropped_{reason}"
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        now = self._clock()
        last = self._last_warning.get(reason)
        if last is not None and now - last < WARN_EVERY:
            self._unreported[reason] = self._unreported.get(reason, 0) + 1
            log.debug("heartbeat: dropped %s datagram on %s: %s", reason, network, detail)
            return
        self._last_warning[reason] = now
        others = self._unreported.pop(reason, 0)
        log.warning(
            "heartbeat: dropped %s datagram on %s: %s%s",
            reason,
            network,
            detail,
            f" (and {others} more since the last report)" if others else "",
        )

    # --- helpers --------------------------------------------------------------------------

    def _bind(self, network: str, address: str) -> socket.socket:
        sock = socket.socket(_family(address), socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((address, self._port))
        except OSError as exc:
            sock.close()
            raise NetError(
                f"heartbeat network {network!r}: cannot bind UDP {address} port "
                f"{self._port}: {exc.strerror or exc}"
            ) from exc
        return sock

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()


def _normalize(address: str) -> str:
    return ipaddress.ip_address(address).compressed


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6
