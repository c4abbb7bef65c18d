"""The chaos checker's pure parts: lost and unexpected records, dual primaries seen by the
client and in agent logs, and the seeded schedule."""

from __future__ import annotations

from hakit.lab.chaos import KINDS, _stamp, analyze, dual_from_logs, flips, schedule


def req(i: int, kind: str, ok: bool, node: str = "n1", at: float = 0.0) -> dict[str, object]:
    return {"id": i, "kind": kind, "ok": ok, "node": node, "t0": at, "t1": at, "acked_at": at}


def test_lost_and_unexpected_records_are_found_per_kind() -> None:
    requests = [req(0, "append", True), req(1, "sqlite", True), req(2, "append", False)]
    lost, unexpected, _ = analyze(requests, ["rec-0", "rec-2", "rec-9", "rec-0"], [])
    assert lost == ["sqlite rec-1 (acknowledged by n1)"]
    assert unexpected == ["append rec-9: never sent", "append rec-0: twice"]
    assert analyze(requests, ["rec-0"], ["rec-1"])[:2] == ([], [])  # unacked may be missing


def test_a_quick_return_to_the_first_node_is_a_dual_primary_but_a_failover_is_not() -> None:
    failover = [req(i, "append", True, "n1" if i < 5 else "n2", at=i * 0.1) for i in range(10)]
    assert flips(failover) == []
    mixed = [*failover, req(99, "append", True, "n1", at=0.75)]
    assert len(flips(mixed)) == 2  # n1, n2, n1 and n2, n1, n2
    back_later = [*failover, req(99, "append", True, "n1", at=5.0)]
    assert flips(back_later) == []  # a switch back seconds later (swap) is legitimate


def _line(t: str, move: str) -> str:
    return f"2026-11-23 10:00:{t} INFO hakit.agent.runner_base: module m: {move} (why)"


def test_overlapping_primary_periods_in_the_logs_count_unless_the_node_was_paused() -> None:
    logs = {
        "n1": [_line("01,000", "WAIT -> ALONE"), _line("05,000", "ALONE -> STOPPING_PRIM")],
        "n2": [_line("03,000", "SECOND -> ALONE"), _line("09,000", "ALONE -> PRIM")],
    }
    assert len(dual_from_logs(logs, [], [])) == 1
    start = _stamp(logs["n1"][0])
    assert start is not None
    # n1 paused at second 02 (it fenced at 05, once resumed): its period ends at 02
    assert dual_from_logs(logs, [("n1", start + 1.0, start + 3.5)], []) == []
    assert dual_from_logs(logs, [], [("n1", start + 1.0)]) == []  # powered off at 02


def test_the_schedule_is_reproducible_and_covers_every_kind() -> None:
    assert schedule(7, 20) == schedule(7, 20)
    assert schedule(7, 20) != schedule(8, 20)
    assert {k for k, _, _ in schedule(3, len(KINDS))} == set(KINDS)
    assert all(1.0 <= hold <= 3.0 for _, _, hold in schedule(3, 30))


def test_log_lines_stamped_during_a_clock_jump_are_put_back_at_their_real_time() -> None:
    # n1 is ALONE from 10:00:01 to 10:00:05. n2's wall clock was an hour ahead from real
    # 10:00:00 to 10:00:09: its line stamped 11:00:03 was written at 10:00:03 (an overlap);
    # the line before it, 10:00:00, was written before the jump
    logs = {
        "n1": [_line("01,000", "WAIT -> ALONE"), _line("05,000", "ALONE -> STOPPING_PRIM")],
        "n2": [
            _line("00,000", "STARTING_SECOND -> SECOND"),
            _line("03,000", "SECOND -> ALONE").replace(" 10:00:", " 11:00:"),
        ],
    }
    start = _stamp(logs["n1"][0])
    assert start is not None
    assert dual_from_logs(logs, [], []) == []  # taken as written, an hour later: no overlap
    found = dual_from_logs(logs, [], [], [("n2", start - 1, start + 8, 3600.0)])
    assert len(found) == 1
    # a later real line inside the stamp window of an earlier jump stays where it is
    later = {**logs, "n2": [*logs["n2"], _line("59,000", "ALONE -> STOPPING_PRIM")]}
    jump_before = [("n2", start - 3601, start - 3592, 3600.0), ("n2", start - 1, start + 8, 3600.0)]
    assert len(dual_from_logs(later, [], [], jump_before)) == 1


def test_a_pause_or_power_off_before_a_period_does_not_end_it() -> None:
    logs = {
        "n1": [_line("05,000", "WAIT -> ALONE"), _line("06,000", "ALONE -> STOPPING_PRIM")],
        "n2": [_line("08,000", "SECOND -> ALONE")],
    }
    start = _stamp(logs["n1"][0])
    assert start is not None
    # n1 was powered off at second 01, long before its period 05-06: the period still ends
    # at 06, and does not overlap n2's from 08
    assert dual_from_logs(logs, [], [("n1", start - 4.0)]) == []
