"""The farm module machine (core/farm.py): one machine fed by hand, then simulated farms.

The simulated farms (farm_sim.py) check after every 10 ms step that no two nodes which hear
each other accept the same bucket, and whenever nothing has changed for 2 × timeout that every
bucket is accepted by exactly the UP node rendezvous hashing names. Scripted scenarios are
replayed against golden transcripts (tests/core/testdata/farm_*.txt); when a change of behaviour
is intended, regenerate them with ``HAKIT_UPDATE_GOLDEN=1 pytest tests/core/test_farm.py`` and
review the diff. ``HAKIT_FARM_EXAMPLES`` sets the number of random histories (default 25).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hakit.core.actions import RunScript, StartCheckers, StopCheckers, Transitioned
from hakit.core.buckets import BUCKETS, owned_by, owners
from hakit.core.events import (
    CheckerAction,
    CheckerFailed,
    Command,
    PeerLost,
    ScriptDone,
    Tick,
    Verb,
)
from hakit.core.farm import (
    TABLE,
    ApplyBuckets,
    AwaitDrain,
    CheckerRecovered,
    CommandRefused,
    Drained,
    FarmAction,
    FarmDurable,
    FarmMachine,
    FarmPeerHeard,
    FarmPeerStatus,
    FarmPersist,
    FarmSettings,
    SetupFarm,
    TeardownFarm,
)
from hakit.model import NodeId, State

from .farm_sim import FarmSim

TESTDATA = Path(__file__).parent / "testdata"
N1, N2, N3, N4 = (NodeId(f"n{i}") for i in range(1, 5))
UP, WAIT, STOP = State.UP, State.WAIT, State.STOP
STARTING, STOPPING = State.STARTING, State.STOPPING
EXAMPLES = int(os.environ.get("HAKIT_FARM_EXAMPLES", "25"))


# ---------------------------------------------------------------------- one machine by hand


def machine(now: float = 0.0, nodes: tuple[NodeId, ...] = (N1, N2, N3)) -> FarmMachine:
    s = FarmSettings(N1, nodes, seed=7, startup_wait=3.0, drain_timeout=30.0, module="web")
    return FarmMachine(s, FarmDurable(), now)


def started(now: float = 0.0) -> FarmMachine:
    """n1 UP, its peers not heard yet (start-up wait under way at ``now``)."""
    m = machine(now)
    m.step(now, Command(Verb.START))
    m.step(now, ScriptDone("prestart", True))
    m.step(now, ScriptDone("start_both", True))
    return m


def heard(
    m: FarmMachine, node: NodeId, *, member: bool = True, claims: frozenset[int] = frozenset()
) -> list[FarmAction]:
    """A heartbeat of ``node`` acknowledging n1's current status."""
    st = FarmPeerStatus(node, UP if member else STOP, member, claims, 1, m.status.version)
    return m.step(1.0, FarmPeerHeard(st))


def applied(actions: list[FarmAction]) -> list[ApplyBuckets]:
    return [a for a in actions if isinstance(a, ApplyBuckets)]


SHARE = {n: owned_by(owners({N1: 1, N2: 1, N3: 1}, 7), n) for n in (N1, N2, N3)}


def test_start_sets_the_farm_up_owning_nothing_then_runs_prestart_and_start_both() -> None:
    m = machine()
    assert m.step(0, Command(Verb.START)) == [
        Transitioned(STOP, STARTING, "start requested by the operator"),
        FarmPersist(True, STARTING),
        SetupFarm(),
        RunScript("prestart", "STOP->STARTING"),
    ]
    assert m.step(0.2, ScriptDone("prestart", True)) == [RunScript("start_both", "STARTING->UP")]
    assert m.step(0.4, ScriptDone("start_both", True)) == [
        Transitioned(STARTING, UP, "start_both ok"),
        FarmPersist(True, UP),
        StartCheckers(),
    ]
    assert m.status.claims == frozenset()  # nothing before the peers are heard or waited for
    assert m.status.reason == "UP 0/256: waiting up to 2.6 s to hear n2 n3"


