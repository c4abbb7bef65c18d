"""Does the largest heartbeat a node can send fit in one datagram? (checked at start-up and by
``hakit config check``)

A heartbeat carries every module the node runs. Its largest form is built with the real
encoders from worst-case values (the longest state names, 2^40 versions, every bucket claimed,
an acknowledgement for every peer of every farm module) and signed as :mod:`hakit.net.wire`
would sign it; the farm modules' packet counters are left out, since the agent drops them when
a heartbeat would not fit.
"""

from __future__ import annotations

from hakit.config import Config
from hakit.core import farm_payload, payload
from hakit.core.farm import FarmStatus
from hakit.core.freshness import DataState
from hakit.core.mirror import Status
from hakit.model import ModuleName, NodeId, State
from hakit.net.wire import MAX_DATAGRAM, Envelope, encoded_size

_BIG = 2**40


def largest_heartbeat(config: Config, node: str) -> int:
    """Size in bytes of the largest heartbeat ``node`` can send (may exceed the limit)."""
    mirrors: dict[ModuleName, Status] = {}
    farms: dict[ModuleName, FarmStatus] = {}
    farm_acks: dict[ModuleName, farm_payload.FarmAcks] = {}
    for name, module in config.modules.items():
        if node not in module.nodes:
            continue
        if module.farm:
            farms[ModuleName(name)] = FarmStatus(
                State.STOPPING, True, frozenset(range(256)), frozenset(), "", True, _BIG, True
            )
            farm_acks[ModuleName(name)] = tuple(
                (NodeId(n), payload.Ack(2**31, _BIG)) for n in module.nodes if n != node
            )
        else:
            mirrors[ModuleName(name)] = Status(
                State.STOPPING_SECOND, True, _BIG, _BIG, True, True, "", True, _BIG,
                DataState.RESYNCING, _BIG, True, True,
            )  # fmt: skip
    acks = {name: payload.Ack(2**31, _BIG) for name in mirrors}
    body = payload.encode(mirrors, acks) | farm_payload.encode(farms, farm_acks)
    return encoded_size(Envelope(config.cluster.name, node, 2**31, _BIG, body))


def heartbeat_problems(config: Config) -> list[str]:
    """One sentence per node whose largest heartbeat would not fit in a datagram."""
    out = []
    for node in sorted(config.cluster.nodes):
        size = largest_heartbeat(config, node)
        if size > MAX_DATAGRAM:
            out.append(
                f"node {node}: its heartbeat can reach {size} bytes, over the {MAX_DATAGRAM}-byte "
                "datagram limit — run fewer modules on it, or fewer nodes per farm module"
            )
    return out
