"""Farm statuses in heartbeats: they survive the trip, the acknowledgement addressed to the
receiver is the one it gets, and malformed entries drop the heartbeat."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakit.core import farm_payload
from hakit.core.farm import FarmStatus
from hakit.core.payload import Ack, PayloadError
from hakit.model import ModuleName, NodeId, State

WEB = ModuleName("web")


def status(claims: frozenset[int], version: int = 7, state: State = State.UP) -> FarmStatus:
    return FarmStatus(state, True, claims, frozenset(), "UP", True, version, False)


@given(
    claims=st.frozensets(st.integers(0, 255)),
    version=st.integers(0, 2**40),
    incarnation=st.integers(0, 2**31),
)
def test_a_status_comes_back_as_sent_with_the_receivers_acknowledgement(
    claims: frozenset[int], version: int, incarnation: int
) -> None:
    acks = ((NodeId("n2"), Ack(incarnation, 3)), (NodeId("n3"), Ack(5, 9)))
    body = farm_payload.encode({WEB: status(claims, version)}, {WEB: acks})

    got = farm_payload.decode(body, NodeId("n1"), NodeId("n2"), incarnation)

    peer, sent_version = got[WEB]
    assert (peer.node, peer.state, peer.member, peer.claims) == ("n1", State.UP, True, claims)
    assert peer.version == sent_version == version
    assert peer.acked_version == 3


def test_an_acknowledgement_of_an_older_incarnation_or_none_is_minus_one() -> None:
    body = farm_payload.encode({WEB: status(frozenset({1}))}, {WEB: ((NodeId("n2"), Ack(4, 3)),)})

    assert farm_payload.decode(body, NodeId("n1"), NodeId("n2"), 5)[WEB][0].acked_version == -1
    assert farm_payload.decode(body, NodeId("n1"), NodeId("n3"), 4)[WEB][0].acked_version == -1


def test_a_payload_without_farms_has_none() -> None:
    assert farm_payload.decode({"modules": {}}, NodeId("n1"), NodeId("n2"), 1) == {}


def good() -> dict[str, Any]:
    body = farm_payload.encode({WEB: status(frozenset({3}))}, {WEB: ()})
    entry: dict[str, Any] = body["farms"]["web"]
    return entry


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("state", "RUNNING"),
        ("member", 1),
        ("ver", True),
        ("ver", "7"),
        ("claims", "zz"),
        ("claims", "0" * 63),
        ("claims", None),
        ("acks", []),
    ],
)
def test_a_malformed_entry_drops_the_heartbeat(key: str, value: object) -> None:
    entry = good() | {key: value}

    with pytest.raises(PayloadError):
        farm_payload.decode({"farms": {"web": entry}}, NodeId("n1"), NodeId("n2"), 1)


def test_a_malformed_acknowledgement_for_me_drops_the_heartbeat() -> None:
    entry = good() | {"acks": {"n2": [1]}}

    with pytest.raises(PayloadError):
        farm_payload.decode({"farms": {"web": entry}}, NodeId("n1"), NodeId("n2"), 1)


def test_packet_counters_ride_along_for_display_and_bad_ones_are_skipped() -> None:
    body = farm_payload.encode(
        {WEB: status(frozenset({1}))}, {WEB: ()}, {WEB: {"new": 5, "dropped": 2}}
    )

    assert farm_payload.decode_counters(body) == {WEB: {"new": 5, "dropped": 2}}
    body["farms"]["web"]["ctr"] = {"new": -1, "x": "y", "ok": 3}
    assert farm_payload.decode_counters(body) == {WEB: {"ok": 3}}
    assert farm_payload.decode_counters({"farms": []}) == {}