def test_a_node_takes_its_share_once_every_peer_acknowledged_its_status() -> None:
    m = started()
    assert heard(m, N2) == []  # n3 not heard yet, the start-up wait is not over
    st = FarmPeerStatus(N3, UP, True, frozenset(), 1, m.status.version - 1)
    assert m.step(1.0, FarmPeerHeard(st)) == []
    assert "waiting for n3 to acknowledge this node's status" in m.status.reason
    (apply,) = applied(heard(m, N3))
    assert apply.owned == SHARE[N1]
    assert apply.loose == frozenset()
    assert apply.arp  # n1 is the smallest member
    assert apply.reason == f"took {len(SHARE[N1])} free buckets; answers ARP for the VIP"
    assert m.status.reason == f"UP {len(SHARE[N1])}/256: members n1 n2 n3"
    assert m.view() == {
        "state": "UP",
        "members": ["n1", "n2", "n3"],
        "shares": {"n1": 89, "n2": 72, "n3": 95},
        "claimed": {"n1": 89, "n2": 0, "n3": 0},
        "buckets": 89,
        "loose": 0,
        "arp": True,
        "reason": "UP 89/256: members n1 n2 n3",
    }


def test_silent_peers_are_waited_for_only_for_the_startup_wait() -> None:
    m = started(now=10.0)
    assert m.step(12.9, Tick()) == []
    (apply,) = applied(m.step(13.0, Tick()))
    assert apply.owned == frozenset(range(BUCKETS))  # alone: every bucket, none loose
    assert apply.loose == frozenset()


def test_a_bucket_still_claimed_by_a_peer_is_taken_only_once_it_is_released() -> None:
    m = started()
    heard(m, N2, member=False, claims=SHARE[N1])  # n2 leaving: still accepts n1's share
    mine = owned_by(owners({N1: 1, N3: 1}, 7), N1)
    (apply,) = applied(heard(m, N3))
    assert apply.owned == mine - SHARE[N1]
    assert m.status.reason.endswith(f"waiting for n2 to release {len(SHARE[N1])} buckets")
    heard(m, N3)  # every peer acknowledges n1's new claims again
    (apply,) = applied(heard(m, N2, member=False))  # released cleanly: not loose
    assert apply.owned == mine
    assert apply.loose == frozenset()
    assert apply.reason == f"took {len(SHARE[N1])} buckets released by n2"


def test_buckets_of_a_lost_peer_are_taken_loose_and_stay_loose_until_released() -> None:
    m = started()
    heard(m, N2, claims=SHARE[N2])
    heard(m, N3, claims=SHARE[N3])
    assert m.step(2.0, PeerLost(N3, 3.0)) == []  # n2 has not acknowledged n1's claims yet
    (apply,) = applied(heard(m, N2, claims=SHARE[N2]))
    taken = owned_by(owners({N1: 1, N2: 1}, 7), N1) - SHARE[N1]
    assert apply.owned == SHARE[N1] | taken
    assert apply.loose == taken
    assert apply.reason == f"took {len(taken)} buckets of n3 (lost)"
    # n3 comes back: n1 hands the buckets back (cleanly), and their loose flags end
    st = FarmPeerStatus(N3, UP, True, frozenset(), 0, -1)
    (apply,) = applied(m.step(3.0, FarmPeerHeard(st)))
    assert (apply.owned, apply.loose) == (SHARE[N1], frozenset())


