"""Module statuses inside heartbeats: to and from the JSON payload of an envelope. Pure.

Each module entry carries this node's status and an *acknowledgement*: the incarnation and
status version of the peer's module that this node last processed. The receiver turns the
acknowledgement into ``acked_version`` (its own version if the incarnation is its current one,
else -1): see :class:`hakit.core.events.PeerModuleStatus`.

Replicated modules add their data record, each key only when it differs from its default (so
the entries of other modules are unchanged): ``"data"`` a one-letter code (``u`` up to date,
``o`` outdated, ``r`` resyncing; absent: unknown), ``"gen"`` the generation (absent: 0),
``"alone"`` true if it ran alone, ``"sync"`` true if it is primary with an in-sync secondary.

Input comes from the network (authenticated, but still checked): anything malformed raises
:class:`PayloadError` and the whole heartbeat is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from hakit.core.events import PeerModuleStatus
from hakit.core.freshness import DataState
from hakit.core.mirror import Status
from hakit.model import ModuleName, NodeId, State

T = TypeVar("T")


_DATA_CODES = {DataState.UPTODATE: "u", DataState.OUTDATED: "o", DataState.RESYNCING: "r"}
_DATA_STATES = {code: state for state, code in _DATA_CODES.items()}


class PayloadError(ValueError):
    """A heartbeat payload that does not have the expected shape."""


@dataclass(frozen=True)
class Ack:
    """The peer's module status this node last processed: (peer incarnation, version)."""

    incarnation: int = -1
    version: int = -1


def encode(statuses: Mapping[ModuleName, Status], acks: Mapping[ModuleName, Ack]) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    for name, st in statuses.items():
        ack = acks.get(name, Ack())
        modules[name] = {
            "state": st.state.value,
            "claims": st.claims_primary,
            "epoch": st.epoch,
            "pepoch": st.primary_epoch,
            "handover": st.handover,
            "swap": st.swap_request,
            "ver": st.version,
            "ack": [ack.incarnation, ack.version],
        }
        entry = modules[name]
        if st.data != DataState.UNKNOWN:
            entry["data"] = _DATA_CODES[st.data]
        if st.generation:
            entry["gen"] = st.generation
        if st.ran_alone:
            entry["alone"] = True
        if st.in_sync:
            entry["sync"] = True
        if st.lease:
            entry["lease"] = dict(st.lease)
    return {"modules": modules}


@dataclass(frozen=True)
class Received:
    """One module's entry of a peer's heartbeat, decoded."""

    status: PeerModuleStatus
    version: int  # the peer's status version (to acknowledge back)


def decode(
    payload: Mapping[str, Any], sender: NodeId, my_incarnation: int
) -> dict[ModuleName, Received]:
    modules = payload.get("modules")
    if not isinstance(modules, dict):
        raise PayloadError("modules: expected an object")
    out: dict[ModuleName, Received] = {}
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            raise PayloadError(f"modules.{name}: expected an object")
        try:
            state = State(_get(entry, "state", str))
        except ValueError as exc:
            raise PayloadError(f"modules.{name}.state: unknown state") from exc
        ack = entry.get("ack")
        if not (isinstance(ack, list) and len(ack) == 2 and all(_is_int(a) for a in ack)):
            raise PayloadError(f"modules.{name}.ack: expected [incarnation, version]")
        status = PeerModuleStatus(
            node=sender,
            state=state,
            claims_primary=_get(entry, "claims", bool),
            epoch=_get(entry, "epoch", int),
            primary_epoch=_get(entry, "pepoch", int),
            handover=_get(entry, "handover", bool),
            swap_request=_get(entry, "swap", bool),
            acked_version=ack[1] if ack[0] == my_incarnation else -1,
            data=_data_state(entry),
            generation=_get(entry, "gen", int, 0),
            ran_alone=_get(entry, "alone", bool, False),
            in_sync=_get(entry, "sync", bool, False),
            lease=_lease(entry),
        )
        out[ModuleName(name)] = Received(status, _get(entry, "ver", int))
    return out


def _lease(entry: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    value = entry.get("lease", {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and _is_int(t) for k, t in value.items()
    ):
        raise PayloadError("lease: expected an object of issuer -> term")
    return tuple(sorted(value.items()))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _data_state(entry: Mapping[str, Any]) -> DataState:
    code = entry.get("data")
    if code is None:
        return DataState.UNKNOWN
    if not isinstance(code, str) or code not in _DATA_STATES:
        raise PayloadError("data: expected one of " + ", ".join(sorted(_DATA_STATES)))
    return _DATA_STATES[code]


def _get(entry: Mapping[str, Any], key: str, kind: type[T], default: T | None = None) -> T:
    """``entry[key]`` of type ``kind``; absent → ``default`` if one is given."""
    value = entry.get(key)
    if value is None and default is not None:
        return default
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise PayloadError(f"{key}: expected {kind.__name__}")
    return value  # type: ignore[return-value]
