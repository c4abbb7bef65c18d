"""Farm module statuses inside heartbeats: to and from the JSON payload. Pure.

Farm modules travel under the payload's ``"farms"`` key (mirror modules under ``"modules"``,
:mod:`hakit.core.payload`), one entry per module::

    {"state": "UP", "member": true, "claims": "<64 hex digits>", "ver": 12,
     "acks": {"n2": [incarnation, version], "n3": [...]},
     "ctr": {"new": 120, "established": 4031, "dropped": 9}}

``claims`` is the 256-bit bitmap of the buckets whose new connections the sender's filter
accepts now (:func:`hakit.core.buckets.encode_set`). ``acks`` holds, for each peer, the
incarnation and status version of that peer's module the sender had processed when it built
this status; the receiver keeps the entry addressed to itself and turns it into
``acked_version`` (its own version if the incarnation is its current one, else -1). ``ctr``
(optional) carries the packet counters of the sender's filter, for ``hakit state`` on every
node; they are not part of the status (no version change, never seen by the machine).

Input comes from the network (authenticated, but still checked): anything malformed raises
:class:`hakit.core.payload.PayloadError` and the whole heartbeat is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hakit.core.buckets import decode_set, encode_set
from hakit.core.farm import FarmPeerStatus, FarmStatus
from hakit.core.payload import Ack, PayloadError
from hakit.model import ModuleName, NodeId, State

FarmAcks = tuple[tuple[NodeId, Ack], ...]
"""What a farm runner publishes with its status: per peer, the peer status it processed."""


def encode(
    statuses: Mapping[ModuleName, FarmStatus],
    acks: Mapping[ModuleName, FarmAcks],
    counters: Mapping[ModuleName, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    farms: dict[str, Any] = {}
    for name, st in statuses.items():
        farms[name] = {
            "state": st.state.value,
            "member": st.member,
            "claims": encode_set(st.claims),
            "ver": st.version,
            "acks": {node: [a.incarnation, a.version] for node, a in acks.get(name, ())},
        }
        if counters and counters.get(name):
            farms[name]["ctr"] = dict(counters[name])
    return {"farms": farms}


def decode_counters(payload: Mapping[str, Any]) -> dict[ModuleName, dict[str, int]]:
    """The packet counters each farm entry carries (display only; bad values are skipped)."""
    out: dict[ModuleName, dict[str, int]] = {}
    farms = payload.get("farms", {})
    if not isinstance(farms, dict):
        return out
    for name, entry in farms.items():
        ctr = entry.get("ctr") if isinstance(entry, dict) else None
        if isinstance(ctr, dict):
            out[ModuleName(name)] = {
                str(k)[:32]: v for k, v in list(ctr.items())[:16] if _is_int(v) and v >= 0
            }
    return out


def decode(
    payload: Mapping[str, Any], sender: NodeId, me: NodeId, my_incarnation: int
) -> dict[ModuleName, tuple[FarmPeerStatus, int]]:
    """Each farm module's status from ``sender``, with the sender's version (to acknowledge)."""
    farms = payload.get("farms", {})
    if not isinstance(farms, dict):
        raise PayloadError("farms: expected an object")
    out: dict[ModuleName, tuple[FarmPeerStatus, int]] = {}
    for name, entry in farms.items():
        if not isinstance(entry, dict):
            raise PayloadError(f"farms.{name}: expected an object")
        try:
            state = State(str(entry.get("state")))
        except ValueError as exc:
            raise PayloadError(f"farms.{name}.state: unknown state") from exc
        member, version = entry.get("member"), entry.get("ver")
        if not isinstance(member, bool) or not isinstance(version, int) or _is_bool(version):
            raise PayloadError(f"farms.{name}: member (bool) and ver (int) expected")
        claims_text = entry.get("claims")
        if not isinstance(claims_text, str):
            raise PayloadError(f"farms.{name}.claims: expected a string")
        try:
            claims = decode_set(claims_text)
        except ValueError as exc:
            raise PayloadError(f"farms.{name}.claims: {exc}") from exc
        acks = entry.get("acks")
        if not isinstance(acks, dict):
            raise PayloadError(f"farms.{name}.acks: expected an object")
        mine = acks.get(me)
        acked = -1
        if mine is not None:
            if not (isinstance(mine, list) and len(mine) == 2 and all(_is_int(a) for a in mine)):
                raise PayloadError(f"farms.{name}.acks.{me}: expected [incarnation, version]")
            acked = mine[1] if mine[0] == my_incarnation else -1
        status = FarmPeerStatus(
            node=sender,
            state=state,
            member=member,
            claims=claims,
            version=version,
            acked_version=acked,
        )
        out[ModuleName(name)] = (status, version)
    return out


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