def test_a_peer_whose_agent_restarted_left_uncleanly_so_its_buckets_are_taken_loose() -> None:
    """The driver steps PeerLost when a peer's new incarnation is heard: the restarted agent
    removed its filter at start, its old connections are gone, their clients need a reset."""
    m = started()
    heard(m, N2, claims=SHARE[N2])
    heard(m, N3, claims=SHARE[N3])
    m.step(2.0, PeerLost(N3, 0.0))  # n3's agent restarted: a new incarnation was heard
    actions = heard(m, N3, member=False)  # it claims nothing (its filter was removed)
    actions += heard(m, N2, claims=SHARE[N2])
    (apply,) = applied(actions)
    taken = owned_by(owners({N1: 1, N2: 1}, 7), N1) - SHARE[N1]
    assert apply.loose == taken, "not a clean release: its clients must get a reset"


def test_the_version_changes_with_the_status_but_not_with_the_reason() -> None:
    m = started()
    v = m.status.version
    m.step(1.0, Tick())
    heard(m, N2)
    assert m.status.version == v  # the reason changed, nothing else
    heard(m, N3)
    assert m.status.version == v + 1  # claims and ARP in one batch: one new version


def test_clean_stop_releases_then_drains_then_stops_the_application() -> None:
    m = started()
    heard(m, N2)
    heard(m, N3)
    assert m.step(5, Command(Verb.STOP)) == [
        Transitioned(UP, STOPPING, "stop requested by the operator"),
        FarmPersist(False, STOPPING),
        StopCheckers(),
        ApplyBuckets(frozenset(), frozenset(), False, "released 89 buckets"),
        AwaitDrain(30.0),
    ]
    assert (m.status.claims, m.status.member, m.status.arp) == (frozenset(), False, False)
    assert m.step(6, Drained(2)) == [RunScript("stop_both", "UP->STOPPING")]
    assert m.status.reason == "drain timeout: 2 connections still open"
    assert m.step(7, ScriptDone("stop_both", True)) == [
        TeardownFarm(),
        RunScript("poststop", "STOPPING->STOP"),
    ]
    assert m.step(8, ScriptDone("poststop", True)) == [
        Transitioned(STOPPING, STOP, "poststop ok"),
        FarmPersist(False, STOP),
    ]
    assert m.status.reason == "stop requested by the operator"


def test_restart_leaves_cleanly_then_starts_again() -> None:
    m = started(now=-5.0)
    m.step(0, Tick())  # alone: every bucket
    assert m.step(1, Command(Verb.RESTART))[-1] == AwaitDrain(30.0)
    m.step(2, Drained(0))
    m.step(3, ScriptDone("stop_both", True))
    assert m.step(4, ScriptDone("poststop", True)) == [
        Transitioned(STOPPING, STARTING, "poststop ok; starting again"),
        FarmPersist(True, STARTING),
        SetupFarm(),
        RunScript("prestart", "STOPPING->STARTING"),
    ]


def test_stop_during_a_start_script_stops_once_it_has_finished() -> None:
    m = machine()
    m.step(0, Command(Verb.START))
    assert m.step(0.1, Command(Verb.STOP)) == [FarmPersist(False, STARTING)]
    assert m.step(0.2, ScriptDone("prestart", True)) == [
        Transitioned(STARTING, STOPPING, "prestart ok; stop was requested"),
        FarmPersist(False, STOPPING),
        TeardownFarm(),
        RunScript("poststop", "STOPPING->STOP"),
    ]
    m.step(0.3, ScriptDone("poststop", True))
    assert (m.state, m.status.reason) == (STOP, "stop requested by the operator")


def test_failed_start_waits_with_the_farm_removed_and_restart_tries_again() -> None:
    m = machine()
    m.step(0, Command(Verb.START))
    m.step(0.2, ScriptDone("prestart", True))
    actions = m.step(0.4, ScriptDone("start_both", False, "exit 1"))
    assert actions[0] == Transitioned(STARTING, WAIT, m.status.reason)
    assert actions[1:] == [FarmPersist(True, WAIT), TeardownFarm()]
    assert m.status.reason.startswith("start_both failed (exit 1): the application did not start")
    with pytest.raises(CommandRefused, match="restart -m web"):
        m.command(1, Command(Verb.START))
    m.step(1, Tick())
    assert m.step(2, CheckerFailed("http", CheckerAction.RESTART, "down")) == []  # no checkers
    # restart: stop_both cleans up what start_both left (no drain: nothing was served)
    assert m.command(3, Command(Verb.RESTART))[-1] == RunScript("stop_both", "WAIT->STOPPING")


