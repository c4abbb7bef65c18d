"""Heartbeat payload decoding (network input) and the durable store."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakit.agent.store import Store
from hakit.core import payload
from hakit.core.mirror import Durable, MirrorMachine, MirrorSettings
from hakit.model import ModuleName, NodeId, State


def _status_body(ack: list[int]) -> dict[str, object]:
    machine = MirrorMachine(MirrorSettings(node=NodeId("n1"), peer=NodeId("n2")))
    return payload.encode(
        {ModuleName("app"): machine.status()}, {ModuleName("app"): payload.Ack(*ack)}
    )


def test_round_trip_turns_the_ack_into_our_version_only_for_our_incarnation() -> None:
    body = _status_body([7, 3])
    mine = payload.decode(body, NodeId("n1"), my_incarnation=7)[ModuleName("app")]
    assert mine.status.acked_version == 3
    assert mine.status.state == State.STOP
    other = payload.decode(body, NodeId("n1"), my_incarnation=8)[ModuleName("app")]
    assert other.status.acked_version == -1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("state", "BOGUS"),
        ("claims", 1),
        ("epoch", True),
        ("epoch", "1"),
        ("ack", [1]),
        ("ver", None),
    ],
)
def test_malformed_entries_raise_payload_error(field: str, value: object) -> None:
    body = _status_body([1, 1])
    body["modules"]["app"][field] = value  # type: ignore[index]
    with pytest.raises(payload.PayloadError):
        payload.decode(body, NodeId("n1"), 1)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_arbitrary_json_only_raises_payload_error(data: object) -> None:
    with contextlib.suppress(payload.PayloadError):
        payload.decode({"modules": data}, NodeId("n1"), 1)


def test_store_round_trips_records_and_bumps_incarnation(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    assert store.load_module("app") == Durable()
    record = Durable(wanted=True, state=State.PRIM, epoch=4, primary_epoch=4)
    store.save_module("app", record)
    assert Store(tmp_path / "state").load_module("app") == record
    assert [store.next_incarnation() for _ in range(3)] == [1, 2, 3]
    assert not list((tmp_path / "state").rglob(".*.tmp"))


def test_damaged_record_starts_from_stop(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "app.json").write_text(json.dumps({"wanted": True}))
    assert store.load_module("app") == Durable()
