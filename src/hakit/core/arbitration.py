"""Arbitration of one mirror module on this node: its leases on the module's arbiters. Pure.

The mirror machine (:mod:`hakit.core.mirror`) owns one :class:`Arbitration`. With no arbiter
configured it is disabled and changes nothing. With arbiters (witnesses or etcd, see
``docs/split-brain.md``), the machine:

- **takes the primary role only while it holds the lease** on a majority of the arbiters: an
  automatic or commanded move towards STARTING_PRIM waits ("waiting for the arbiters") and the
  lease is asked for every :attr:`ArbitrationSettings.retry` seconds until it is granted;
- **renews it while it claims the primary role** (every :attr:`ArbitrationSettings.renew`
  seconds, at once when what it must record changes), and **releases** it once it no longer
  claims it (after its stop script ended and its VIPs are gone);
- **fences itself** when it claims the primary role, the lease is no longer valid and its peer
  could be taking over (lost, silent for ``silence`` seconds, or claiming the role): VIPs
  removed at once, then the stop script, then WAIT;
- learns from every answer the **ran-alone records** of its peer (a peer that ran alone with a
  newer generation: this node's copy is not up to date, the data rules refuse the takeover);
- and, running alone, records its own generation there before its unreplicated writes may be
  acknowledged (:meth:`recorded`, used for :class:`hakit.core.actions.PermitAlone`).

Timing (the self-fencing argument, ``docs/split-brain.md``): an answer to a request sent at
``s`` makes the lease valid on this node until ``s + min(duration, remaining) - margin``
(:class:`hakit.core.lease.Holding`); an arbiter grants it to another node only after
``s' + duration`` where ``s'`` ≥ ``s`` is when it received the last renewal. The peer also
needs a whole heartbeat timeout ``T`` of silence (from its last heartbeat of this node, ``h2``)
before it moves; this node fences once the lease is invalid and the peer has been silent for
``silence`` < ``T - interval`` (from ``h1``, and ``|h1 - h2|`` ≤ one interval plus the
latency in a cut), so it removes its VIPs before ``max(expiry, h2 + T)``. It removes them at
its first tick after that moment (ticks ≤ 50 ms), so ``margin`` must exceed a tick plus the
time to delete an address, plus the clock-rate difference over one duration. Configuration
enforces ``renew + timeout < duration - margin`` so that one lost renewal does not fence a
healthy primary.
"""

from __future__ import annotations

from dataclasses import dataclass

from hakit.core.actions import AskArbiters
from hakit.core.events import ArbiterAnswered
from hakit.core.lease import Holding, majority
from hakit.model import NodeId


@dataclass(frozen=True)
class ArbitrationSettings:
    """The module's arbiters and lease timing (seconds). No arbiter: arbitration is off."""

    arbiters: tuple[str, ...] = ()  # names, as the driver reports them in ArbiterAnswered
    duration: float = 3.0  # lease duration asked of every arbiter
    margin: float = 0.5  # deadline = send time + duration - margin
    renew: float = 1.0  # a held lease is renewed this often
    retry: float = 0.25  # a wanted lease that is not held is asked for this often
    # a primary without a valid lease fences once its peer is silent this long (less than the
    # heartbeat timeout minus an interval: the peer takes over only after a whole timeout)
    silence: float = 1.5

    @property
    def enabled(self) -> bool:
        return bool(self.arbiters)


class Arbitration:
    """This node's leases on the arbiters of one module (see the module docstring)."""

    def __init__(self, settings: ArbitrationSettings, node: NodeId) -> None:
        self.settings = settings
        self.node = node
        self.holdings = {a: Holding(settings.duration, settings.margin) for a in settings.arbiters}
        self.confirmed: dict[str, int] = {}  # arbiter -> our ran-alone generation it recorded
        self.sources: dict[str, str] = {}  # arbiter -> issuer of its terms (witness id, …)
        self.others: dict[NodeId, int] = {}  # other node -> highest ran-alone record seen
        self.last_ask = float("-inf")  # when the last acquire was sent
        self.sent: tuple[int, int] | None = None  # (alone, synced) of the last request
        self.last_refusal = ""  # why the lease is not held, from the latest answer

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def valid(self, now: float) -> bool:
        """A majority of the arbiters' leases are valid (always False when disabled)."""
        return self.enabled and majority(self.holdings.values(), now)

    def valid_until(self) -> float:
        """When the majority's lease ends on this node's clock (-inf: not held)."""
        deadlines = sorted((h.deadline for h in self.holdings.values()), reverse=True)
        return deadlines[len(deadlines) // 2] if deadlines else float("-inf")

    def holds_any(self, now: float) -> bool:
        return any(h.valid(now) for h in self.holdings.values())

    def term(self) -> int:
        """The highest term held (for display; the fencing token is :meth:`tokens`)."""
        return max((h.term for h in self.holdings.values()), default=0)

    def tokens(self, now: float) -> tuple[tuple[str, int], ...]:
        """The fencing token: the terms of the leases valid now, each named by its issuer."""
        return tuple(
            sorted(
                (self.sources.get(a) or a, h.term) for a, h in self.holdings.items() if h.valid(now)
            )
        )

    def recorded(self) -> int:
        """The highest ran-alone generation of this node that a majority of arbiters recorded."""
        values = sorted((self.confirmed.get(a, 0) for a in self.holdings), reverse=True)
        return values[len(values) // 2] if values else 0

    def refusal(self, now: float) -> str | None:
        """Why this node may not act as primary now (None: it holds the lease)."""
        if not self.enabled or self.valid(now):
            return None
        why = f": {self.last_refusal}" if self.last_refusal else ""
        return f"waiting for the arbiters' lease{why}"

    def ask(self, now: float, wanted: bool, alone: int, synced: int) -> AskArbiters | None:
        """The request to send now, if any: a wanted lease is renewed every ``renew`` seconds
        while valid and every arbiter answered the last request, else asked again every
        ``retry`` seconds (a lost renewal is retried at once), and at once when what this node
        must record changes; a lease no longer wanted but still held is released."""
        if not self.enabled:
            return None
        if not wanted:
            if not self.holds_any(now):
                return None
            for h in self.holdings.values():
                h.released(now)
            self.sent = None
            return AskArbiters("release", self._terms())
        answered = all(h.last_sent >= self.last_ask for h in self.holdings.values())
        interval = self.settings.renew if self.valid(now) and answered else self.settings.retry
        if self.sent == (alone, synced) and now < self.last_ask + interval:
            return None
        self.last_ask = now
        self.sent = (alone, synced)
        return AskArbiters("acquire", self._terms(), alone, synced)

    def answered(self, ev: ArbiterAnswered) -> bool:
        """Record an answer; True if it showed a newer ran-alone record of another node."""
        holding = self.holdings.get(ev.arbiter)
        if holding is None:
            return False
        a = ev.answer
        holding.answered(ev.sent_at, a)
        if a.granted:
            self.confirmed[ev.arbiter] = a.alone_of(self.node)
            if a.source:
                self.sources[ev.arbiter] = a.source
            self.last_refusal = ""
        else:
            self.last_refusal = f"{ev.arbiter}: {a.reason}" if a.reason else ev.arbiter
        newer = False
        for node, generation in a.alone:
            if node != self.node and generation > self.others.get(node, 0):
                self.others[node] = generation
                newer = True
        return newer

    def _terms(self) -> tuple[tuple[str, int], ...]:
        return tuple((a, h.term) for a, h in self.holdings.items())
