"""Replicated mirror modules on the simulated pair: who has the latest data (docs/replication.md).

Every run also checks sim.py's invariants after each step: never two nodes serving while they
hear each other, and no node becoming primary (unforced) without every acknowledged write.
The first three scenarios are also replayed against golden transcripts.
"""

from __future__ import annotations

import pytest

from hakit.core.actions import (
    DelVips,
    Persist,
    ReplicaRole,
    RunScript,
    SetReplication,
    Transitioned,
)
from hakit.core.events import (
    Command,
    PeerHeard,
    PeerModuleStatus,
    ReplicaFailed,
    ReplicaReport,
    ScriptDone,
    Verb,
)
from hakit.core.freshness import DataRecord, DataState
from hakit.core.mirror import CommandRefused, MirrorMachine, MirrorSettings
from hakit.model import NodeId, State

from .sim import SimCluster

P, S, A, W, STOP = State.PRIM, State.SECOND, State.ALONE, State.WAIT, State.STOP
U = DataState.UPTODATE
REPLICATED: dict[str, dict[str, object]] = {"app": {"replicated": True, "module": "app"}}


def replicated(**opts: object) -> SimCluster:
    return SimCluster(REPLICATED, **opts)  # type: ignore[arg-type]


def reason(c: SimCluster, node: str) -> str:
    return c.nodes[node].modules["app"].machine.reason  # type: ignore[index]


def started_pair(**opts: object) -> SimCluster:
    c = replicated(**opts)
    c.start_both()
    c.run_until(lambda: c.states() == (P, S))
    c.run(1.0)
    return c


# ---------------------------------------------------------------- scenarios (also golden)
def primary_dies_then_secondary_dies_then_old_primary_returns(c: SimCluster) -> None:
    c.start_both()
    c.run(3)
    c.poweroff("n1")
    c.run(6)  # n2 takes over, ALONE (generation 2)
    c.poweroff("n2")
    c.run(1)
    c.poweron("n1")
    c.run(6)  # n1 did not run alone: it waits
    c.command("n1", Verb.PRIM, force=True)
    c.run(2)
    c.poweron("n2")
    c.run(4)


def secondary_powered_off_during_resync_cannot_become_primary(c: SimCluster) -> None:
    c.resync_seconds = 3.0
    c.start_both()
    c.run(1.5)  # n1 ALONE, resyncing n2
    c.poweroff("n2")
    c.run(1)
    c.poweroff("n1")
    c.run(1)
    c.poweron("n2")
    c.run(6)  # n2 resyncing: waits
    c.poweron("n1")
    c.run(6)


def fresh_cluster_both_unknown_start_together(c: SimCluster) -> None:
    c.start_both()
    c.run(3)


# ---------------------------------------------------------------- tests
def test_old_primary_waits_after_double_failure_until_forced() -> None:
    c = replicated()
    c.start_both()
    c.run(3)
    c.poweroff("n1")
    c.run_until(lambda: c.state("n2") == A)
    c.run(0.5)
    c.poweroff("n2")
    c.poweron("n1")
    c.run(8)
    assert c.state("n1") == W
    assert "n2 may have run without this node since generation 1" in reason(c, "n1")
    assert "`hakit prim --force -m app`" in reason(c, "n1")
    with pytest.raises(CommandRefused, match="add --force to accept losing"):
        c.command("n1", Verb.PRIM)
    c.command("n1", Verb.PRIM, force=True)
    c.run_until(lambda: c.state("n1") == A, limit=2)
    c.poweron("n2")  # its changes made alone are discarded: it is resynchronised from n1
    c.run_until(lambda: c.states() == (P, S), limit=8)
    assert c.record("n2") == c.record("n1") == DataRecord(U, 2)


def test_golden_double_failure_ends_with_the_forced_node_primary() -> None:
    c = replicated()
    primary_dies_then_secondary_dies_then_old_primary_returns(c)
    assert c.states() == (P, S)


def test_node_powered_off_during_resync_cannot_become_primary() -> None:
    c = replicated(resync_seconds=3.0)
    c.start_both()
    c.run(1.5)
    assert c.record("n2").data == DataState.RESYNCING
    c.poweroff("n2")
    c.run(1)
    c.poweroff("n1")
    c.poweron("n2")
    c.run(10)
    assert c.state("n2") == W
    assert "resynchronisation from n1 did not finish" in reason(c, "n2")
    assert c.serving() == []
    c.poweron("n1")  # the node with the data returns: it becomes primary, n2 is resynced
    c.run_until(lambda: c.states() == (P, S), limit=10)


