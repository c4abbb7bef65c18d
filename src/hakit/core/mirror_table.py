"""The mirror module's transitions, as data: ``TABLE[state][trigger] -> Edge``.

The machine (:mod:`hakit.core.mirror`) only ever moves along an edge of this table; the state
diagram in ``docs/state-diagram.md`` is generated from it (``python -m hakit.core.diagram``), so
picture and code cannot drift.

A transitional state (a script runs) remembers a *goal*: where to go when its script ends. The
``THEN_*`` triggers fire when a stop script ends and name that goal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hakit.model import State


class Goal(StrEnum):
    """Where a node heads once the running script has finished."""

    STOP = "stop"
    PRIM = "prim"
    SECOND = "second"
    WAIT = "wait"
    RESTART_MODULE = "restart"  # stopstart: full stop, then start again


class Trigger(StrEnum):
    """Named reasons to move, computed by the machine from events and the peer's status."""

    # operator commands
    START = "start"
    STOP = "stop"
    PRIM = "prim"
    SECOND = "second"
    SWAP = "swap"
    RESTART = "restart"
    STOPSTART = "stopstart"
    # end of the running script
    DONE = "done"  # prestart, start_second, poststop succeeded
    DONE_PEERED = "done, peer is SECOND"  # start_prim succeeded, a secondary is there
    DONE_ALONE = "done, no secondary"  # start_prim succeeded, no secondary
    FAILED = "script failed"
    THEN_STOP = "then stop"
    THEN_PRIM = "then prim"
    THEN_SECOND = "then second"
    THEN_WAIT = "then wait"
    THEN_RESTART = "then start again"
    # the peer
    NO_PEER = "no peer"  # start-up wait over and no peer heard
    PEER_LOST = "peer lost"
    PEER_LOST_NO_FAILOVER = "peer lost, failover off"
    PEER_PRIMARY = "peer is primary"
    PEER_SECONDARY = "peer is secondary"
    PEER_STOPPED = "peer stopped"
    PEER_LEFT = "peer left secondary"
    HANDED_OVER = "peer handed over"
    WON_ELECTION = "won election"
    LOST_ELECTION = "lost election"
    DUAL_PRIMARY = "both primary, this node yields"
    FENCED = "peer lost, lease lost"  # arbitration: stop serving before the lease runs out
    # data freshness (replicated modules)
    REPLICA_DEGRADED = "secondary not in sync"  # the replication to the secondary stopped
    DATA_NOT_CURRENT = "data not provably up to date"  # may not take over: wait instead
    SWAP_REQUESTED = "peer asks to swap"
    # checkers and the loop guard
    CHECK_RESTART = "checker: restart"
    CHECK_FAILOVER = "checker: failover"
    CHECK_STOP = "checker: stop"
    LOOP_GUARD = "loop guard"


@dataclass(frozen=True)
class Edge:
    """Next state, and the goal it takes with it (for transitional states)."""

    to: State
    goal: Goal | None = None


S, T, G = State, Trigger, Goal

_STOP_PRIM = {
    T.STOP: Edge(S.STOPPING_PRIM, G.STOP),
    T.SWAP: Edge(S.STOPPING_PRIM, G.SECOND),
    T.SECOND: Edge(S.STOPPING_PRIM, G.SECOND),
    T.RESTART: Edge(S.STOPPING_PRIM, G.PRIM),
    T.STOPSTART: Edge(S.STOPPING_PRIM, G.RESTART_MODULE),
    T.DUAL_PRIMARY: Edge(S.STOPPING_PRIM, G.SECOND),
    T.SWAP_REQUESTED: Edge(S.STOPPING_PRIM, G.SECOND),
    T.CHECK_RESTART: Edge(S.STOPPING_PRIM, G.PRIM),
    T.CHECK_FAILOVER: Edge(S.STOPPING_PRIM, G.SECOND),
    T.CHECK_STOP: Edge(S.STOPPING_PRIM, G.STOP),
    T.LOOP_GUARD: Edge(S.STOPPING_PRIM, G.STOP),
    T.FENCED: Edge(S.STOPPING_PRIM, G.WAIT),
}

