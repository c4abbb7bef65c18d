"""Leases of a witness: which node may run a module as primary, and the fencing token. Pure.

Building block of arbitration (issue 5; not wired into the agent yet). A *witness* — a small
service on a third host, later an etcd cluster — keeps one lease per module and answers a
node's request to acquire (or renew) it:

- the lease is free (never held, expired, or released): granted to the caller with a new
  **term**, strictly greater than every term this witness ever issued (the fencing token that
  replicated writes will carry);
- the caller holds it: renewed, same term;
- another node holds it and it has not expired: refused, saying who holds it and for how long.
  So when both nodes reach the witness but not each other, the current holder keeps it.

Expiry runs on the witness's monotonic clock: a grant or renewal received at ``now`` is valid
until ``now + duration``. A node may serve as primary only until its own **deadline**:

    send time of its last granted request + duration − margin

(:meth:`Holding.answered`). The witness measured its expiry from the *receive* time, which is not
earlier than the send time, so the node's deadline passes before the witness can grant the
lease to anyone else, as long as the two clocks' rates differ by less than ``margin`` over one
``duration``. That is the timing argument of self-fencing: a primary that cannot renew stops
(application, VIPs) before its deadline; the peer cannot acquire before the lease expired.

Restart of the witness: it knows no holder any more. During one ``duration`` after its start
it grants nothing new, but accepts a renewal from a node that presents the term it holds — only
the real holder can believe it holds a lease, and its deadline has not passed — so primaries
keep running through a witness restart; after that, free leases are granted as usual. Terms
continue above the high-water mark the driver persisted (:attr:`LeaseTable.high_term`,
written durably BEFORE a reply that carries a new term is sent).

Caveats: one witness is a single point of decision (use an odd number and :func:`majority`);
the renewal rule after a restart trusts the term a node presents, which an authenticated
channel (the cluster key) makes safe against outsiders but not against a node bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hakit.model import NodeId


@dataclass(frozen=True)
class Answer:
    """The witness's answer to one request."""

    granted: bool
    holder: NodeId | None  # who holds the lease after this request (None: nobody)
    term: int  # the holder's term (0: never held)
    remaining: float  # seconds the lease has left after this request (0 if free)
    reason: str  # for logs, e.g. "held by n1 for 2.4 s more"


@dataclass
class _Lease:
    holder: NodeId
    term: int
    expires: float


class LeaseTable:
    """The leases one witness keeps, one per module. ``now``: the witness's monotonic clock."""

    def __init__(self, duration: float, now: float, high_term: int = 0) -> None:
        if duration <= 0:
            raise ValueError("duration must be positive")
        self.duration = duration
        self.high_term = high_term  # persisted by the driver before any reply carrying more
        self._quiet_until = now + duration  # after a (re)start: no new grants for one duration
        self._leases: dict[str, _Lease] = {}

    def acquire(self, now: float, module: str, node: NodeId, held_term: int = 0) -> Answer:
        """Grant, renew or refuse ``module``'s lease to ``node``. ``held_term``: the term the
        node believes it holds (0: none), used only to renew across a restart of the witness."""
        lease = self._leases.get(module)
        if lease is not None and lease.expires <= now:
            lease = None
            del self._leases[module]
        if lease is not None and lease.holder != node:
            left = lease.expires - now
            return Answer(
                False, lease.holder, lease.term, left, f"held by {lease.holder} for {left:.1f} s"
            )
        if lease is not None:  # renewal
            lease.expires = now + self.duration
            return Answer(True, node, lease.term, self.duration, f"renewed (term {lease.term})")
        if now < self._quiet_until:
            if 0 < held_term <= self.high_term or (held_term > 0 and self.high_term == 0):
                # the witness restarted: only the real holder presents a term it holds
                self.high_term = max(self.high_term, held_term)
                self._leases[module] = _Lease(node, held_term, now + self.duration)
                return Answer(
                    True, node, held_term, self.duration, f"renewed after a witness restart "
                    f"(term {held_term})"
                )  # fmt: skip
            left = self._quiet_until - now
            return Answer(False, None, 0, 0.0, f"witness restarted: no new lease for {left:.1f} s")
        self.high_term += 1
        self._leases[module] = _Lease(node, self.high_term, now + self.duration)
        return Answer(True, node, self.high_term, self.duration, f"granted (term {self.high_term})")

    def release(self, now: float, module: str, node: NodeId) -> bool:
        """``node`` hands the lease back (a clean stop or switch-over); True if it held it."""
        lease = self._leases.get(module)
        if lease is None or lease.holder != node or lease.expires <= now:
            return False
        del self._leases[module]
        return True

    def holder(self, now: float, module: str) -> NodeId | None:
        lease = self._leases.get(module)
        return lease.holder if lease is not None and lease.expires > now else None


@dataclass
class Holding:
    """A node's view of one lease it holds on one witness (its own monotonic clock)."""

    duration: float
    margin: float  # covers the clock-rate difference over one duration, and scheduling
    term: int = 0
    deadline: float = float("-inf")
    last_sent: float = float("-inf")  # send time of the newest request whose answer counted

    def answered(self, sent_at: float, answer: Answer) -> None:
        """Record the answer to a request sent at ``sent_at`` (this node's clock). An answer to
        an older request than one already counted is ignored (it arrived late)."""
        if sent_at < self.last_sent:
            return
        self.last_sent = sent_at
        if answer.granted:
            self.term = answer.term
            self.deadline = sent_at + self.duration - self.margin
        else:
            self.deadline = float("-inf")

    def valid(self, now: float) -> bool:
        return now < self.deadline


def majority(holdings: Iterable[Holding], now: float) -> bool:
    """True while more than half of the witnesses' leases are valid (one witness: that one)."""
    views = list(holdings)
    return sum(1 for h in views if h.valid(now)) * 2 > len(views)