def test_checker_failure_releases_every_bucket_and_keeps_the_application() -> None:
    m = started()
    heard(m, N2)
    heard(m, N3)
    actions = m.step(5, CheckerFailed("http", CheckerAction.FAILOVER, "no answer on port 80"))
    why = (
        "checker http failed: no answer on port 80; leaving the farm (buckets released), "
        "the application keeps running"
    )
    assert actions == [
        Transitioned(UP, WAIT, why),
        FarmPersist(True, WAIT),
        ApplyBuckets(
            frozenset(),
            frozenset(),
            False,
            "released 89 buckets (left the membership); no longer answers ARP",
        ),
    ]
    assert not m.status.member
    m.step(6, CheckerFailed("disk", CheckerAction.RESTART, "full"))
    assert m.step(7, CheckerRecovered("http")) == []  # disk still fails
    assert m.state == WAIT
    actions = m.step(8, CheckerRecovered("disk"))
    assert actions == [
        Transitioned(WAIT, UP, "checker disk recovered: rejoining the farm"),
        FarmPersist(True, UP),
    ]
    heard(m, N2)
    (apply,) = applied(heard(m, N3))  # back once the peers acknowledged the new status
    assert apply.owned == SHARE[N1]


@pytest.mark.parametrize(
    ("setup", "verb", "match"),
    [
        ([], Verb.STOP, "already stopped"),
        ([], Verb.RESTART, "stopped: `hakit start -m web`"),
        ([], Verb.SWAP, "mirror modules only"),
        ([Verb.START], Verb.START, r"already started \(STARTING\)"),
        ([Verb.START], Verb.RESTART, "busy: prestart is running"),
        ([Verb.START], Verb.PRIM, "mirror modules only"),
    ],
)
def test_commands_that_do_not_apply_are_refused_and_change_nothing(
    setup: list[Verb], verb: Verb, match: str
) -> None:
    m = machine()
    for v in setup:
        m.command(0, Command(v))
    before = m.status
    with pytest.raises(CommandRefused, match=match):
        m.command(1, Command(verb))
    assert m.status == before


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="not listed"):
        FarmSettings(N4, (N1, N2))
    with pytest.raises(ValueError, match="2 to 32"):
        FarmSettings(N1, (N1,))
    with pytest.raises(ValueError, match="weights"):
        FarmSettings(N1, (N1, N2), weights={N2: 0})


def test_every_state_of_the_table_is_reachable_and_has_a_way_out() -> None:
    assert set(TABLE) == {STOP, STARTING, UP, WAIT, STOPPING}
    targets = {to for edges in TABLE.values() for to in edges.values()}
    assert targets == set(TABLE)


# ---------------------------------------------------------------------- simulated farms


def started_farm(n: int = 3, **opts: object) -> FarmSim:
    c = FarmSim(n, **opts)  # type: ignore[arg-type]
    c.start()
    c.run_until_stable()
    return c


def test_three_nodes_start_together_and_split_the_buckets_as_rendezvous_says() -> None:
    c = FarmSim(3)
    c.start()
    took = c.run_until(lambda: len(c.owner_map()) == BUCKETS)
    assert took < 1.0  # scripts (0.4 s) and one round of heartbeats
    c.run_until_stable()
    assert {n: len(o) for n, o in c.claims().items()} == {"n1": 89, "n2": 72, "n3": 95}


def test_a_node_started_alone_waits_the_startup_wait_then_takes_everything() -> None:
    c = FarmSim(3)
    c.poweroff("n2")
    c.poweroff("n3")
    c.start("n1")
    took = c.run_until(lambda: len(c.claims()["n1"]) == BUCKETS)
    assert 3.0 <= took <= 3.1
    assert not c.nodes["n1"].loose


