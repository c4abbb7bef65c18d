"""Inputs of the pure core: what happened, as data. The driver creates them; the core reads them.

Time is never read by the core: every call to a machine's ``step`` carries ``now`` (seconds on
the driver's monotonic clock, or a simulated clock in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hakit.core.freshness import DataRecord, DataState
from hakit.core.lease import Answer
from hakit.model import NodeId, State


class Verb(StrEnum):
    """Operator commands on a module (`hakit VERB -m MODULE`)."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"  # stop_prim + start_prim on the primary, no failover
    STOPSTART = "stopstart"  # stop the module (handing over), then start it again
    SWAP = "swap"  # primary and secondary exchange roles
    PRIM = "prim"  # start, or switch, as primary
    SECOND = "second"  # start, or switch, as secondary


class CheckerAction(StrEnum):
    """What a failing checker asks for."""

    RESTART = "restart"  # restart locally (up to max_restarts), then fail over
    FAILOVER = "failover"  # hand the module over to the secondary
    STOP = "stop"  # stop the module on this node


@dataclass(frozen=True)
class PeerModuleStatus:
    """The peer's view of one module, as carried in its latest heartbeat.

    ``claims_primary``: the peer runs, or is about to run, the application as primary (it may
    hold the VIP). ``epoch``: the highest primary epoch the peer knows. ``primary_epoch``: the
    epoch of the peer's latest primary term (0: never primary). ``handover``: the peer left the
    primary role so that this node takes it. ``swap_request``: the peer (secondary) asks this
    node (primary) to swap. ``acked_version``: the version of this node's status (for this
    node's current incarnation) that the peer had processed when it built this status, or -1;
    a decision that assumes the peer will not take over needs it equal to this node's current
    version, so that the peer decided knowing this node's current state.

    Replicated modules only (defaults otherwise): ``data``, ``generation``, ``ran_alone``: the
    peer's data record (:class:`hakit.core.freshness.DataRecord`); ``in_sync``: the peer is
    primary and its secondary (this node) is connected and in sync.
    """

    node: NodeId
    state: State
    claims_primary: bool
    epoch: int
    primary_epoch: int
    handover: bool = False
    swap_request: bool = False
    acked_version: int = -1
    data: DataState = DataState.UNKNOWN
    generation: int = 0
    ran_alone: bool = False
    in_sync: bool = False
    # arbitration: the fencing token under which the peer last became primary (issuer, term)
    lease: tuple[tuple[str, int], ...] = ()

    @property
    def record(self) -> DataRecord:
        return DataRecord(self.data, self.generation, self.ran_alone)


@dataclass(frozen=True)
class Tick:
    """Time passes: timers (start-up wait, loop guard window) are checked."""


@dataclass(frozen=True)
class PeerHeard:
    """A heartbeat from the peer arrived carrying this module's status on the peer."""

    status: PeerModuleStatus


@dataclass(frozen=True)
class PeerLost:
    """No heartbeat from the peer on any network for the heartbeat timeout."""

    node: NodeId
    silent_for: float


@dataclass(frozen=True)
class ScriptDone:
    """A script (or the step it ends, e.g. VIP addition then start_prim) finished."""

    script: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class CheckerFailed:
    """A checker reported the application unhealthy."""

    checker: str
    action: CheckerAction
    detail: str


@dataclass(frozen=True)
class Command:
    """An operator command. ``force`` confirms a dangerous command (e.g. ``prim --force``)."""

    verb: Verb
    force: bool = False


@dataclass(frozen=True)
class ReplicaReport:
    """The module's replication process reports its data record (replicated modules only).

    Sent by the process after every change of its record and of ``in_sync``, and once after
    every role change (:class:`hakit.core.actions.SetReplication`). ``in_sync``: on a primary,
    the secondary is connected and in sync (always false in other roles). ``detail`` is for
    the log, e.g. "secondary lost: connection reset", "resync 45 % (1.2 GB of 2.7 GB)".
    """

    record: DataRecord
    in_sync: bool
    detail: str = ""


@dataclass(frozen=True)
class ReplicaFailed:
    """The replication process died or hung; the driver restarts it (replicated modules only).

    On a primary its FUSE mounts died with it: the application lost its data path.
    """

    detail: str


@dataclass(frozen=True)
class ReplicaFenced:
    """The primary's replication process removed the module's VIPs by itself: the deadline
    of :class:`hakit.core.actions.FenceAt` passed without a later one (the agent was paused or
    stuck). The node must not serve any more without a new start."""

    detail: str


@dataclass(frozen=True)
class ArbiterAnswered:
    """An arbiter (witness, etcd) answered a request the machine asked for
    (:class:`hakit.core.actions.AskArbiters`). ``sent_at``: when the request was sent, on the
    clock of ``now``; no event when no answer came in time."""

    arbiter: str
    sent_at: float
    answer: Answer


Event = (
    Tick
    | PeerHeard
    | PeerLost
    | ScriptDone
    | CheckerFailed
    | Command
    | ReplicaReport
    | ReplicaFailed
    | ArbiterAnswered
    | ReplicaFenced
)
