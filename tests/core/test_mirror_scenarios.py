"""Mirror module scenarios on the simulated two-node cluster (see sim.py).

Every run also checks the safety invariant after each 10 ms step: while the nodes hear each
other, at most one of them runs the application or holds the VIP.
"""

from __future__ import annotations

import pytest

from hakit.core.events import CheckerAction, Verb
from hakit.core.mirror import CommandRefused
from hakit.model import State

from .sim import SimCluster

P, S, A, W, STOP = State.PRIM, State.SECOND, State.ALONE, State.WAIT, State.STOP


def started_pair(**opts: object) -> SimCluster:
    c = SimCluster({"app": dict(opts)})
    c.start_both()
    c.run_until(lambda: sorted(c.states()) == [P, S])
    c.run(1.0)  # both have heard the other's latest status
    return c


def primary(c: SimCluster) -> str:
    return "n1" if c.state("n1") in (P, A) else "n2"


def other(node: str) -> str:
    return "n2" if node == "n1" else "n1"


def test_start_without_peer_becomes_alone_after_startup_wait() -> None:
    c = SimCluster()
    c.poweroff("n2")
    c.command("n1", Verb.START)
    took = c.run_until(lambda: c.state("n1") == A)
    assert 3.0 <= took <= 3.6
    assert c.serving() == ["n1"]


def test_both_start_at_the_same_instant_gives_exactly_one_primary() -> None:
    c = SimCluster()
    c.start_both()
    c.run_until(lambda: sorted(c.states()) == [P, S], limit=5)
    c.run(10)
    assert sorted(c.states()) == [P, S]
    assert c.serving() == [primary(c)]


def test_election_prefers_the_preferred_node() -> None:
    c = SimCluster({"app": {"preferred": "n2"}})
    c.start_both()
    c.run_until(lambda: c.states() == (S, P), limit=5)


def test_second_node_started_later_joins_as_secondary() -> None:
    c = SimCluster()
    c.command("n1", Verb.START)
    c.run_until(lambda: c.state("n1") == A)
    c.command("n2", Verb.START)
    c.run_until(lambda: c.states() == (P, S), limit=3)


def test_secondary_takes_over_when_primary_powers_off() -> None:
    c = started_pair()
    p = primary(c)
    c.run(1.3)
    c.poweroff(p)
    took = c.run_until(lambda: c.state(other(p)) == A)
    assert 3.0 <= took <= 4.0  # timeout + stop_second + start_prim
    assert c.serving() == [other(p)]


def test_primary_goes_alone_when_secondary_is_lost_and_keeps_serving() -> None:
    c = started_pair()
    p = primary(c)
    c.poweroff(other(p))
    c.run_until(lambda: c.state(p) == A)
    assert c.serving() == [p]


def test_powered_on_node_rejoins_as_secondary() -> None:
    c = started_pair()
    p = primary(c)
    c.poweroff(p)
    c.run_until(lambda: c.state(other(p)) == A)
    c.poweron(p)
    c.run_until(lambda: c.state(p) == S and c.state(other(p)) == P, limit=8)


def test_clean_stop_of_primary_hands_over_to_secondary() -> None:
    c = started_pair()
    p = primary(c)
    c.command(p, Verb.STOP)
    took = c.run_until(lambda: c.state(p) == STOP and c.state(other(p)) == A)
    assert took < 2.0  # no heartbeat timeout involved
    assert c.nodes[p].modules["app"].durable.wanted is False  # type: ignore[index]


def test_swap_stops_on_primary_before_starting_on_secondary() -> None:
    c = started_pair()
    p = primary(c)
    c.command(p, Verb.SWAP)
    c.run_until(lambda: c.state(p) == S and c.state(other(p)) == P, limit=5)
    # and back, asked from the secondary this time
    c.command(p, Verb.SWAP)
    c.run_until(lambda: c.state(p) == P and c.state(other(p)) == S, limit=5)


def test_second_on_primary_hands_over() -> None:
    c = started_pair()
    p = primary(c)
    c.command(p, Verb.SECOND)
    c.run_until(lambda: c.state(p) == S and c.state(other(p)) == P, limit=5)


def test_prim_refused_while_peer_is_primary_and_accepted_in_wait() -> None:
    c = started_pair()
    p = primary(c)
    with pytest.raises(CommandRefused, match="swap"):
        c.command(other(p), Verb.PRIM)
    solo = SimCluster({"app": {"failover": False}})
    solo.poweroff("n2")
    solo.command("n1", Verb.START)
    solo.run(6)
    assert solo.state("n1") == W  # failover off: never primary without the peer
    solo.command("n1", Verb.PRIM)
    solo.run_until(lambda: solo.state("n1") == A, limit=2)


def test_restart_runs_stop_prim_then_start_prim_without_failover() -> None:
    c = started_pair()
    p = primary(c)
    seen: list[tuple[State, State]] = []
    c.on_step.append(lambda cl: seen.append(cl.states()))
    c.command(p, Verb.RESTART)
    c.run_until(lambda: c.state(p) == P and len(seen) > 10, limit=5)
    assert all(s[0 if p == "n1" else 1] != S for s in seen)
    assert c.state(other(p)) == S
    assert c.nodes[p].modules["app"].vip  # type: ignore[index]


