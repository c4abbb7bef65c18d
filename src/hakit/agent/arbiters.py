"""The arbiters of one mirror module on this node: clients built from ``[arbitration]``.

Each client answers :meth:`Arbiter.request` with ``(send time, answer)`` or None (no answer in
time); the runner turns answers into :class:`hakit.core.events.ArbiterAnswered` events. Names
are those of :attr:`hakit.config.ArbitrationConfig.arbiters` ("ADDRESS:PORT" per witness,
"etcd" for the etcd cluster), the same the machine's :class:`ArbitrationSettings` lists.
"""

from __future__ import annotations

import logging
from typing import Protocol

from hakit.config import Config, Module
from hakit.core.arbitration import ArbitrationSettings
from hakit.core.lease import Answer

log = logging.getLogger(__name__)


class Arbiter(Protocol):
    name: str

    async def request(
        self, op: str, term: int, alone: int = 0, synced: int = 0
    ) -> tuple[float, Answer] | None: ...


def settings(config: Config) -> ArbitrationSettings:
    """The machine's view of ``[arbitration]`` (silence: half the heartbeat timeout)."""
    a = config.cluster.arbitration
    return ArbitrationSettings(
        arbiters=tuple(a.arbiters),
        duration=a.lease,
        margin=a.margin,
        renew=a.renew,
        retry=min(0.25, a.renew),
        silence=config.cluster.heartbeat.timeout / 2,
    )


def clients(config: Config, node: str, module: Module, incarnation: int) -> dict[str, Arbiter]:
    """One client per arbiter for ``module`` (empty without arbiters)."""
    a = config.cluster.arbitration
    out: dict[str, Arbiter] = {}
    if a.etcd:
        from hakit.net.etcd_arbiter import EtcdArbiter  # noqa: PLC0415 (only when configured)

        out["etcd"] = EtcdArbiter(
            list(a.etcd),
            config.cluster.name,
            node,
            module.name,
            duration=a.lease,
            timeout=a.timeout,
        )
        return out
    from hakit.net.witness import WitnessClient  # noqa: PLC0415

    for w in a.witnesses:
        host, _, port = w.rpartition(":")
        out[w] = WitnessClient(
            config.key(),
            config.cluster.name,
            node,
            (host, int(port)),
            module.name,
            incarnation,
            timeout=a.timeout,
        )
    return out