def test_golden_resync_interrupted_ends_with_the_node_that_had_the_data_primary() -> None:
    c = replicated()
    secondary_powered_off_during_resync_cannot_become_primary(c)
    assert c.states() == (P, S)


def test_fresh_cluster_elects_one_primary_which_is_prim_only_once_the_other_is_resynced() -> None:
    c = replicated(resync_seconds=2.0)
    seen: list[tuple[State, State]] = []
    c.on_step.append(lambda cl: seen.append(cl.states()))
    fresh_cluster_both_unknown_start_together(c)
    assert c.states() == (P, S)
    assert (A, S) in seen  # ALONE while the secondary was resyncing
    assert c.record("n1") == c.record("n2") == DataRecord(U, 1)


def test_fresh_node_alone_waits_for_its_peer() -> None:
    c = replicated()
    c.poweroff("n2")
    c.command("n1", Verb.START)
    c.run(6)
    assert c.state("n1") == W
    assert "never been synchronised with n2" in reason(c, "n1")
    with pytest.raises(CommandRefused, match="never been synchronised"):
        c.command("n1", Verb.PRIM)


def test_prim_force_from_stop_starts_a_fresh_node_alone() -> None:
    c = replicated()
    c.poweroff("n2")
    with pytest.raises(CommandRefused, match="add --force"):
        c.command("n1", Verb.PRIM)
    assert c.state("n1") == STOP
    c.command("n1", Verb.PRIM, force=True)
    c.run_until(lambda: c.state("n1") == A, limit=2)
    assert c.record("n1") == DataRecord(U, 1, ran_alone=True)


def test_secondary_with_broken_replication_link_makes_primary_alone_then_prim_again() -> None:
    c = started_pair()
    c.break_replication()
    c.run_until(lambda: c.state("n1") == A, limit=1)
    assert "replication to n2 stopped: secondary lost" in reason(c, "n1")
    assert c.record("n1") == DataRecord(U, 2, ran_alone=True)
    c.run(3)
    assert c.states() == (A, S)  # heartbeats fine: n2 stays SECOND
    c.repair_replication()
    c.run_until(lambda: c.states() == (P, S), limit=3)
    assert c.record("n2") == DataRecord(U, 2)


def test_secondary_not_in_sync_does_not_take_over() -> None:
    c = started_pair()
    c.break_replication()
    c.run(1)
    c.poweroff("n1")
    c.run(8)
    assert c.state("n2") == W
    assert "n1 announced generation 2, this node has generation 1" in reason(c, "n2")
    c.repair_replication()
    c.poweron("n1")
    c.run_until(lambda: c.states() == (P, S), limit=10)


def test_in_sync_secondary_takes_over_without_losing_a_write() -> None:
    c = started_pair()
    c.run(2)
    before = c.writes
    c.poweroff("n1")
    c.run_until(lambda: c.state("n2") == A)  # the invariant checked every acked write
    assert before > 100
    assert c.acked["app"] <= c.nodes["n2"].modules["app"].replica.data  # type: ignore[index,union-attr]


def test_cut_then_heal_keeps_the_former_primary_and_resyncs_the_other() -> None:
    c = started_pair()
    c.cut("n2")
    c.run_until(lambda: c.states() == (A, A))
    c.heal()
    c.run_until(lambda: c.states() == (P, S), limit=6)
    assert c.record("n2") == c.record("n1")
    assert "data marked outdated" in "\n".join(c.transcript)


def test_split_brain_loser_never_takes_over_alone_before_its_resync() -> None:
    c = started_pair()
    c.cut("n2")
    c.run_until(lambda: c.states() == (A, A))
    c.break_replication()  # no resync after the heal
    c.heal()
    c.run_until(lambda: c.states() == (A, S), limit=6)
    c.run(1)  # n1 acknowledges writes n2 does not have
    c.poweroff("n1")
    c.run(10)
    assert c.state("n2") == W
    assert c.record("n2").data == DataState.OUTDATED
    assert c.serving() == []


def test_node_with_the_newest_data_takes_over_from_an_older_waiting_peer() -> None:
    c = started_pair()
    c.break_replication()
    c.run(1)  # n1 runs alone: n2 is outdated
    c.command("n1", Verb.STOP)
    c.run(3)
    assert c.states() == (STOP, W)
    c.command("n1", Verb.SECOND)  # the operator makes the newest copy secondary
    c.repair_replication()
    c.run_until(lambda: c.states() == (P, S), limit=6)
    assert "n1 wins, it has the newer data" in "\n".join(c.transcript)


