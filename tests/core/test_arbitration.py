"""Arbitration on the simulated pair with a witness: partitions, isolation, witness outages,
double failures and pauses-like silences. The simulator (sim.py) checks at every 10 ms step that
at most one node serves (VIP, or acknowledged writes) — partitions included — and, whenever a
node becomes primary, that it holds every write acknowledged so far.

Scenarios are also replayed against golden transcripts (test_golden_transcripts.py).
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hakit.core.events import Verb
from hakit.core.mirror import CommandRefused
from hakit.model import State

from .sim import SimCluster
from .test_mirror_replicated import REPLICATED, reason

P, S, A, W = State.PRIM, State.SECOND, State.ALONE, State.WAIT
LEASE = 3.0


def witnessed() -> SimCluster:
    return SimCluster(REPLICATED, witness=LEASE, resync_seconds=0.5)


def started(c: SimCluster) -> SimCluster:
    c.start_both()
    c.run_until(lambda: c.states() == (P, S), limit=15)
    c.run(1.0)
    return c


# ---------------------------------------------------------------- scenarios (also golden)
def witness_partition_between_nodes_primary_keeps_its_role(c: SimCluster) -> None:
    started(c)
    c.cut("n2")  # n2 still reaches the witness
    c.witness_cut.discard("n2")
    c.run(8)
    c.heal()
    c.run(4)


def witness_primary_isolated_fences_then_secondary_takes_over(c: SimCluster) -> None:
    started(c)
    c.cut("n1")
    c.cut_witness("n1")
    c.run(10)
    c.heal()
    c.run(5)


def witness_down_then_primary_dies_nobody_serves_until_it_returns(c: SimCluster) -> None:
    started(c)
    c.set_witness_down(True)
    c.run(4)
    c.poweroff("n1")
    c.run(6)
    c.set_witness_down(False)
    c.run(5)


def witness_partition_then_primary_dies_secondary_waits_for_it(c: SimCluster) -> None:
    started(c)
    c.cut("n2")  # both reach the witness; n1 runs alone and says so there
    c.run(5)
    c.poweroff("n1")
    c.run(8)
    c.heal()
    c.poweron("n1")
    c.run(8)


def witness_primary_agent_paused_then_resumed(c: SimCluster) -> None:
    started(c)
    c.pause("n1")  # longer than the heartbeat timeout and the lease
    c.run(6)
    c.resume("n1")
    c.run(5)


SCENARIOS = (
    witness_primary_agent_paused_then_resumed,
    witness_partition_between_nodes_primary_keeps_its_role,
    witness_primary_isolated_fences_then_secondary_takes_over,
    witness_down_then_primary_dies_nobody_serves_until_it_returns,
    witness_partition_then_primary_dies_secondary_waits_for_it,
)


# ---------------------------------------------------------------- assertions
def test_partition_between_nodes_keeps_the_primary_and_the_secondary_waits() -> None:
    c = witnessed()
    witness_partition_between_nodes_primary_keeps_its_role(c)
    assert c.states() == (P, S)
    c2 = started(witnessed())
    c2.cut("n2")
    c2.run(8)
    # n2 never took over: n1 renews the lease, and the witness showed n2 that n1 runs alone
    # with a newer generation, so n2 waits for n1
    assert c2.states() == (A, W)
    assert "n2 app: SECOND -> STOPPING_SECOND" in c2.transcript_of("n2")  # to WAIT, not PRIM
    assert "n1 announced generation 2" in reason(c2, "n2")


def test_isolated_primary_fences_and_the_secondary_takes_over_after_the_lease() -> None:
    c = started(witnessed())
    c.cut("n1")
    c.cut_witness("n1")
    c.run(10)
    assert c.states() == (W, A)
    assert "fencing" in c.transcript_of("n1")
    c.heal()
    c.run_until(lambda: c.states() == (S, P), limit=10)


def test_without_the_witness_a_primary_that_loses_its_peer_fences() -> None:
    c = started(witnessed())
    c.set_witness_down(True)
    c.run(4)
    assert c.states() == (P, S)  # the peer is there: the witness is not needed
    c.poweroff("n2")
    c.run(6)
    assert c.state("n1") == W
    c.set_witness_down(False)
    c.run_until(lambda: c.state("n1") == A, limit=8)  # the lease again: it may serve


def test_secondary_learns_the_ran_alone_record_and_does_not_take_over() -> None:
    c = witnessed()
    witness_partition_then_primary_dies_secondary_waits_for_it(c)
    assert c.states() == (P, S)  # n1 came back with the data and serves again
    n2 = c.transcript_of("n2")
    assert "n1 announced generation" in n2 and "STARTING_PRIM" not in n2


def test_a_paused_primary_loses_its_vip_to_the_watchdog_and_fences_when_it_resumes() -> None:
    c = started(witnessed())
    c.pause("n1")
    c.run(6)
    assert c.state("n2") == A  # took over after the lease ran out
    assert "replica removes the VIPs (watchdog)" in c.transcript_of("n1")
    c.resume("n1")
    c.run(0.05)
    assert "fencing" in c.transcript_of("n1")
    c.run_until(lambda: c.states() == (S, P), limit=10)


def test_operator_prim_in_wait_waits_for_the_lease() -> None:
    c = started(witnessed())
    c.cut("n1")
    c.cut_witness("n1")
    c.run(10)
    assert c.state("n1") == W
    c.command("n1", Verb.PRIM, force=True)  # accepted, but the lease is n2's
    c.run(3)
    assert c.state("n1") == W
    assert "waiting for the arbiters' lease" in reason(c, "n1")


nodes = st.sampled_from(["n1", "n2"])
faults = st.one_of(
    st.tuples(st.just("poweroff"), nodes),
    st.tuples(st.just("poweron"), nodes),
    st.tuples(st.just("cut"), nodes),
    st.tuples(st.just("cut_witness"), nodes),
    st.tuples(st.just("witness_down"), st.booleans()),
    st.tuples(st.just("heal"), st.none()),
    st.tuples(st.just("link"), st.booleans()),
    st.tuples(st.just("replica_dies"), nodes),
    st.tuples(st.just("pause"), nodes),
    st.tuples(st.just("resume"), nodes),
    st.tuples(st.just("cmd"), st.tuples(nodes, st.sampled_from([Verb.SWAP, Verb.STOPSTART]))),
    st.tuples(st.just("wait"), st.floats(0.0, 6.0)),
)


def _apply(c: SimCluster, kind: str, arg: object) -> None:
    if kind == "poweroff":
        c.poweroff(str(arg))
    elif kind == "poweron" and not c.nodes[str(arg)].powered:
        c.poweron(str(arg))
    elif kind == "cut":
        c.cut(str(arg))
    elif kind == "cut_witness":
        c.cut_witness(str(arg))
    elif kind == "witness_down":
        c.set_witness_down(bool(arg))
    elif kind == "heal":
        c.heal()
    elif kind == "link":
        (c.break_replication if arg else c.repair_replication)()
    elif kind == "replica_dies" and c.nodes[str(arg)].powered:
        c.replica_dies(str(arg))
    elif kind == "pause" and c.nodes[str(arg)].powered:
        c.pause(str(arg))
    elif kind == "resume" and c.nodes[str(arg)].paused:
        c.resume(str(arg))
    elif kind == "cmd":
        node, verb = arg  # type: ignore[misc]
        if c.nodes[node].powered:
            with contextlib.suppress(CommandRefused):
                c.command(node, verb)
    elif kind == "wait":
        c.run(float(arg))  # type: ignore[arg-type]


@settings(
    max_examples=int(os.environ.get("HAKIT_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@example(ops=[("cut", "n2"), ("wait", 5.0), ("poweroff", "n1"), ("wait", 6.0)])
@example(ops=[("cut_witness", "n1"), ("cut", "n1"), ("wait", 6.0), ("heal", None)])
@example(ops=[("pause", "n1"), ("wait", 6.0), ("resume", "n1"), ("wait", 2.0)])
@example(  # found by this test: both ran alone at one generation, the later lease must win
    ops=[("pause", "n1"), ("wait", 4.0), ("poweroff", "n2")]
)
@example(  # found by this test: the watchdog died with the replicator while the agent slept
    ops=[("pause", "n1"), ("replica_dies", "n1"), ("wait", 4.0)]
)
@given(ops=st.lists(faults, max_size=20))
def test_random_faults_with_a_witness_never_two_serving_never_a_lost_write(
    ops: list[tuple[str, object]],
) -> None:
    c = started(witnessed())
    for kind, arg in ops:
        _apply(c, kind, arg)
        c.run(0.05)
    c.recover_all()


plain_faults = st.one_of(
    st.tuples(st.sampled_from(["poweroff", "poweron", "cut", "cut_witness", "pause"]), nodes),
    st.tuples(st.just("resume"), nodes),
    st.tuples(st.just("witness_down"), st.booleans()),
    st.tuples(st.just("heal"), st.none()),
    st.tuples(st.just("cmd"), st.tuples(nodes, st.sampled_from([Verb.SWAP, Verb.STOPSTART]))),
    st.tuples(st.just("wait"), st.floats(0.0, 6.0)),
)


def test_a_paused_agent_without_replication_stops_serving_at_its_kernel_lease() -> None:
    """No replication process, so no watchdog process: only the VIPs' lease held by the
    kernel stops the paused primary serving before its peer takes over."""
    c = started(SimCluster(witness=LEASE))
    c.pause("n1")
    c.run_until(lambda: c.state("n2") == A, limit=10)
    assert c.serving() == ["n2"]
    assert c.nodes["n1"].modules["app"].vip, "the paused agent could not remove its VIP"
    c.resume("n1")
    c.run_until(lambda: c.states() == (S, A) or c.states() == (S, P), limit=15)


@settings(
    max_examples=int(os.environ.get("HAKIT_EXAMPLES", "120")) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@example(ops=[("pause", "n1"), ("wait", 4.0), ("resume", "n1"), ("wait", 2.0)])
@given(ops=st.lists(plain_faults, max_size=20))
def test_random_faults_with_a_witness_without_replication_never_two_serving(
    ops: list[tuple[str, object]],
) -> None:
    c = started(SimCluster(witness=LEASE))
    for kind, arg in ops:
        _apply(c, kind, arg)
        c.run(0.05)
    c.recover_all()