def test_a_join_moves_about_a_quarter_of_the_buckets_and_only_to_the_joiner() -> None:
    c = FarmSim(4)
    c.start("n1", "n2", "n3")
    c.run_until_stable()
    before = c.owner_map()

    def only_to_the_joiner(sim: FarmSim) -> None:
        for b, owner in sim.owner_map().items():
            assert owner in (before[b], "n4"), f"bucket {b} went to {owner}"

    c.on_step.append(only_to_the_joiner)
    c.start("n4")
    c.run_until_stable()
    moved = {b for b, owner in c.owner_map().items() if owner != before[b]}
    assert moved == c.claims()["n4"]
    assert 40 <= len(moved) <= 90  # about 1/4 of 256
    assert not c.nodes["n4"].loose  # taken from nodes that released them cleanly


def test_a_clean_leave_moves_only_the_leavers_buckets_and_drains_before_stop_both() -> None:
    c = started_farm(4, drain_seconds=2.0)
    before = c.owner_map()
    c.command("n2", Verb.STOP)
    c.run(0.1)
    assert c.nodes["n2"].app  # draining: the application still serves its connections
    assert set(c.owner_map().values()) == {"n1", "n3", "n4"}  # taken over at once
    c.run_until_stable()
    assert c.state("n2") == STOP
    assert not c.nodes["n2"].app
    moved = {b for b, owner in c.owner_map().items() if owner != before[b]}
    assert moved == {b for b, owner in before.items() if owner == "n2"}
    assert all(not n.loose for n in c.nodes.values())


def test_buckets_of_a_powered_off_node_are_taken_loose_after_the_timeout() -> None:
    c = started_farm(3)
    gone = c.claims()["n2"]
    c.poweroff("n2")
    took = c.run_until(lambda: len(c.owner_map()) == BUCKETS)
    assert 2.5 <= took <= 3.1  # the timeout after its last heartbeat
    assert c.nodes["n1"].loose | c.nodes["n3"].loose == gone
    c.poweron("n2")  # wanted: starts again, takes its share back cleanly
    c.run_until_stable()
    assert c.claims()["n2"] == gone
    assert all(not n.loose for n in c.nodes.values())


def test_weights_are_respected() -> None:
    c = started_farm(3, weights={"n1": 3})
    got = {n: len(o) for n, o in c.claims().items()}
    assert got["n1"] > 100
    assert got["n1"] > 2 * max(got["n2"], got["n3"])


def test_a_cut_node_takes_every_bucket_and_the_farm_converges_after_heal() -> None:
    c = started_farm(3)
    before = c.owner_map()
    c.cut("n3")
    c.run(5)
    assert len(c.claims()["n3"]) == BUCKETS  # it believes the others dead (no arbitration)
    c.heal()
    c.run_until_stable()
    assert c.owner_map() == before


# ---------------------------------------------------------------------- golden transcripts


def three_nodes_start(c: FarmSim) -> None:
    c.start()
    c.run(8)


def join(c: FarmSim) -> None:
    c.start("n1", "n2")
    c.run(8)
    c.start("n3")
    c.run(8)


def clean_leave(c: FarmSim) -> None:
    c.start()
    c.run(8)
    c.command("n3", Verb.STOP)
    c.run(8)


def power_off(c: FarmSim) -> None:
    c.start()
    c.run(8)
    c.poweroff("n2")
    c.run(8)
    c.poweron("n2")
    c.run(8)


def checker_failure_and_recovery(c: FarmSim) -> None:
    c.start()
    c.run(8)
    c.checker_fails("n1")
    c.run(8)
    c.checker_recovers("n1")
    c.run(8)


def two_nodes_start_at_once(c: FarmSim) -> None:
    c.start("n1", "n2")
    c.run(8)