def test_stopstart_on_primary_moves_the_module_to_the_other_node() -> None:
    c = started_pair()
    p = primary(c)
    c.command(p, Verb.STOPSTART)
    c.run_until(lambda: c.state(p) == S and c.state(other(p)) == P, limit=8)


def test_failover_off_makes_secondary_wait_instead_of_taking_over() -> None:
    c = started_pair(failover=False)
    p = primary(c)
    c.poweroff(p)
    c.run(8)
    assert c.state(other(p)) == W
    assert c.serving() == []
    c.poweron(p)
    c.run_until(lambda: sorted(c.states()) == [P, S], limit=8)


def test_preferred_primary_fails_back_after_rejoin_when_enabled() -> None:
    c = started_pair(preferred="n1", failback=True)
    assert c.states() == (P, S)
    c.poweroff("n1")
    c.run_until(lambda: c.state("n2") == A)
    c.poweron("n1")
    c.run_until(lambda: c.states() == (P, S), limit=10)


def test_no_failback_by_default() -> None:
    c = started_pair(preferred="n1")
    c.poweroff("n1")
    c.run_until(lambda: c.state("n2") == A)
    c.poweron("n1")
    c.run_until(lambda: c.states() == (S, P), limit=10)
    c.run(10)
    assert c.states() == (S, P)


def test_checker_restarts_locally_then_fails_over() -> None:
    c = started_pair(max_restarts=2)
    p = primary(c)
    for _ in range(2):
        c.checker_fails(p, CheckerAction.RESTART)
        c.run_until(lambda: c.state(p) == P, limit=3)
        assert c.state(other(p)) == S
    c.checker_fails(p, CheckerAction.RESTART)
    c.run_until(lambda: c.state(p) == S and c.state(other(p)) == P, limit=5)


def test_loop_guard_stops_after_too_many_automatic_actions() -> None:
    c = started_pair(max_restarts=10, guard_max=3)
    p = primary(c)
    for _ in range(3):
        c.checker_fails(p, CheckerAction.RESTART)
        c.run_until(lambda: c.state(p) == P, limit=3)
    c.checker_fails(p, CheckerAction.RESTART)
    c.run_until(lambda: c.state(p) == STOP, limit=3)
    assert "loop guard" in c.nodes[p].modules["app"].machine.reason  # type: ignore[index]
    c.run_until(lambda: c.state(other(p)) == A, limit=3)  # the peer takes over


def test_failing_start_prim_stops_the_module_and_the_peer_takes_over() -> None:
    c = SimCluster()
    c.fail_script("n1", "app", "start_prim")
    c.fail_script("n2", "app", "start_prim")
    c.start_both()
    c.run(10)
    assert c.states() == (STOP, STOP)  # defined end state, reason kept
    assert "start_prim failed" in c.nodes["n1"].modules["app"].machine.reason  # type: ignore[index]


def test_hung_script_timeout_is_a_failure_with_a_defined_state() -> None:
    c = SimCluster()
    c.fail_script("n1", "app", "prestart")
    c.script_seconds[("n1", "app", "prestart")] = 5.0  # killed at its timeout: reported failed
    c.start_both()
    c.run_until(lambda: c.states() == (STOP, A), limit=12)


def test_cut_without_arbitration_makes_both_alone_then_former_primary_stays() -> None:
    """Documented behaviour until arbitration exists: split brain while cut, resolved on heal."""
    c = started_pair()
    p = primary(c)
    c.cut(other(p))
    c.run_until(lambda: c.states() == (A, A))
    c.heal()
    c.run_until(lambda: c.state(p) == P and c.state(other(p)) == S, limit=6)


def test_two_modules_with_opposite_primaries() -> None:
    c = SimCluster({"a": {"preferred": "n1"}, "b": {"preferred": "n2"}})
    c.start_both("a")
    c.start_both("b")
    c.run_until(lambda: c.states("a") == (P, S) and c.states("b") == (S, P), limit=5)
    c.poweroff("n1")
    c.run_until(lambda: c.states("a")[1] == A and c.states("b")[1] == A)


def test_stop_during_a_running_script_applies_when_it_ends() -> None:
    c = SimCluster()
    c.script_seconds[("n1", "app", "prestart")] = 1.0
    c.command("n1", Verb.START)
    with pytest.raises(CommandRefused, match="busy"):
        c.command("n1", Verb.SWAP)
    c.command("n1", Verb.STOP)
    c.run_until(lambda: c.state("n1") == STOP, limit=3)


def test_fast_profile_takes_over_within_a_second() -> None:
    c = SimCluster(interval=0.1, timeout=0.5, script_seconds=0.1)
    c.start_both()
    c.run_until(lambda: sorted(c.states()) == [P, S], limit=3)
    p = primary(c)
    c.poweroff(p)
    took = c.run_until(lambda: c.state(other(p)) == A)
    assert took < 1.0
