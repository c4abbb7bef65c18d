"""Witness leases: grants, renewals, refusals, expiry, restarts — and the safety property:
two nodes never both believe they hold a module's lease, whatever the message delays."""

from __future__ import annotations

import heapq

from hypothesis import example, given, settings
from hypothesis import strategies as st

from hakit.core.lease import Answer, Holding, LeaseTable, majority
from hakit.model import NodeId

N1, N2 = NodeId("n1"), NodeId("n2")
D = 3.0


def table(now: float = 0.0, high_term: int = 0) -> LeaseTable:
    return LeaseTable(D, now, high_term)


def test_a_free_lease_is_granted_after_the_start_quiet_period_then_renewed_then_refused() -> None:
    t = table()
    assert not t.acquire(1.0, "db", N1).granted  # just started: nothing new for D seconds
    a = t.acquire(3.0, "db", N1)
    assert (a.granted, a.holder, a.term) == (True, N1, 1)
    b = t.acquire(4.0, "db", N2)
    assert (b.granted, b.holder, b.term) == (False, N1, 1) and b.remaining == 2.0
    assert t.acquire(5.0, "db", N1).term == 1  # renewed: same term
    assert not t.acquire(7.9, "db", N2).granted  # renewed at 5.0: valid until 8.0
    c = t.acquire(8.0, "db", N2)
    assert (c.granted, c.term) == (True, 2)  # expired: the other node gets a NEW term
    assert t.high_term == 2


def test_a_released_lease_goes_at_once_and_only_its_holder_can_release_it() -> None:
    t = table()
    t.acquire(3.0, "db", N1)
    assert not t.release(3.5, "db", N2)
    assert t.release(3.5, "db", N1)
    assert t.acquire(3.6, "db", N2).term == 2
    assert t.holder(3.6, "db") == N2 and t.holder(9.0, "db") is None


def test_after_a_restart_only_the_recorded_holder_renews_and_terms_keep_growing() -> None:
    before = table()
    before.acquire(3.0, "db", N1)  # term 1
    before.acquire(7.0, "db", N2)  # n1's expired: term 2
    t = LeaseTable(D, 100.0, before.high_term, before.last)  # restarted from the state
    assert t.state() == {"high_term": 2, "last": {"db": ["n2", 2]}, "alone": {}}
    assert not t.acquire(101.0, "db", N1, held_term=1).granted  # a stale term: refused
    assert not t.acquire(101.0, "db", N1).granted  # a new grant must wait
    a = t.acquire(101.0, "db", N2, held_term=2)
    assert (a.granted, a.term) == (True, 2)  # the real holder keeps running
    t.release(102.0, "db", N2)
    assert t.last["db"] is None  # persisted: a late renewal of n2 cannot revive it
    assert not t.acquire(102.5, "db", N2, held_term=2).granted
    assert t.acquire(103.0, "db", N1).term == 3  # above the persisted high water


def test_a_released_holding_ignores_the_late_answer_to_an_earlier_renewal() -> None:
    h = Holding(D, 0.5)
    h.answered(0.0, Answer(True, N1, 1, D, ""))
    h.released(0.55)  # before sending the release
    h.answered(0.4, Answer(True, N1, 1, D, ""))  # the renewal sent at 0.4, answered late
    assert not h.valid(0.8)


def test_the_witness_duration_counts_when_it_is_shorter() -> None:
    h = Holding(5.0, 0.5)
    h.answered(10.0, Answer(True, N1, 1, 3.0, ""))
    assert h.valid(12.4) and not h.valid(12.5)


def test_majority_of_witnesses() -> None:
    views = [Holding(D, 0.5) for _ in range(3)]
    for v in views[:2]:
        v.answered(0.0, Answer(True, N1, 1, D, ""))
    assert majority(views, 1.0) and not majority(views, 2.5)
    views[1].answered(1.0, Answer(False, N2, 2, 1.0, ""))
    assert not majority(views, 1.0)