def cut_and_heal(c: FarmSim) -> None:
    c.start()
    c.run(8)
    c.cut("n3")
    c.run(8)
    c.heal()
    c.run(8)


GOLDEN: dict[str, Callable[[FarmSim], None]] = {
    f.__name__: f
    for f in (
        three_nodes_start,
        join,
        clean_leave,
        power_off,
        checker_failure_and_recovery,
        two_nodes_start_at_once,
        cut_and_heal,
    )
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_farm_scenario_matches_golden_transcript(name: str) -> None:
    c = FarmSim(2 if name == "two_nodes_start_at_once" else 3)
    GOLDEN[name](c)
    got = "\n".join(c.transcript) + "\n"
    path = TESTDATA / f"farm_{name}.txt"
    if os.environ.get("HAKIT_UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.exists(), f"no golden transcript: run with HAKIT_UPDATE_GOLDEN=1 to create {path}"
    assert got == path.read_text()


# ---------------------------------------------------------------------- random histories

NODES = ["n1", "n2", "n3", "n4"]
VERBS = ["start", "stop", "restart"]
operations = st.one_of(
    st.tuples(st.just("cmd"), st.sampled_from(NODES), st.sampled_from(VERBS)),
    st.tuples(st.just("poweroff"), st.sampled_from(NODES), st.none()),
    st.tuples(st.just("poweron"), st.sampled_from(NODES), st.none()),
    st.tuples(st.just("cut"), st.sampled_from(NODES), st.none()),
    st.tuples(st.just("heal"), st.none(), st.none()),
    st.tuples(st.just("fail"), st.sampled_from(NODES), st.sampled_from(["http", "disk"])),
    st.tuples(st.just("recover"), st.sampled_from(NODES), st.sampled_from(["http", "disk"])),
    st.tuples(st.just("wait"), st.floats(0.0, 4.0), st.none()),
)


def apply(c: FarmSim, kind: str, a: object, b: object) -> None:
    node = str(a)
    if kind == "wait":
        c.run(float(a))  # type: ignore[arg-type]
    elif kind == "heal":
        c.heal()
    elif node not in c.nodes:
        return
    elif kind == "poweron":
        if not c.nodes[node].powered:
            c.poweron(node)
    elif not c.nodes[node].powered:
        return
    elif kind == "cmd":
        with contextlib.suppress(CommandRefused):
            c.command(node, str(b))
    elif kind == "poweroff":
        c.poweroff(node)
    elif kind == "cut":
        c.cut(node)
    elif kind == "fail":
        c.checker_fails(node, str(b))
    elif kind == "recover":
        c.checker_recovers(node, str(b))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 4),
    weights=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    ops=st.lists(operations, max_size=15),
    script_seconds=st.sampled_from([0.0, 0.05, 0.3]),
    drain_seconds=st.sampled_from([0.0, 0.5]),
)
def test_random_histories_never_share_a_bucket_and_converge(
    n: int,
    weights: list[int],
    ops: list[tuple[str, object, object]],
    script_seconds: float,
    drain_seconds: float,
) -> None:
    c = FarmSim(
        n,
        weights={f"n{i + 1}": w for i, w in enumerate(weights[:n])},
        seed=n,
        script_seconds=script_seconds,
        drain_seconds=drain_seconds,
    )
    c.start()
    for kind, a, b in ops:
        apply(c, kind, a, b)
        c.run(0.05)
    # heal everything, every checker recovers, every node wants the module again
    c.heal()
    for name, node in c.nodes.items():
        if not node.powered:
            c.poweron(name)
    for name in c.nodes:
        for checker in ("http", "disk"):
            c.checker_recovers(name, checker)
    c.run(3)
    for name in c.nodes:
        if c.state(name) == STOP:
            c.command(name, Verb.START)
    c.run_until(lambda: all(s == UP for s in c.states().values()), limit=20)
    c.run_until_stable()
    assert c.up_nodes() == sorted(c.nodes)
    assert len(c.owner_map()) == BUCKETS
