"""The state table of `hakit state`: a farm row shows the share, the members and counters."""

from __future__ import annotations

import io

from rich.console import Console

from hakit.cli import farm_cells, state_table


def farm_view() -> dict[str, object]:
    return {
        "mode": "farm",
        "state": "UP",
        "colour": "green",
        "reason": "UP 86/256: members n1 n2 n3",
        "since": 0,
        "farm": {
            "buckets": 86,
            "shares": {"n1": 86, "n2": 85, "n3": 85},
            "arp": True,
            "counters": {"new": 12, "dropped": 30},
            "node_counters": {
                "n1": {"new": 12, "established": 50, "dropped": 30},
                "n2": {"new": 9, "established": 40, "dropped": 33},
                "n3": {},
            },
        },
    }


def test_a_farm_row_shows_share_members_and_packet_counters() -> None:
    state, _since, members, packets, reason = farm_cells(farm_view())

    assert "UP 86/256" in state and "answers ARP" in state
    assert members == "members n1:86 n2:85 n3:85"
    assert packets.splitlines() == [
        "n1: new 12, est 50, drop 30",
        "n2: new 9, est 40, drop 33",
    ]
    assert reason.startswith("UP 86/256")


def test_the_table_renders_farm_and_mirror_rows_together() -> None:
    mirror = {"state": "PRIM", "colour": "green", "reason": "in sync", "peer": "n2"}
    out = io.StringIO()
    Console(file=out, width=200).print(
        state_table("n1", {"web": farm_view(), "db": mirror}, {"n2": {"alive": True}})
    )

    text = out.getvalue()
    assert "UP 86/256" in text and "PRIM" in text and "members n1:86" in text


def test_a_mirror_row_shows_whether_the_node_holds_the_arbiters_lease() -> None:
    mirror = {
        "state": "PRIM",
        "colour": "green",
        "reason": "n2 is SECOND",
        "since": 0,
        "peer": "n2",
        "peer_state": "SECOND",
        "arbitration": {"lease": True, "term": 6, "valid_for": 2.1, "arbiters": {}},
    }
    waiting = {**mirror, "state": "WAIT", "arbitration": {"lease": False, "term": 0}}
    out = io.StringIO()
    Console(file=out, width=200).print(state_table("n1", {"a": mirror, "b": waiting}, {}))
    text = out.getvalue()
    assert "lease (term 6)" in text and "no lease" in text