def test_secondary_with_newer_data_takes_over_from_a_peer_waiting_on_older_data() -> None:
    m = _machine(DataRecord(U, 4))
    _to_wait(m)
    m.step(1.0, _peer(State.PRIM, m.version, data=U, generation=4, in_sync=True))
    m.step(1.1, ScriptDone("start_second", True))
    assert m.state == S
    actions = m.step(1.2, _peer(State.WAIT, m.version, data=U, generation=3))
    assert isinstance(actions[0], Transitioned)
    assert (actions[0].new, m.goal) == (State.STOPPING_SECOND, "prim")
    assert actions[0].reason == "n2 is WAIT with older data (up to date, generation 3): taking over"


def test_peer_generation_seen_is_persisted_and_survives_a_restart() -> None:
    c = started_pair()
    c.break_replication()
    c.run(1)  # n1: generation 2
    assert c.nodes["n2"].modules["app"].durable.peer_generation_seen == 2  # type: ignore[index]
    c.poweroff("n2")
    c.poweroff("n1")
    c.poweron("n2")
    c.run(6)
    assert c.state("n2") == W
    assert "n1 announced generation 2" in reason(c, "n2")


def test_swap_refused_while_the_secondary_is_not_in_sync() -> None:
    c = started_pair()
    c.break_replication()
    c.run(1)
    with pytest.raises(CommandRefused, match="not in sync yet"):
        c.command("n1", Verb.SWAP)
    c.repair_replication()
    c.run_until(lambda: c.states() == (P, S), limit=3)
    c.command("n1", Verb.SWAP)
    c.run_until(lambda: c.states() == (S, P), limit=5)


def test_clean_stop_of_the_primary_hands_over_to_the_in_sync_secondary() -> None:
    c = started_pair()
    c.command("n1", Verb.STOP)
    c.run_until(lambda: c.states() == (STOP, A), limit=3)


def test_stop_of_an_alone_primary_leaves_a_stale_secondary_waiting() -> None:
    c = started_pair()
    c.break_replication()
    c.run(1)
    c.command("n1", Verb.STOP)
    c.run(3)
    assert c.states() == (STOP, W)
    assert "data is older than n1's" in reason(c, "n2")
    c.command("n1", Verb.START)
    c.repair_replication()
    c.run_until(lambda: c.states() == (P, S), limit=6)


def test_replication_process_failure_on_the_primary_fails_over_to_the_in_sync_secondary() -> None:
    c = started_pair()
    c.replica_dies("n1")
    c.run_until(lambda: c.states() == (S, P), limit=6)
    assert "replication process failed" in "\n".join(c.transcript)


def test_replication_process_failure_on_an_alone_primary_restarts_it_locally() -> None:
    c = started_pair()
    c.break_replication()
    c.run(1)
    c.replica_dies("n1")
    c.run(2)
    text = "\n".join(c.transcript)
    assert "local restart 1/2" in text
    assert text.count("n1 app: replica primary") == 2  # the role is set again before start_prim
    assert c.states() == (A, S)


def test_replication_process_failure_on_the_secondary_is_only_noted() -> None:
    c = started_pair()
    c.replica_dies("n2")
    assert c.states() == (P, S)
    assert "replication process failed" in reason(c, "n2")
    c.run_until(lambda: c.state("n1") == A, limit=1)  # the primary lost its secondary
    c.run_until(lambda: c.states() == (P, S), limit=3)  # restarted, resynced


def test_non_replicated_modules_never_drive_a_replication_process() -> None:
    c = SimCluster()
    c.start_both()
    c.run(3)
    c.poweroff("n1")
    c.run(6)
    assert not any("replica" in line for line in c.transcript)


# ---------------------------------------------------------------- one machine, exact actions
def _machine(data: DataRecord | None = None) -> MirrorMachine:
    settings = MirrorSettings(node=NodeId("n1"), peer=NodeId("n2"), replicated=True, module="app")
    return MirrorMachine(settings, data=data)


def _peer(state: State, version: int, **kw: object) -> PeerHeard:
    claims = state.holds_primary_role
    status = PeerModuleStatus(
        NodeId("n2"),
        state,
        claims,
        1,
        1 if claims else 0,
        acked_version=version,
        **kw,  # type: ignore[arg-type]
    )
    return PeerHeard(status)


