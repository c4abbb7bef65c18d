"""Leases of a witness: which node may run a module as primary, and the fencing token. Pure.

Arbitration's shared vocabulary (the node's side is :mod:`hakit.core.arbitration`). A
*witness* — a small service on a third host (:mod:`hakit.net.witness`) — keeps one lease per
module and answers a node's request to acquire (or renew) it:

- the lease is free (never held, expired, or released): granted to the caller with a new
  **term**, strictly greater than every term this witness ever issued (the fencing token that
  replicated writes will carry);
- the caller holds it: renewed, same term;
- another node holds it and it has not expired: refused, saying who holds it and for how long.
  So when both nodes reach the witness but not each other, the current holder keeps it.

**Ran-alone records.** A node that holds the lease and runs a replicated module without an
in-sync secondary says so in its requests (``alone``: its data generation); the witness records
it per module and node (persisted before the answer) and shows every record in every answer.
A node may acknowledge writes that exist only on its own disk once a majority of the witnesses
recorded their generation; any node that later acquires the lease learns the record and will
not take over on older data. Only the node itself clears its record, by saying which
generation its in-sync secondary has (``synced``): a record of that generation or older goes —
a bare acquire, or a late request from before a newer record, never clears it.

Expiry runs on the witness's monotonic clock: a grant or renewal received at ``now`` is valid
until ``now + duration``. A node may serve as primary only until its own **deadline**:

    send time of its last granted request + duration − margin

(:meth:`Holding.answered`). The witness measured its expiry from the *receive* time, which is not
earlier than the send time, so the node's deadline passes before the witness can grant the
lease to anyone else, as long as the two clocks' rates differ by less than ``margin`` over one
``duration``. That is the timing argument of self-fencing: a primary that cannot renew stops
(application, VIPs) before its deadline; the peer cannot acquire before the lease expired.

Restart of the witness: it knows no live lease any more, only what the driver persisted at
every change (:meth:`LeaseTable.state`: the term high-water mark and, per module, the last
holder and term, or none after a release — written durably BEFORE the answer that reveals the
change is sent). During one ``duration`` after its start it grants nothing new, but renews the
lease of the recorded holder when it presents exactly the recorded term: that node was the last
one granted this module's lease and nobody got it since, so primaries keep running through a
witness restart. After the quiet period, free leases are granted as usual, above the mark.

A node releases a lease only after its application and VIPs are stopped, and calls
:meth:`Holding.released` before it sends the release, so that the late answer to an earlier
renewal cannot make it valid again.

Caveats: one witness is a single point of decision (use an odd number and :func:`majority`).
Each witness issues its own terms: the fencing token of a primary is the set of its terms,
each named by its issuer (:attr:`Answer.source`), and a secondary compares only terms of the
same issuer (two majorities share a witness, whose later term is greater). The node's clock
counts suspended time (``CLOCK_BOOTTIME``, :mod:`hakit.system.clock`); a node paused between
a ``valid()`` check and acting on it is stopped by the replicator's watchdog and by the
fencing tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hakit.model import NodeId


@dataclass(frozen=True)
class Answer:
    """The witness's answer to one request."""

    granted: bool
    holder: NodeId | None  # who holds the lease after this request (None: nobody)
    term: int  # the holder's term (0: never held)
    remaining: float  # seconds the lease has left after this request (0 if free)
    reason: str  # for logs, e.g. "held by n1 for 2.4 s more"
    # the module's ran-alone records after this request: (node, data generation), sorted
    alone: tuple[tuple[NodeId, int], ...] = ()
    source: str = ""  # the issuer of the terms (witness id, etcd cluster id): set by clients

    def alone_of(self, node: NodeId) -> int:
        """The generation ``node`` ran alone with, as recorded (0: no record)."""
        return next((g for n, g in self.alone if n == node), 0)


@dataclass
class _Lease:
    holder: NodeId
    term: int
    expires: float


