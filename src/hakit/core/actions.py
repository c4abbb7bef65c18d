"""Outputs of the pure core: what the driver must do, in order.

Contract for the driver, for every list of actions returned by a machine's ``step``:
- execute the actions in list order;
- every action but :class:`RunScript` completes before the driver does anything else (in
  particular before it builds the next heartbeat, which carries the new state): ``Persist`` is
  durable on disk before the next action runs ("persist, then act"), VIPs are added or removed;
- at most one :class:`RunScript` is in a list and it comes last; its end is reported back as
  :class:`hakit.core.events.ScriptDone` with the same script name. If an action before it
  fails (a VIP cannot be added), the driver skips the script and reports
  ``ScriptDone(script, ok=False, detail=<what failed>)``. A script that does not exist in the
  module folder is reported done and ok.
- :class:`SetReplication` (replicated modules only) also completes before the next action:
  with role ``primary`` the FUSE mounts exist (and the new generation is durable) before
  ``AddVips`` and ``start_prim`` run; with role ``secondary`` the listener is up before
  ``start_second`` runs; with role ``idle`` every mount is gone and nothing listens any more.
  If it fails, the driver goes on like after a failed VIP: it executes the other actions but
  skips the ``RunScript`` that follows and reports it ``ScriptDone(script, ok=False, detail)``
  (with no script after it, it logs the failure; a process that is unusable is reported as
  :class:`hakit.core.events.ReplicaFailed`). Setting the role the process already has is a
  no-op; ``primary`` is never sent while the role is ``primary``. After the role is set, the
  process reports its record again (:class:`hakit.core.events.ReplicaReport`). After a
  ``ReplicaFailed``, the driver restarts the process in the role it had, except ``primary``:
  that one is restarted ``idle`` (the machine sends ``primary`` again before any ``start_prim``).

Order of the actions of one transition (absent ones are skipped). A list may hold several
transitions in a row, and may start with ``AnnounceVips`` or a lone ``Persist`` (the peer
announced a higher data generation)::

    Transitioned
    DelVips, SetReplication(idle)          leaving STOPPING_PRIM (but to STARTING_PRIM)
    SetReplication(idle)                   leaving STOPPING_SECOND (but to STARTING_SECOND)
    Persist
    StartCheckers | StopCheckers
    SetReplication(primary), AddVips       entering STARTING_PRIM
    SetReplication(secondary)              entering STARTING_SECOND
    RunScript

``AskArbiters``, ``PermitAlone`` and a fencing ``DelVips`` (the lease ran out while primary
without a peer) come after the transitions, before the ``RunScript``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hakit.model import State


class ReplicaRole(StrEnum):
    """Role of a mirror module's replication process (docs/replication.md)."""

    IDLE = "idle"  # nothing mounted, nothing listening
    PRIMARY = "primary"  # FUSE mounted over the directories, replicating to the secondary
    SECONDARY = "secondary"  # listening, applying the primary's requests


@dataclass(frozen=True)
class Transitioned:
    """The module changed state; the driver logs ``from -> to (reason)`` at INFO."""

    old: State
    new: State
    reason: str


@dataclass(frozen=True)
class Persist:
    """Write the module's durable record (atomically, fsynced) before the next action."""

    wanted: bool  # the module should run (restart it when the agent starts)
    state: State
    epoch: int
    primary_epoch: int
    peer_generation_seen: int = 0  # highest data generation the peer announced (replicated)
    lease: tuple[tuple[str, int], ...] = ()  # the fencing token of the last primary term here


@dataclass(frozen=True)
class SetReplication:
    """Give the module's replication process its role; done before the next action.

    ``primary``: the process sets ``generation = max(own, peer_generation) + 1``, ``ran_alone``,
    ``up to date``, durably, mounts, then connects to the secondary (a full resync if
    ``force_full``: the operator forced this node primary, the peer's copy is discarded).
    ``outdated`` (``idle``/``secondary``): first mark the record ``outdated`` (``ran_alone``
    cleared), durably: this node ran alone and yielded to a peer whose copy is kept (split
    brain), so its own changes are to be discarded by the next resync.
    """

    role: ReplicaRole
    force_full: bool = False
    peer_generation: int = 0  # highest generation the peer announced (primary only)
    # primary: the fencing token, its lease terms named by issuer (empty: no arbiter)
    terms: tuple[tuple[str, int], ...] = ()
    outdated: bool = False


@dataclass(frozen=True)
class RunScript:
    """Run a module script (prestart, start_prim, …) with the transition in its environment."""

    script: str
    transition: str  # e.g. "SECOND->PRIM", given to the script as an argument


@dataclass(frozen=True)
class AddVips:
    """Add every VIP of the module on its interface, then announce it (gratuitous ARP)."""


@dataclass(frozen=True)
class DelVips:
    """Remove every VIP of the module from its interface (no error if already absent)."""


@dataclass(frozen=True)
class AnnounceVips:
    """Announce the VIPs again (gratuitous ARP): the peer held them too and has let go, so
    hosts that learned the peer's MAC while both were primary must learn ours again."""


@dataclass(frozen=True)
class StartCheckers:
    """Start the module's checkers (the application now runs as primary)."""


@dataclass(frozen=True)
class StopCheckers:
    """Stop the module's checkers (before the application is stopped)."""


@dataclass(frozen=True)
class AskArbiters:
    """Send one request to every arbiter of the module (at once, without waiting: each answer
    comes back as :class:`hakit.core.events.ArbiterAnswered`). ``op``: ``acquire`` (or renew)
    or ``release``; ``terms``: per arbiter, the term this node holds there (0: none);
    ``alone``: the data generation this node runs alone with (0: none); ``synced``: the
    generation its in-sync secondary has (0: none; clears a ran-alone record up to it)."""

    op: str
    terms: tuple[tuple[str, int], ...]
    alone: int = 0
    synced: int = 0


@dataclass(frozen=True)
class PermitAlone:
    """Tell the replication process (primary) that changes it cannot replicate may be
    acknowledged at data generations up to ``generation``: the peer or a majority of the
    arbiters know that this node runs alone with it (docs/split-brain.md)."""

    generation: int


@dataclass(frozen=True)
class FenceAt:
    """At ``deadline`` (the clock of ``now``; 0: never), unless a later one arrives, the
    module's VIPs stop serving without this agent: the primary's replication process removes
    them, and the kernel drops their traffic (the VIPs' lease, :mod:`hakit.net.vip_fence`;
    also for modules without replication). The driver sends it at once, not after queued
    actions."""

    deadline: float


Action = (
    Transitioned
    | Persist
    | RunScript
    | AddVips
    | DelVips
    | AnnounceVips
    | StartCheckers
    | StopCheckers
    | SetReplication
    | AskArbiters
    | PermitAlone
    | FenceAt
)