@settings(max_examples=500, deadline=None)
@example(  # n1 granted at 3.5 and silent; n2 asks just after the witness's expiry (6.5)
    [(N1, 3.5, 0.0, 0.0, False, False), (N2, 3.1, 0.0, 0.0, False, False)]
)
@example(  # a stale renewal of n1's old term reaches a restarted witness after n2 got it
    [(N2, 2.0, 0.0, 0.0, False, False), (N1, 1.0, 0.0, 0.0, False, False),
     (N1, 1.9, 1.5, 0.0, False, True), (N2, 1.1, 0.0, 0.0, False, False)]
)  # fmt: skip
@example(  # the witness restarts while n1 holds the lease: n2 must not get it meanwhile
    [(N1, 3.5, 0.0, 0.0, False, False), (N2, 0.5, 0.0, 0.0, False, True),
     (N1, 0.5, 0.1, 0.1, False, False), (N2, 1.0, 0.0, 0.0, False, False)]
)  # fmt: skip
@given(
    st.lists(
        st.tuples(
            st.sampled_from([N1, N2]),  # who asks
            st.floats(0.0, 2.0),  # time since the previous request
            st.floats(0.0, 1.5),  # delay to the witness
            st.floats(0.0, 1.5),  # delay back
            st.booleans(),  # answer lost
            st.booleans(),  # witness restarts just before handling it
        ),
        min_size=1,
        max_size=60,
    )
)
def test_two_nodes_never_both_hold_the_lease(
    steps: list[tuple[NodeId, float, float, float, bool, bool]],
) -> None:
    """A discrete-event run on one global time (equal clock rates): requests reach the witness
    in arrival order, answers come back in arrival order, any delays, losses and restarts."""
    margin = 1.0  # wide: a deadline computed on the wrong side of it is found quickly
    witness = table()
    holdings = {N1: Holding(D, margin), N2: Holding(D, margin)}
    queue: list[tuple[float, int, str, tuple[object, ...]]] = []
    now = 0.0
    for k, (node, gap, there, back, lost, restart) in enumerate(steps):
        now += gap
        heapq.heappush(queue, (now, k, "send", (node, there, back, lost, restart)))
    seq = len(steps)
    while queue:
        at, _, kind, data = heapq.heappop(queue)
        if kind == "send":
            node, there, back, lost, restart = data
            h = holdings[node]  # type: ignore[index]
            held = h.term if h.valid(at) else 0
            seq += 1
            heapq.heappush(
                queue, (at + there, seq, "arrive", (node, at, back, lost, restart, held))
            )  # type: ignore[operator]
        elif kind == "arrive":
            node, sent, back, lost, restart, held = data
            if restart:  # from what the driver persisted
                witness = LeaseTable(D, at, witness.high_term, witness.last)
            answer = witness.acquire(at, "db", node, held)  # type: ignore[arg-type]
            if not lost:
                seq += 1
                heapq.heappush(queue, (at + back, seq, "answer", (node, sent, answer)))  # type: ignore[operator]
        else:
            node, sent, answer = data
            holdings[node].answered(sent, answer)  # type: ignore[index, arg-type]
        assert not (holdings[N1].valid(at) and holdings[N2].valid(at)), at


def test_ran_alone_records_are_kept_for_every_later_holder_and_cleared_only_by_their_node() -> None:
    t = table()
    assert t.acquire(3.0, "db", N1, alone=7).alone == ((N1, 7),)  # granted: recorded
    refused = t.acquire(3.5, "db", N2, alone=9)
    assert not refused.granted and refused.alone_of(N1) == 7 and refused.alone_of(N2) == 0
    assert t.acquire(4.0, "db", N1, alone=6).alone_of(N1) == 7  # never lowered
    later = t.acquire(8.0, "db", N2, synced=9)  # n1 expired: n2 learns n1's record
    assert later.granted and later.alone == ((N1, 7),)  # and cannot clear it
    restarted = LeaseTable(D, 100.0, t.high_term, t.last, {"db": {N1: 7}})
    assert restarted.state()["alone"] == {"db": {"n1": 7}}
    assert restarted.acquire(104.0, "db", N1).alone_of(N1) == 7  # a bare acquire keeps it
    stale = restarted.acquire(104.2, "db", N1, synced=6)  # a late request from before 7
    assert stale.alone_of(N1) == 7
    assert restarted.acquire(104.5, "db", N1, synced=7).alone == ()  # in sync at 7: cleared
