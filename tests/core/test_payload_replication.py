"""Heartbeat payload: the data record of replicated modules, and nothing new for the others."""

from __future__ import annotations

import pytest

from hakit.core import payload
from hakit.core.freshness import DataRecord, DataState
from hakit.core.mirror import MirrorMachine, MirrorSettings
from hakit.model import ModuleName, NodeId

APP = ModuleName("app")


def _encode(machine: MirrorMachine) -> dict[str, object]:
    return payload.encode({APP: machine.status()}, {APP: payload.Ack(1, 0)})


def test_non_replicated_entries_carry_no_data_keys() -> None:
    body = _encode(MirrorMachine(MirrorSettings(node=NodeId("n1"), peer=NodeId("n2"))))
    entry = body["modules"][APP]  # type: ignore[index]
    assert set(entry) == {"state", "claims", "epoch", "pepoch", "handover", "swap", "ver", "ack"}


def test_data_record_round_trips_compactly() -> None:
    settings = MirrorSettings(node=NodeId("n1"), peer=NodeId("n2"), replicated=True)
    record = DataRecord(DataState.UPTODATE, 7, ran_alone=True)
    body = _encode(MirrorMachine(settings, data=record))
    entry = body["modules"][APP]  # type: ignore[index]
    assert (entry["data"], entry["gen"], entry["alone"]) == ("u", 7, True)
    assert "sync" not in entry
    status = payload.decode(body, NodeId("n1"), 1)[APP].status
    assert status.record == record
    assert status.in_sync is False


@pytest.mark.parametrize(("key", "value"), [("data", "x"), ("data", 1), ("gen", "7"), ("sync", 1)])
def test_malformed_data_fields_raise_payload_error(key: str, value: object) -> None:
    body = _encode(MirrorMachine(MirrorSettings(node=NodeId("n1"), peer=NodeId("n2"))))
    body["modules"][APP][key] = value  # type: ignore[index]
    with pytest.raises(payload.PayloadError):
        payload.decode(body, NodeId("n1"), 1)