class LeaseTable:
    """The leases one witness keeps, one per module. ``now``: the witness's monotonic clock."""

    def __init__(
        self,
        duration: float,
        now: float,
        high_term: int = 0,
        last: Mapping[str, tuple[NodeId, int] | None] | None = None,
        alone: Mapping[str, Mapping[NodeId, int]] | None = None,
    ) -> None:
        if duration <= 0:
            raise ValueError("duration must be positive")
        self.duration = duration
        self.high_term = high_term  # persisted by the driver before any reply carrying more
        # per module: the last holder and term granted, None once released (persisted too)
        self.last: dict[str, tuple[NodeId, int] | None] = dict(last or {})
        # per module: node -> the data generation it runs alone with (persisted too)
        self.alone: dict[str, dict[NodeId, int]] = {m: dict(r) for m, r in (alone or {}).items()}
        self._quiet_until = now + duration  # after a (re)start: no new grants for one duration
        self._leases: dict[str, _Lease] = {}

    def state(self) -> dict[str, Any]:
        """What the driver persists (JSON-ready) before answering after a change."""
        last = {m: (list(v) if v else None) for m, v in sorted(self.last.items())}
        alone = {m: dict(sorted(r.items())) for m, r in sorted(self.alone.items()) if r}
        return {"high_term": self.high_term, "last": last, "alone": alone}

    def acquire(  # noqa: PLR0917
        self,
        now: float,
        module: str,
        node: NodeId,
        held_term: int = 0,
        alone: int = 0,
        synced: int = 0,
    ) -> Answer:
        """Grant, renew or refuse ``module``'s lease to ``node``, then (granted only) update its
        ran-alone record: ``alone`` > 0 records that generation; ``synced`` (the generation its
        in-sync secondary has) clears a record of that generation or older.
        ``held_term``: the term the node believes it holds (0: none), used only to renew across
        a restart of the witness."""
        answer = self._acquire(now, module, node, held_term)
        records = self.alone.setdefault(module, {})
        if answer.granted and alone > records.get(node, 0):
            records[node] = alone
        elif answer.granted and not alone and 0 < records.get(node, 0) <= synced:
            records.pop(node, None)
        return replace(answer, alone=self.records(module))

    def records(self, module: str) -> tuple[tuple[NodeId, int], ...]:
        return tuple(sorted(self.alone.get(module, {}).items()))

    def _acquire(self, now: float, module: str, node: NodeId, held_term: int) -> Answer:
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
            if held_term > 0 and self.last.get(module) == (node, held_term):
                # the witness restarted: the last holder of this module, nobody granted since
                self._leases[module] = _Lease(node, held_term, now + self.duration)
                return Answer(
                    True, node, held_term, self.duration, f"renewed after a witness restart "
                    f"(term {held_term})"
                )  # fmt: skip
            left = self._quiet_until - now
            return Answer(False, None, 0, 0.0, f"witness restarted: no new lease for {left:.1f} s")
        self.high_term += 1
        self._leases[module] = _Lease(node, self.high_term, now + self.duration)
        self.last[module] = (node, self.high_term)
        return Answer(True, node, self.high_term, self.duration, f"granted (term {self.high_term})")

    def release(self, now: float, module: str, node: NodeId) -> bool:
        """``node`` hands the lease back (a clean stop or switch-over); True if it held it."""
        lease = self._leases.get(module)
        if lease is None or lease.holder != node or lease.expires <= now:
            return False
        del self._leases[module]
        self.last[module] = None
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

    def __post_init__(self) -> None:
        if not 0 <= self.margin < self.duration:
            raise ValueError("margin must be at least 0 and less than the duration")

    def answered(self, sent_at: float, answer: Answer) -> None:
        """Record the answer to a request sent at ``sent_at`` (this node's clock). An answer to
        an older request than one already counted is ignored (it arrived late)."""
        if sent_at < self.last_sent:
            return
        self.last_sent = sent_at
        if answer.granted:
            self.term = answer.term
            # the witness's own duration counts if it is shorter than ours
            self.deadline = sent_at + min(self.duration, answer.remaining) - self.margin
        else:
            self.deadline = float("-inf")

    def released(self, sent_at: float) -> None:
        """Before sending a release at ``sent_at``: invalid from now on, and answers to
        earlier requests are ignored."""
        self.deadline = float("-inf")
        self.last_sent = max(self.last_sent, sent_at)

    def valid(self, now: float) -> bool:
        return now < self.deadline


def majority(holdings: Iterable[Holding], now: float) -> bool:
    """True while more than half of the witnesses' leases are valid (one witness: that one)."""
    views = list(holdings)
    return sum(1 for h in views if h.valid(now)) * 2 > len(views)
