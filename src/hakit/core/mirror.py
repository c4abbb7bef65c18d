"""The mirror module state machine of one node: events and ticks in, actions out. Pure.

One :class:`MirrorMachine` per (node, mirror module). The driver feeds it events with the
current time (``step(now, event)``) and executes the returned actions in order (contract in
:mod:`hakit.core.actions`). It moves only along edges of
:data:`hakit.core.mirror_table.TABLE`; every move is returned as a ``Transitioned`` action with
its reason, for the log.

Rules that keep two primaries from running at once (while the nodes can hear each other):

- a node starts becoming primary only if its peer is lost, or the peer's latest status shows
  it neither is nor is about to be primary (``claims_primary`` false) *and* acknowledges this
  node's current status version: the peer decided knowing this node's current state, so it
  cannot be taking over at the same moment on an older view (every change of this node's
  status bumps its version);
- a node stays in a primary-claiming state (STARTING_PRIM … STOPPING_PRIM) until its stop
  script has finished and its VIPs are removed, so the other node waits for that;
- when both nodes start at once they elect the same winner from the same inputs (preferred
  node, then the more recent primary term, then the smaller node name);
- if both are primary after a partition heals (possible only without arbitration), the node
  whose primary term began later yields (the former primary stays).

With arbiters (:mod:`hakit.core.arbitration`), a node also needs the arbiters' lease to move
towards the primary role, keeps renewing it while it claims that role, and fences itself (VIPs
off at once, stop script, WAIT) when its peer is lost and the lease is gone. Replicated modules
acknowledge writes the secondary did not get only once the peer or a majority of the arbiters
know the generation the node runs alone with (:class:`PermitAlone`).

Replicated modules (``MirrorSettings.replicated``) add the data rules of ``docs/replication.md``
("Who has the latest data"; the comparisons and the operator's sentences are in
:mod:`hakit.core.freshness`): a node becomes primary only on data it can prove up to date —
with its peer present, a copy not older than the peer's; without it, an up-to-date copy of at
least the generation the peer announced that ran alone last (or was in sync as secondary when the
peer was lost). Otherwise it waits in WAIT and says why, until its peer returns or the operator
forces it (``prim --force``). The machine drives the replication process with
:class:`SetReplication` (primary, secondary, idle) and learns its record from ``ReplicaReport``;
PRIM means "a secondary is connected and in sync", ALONE "running without one". Two details
that the records alone cannot carry: a node that ran alone and becomes secondary of a peer
whose copy is kept (split brain, or a forced peer) has its record marked ``outdated`` at its
next role change, so that it cannot take over alone before its resync; and
``peer_generation_seen`` falls back to the peer's generation once the peer's copy is in sync
with this node's (the peer's older announcements describe data that no longer exists).

Caveats: without arbiters, a cut between the nodes makes both primary until the network heals
(the loser's changes are kept in a recovery folder); ``docs/split-brain.md`` has the details.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hakit.core import freshness, mirror_arbitration, mirror_commands
from hakit.core.actions import (
    Action,
    AddVips,
    AnnounceVips,
    DelVips,
    Persist,
    ReplicaRole,
    RunScript,
    SetReplication,
    StartCheckers,
    StopCheckers,
    Transitioned,
)
from hakit.core.arbitration import Arbitration, ArbitrationSettings
from hakit.core.events import (
    ArbiterAnswered,
    CheckerAction,
    CheckerFailed,
    Command,
    Event,
    PeerHeard,
    PeerLost,
    PeerModuleStatus,
    ReplicaFailed,
    ReplicaFenced,
    ReplicaReport,
    ScriptDone,
    Tick,
)
from hakit.core.freshness import DataRecord, DataState
from hakit.core.mirror_commands import CommandRefused as CommandRefused  # noqa: PLC0414 (re-exported)
from hakit.core.mirror_table import SCRIPT_OF, TABLE, THEN_TRIGGER, Edge, Goal, Trigger
from hakit.model import NodeId, State


class IllegalTransition(Exception):
    """A trigger with no edge from the current state: a bug in the machine, never expected."""


@dataclass(frozen=True)
class MirrorSettings:
    """What the machine needs from the configuration (durations in seconds)."""

    node: NodeId
    peer: NodeId
    preferred: NodeId | None = None  # preferred primary when both start (None: no preference)
    failover: bool = True  # secondary takes over when the primary is lost
    failback: bool = False  # preferred node takes the primary role back when it rejoins
    startup_wait: float = 3.0  # seconds a starting node waits to hear its peer; ≥ hb timeout
    max_restarts: int = 2  # local restarts by checkers within the guard period, then failover
    guard_max: int = 4  # automatic restarts + failovers allowed within guard_period
    guard_period: float = 3600.0
    replicated: bool = False  # the module's directories are replicated: the data rules apply
    module: str = ""  # module name, for the commands suggested in reasons
    arbitration: ArbitrationSettings = field(default_factory=ArbitrationSettings)  # none: off


@dataclass(frozen=True)
class Durable:
    """The record persisted by the driver and given back at the next start of the agent."""

    wanted: bool = False
    state: State = State.STOP
    epoch: int = 0
    primary_epoch: int = 0
    # replicated: highest data generation the peer announced since its copy was last in sync
    peer_generation_seen: int = 0
    lease: tuple[tuple[str, int], ...] = ()  # fencing token of this node's last primary term


@dataclass(frozen=True)
class Status:
    """This node's status for the module: what heartbeats carry and `hakit state` shows."""

    state: State
    claims_primary: bool
    epoch: int
    primary_epoch: int
    handover: bool
    swap_request: bool
    reason: str
    wanted: bool
    version: int  # bumped at every change of the other fields but reason
    # replicated modules: this node's data record, and (primary) its secondary is in sync
    data: DataState = DataState.UNKNOWN
    generation: int = 0
    ran_alone: bool = False
    in_sync: bool = False
    lease: tuple[tuple[str, int], ...] = ()  # fencing token of this node's last primary term

    @property
    def record(self) -> DataRecord:
        return DataRecord(self.data, self.generation, self.ran_alone)


