"""The prober's analysis (pure) and its refusal to probe outside the lab networks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakit.errors import LabError
from hakit.lab.probe import Record, _parse_answer, analyze, check_target
from hakit.lab.streams import Stream, summarize

PERIOD = 0.01


def ok(i: int, node: str, period: float = PERIOD) -> Record:
    """A success for the request sent in slot ``i`` (sent at i x period)."""
    return Record(sent=i * period, received=i * period + 0.001, node=node)


def lost(i: int, error: str = "timeout", period: float = PERIOD) -> Record:
    return Record(sent=i * period, error=error)


def test_no_loss_gives_one_period_outage_and_no_gaps() -> None:
    a = analyze([ok(i, "n1") for i in range(100)], PERIOD)
    assert (a.total, a.ok, a.failed) == (100, 100, 0)
    assert a.per_node == {"n1": 100}
    assert a.outage is not None
    assert a.outage.seconds == pytest.approx(PERIOD)
    assert a.outage.lost == 0
    assert a.gaps == []
    assert a.switches == ["n1"]
    assert a.switch_count == 0
    assert not a.interleaved


def test_failover_outage_is_first_success_after_minus_last_success_before() -> None:
    records = [ok(i, "n1") for i in range(10)]
    records += [lost(i) for i in range(10, 40)]
    records += [ok(i, "n2") for i in range(40, 60)]
    a = analyze(records, PERIOD)
    assert a.outage is not None
    assert a.outage.seconds == pytest.approx(31 * PERIOD)  # sent 9 -> sent 40
    assert (a.outage.before, a.outage.after, a.outage.lost) == ("n1", "n2", 30)
    assert a.outage.start == pytest.approx(9 * PERIOD)
    assert a.gaps == [a.outage]
    assert a.switches == ["n1", "n2"]
    assert a.switch_count == 1
    assert not a.interleaved
    assert a.errors == {"timeout": 30}
    assert (a.leading_failed, a.trailing_failed) == (0, 0)


def test_records_are_analysed_in_send_order_whatever_their_order() -> None:
    records = [ok(0, "n1"), lost(1), lost(2), ok(3, "n2")]
    assert analyze(list(reversed(records)), PERIOD) == analyze(records, PERIOD)


def test_every_gap_over_two_periods_is_listed_and_the_longest_is_the_outage() -> None:
    records = [ok(0, "n1"), lost(1), lost(2), ok(3, "n1"), lost(4), ok(5, "n1"), ok(6, "n1")]
    records += [lost(i) for i in range(7, 12)] + [ok(12, "n1")]
    a = analyze(records, PERIOD)
    assert [round(g.seconds / PERIOD) for g in a.gaps] == [3, 6]  # the 2-period gap is not one
    assert a.outage is not None
    assert a.outage.seconds == pytest.approx(6 * PERIOD)


def test_flapping_between_nodes_is_shown_in_switches_and_flagged_interleaved() -> None:
    records = [ok(0, "n1"), ok(1, "n2"), ok(2, "n1"), ok(3, "n2")]
    a = analyze(records, PERIOD)
    assert a.switches == ["n1", "n2", "n1", "n2"]
    assert a.switch_count == 3
    assert a.interleaved
    assert a.per_node == {"n1": 2, "n2": 2}


def test_switching_back_after_a_clean_failover_is_interleaved_only_if_spans_overlap() -> None:
    back = analyze([ok(0, "n1"), ok(1, "n2"), ok(2, "n2"), ok(3, "n1")], PERIOD)
    assert back.switches == ["n1", "n2", "n1"]
    assert back.interleaved  # n1 answered before and after n2: their spans overlap


def test_failures_before_first_and_after_last_success_are_counted_apart() -> None:
    records = [lost(0, "ConnectionRefusedError"), lost(1), ok(2, "n1"), ok(3, "n1"), lost(4)]
    a = analyze(records, PERIOD)
    assert (a.leading_failed, a.trailing_failed) == (2, 1)
    assert a.errors == {"ConnectionRefusedError": 1, "timeout": 2}
    assert a.outage is not None
    assert a.outage.seconds == pytest.approx(PERIOD)


def test_no_success_at_all_has_no_outage_figure() -> None:
    a = analyze([lost(i) for i in range(5)], PERIOD)
    assert (a.ok, a.failed, a.outage, a.switches) == (0, 5, None, [])
    assert (a.leading_failed, a.trailing_failed) == (5, 0)


def test_empty_run() -> None:
    a = analyze([], PERIOD)
    assert (a.total, a.first_sent, a.outage) == (0, None, None)


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["n1", "n2"])), max_size=60))
def test_counts_add_up_and_gaps_hold_the_runs_of_two_or_more_losses(
    plan: list[tuple[bool, str]],
) -> None:
    records = [ok(i, node) if success else lost(i) for i, (success, node) in enumerate(plan)]
    a = analyze(records, PERIOD)
    assert a.ok + a.failed == a.total == len(plan)
    assert sum(a.per_node.values()) == a.ok
    assert sum(a.errors.values()) == a.failed
    # runs of failures between two successes; a gap is > 2 periods, i.e. 2 or more lost
    runs, run, seen_success = [], 0, False
    for success, _node in plan:
        if success:
            if seen_success and run:
                runs.append(run)
            run, seen_success = 0, True
        else:
            run += 1
    assert [g.lost for g in a.gaps] == [r for r in runs if r >= 2]
    assert a.failed - a.leading_failed - a.trailing_failed == sum(runs)


def test_answer_parsing_takes_node_from_header_then_body() -> None:
    head = b"HTTP/1.0 200 OK\r\nX-Node: n2\r\nContent-Length: 3\r\n\r\nn1\n"
    assert _parse_answer(head) == ("n2", "")
    assert _parse_answer(b"HTTP/1.0 200 OK\r\n\r\nn1\n") == ("n1", "")
    assert _parse_answer(b"HTTP/1.0 503 Unavailable\r\n\r\n")[0] is None
    assert _parse_answer(b"") == (None, "empty answer")


@pytest.mark.parametrize("target", ["192.0.2.100:8080", "198.51.100.7:80"])
def test_targets_in_the_test_networks_are_accepted(target: str) -> None:
    host, port = check_target(target)
    assert f"{host}:{port}" == target


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:8080", "203.0.113.5:80", "192.0.3.1:80", "example.org:80", "192.0.2.1", "::1:80"],
)
def test_targets_outside_the_test_networks_are_refused(target: str) -> None:
    with pytest.raises(LabError):
        check_target(target)


def test_client_addresses_answered_by_two_nodes_are_listed() -> None:
    records = [
        Record(0.00, 0.01, "n1", source="192.0.2.200"),
        Record(0.01, 0.02, "n2", source="192.0.2.201"),
        Record(0.02, 0.03, "n1", source="192.0.2.200"),
        Record(0.03, 0.04, "n3", source="192.0.2.201"),
        Record(0.04, error="timeout", source="192.0.2.202"),
    ]

    a = analyze(records, 0.01)

    assert a.sources == 3
    assert a.split_sources == ["192.0.2.201"]


def test_stream_summary_counts_intact_broken_and_mixed_streams() -> None:
    streams = [
        Stream("192.0.2.200", {"n1"}, 50, ended=True),
        Stream("192.0.2.201", {"n2"}, 12, ended=False, error="ConnectionResetError"),
        Stream("192.0.2.202", {"n1", "n3"}, 50, ended=True),
    ]

    s = summarize(streams)

    assert (s.count, s.intact, s.broken, s.mixed) == (3, 1, 1, 1)
    assert s.per_node == {"n1": 2, "n2": 1, "n3": 1}
    assert s.errors == {"ConnectionResetError": 1}