TABLE: dict[State, dict[Trigger, Edge]] = {
    S.STOP: {
        T.START: Edge(S.STARTING),
        T.PRIM: Edge(S.STARTING, G.PRIM),
        T.SECOND: Edge(S.STARTING, G.SECOND),
    },
    S.STARTING: {
        T.DONE: Edge(S.WAIT),
        T.FAILED: Edge(S.STOP),
        T.THEN_STOP: Edge(S.STOPPING, G.STOP),
    },
    S.WAIT: {
        T.STOP: Edge(S.STOPPING, G.STOP),
        T.PRIM: Edge(S.STARTING_PRIM),
        T.SECOND: Edge(S.STARTING_SECOND),
        T.NO_PEER: Edge(S.STARTING_PRIM),
        T.PEER_PRIMARY: Edge(S.STARTING_SECOND),
        T.PEER_SECONDARY: Edge(S.STARTING_PRIM),
        T.PEER_STOPPED: Edge(S.STARTING_PRIM),
        T.WON_ELECTION: Edge(S.STARTING_PRIM),
        T.LOST_ELECTION: Edge(S.STARTING_SECOND),
    },
    S.STARTING_PRIM: {
        T.DONE_PEERED: Edge(S.PRIM),
        T.DONE_ALONE: Edge(S.ALONE),
        T.FAILED: Edge(S.STOPPING_PRIM, G.STOP),
        T.THEN_STOP: Edge(S.STOPPING_PRIM, G.STOP),
    },
    S.PRIM: {
        **_STOP_PRIM,
        T.PEER_LOST: Edge(S.ALONE),
        T.PEER_LEFT: Edge(S.ALONE),
        T.REPLICA_DEGRADED: Edge(S.ALONE),
    },
    S.ALONE: {**_STOP_PRIM, T.PEER_SECONDARY: Edge(S.PRIM)},
    S.STOPPING_PRIM: {
        T.THEN_STOP: Edge(S.STOPPING, G.STOP),
        T.THEN_SECOND: Edge(S.STARTING_SECOND),
        T.THEN_PRIM: Edge(S.STARTING_PRIM),
        T.THEN_WAIT: Edge(S.WAIT),
        T.THEN_RESTART: Edge(S.STOPPING, G.RESTART_MODULE),
    },
    S.STARTING_SECOND: {
        T.DONE: Edge(S.SECOND),
        T.FAILED: Edge(S.STOPPING_SECOND, G.STOP),
        T.THEN_STOP: Edge(S.STOPPING_SECOND, G.STOP),
    },
    S.SECOND: {
        T.STOP: Edge(S.STOPPING_SECOND, G.STOP),
        T.PRIM: Edge(S.STOPPING_SECOND, G.PRIM),
        T.STOPSTART: Edge(S.STOPPING_SECOND, G.RESTART_MODULE),
        T.PEER_LOST: Edge(S.STOPPING_SECOND, G.PRIM),
        T.PEER_LOST_NO_FAILOVER: Edge(S.STOPPING_SECOND, G.WAIT),
        T.DATA_NOT_CURRENT: Edge(S.STOPPING_SECOND, G.WAIT),
        T.PEER_STOPPED: Edge(S.STOPPING_SECOND, G.PRIM),
        T.HANDED_OVER: Edge(S.STOPPING_SECOND, G.PRIM),
        T.WON_ELECTION: Edge(S.STOPPING_SECOND, G.PRIM),
        T.LOOP_GUARD: Edge(S.STOPPING_SECOND, G.STOP),
    },
    S.STOPPING_SECOND: {
        T.THEN_PRIM: Edge(S.STARTING_PRIM),
        T.THEN_SECOND: Edge(S.STARTING_SECOND),
        T.THEN_STOP: Edge(S.STOPPING, G.STOP),
        T.THEN_WAIT: Edge(S.WAIT),
        T.THEN_RESTART: Edge(S.STOPPING, G.RESTART_MODULE),
    },
    S.STOPPING: {
        T.DONE: Edge(S.STOP),
        T.THEN_STOP: Edge(S.STOP),
        T.THEN_RESTART: Edge(S.STARTING),
    },
}

#: The script each transitional state runs (absent scripts count as instant success).
SCRIPT_OF: dict[State, str] = {
    S.STARTING: "prestart",
    S.STARTING_PRIM: "start_prim",
    S.STOPPING_PRIM: "stop_prim",
    S.STARTING_SECOND: "start_second",
    S.STOPPING_SECOND: "stop_second",
    S.STOPPING: "poststop",
}

THEN_TRIGGER: dict[Goal, Trigger] = {
    G.STOP: T.THEN_STOP,
    G.PRIM: T.THEN_PRIM,
    G.SECOND: T.THEN_SECOND,
    G.WAIT: T.THEN_WAIT,
    G.RESTART_MODULE: T.THEN_RESTART,
}