@dataclass
class _Counters:
    restarts: list[float] = field(default_factory=list)  # times of checker restarts
    automatic: list[float] = field(default_factory=list)  # restarts + failovers (loop guard)


class MirrorMachine:
    """Mirror module on one node. Call :meth:`step` for every event; read :meth:`status`.

    ``data``: the module's data record as read from disk when the agent started (replicated
    modules; later records come in ``ReplicaReport`` events).
    """

    def __init__(
        self,
        settings: MirrorSettings,
        durable: Durable | None = None,
        data: DataRecord | None = None,
    ) -> None:
        d = durable or Durable()
        self.settings = settings
        self.state = State.STOP
        self.goal: Goal | None = None
        self.wanted = d.wanted
        self.epoch = max(d.epoch, d.primary_epoch)
        self.primary_epoch = d.primary_epoch
        self.previous_state = d.state  # what the node was before the agent (re)started
        self.peer: PeerModuleStatus | None = None
        self.peer_silent_for: float | None = None
        self.peer_heard_at = float("-inf")  # when the latest heartbeat of the peer came
        self.handover = False
        self.swap_request = False
        self.reason = (
            "agent started" if d.state == State.STOP else f"agent restarted (was {d.state})"
        )
        self.wait_deadline = 0.0
        self.version = 0
        self.stop_cause = ""
        self._counters = _Counters()
        # replicated modules only (see the module docstring)
        self.data = (data or DataRecord()) if settings.replicated else DataRecord()
        self.in_sync = False  # primary: the secondary is connected and in sync
        self.replica_detail = ""  # the latest report's detail, for reasons
        self.replica_role = ReplicaRole.IDLE  # the role last given to the replication process
        self.peer_generation_seen = d.peer_generation_seen
        self.lease = d.lease  # arbitration: the token of this node's last primary term
        self.peer_was_in_sync = False  # the peer's latest status as primary said "in sync"
        self.force = False  # `prim --force` accepted: the data rules are bypassed once
        self.mark_outdated = False  # yielded with a ran-alone copy: mark it outdated
        self.replica_failed = ""  # the process failed while start_prim ran: handled after it
        self.arb = Arbitration(settings.arbitration, settings.node)
        self.lease_wanted = False  # a move towards the primary role waits for the lease
        self.fenced = False  # VIPs removed because the lease ran out (until STARTING_PRIM)
        self.permitted = 0  # ran-alone generation permitted to the replication process
        self.fence_sent = 0.0  # the replication process's watchdog deadline (FenceAt)
        self.replica_fenced = ""  # the watchdog removed the VIPs: stop serving (why)

    # ------------------------------------------------------------------ public
    def status(self) -> Status:
        return Status(
            state=self.state,
            claims_primary=self.claims_primary,
            epoch=self.epoch,
            primary_epoch=self.primary_epoch,
            handover=self.handover,
            swap_request=self.swap_request,
            reason=self.reason,
            wanted=self.wanted,
            version=self.version,
            data=self.data.data,
            generation=self.data.generation,
            ran_alone=self.data.ran_alone,
            in_sync=self.in_sync,
            lease=self.lease,
        )

    @property
    def claims_primary(self) -> bool:
        """True while this node is, or is about to be, primary (it may hold the VIP)."""
        return self.state.holds_primary_role or (
            self.state == State.STOPPING_SECOND and self.goal == Goal.PRIM
        )

    def step(self, now: float, event: Event) -> list[Action]:
        """Apply one event; return the actions to execute, in order.

        Raises :class:`CommandRefused` for a command that does not apply now (nothing changed).
        """
        actions: list[Action] = []
        match event:
            case Command():
                mirror_commands.apply(self, now, event, actions)
            case ScriptDone():
                self._script_done(now, event, actions)
            case PeerHeard(status=status):
                # the peer is heard again, or let go of the primary role, while this node
                # serves: it may have held the VIPs meanwhile (both primary across a cut), so
                # hosts may have learned its MAC; announce them again
                was_contested = self.peer is None or self.peer.claims_primary
                if was_contested and not status.claims_primary and self.state.serves:
                    actions.append(AnnounceVips())
                self.peer = status
                self.peer_heard_at = now
                self.peer_silent_for = None
                self.epoch = max(self.epoch, status.epoch)
                if status.claims_primary and self.handover:
                    self.handover = False  # it took over: our hand-over is complete
                    self.version += 1
                if self.settings.replicated:
                    self._peer_data(status, actions)
            case PeerLost(silent_for=silent):
                self.peer = None
                self.peer_silent_for = silent
            case CheckerFailed():
                what = f"checker {event.checker}: {event.detail}"
                self._checker_failed(now, event.action, what, actions)
            case ReplicaReport():
                self._replica_report(event)
            case ReplicaFailed():
                self._replica_failed(now, event, actions)
            case ReplicaFenced(detail=detail):
                if self.claims_primary:
                    self.replica_fenced = detail or "the replication process removed the VIPs"
                    self.fenced = True
                    actions.append(DelVips())  # after any AddVips still queued
            case ArbiterAnswered():
                seen = self.peer_generation_seen
                if self.arb.answered(event) and self.settings.replicated:
                    seen = max(seen, self.arb.others.get(self.settings.peer, 0))
                if seen != self.peer_generation_seen:
                    self.peer_generation_seen = seen
                    actions.append(self._persist())
            case Tick():
                pass
        self._settle(now, actions)
        return actions

    # ------------------------------------------------------------------ events
    def _script_done(self, now: float, done: ScriptDone, actions: list[Action]) -> None:
        expected = SCRIPT_OF.get(self.state)
        if done.script != expected:
            return  # stale completion (cannot happen with a correct driver): ignore
        what = f"{done.script} {'ok' if done.ok else 'failed'}"
        if done.detail:
            what += f" ({done.detail})"
        goal, state = self.goal, self.state
        replica_failed, self.replica_failed = self.replica_failed, ""
        if state in (State.STOPPING_PRIM, State.STOPPING_SECOND, State.STOPPING) and (
            goal is not None
        ):
            if goal == Goal.PRIM and self.peer is not None and self.peer.claims_primary:
                goal = Goal.SECOND if state == State.STOPPING_SECOND else Goal.STOP
                what += f"; peer {self.peer.node} is primary now"
            elif goal == Goal.PRIM and state == State.STOPPING_SECOND:
                refusal = self._refusal() or self.arb.refusal(now)
                if refusal is not None:
                    goal = Goal.WAIT
                    what += f"; not becoming primary: {refusal}"
            elif goal == Goal.PRIM and state == State.STOPPING_PRIM:  # a local restart
                fence = mirror_arbitration.must_fence(self, now)
                if self.fenced or fence is not None:
                    goal = Goal.WAIT
                    what += f"; not starting again: {fence or 'fenced while stopping'}"
            self._move(now, THEN_TRIGGER[goal], what, actions)
        elif not done.ok:
            self.wanted = False
            self._move(now, Trigger.FAILED, what, actions)
        elif goal == Goal.STOP:
            self._move(now, Trigger.THEN_STOP, what + "; stop was requested", actions)
        elif state == State.STARTING_PRIM:
            peered = self.peer is not None and self.peer.state in (
                State.SECOND,
                State.STARTING_SECOND,
            )
            if self.settings.replicated:
                peered = peered and self.in_sync
            self._move(now, Trigger.DONE_PEERED if peered else Trigger.DONE_ALONE, what, actions)
            if replica_failed:  # the application started on mounts that died meanwhile
                self._checker_failed(now, CheckerAction.FAILOVER, replica_failed, actions)
        else:
            self._move(now, Trigger.DONE, what, actions)

    def _checker_failed(
        self, now: float, action: CheckerAction, what: str, actions: list[Action]
    ) -> None:
        if self.state not in (State.PRIM, State.ALONE):
            return  # a late report from a checker being stopped
        s = self.settings
        window = now - s.guard_period
        c = self._counters
        c.restarts[:] = [t for t in c.restarts if t > window]
        c.automatic[:] = [t for t in c.automatic if t > window]
        if action == CheckerAction.STOP:
            self.wanted = False
            self._move(now, Trigger.CHECK_STOP, what, actions)
            return
        if len(c.automatic) >= s.guard_max:
            self.wanted = False
            self._move(
                now,
                Trigger.LOOP_GUARD,
                f"{what}; loop guard: {len(c.automatic)} automatic restarts/failovers within "
                f"{s.guard_period:g} s (max {s.guard_max}); fix the application, then "
                f"`hakit start`",
                actions,
            )
            return
        c.automatic.append(now)
        peer = self.peer
        can_fail_over = self.state == State.PRIM and peer is not None and peer.state == State.SECOND
        if s.replicated:  # PRIM: in sync; the secondary must say so too
            can_fail_over = can_fail_over and peer is not None and peer.data == DataState.UPTODATE
        restart = action == CheckerAction.RESTART and len(c.restarts) < s.max_restarts
        if restart or not can_fail_over:
            c.restarts.append(now)
            self._move(
                now,
                Trigger.CHECK_RESTART,
                f"{what}; local restart {len(c.restarts)}/{s.max_restarts}",
                actions,
            )
            return
        self._move(now, Trigger.CHECK_FAILOVER, f"{what}; failing over to {s.peer}", actions)

    # ------------------------------------------------------------------ replication
    def _peer_data(self, status: PeerModuleStatus, actions: list[Action]) -> None:
        """Track what the peer's statuses say about data (replicated modules)."""
        if status.claims_primary:
            self.peer_was_in_sync = status.in_sync
        seen = max(self.peer_generation_seen, status.generation)
        if (
            self.in_sync
            and status.data == DataState.UPTODATE
            and status.generation == self.data.generation
        ):
            seen = status.generation  # the peer's copy is ours now: older announcements are void
        if seen != self.peer_generation_seen:
            self.peer_generation_seen = seen
            actions.append(self._persist())

    def _replica_report(self, report: ReplicaReport) -> None:
        if not self.settings.replicated:
            return
        in_sync = report.in_sync and self.replica_role == ReplicaRole.PRIMARY
        if (report.record, in_sync) != (self.data, self.in_sync):
            self.data, self.in_sync = report.record, in_sync
            self.version += 1
        self.replica_detail = report.detail

    def _replica_failed(self, now: float, ev: ReplicaFailed, actions: list[Action]) -> None:
        if not self.settings.replicated:
            return
        what = f"replication process failed: {ev.detail}"
        if self.in_sync:
            self.in_sync = False
            self.version += 1
        if self.replica_role != ReplicaRole.PRIMARY:
            self.reason = f"{what} (restarting it)"
            return
        # its mounts died with it: the driver restarts it idle, and the role is set again
        # before any start_prim
        self.replica_role = ReplicaRole.IDLE
        self.permitted = 0  # the restarted process has permitted nothing yet
        self.fence_sent = 0.0
        if self.state in (State.PRIM, State.ALONE):
            self._checker_failed(now, CheckerAction.FAILOVER, what, actions)
        elif self.state == State.STARTING_PRIM:
            self.replica_failed = what
        else:
            self.reason = what

    def _set_replication(self, now: float, role: ReplicaRole, actions: list[Action]) -> None:
        """Emit ``SetReplication``; the record it will write is known already (action doc)."""
        if role == ReplicaRole.PRIMARY:
            seen = self.peer_generation_seen
            action = SetReplication(
                role, force_full=self.force, peer_generation=seen, terms=self.arb.tokens(now)
            )
            generation = max(self.data.generation, seen) + 1
            self.data = DataRecord(DataState.UPTODATE, generation, ran_alone=True)
            self.permitted = 0
            self.fence_sent = 0.0
        else:
            action = SetReplication(role, outdated=self.mark_outdated)
            if self.mark_outdated:
                self.data = DataRecord(DataState.OUTDATED, self.data.generation)
            self.mark_outdated = False
        self.replica_role = role
        self.in_sync = False
        actions.append(action)

    def _data_order(self, peer: PeerModuleStatus) -> tuple[int, bool]:
        """Whose copy is newer (1: this node's, -1: the peer's, 0: cannot tell), and whether a
        split brain was decided for the peer. Both nodes reach opposite verdicts."""
        order = freshness.compare(self.data, peer.record)
        if freshness.split_brain(self.data, peer.record):  # the former primary's data is kept
            yields = self._yields_to_peer(peer)
            return (-1 if yields else 1), yields
        return order, False

    def _data_refusal(self) -> str | None:
        """Why the data rules forbid this node to become primary now (None: allowed)."""
        s, peer = self.settings, self.peer
        if not s.replicated:
            return None
        if peer is None:
            in_sync_secondary = self.peer_was_in_sync and self.state in (
                State.SECOND,
                State.STOPPING_SECOND,
            )
            return freshness.alone_refusal(
                self.data, self.peer_generation_seen, s.peer, in_sync_secondary=in_sync_secondary
            )
        order, kept = self._data_order(peer)
        return freshness.lead_refusal(self.data, peer.record, order, s.peer, peer_kept=kept)

    def _refusal(self) -> str | None:
        """:meth:`_data_refusal` with what the node does about it, unless forced."""
        if self.force:
            return None
        refusal = self._data_refusal()
        if refusal is None:
            return None
        return refusal + freshness.waiting_hint(self.settings.peer, self.settings.module)

    # ------------------------------------------------------------------ decisions
    def _settle(self, now: float, actions: list[Action]) -> None:
        """Take the automatic transitions the current situation calls for (at most a few),
        then what arbitration asks for."""
        self.lease_wanted = False
        for _ in range(4):
            decided = self._decide(now)
            if decided is None:
                break
            trigger, why = decided
            blocked = self._lease_gate(now, trigger)
            if blocked is not None:
                self.lease_wanted = True
                self.reason = f"{why}; {blocked}"
                break
            self._move(now, trigger, why, actions)
        mirror_arbitration.arbitrate(self, now, actions)

    def _lease_gate(self, now: float, trigger: Trigger) -> str | None:
        """Why a move towards the primary role must wait for the arbiters (None: go)."""
        edge = TABLE[self.state].get(trigger)
        towards = edge is not None and (edge.to == State.STARTING_PRIM or edge.goal == Goal.PRIM)
        if not towards or self.claims_primary:
            return None
        return self.arb.refusal(now)

    def _decide(self, now: float) -> tuple[Trigger, str] | None:
        match self.state:
            case State.WAIT:
                return self._decide_wait(now)
            case State.SECOND:
                return self._decide_second()
            case State.PRIM | State.ALONE:
                return self._decide_primary(now)
        return None

    def _decide_wait(self, now: float) -> tuple[Trigger, str] | None:
        peer, s = self.peer, self.settings
        if self.goal == Goal.PRIM:
            if peer is not None and peer.claims_primary:
                self.goal = None
                return Trigger.PEER_PRIMARY, f"prim refused: peer {peer.node} is {peer.state}"
            refusal = self._refusal()
            if refusal is None:
                forced = " (--force)" if self.force else ""
                return Trigger.PRIM, f"started as primary by the operator{forced}"
            self.goal = None
            self.reason = f"prim refused: {refusal}"
            return None
        if self.goal == Goal.SECOND:
            return Trigger.SECOND, "started as secondary by the operator"
        if peer is None:
            if now < self.wait_deadline:
                return None
            if not s.failover:
                self.reason = f"waiting for {s.peer}: failover is off (use `hakit prim`)"
                return None
            refusal = self._refusal()
            if refusal is not None:
                self.reason = f"{s.peer} not heard for {s.startup_wait:g} s; {refusal}"
                return None
            return Trigger.NO_PEER, f"{s.peer} not heard for {s.startup_wait:g} s"
        if peer.claims_primary:
            if peer.state == State.STOPPING_PRIM:
                # let it finish: it may be fencing itself or stopping, not staying primary
                # (following it now could give up this node's newer data for nothing)
                self.reason = f"{peer.node} is {peer.state}: waiting for it to settle"
                return None
            return Trigger.PEER_PRIMARY, f"{peer.node} is {peer.state}"
        if not self._peer_is_current(peer):
            return None
        if peer.state in (State.STOP, State.STOPPING, State.SECOND, State.STARTING_SECOND):
            refusal = self._refusal()
            if refusal is not None:
                self.reason = f"{peer.node} is {peer.state}, but {refusal}"
                return None
            if peer.state in (State.STOP, State.STOPPING):
                return Trigger.PEER_STOPPED, f"{peer.node} is {peer.state}"
            return Trigger.PEER_SECONDARY, f"{peer.node} is {peer.state}"
        if peer.state in (State.WAIT, State.STARTING):
            return self._election(Trigger.WON_ELECTION, Trigger.LOST_ELECTION)
        return None

    def _decide_second(self) -> tuple[Trigger, str] | None:
        peer, s = self.peer, self.settings
        if peer is None:
            silent = (
                f"no heartbeat for {self.peer_silent_for:.1f} s" if self.peer_silent_for else ""
            )
            why = f"{s.peer} lost" + (f": {silent}" if silent else "")
            if not s.failover:
                return Trigger.PEER_LOST_NO_FAILOVER, why + "; failover is off"
            refusal = self._refusal()
            if refusal is not None:
                return Trigger.DATA_NOT_CURRENT, f"{why}; not taking over: {refusal}"
            return Trigger.PEER_LOST, why
        if peer.claims_primary:
            if (
                s.failback
                and s.preferred == s.node
                and peer.state == State.PRIM
                and not self.swap_request
            ):
                self.swap_request = True
                self.version += 1
                self.reason = f"failback: asking {peer.node} to hand over to the preferred node"
            return None
        if not self._peer_is_current(peer):
            return None
        if peer.handover or peer.state in (State.STOP, State.STOPPING):
            why = f"{peer.node} handed over ({peer.state})" if peer.handover else ""
            refusal = self._refusal()
            if refusal is not None:
                why = why or f"{peer.node} is {peer.state}"
                return Trigger.DATA_NOT_CURRENT, f"{why}; not taking over: {refusal}"
            if peer.handover:
                return Trigger.HANDED_OVER, why
            return Trigger.PEER_STOPPED, f"{peer.node} is {peer.state}: taking over"
        if peer.state == State.SECOND and not self.handover:  # handed over: the peer takes it
            won = self._election(Trigger.WON_ELECTION, Trigger.LOST_ELECTION)
            return won if won is not None and won[0] == Trigger.WON_ELECTION else None
        if (  # the peer waits because its data is older than this node's: this node takes over
            s.replicated
            and peer.state == State.WAIT
            and self._data_order(peer)[0] > 0
            and self._refusal() is None
        ):
            return Trigger.WON_ELECTION, (
                f"{peer.node} is WAIT with older data "
                f"({freshness.describe(peer.record)}): taking over"
            )
        return None

    def _decide_primary(self, now: float) -> tuple[Trigger, str] | None:
        peer, s = self.peer, self.settings
        fence = mirror_arbitration.must_fence(self, now)
        if self.replica_fenced:
            fence, self.replica_fenced = self.replica_fenced, ""
        if fence is not None:
            return Trigger.FENCED, f"{fence}: fencing (VIPs off, stopping)"
        if peer is None:
            if self.state == State.PRIM:
                silent = self.peer_silent_for or 0.0
                return Trigger.PEER_LOST, f"{s.peer} lost: no heartbeat for {silent:.1f} s"
            return None
        if peer.claims_primary and peer.state in (State.PRIM, State.ALONE):
            if self.arb.enabled:
                # this node holds the lease (else _must_fence decided): the peer's claim is
                # stale (a late heartbeat) or it fences itself now; the term decides nothing
                return None
            if self._yields_to_peer(peer):
                return Trigger.DUAL_PRIMARY, (
                    f"{peer.node} is also {peer.state}; its primary term is older "
                    f"(epoch {peer.primary_epoch} vs {self.primary_epoch}): yielding"
                )
            return None
        if s.replicated and self.state == State.PRIM and not self.in_sync:
            detail = f": {self.replica_detail}" if self.replica_detail else ""
            return Trigger.REPLICA_DEGRADED, f"replication to {peer.node} stopped{detail}"
        if peer.swap_request and peer.state == State.SECOND and self.state == State.PRIM:
            return Trigger.SWAP_REQUESTED, f"{peer.node} asked to swap"
        if self.state == State.ALONE and peer.state == State.SECOND:
            if not s.replicated:
                return Trigger.PEER_SECONDARY, f"{peer.node} is SECOND"
            if self.in_sync and peer.record == DataRecord(DataState.UPTODATE, self.data.generation):
                return Trigger.PEER_SECONDARY, f"{peer.node} is SECOND and in sync"
            return None
        if self.state == State.PRIM and peer.state not in (State.SECOND, State.STARTING_SECOND):
            return Trigger.PEER_LEFT, f"{peer.node} is {peer.state}"
        return None

    def _election(self, won: Trigger, lost: Trigger) -> tuple[Trigger, str] | None:
        """Both nodes compute the same winner from the same inputs (see module docstring).

        Replicated modules: the newer data wins first; if the winner's copy cannot be proved up
        to date (neither is), nobody wins (None, with the reason set).
        """
        s, peer = self.settings, self.peer
        assert peer is not None
        vs = f"election with {peer.node} ({peer.state})"
        if s.replicated:
            refusal = freshness.neither_provable(self.data, peer.record, s.peer)
            if refusal is not None:
                self.reason = f"{vs}: {refusal}{freshness.waiting_hint(s.peer, s.module)}"
                return None
            order, kept = self._data_order(peer)
            if order > 0:
                return won, f"{vs}: this node has the newer data ({freshness.describe(self.data)})"
            if order < 0:
                why = "its primary term is older" if kept else "it has the newer data"
                return lost, f"{vs}: {peer.node} wins, {why} ({freshness.describe(peer.record)})"

        def rank(node: NodeId, primary_epoch: int) -> tuple[bool, int, str]:
            # higher wins; names compare inverted so that the smaller name wins a tie
            return (
                s.preferred == node,
                primary_epoch,
                "".join(chr(0x10FFFF - ord(c)) for c in node),
            )

        mine = rank(s.node, self.primary_epoch)
        theirs = rank(peer.node, peer.primary_epoch)
        if mine > theirs:
            return won, f"{vs}: this node wins"
        return lost, f"{vs}: {peer.node} wins"

    def _peer_is_current(self, peer: PeerModuleStatus) -> bool:
        """The peer's status was built knowing this node's current status."""
        return peer.acked_version == self.version

    def _yields_to_peer(self, peer: PeerModuleStatus) -> bool:
        """Dual primary: the node whose primary term started later yields; tie → larger name.

        With arbiters the other way round, by the fencing tokens: the later lease holder got
        its lease knowing every ran-alone record, so the other one's changes at the same
        generation were never acknowledged (held, docs/split-brain.md): it yields."""
        if _later(peer.lease, self.lease):
            return True
        if _later(self.lease, peer.lease):
            return False
        if self.primary_epoch != peer.primary_epoch:
            return self.primary_epoch > peer.primary_epoch
        return self.settings.node > peer.node

    # ------------------------------------------------------------------ moving
    def _persist(self) -> Persist:
        return Persist(
            self.wanted,
            self.state,
            self.epoch,
            self.primary_epoch,
            self.peer_generation_seen,
            self.lease,
        )

    def _move(self, now: float, trigger: Trigger, why: str, actions: list[Action]) -> None:
        edge: Edge | None = TABLE[self.state].get(trigger)
        if edge is None:
            raise IllegalTransition(f"{self.state} has no edge for {trigger!r}")
        old, new = self.state, edge.to
        repl = self.settings.replicated
        keep_goal = self.goal == Goal.STOP and old in SCRIPT_OF and new in SCRIPT_OF
        # replicated: `prim`/`second` from STOP keep their goal through prestart
        carry_goal = repl and old == State.STARTING and self.goal in (Goal.PRIM, Goal.SECOND)
        self.state = new
        self.goal = Goal.STOP if keep_goal else self.goal if carry_goal else edge.goal
        self.reason = why
        if edge.goal == Goal.STOP and not keep_goal:
            self.stop_cause = why  # the reason STOP will show, whatever the scripts did after
        if new == State.STOP:
            self.reason, self.stop_cause = self.stop_cause or why, ""
        actions.append(Transitioned(old, new, why))
        if trigger == Trigger.FENCED:
            self.fenced = True
            actions.append(DelVips())  # at once: the stop script may take long
        self.version += 1
        if repl and self.data.ran_alone and trigger in _YIELDS_DATA:
            self.mark_outdated = True  # this node's changes made alone will be discarded
        # exit actions and flags
        if old == State.STOPPING_PRIM and new != State.STARTING_PRIM:
            actions.append(DelVips())
            if repl:
                self._set_replication(now, ReplicaRole.IDLE, actions)
        if repl and old == State.STOPPING_SECOND and new != State.STARTING_SECOND:
            self._set_replication(now, ReplicaRole.IDLE, actions)
        if old == State.SECOND or new in (State.STOP, State.WAIT):
            self.swap_request = False
        if old in (State.PRIM, State.ALONE) and edge.goal == Goal.SECOND:
            self.handover = trigger != Trigger.DUAL_PRIMARY  # leave the role *for* the peer
        elif new in (State.STOP, State.WAIT, State.STARTING_PRIM):
            self.handover = False
        if new in (State.STOP, State.STARTING, State.WAIT, State.STARTING_PRIM):
            self.peer_was_in_sync = False
        # entry actions
        if new == State.STARTING_PRIM:
            self.fenced = False
            self.replica_fenced = ""
        if new == State.STARTING_PRIM and old != State.STOPPING_PRIM:
            if self.arb.enabled:
                self.lease = self.arb.tokens(now)  # persisted below, carried by heartbeats
            self.epoch = max(self.epoch, self.peer.epoch if self.peer else 0) + 1
            self.primary_epoch = self.epoch
        if new == State.WAIT:
            self.wait_deadline = now + self.settings.startup_wait
        actions.append(self._persist())
        if old == State.STARTING_PRIM and new in (State.PRIM, State.ALONE):
            actions.append(StartCheckers())
        if old in (State.PRIM, State.ALONE) and new == State.STOPPING_PRIM:
            actions.append(StopCheckers())
        if new == State.STARTING_PRIM:
            if repl and (old != State.STOPPING_PRIM or self.replica_role != ReplicaRole.PRIMARY):
                self._set_replication(now, ReplicaRole.PRIMARY, actions)
            actions.append(AddVips())
        if repl and new == State.STARTING_SECOND:
            self._set_replication(now, ReplicaRole.SECONDARY, actions)
        if self.goal != Goal.PRIM:
            self.force = False
        script = SCRIPT_OF.get(new)
        if script is not None:
            actions.append(RunScript(script, f"{old}->{new}"))


def _later(a: tuple[tuple[str, int], ...], b: tuple[tuple[str, int], ...]) -> bool:
    """Token ``a`` is from a later lease than ``b``: a greater term of a common issuer."""
    terms = dict(b)
    return any(term > terms[issuer] for issuer, term in a if issuer in terms)


#: Triggers by which a node that ran alone becomes secondary of a peer whose copy is kept.
_YIELDS_DATA = frozenset({Trigger.DUAL_PRIMARY, Trigger.PEER_PRIMARY, Trigger.LOST_ELECTION})