def _kinds(actions: list[object]) -> list[str]:
    return [
        f"SetReplication({a.role}{', force' if a.force_full else ''})"
        if isinstance(a, SetReplication)
        else type(a).__name__
        for a in actions
    ]


def _to_wait(m: MirrorMachine) -> None:
    m.step(0.0, Command(Verb.START))
    m.step(0.1, ScriptDone("prestart", True))


def test_becoming_primary_sets_the_replication_role_before_the_vips_and_the_script() -> None:
    m = _machine(DataRecord(U, 4, ran_alone=True))
    _to_wait(m)
    actions = m.step(5.0, _peer(State.STOP, m.version))
    assert _kinds(actions) == [
        "Transitioned",
        "Persist",
        "SetReplication(primary)",
        "AddVips",
        "RunScript",
    ]
    assert actions[2] == SetReplication(ReplicaRole.PRIMARY, peer_generation=0)
    assert m.status().generation == 5 and m.status().ran_alone


def test_done_is_alone_until_the_replica_reports_in_sync_and_the_peer_is_up_to_date() -> None:
    m = _machine(DataRecord(U, 4, ran_alone=True))
    _to_wait(m)
    m.step(5.0, _peer(State.SECOND, m.version, data=U, generation=4))
    m.step(5.1, ScriptDone("start_prim", True))
    assert m.state == A
    m.step(5.2, ReplicaReport(DataRecord(U, 5), in_sync=True, detail="secondary in sync"))
    assert m.state == A  # the peer's status does not say up to date yet
    m.step(5.3, _peer(State.SECOND, m.version, data=U, generation=5))
    assert m.state == P
    assert m.peer_generation_seen == 5
    actions = m.step(5.4, ReplicaReport(DataRecord(U, 6, ran_alone=True), False, "conn reset"))
    assert isinstance(actions[0], Transitioned) and actions[0].new == A
    assert "replication to n2 stopped: conn reset" in actions[0].reason


def test_leaving_the_primary_role_unmounts_after_the_vips_then_listens_as_secondary() -> None:
    m = _machine(DataRecord(U, 4, ran_alone=True))
    _to_wait(m)
    m.step(5.0, _peer(State.SECOND, m.version, data=U, generation=4))
    m.step(5.1, ScriptDone("start_prim", True))
    m.step(5.2, ReplicaReport(DataRecord(U, 5), in_sync=True))
    m.step(5.3, _peer(State.SECOND, m.version, data=U, generation=5))
    actions = m.step(5.4, Command(Verb.SWAP))
    assert _kinds(actions) == ["Transitioned", "Persist", "StopCheckers", "RunScript"]
    actions = m.step(5.5, ScriptDone("stop_prim", True))
    assert _kinds(actions) == [
        "Transitioned",
        "DelVips",
        "SetReplication(idle)",
        "Persist",
        "SetReplication(secondary)",
        "RunScript",
    ]
    assert isinstance(actions[1], DelVips) and isinstance(actions[3], Persist)
    assert isinstance(actions[-1], RunScript) and actions[-1].script == "start_second"


def test_a_restart_keeps_the_replica_mounted() -> None:
    m = _machine(DataRecord(U, 4, ran_alone=True))
    _to_wait(m)
    m.step(5.0, _peer(State.STOP, m.version))
    m.step(5.1, ScriptDone("start_prim", True))
    m.step(5.2, Command(Verb.RESTART))
    actions = m.step(5.3, ScriptDone("stop_prim", True))
    assert _kinds(actions) == ["Transitioned", "Persist", "AddVips", "RunScript"]
    assert not any(isinstance(a, SetReplication) for a in actions)


def test_forced_prim_asks_for_a_full_resync() -> None:
    m = _machine(DataRecord(U, 4))
    _to_wait(m)
    with pytest.raises(CommandRefused, match="add --force"):
        m.step(1.0, Command(Verb.PRIM))
    actions = m.step(1.0, Command(Verb.PRIM, force=True))
    assert "SetReplication(primary, force)" in _kinds(actions)


def test_replica_failure_on_wait_changes_no_state() -> None:
    m = _machine()
    _to_wait(m)
    assert m.step(1.0, ReplicaFailed("hung: no answer to ping for 10 s")) == []
    assert m.state == W
    assert (
        m.reason == "replication process failed: hung: no answer to ping for 10 s (restarting it)"
    )
