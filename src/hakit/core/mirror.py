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
- if both are primary after a partition heals (no arbitration yet: each ran ALONE), the node
  whose primary term began later yields (the former primary stays).

Caveats: without arbitration (a later issue), a cut between the nodes makes both primary
until the network heals; that is the documented behaviour of this version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hakit.core.actions import (
    Action,
    AddVips,
    AnnounceVips,
    DelVips,
    Persist,
    RunScript,
    StartCheckers,
    StopCheckers,
    Transitioned,
)
from hakit.core.events import (
    CheckerAction,
    CheckerFailed,
    Command,
    Event,
    PeerHeard,
    PeerLost,
    PeerModuleStatus,
    ScriptDone,
    Tick,
    Verb,
)
from hakit.core.mirror_table import SCRIPT_OF, TABLE, THEN_TRIGGER, Edge, Goal, Trigger
from hakit.model import NodeId, State


class CommandRefused(Exception):
    """An operator command that cannot apply in the current state; the text says why."""


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


@dataclass(frozen=True)
class Durable:
    """The record persisted by the driver and given back at the next start of the agent."""

    wanted: bool = False
    state: State = State.STOP
    epoch: int = 0
    primary_epoch: int = 0


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
    version: int  # bumped at every change of the fields above but reason


@dataclass
class _Counters:
    restarts: list[float] = field(default_factory=list)  # times of checker restarts
    automatic: list[float] = field(default_factory=list)  # restarts + failovers (loop guard)


class MirrorMachine:
    """Mirror module on one node. Call :meth:`step` for every event; read :meth:`status`."""

    def __init__(self, settings: MirrorSettings, durable: Durable | None = None) -> None:
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
        self.handover = False
        self.swap_request = False
        self.reason = (
            "agent started" if d.state == State.STOP else f"agent restarted (was {d.state})"
        )
        self.wait_deadline = 0.0
        self.version = 0
        self.stop_cause = ""
        self._counters = _Counters()

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
                self._command(now, event, actions)
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
                self.peer_silent_for = None
                self.epoch = max(self.epoch, status.epoch)
                if status.claims_primary and self.handover:
                    self.handover = False  # it took over: our hand-over is complete
                    self.version += 1
            case PeerLost(silent_for=silent):
                self.peer = None
                self.peer_silent_for = silent
            case CheckerFailed():
                self._checker_failed(now, event, actions)
            case Tick():
                pass
        self._settle(now, actions)
        return actions

    # ------------------------------------------------------------------ events
    def _command(self, now: float, cmd: Command, actions: list[Action]) -> None:
        verb, state, peer = cmd.verb, self.state, self.peer
        if verb == Verb.STOP:
            self.wanted = False
            if state == State.STOP:
                raise CommandRefused("the module is already stopped")
            if state in SCRIPT_OF:  # a script runs: stop once it has finished
                self.goal = Goal.STOP
                self.reason = "stop requested: stopping once the running script has finished"
                actions.append(Persist(False, self.state, self.epoch, self.primary_epoch))
                return
            self._move(now, Trigger.STOP, "stop requested by the operator", actions)
            return
        if state in SCRIPT_OF:
            raise CommandRefused(
                f"busy: {SCRIPT_OF[state]} is running ({state}); try again when it has finished"
            )
        if verb in (Verb.START, Verb.PRIM, Verb.SECOND) and state == State.STOP:
            if verb == Verb.PRIM and peer is not None and peer.claims_primary:
                raise CommandRefused(f"peer {peer.node} is {peer.state}: use `swap` instead")
            self.wanted = True
            trigger = {Verb.START: Trigger.START, Verb.PRIM: Trigger.PRIM}.get(verb, Trigger.SECOND)
            self._move(now, trigger, f"{verb} requested by the operator", actions)
            return
        if verb == Verb.START:
            raise CommandRefused(f"the module is already started ({state})")
        if verb == Verb.PRIM:
            if state in (State.PRIM, State.ALONE):
                raise CommandRefused(f"this node is already primary ({state})")
            if peer is not None and peer.claims_primary:
                raise CommandRefused(f"peer {peer.node} is {peer.state}: use `swap` instead")
            self._move(now, Trigger.PRIM, "prim requested by the operator", actions)
            return
        if verb in (Verb.SWAP, Verb.SECOND):
            self._swap(now, verb, actions)
            return
        if verb == Verb.RESTART:
            if state not in (State.PRIM, State.ALONE):
                raise CommandRefused(f"restart applies to the primary; this node is {state}")
            self._move(now, Trigger.RESTART, "restart requested by the operator", actions)
            return
        if verb == Verb.STOPSTART:
            if state not in (State.PRIM, State.ALONE, State.SECOND):
                raise CommandRefused(f"stopstart needs a started module; this node is {state}")
            self._move(now, Trigger.STOPSTART, "stopstart requested by the operator", actions)
            return
        raise CommandRefused(f"{verb} does not apply in state {state}")  # pragma: no cover

    def _swap(self, now: float, verb: Verb, actions: list[Action]) -> None:
        state, peer = self.state, self.peer
        has_secondary = peer is not None and peer.state in (State.SECOND, State.STARTING_SECOND)
        if state in (State.PRIM, State.ALONE):
            if not has_secondary:
                raise CommandRefused(f"{verb}: no secondary to hand over to (this node is {state})")
            self._move(now, Trigger.SWAP, f"{verb} requested: handing over", actions)
            return
        if verb == Verb.SECOND and state == State.WAIT:
            self._move(now, Trigger.SECOND, "second requested by the operator", actions)
            return
        if state == State.SECOND and verb == Verb.SWAP:
            if peer is None or not peer.claims_primary or peer.state == State.STOPPING_PRIM:
                raise CommandRefused("swap: the peer is not primary")
            self.swap_request = True
            self.version += 1
            self.reason = f"swap requested: asking {peer.node} to hand over"
            return
        raise CommandRefused(f"{verb} does not apply in state {state}")

    def _script_done(self, now: float, done: ScriptDone, actions: list[Action]) -> None:
        expected = SCRIPT_OF.get(self.state)
        if done.script != expected:
            return  # stale completion (cannot happen with a correct driver): ignore
        what = f"{done.script} {'ok' if done.ok else 'failed'}"
        if done.detail:
            what += f" ({done.detail})"
        goal, state = self.goal, self.state
        if state in (State.STOPPING_PRIM, State.STOPPING_SECOND, State.STOPPING) and (
            goal is not None
        ):
            if goal == Goal.PRIM and self.peer is not None and self.peer.claims_primary:
                goal = Goal.SECOND if state == State.STOPPING_SECOND else Goal.STOP
                what += f"; peer {self.peer.node} is primary now"
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
            self._move(now, Trigger.DONE_PEERED if peered else Trigger.DONE_ALONE, what, actions)
        else:
            self._move(now, Trigger.DONE, what, actions)

    def _checker_failed(self, now: float, ev: CheckerFailed, actions: list[Action]) -> None:
        if self.state not in (State.PRIM, State.ALONE):
            return  # a late report from a checker being stopped
        s = self.settings
        window = now - s.guard_period
        c = self._counters
        c.restarts[:] = [t for t in c.restarts if t > window]
        c.automatic[:] = [t for t in c.automatic if t > window]
        what = f"checker {ev.checker}: {ev.detail}"
        if ev.action == CheckerAction.STOP:
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
        restart = ev.action == CheckerAction.RESTART and len(c.restarts) < s.max_restarts
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

    # ------------------------------------------------------------------ decisions
    def _settle(self, now: float, actions: list[Action]) -> None:
        """Take the automatic transitions the current situation calls for (at most a few)."""
        for _ in range(4):
            decided = self._decide(now)
            if decided is None:
                return
            trigger, why = decided
            self._move(now, trigger, why, actions)

    def _decide(self, now: float) -> tuple[Trigger, str] | None:
        match self.state:
            case State.WAIT:
                return self._decide_wait(now)
            case State.SECOND:
                return self._decide_second()
            case State.PRIM | State.ALONE:
                return self._decide_primary()
        return None

    def _decide_wait(self, now: float) -> tuple[Trigger, str] | None:
        peer, s = self.peer, self.settings
        if self.goal == Goal.PRIM:
            if peer is not None and peer.claims_primary:
                self.goal = None
                return Trigger.PEER_PRIMARY, f"prim refused: peer {peer.node} is {peer.state}"
            return Trigger.PRIM, "started as primary by the operator"
        if self.goal == Goal.SECOND:
            return Trigger.SECOND, "started as secondary by the operator"
        if peer is None:
            if now < self.wait_deadline:
                return None
            if not s.failover:
                self.reason = f"waiting for {s.peer}: failover is off (use `hakit prim`)"
                return None
            return Trigger.NO_PEER, f"{s.peer} not heard for {s.startup_wait:g} s"
        if peer.claims_primary:
            return Trigger.PEER_PRIMARY, f"{peer.node} is {peer.state}"
        if not self._peer_is_current(peer):
            return None
        if peer.state in (State.STOP, State.STOPPING):
            return Trigger.PEER_STOPPED, f"{peer.node} is {peer.state}"
        if peer.state in (State.SECOND, State.STARTING_SECOND):
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
            if s.failover:
                return Trigger.PEER_LOST, why
            return Trigger.PEER_LOST_NO_FAILOVER, why + "; failover is off"
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
        if peer.handover:
            return Trigger.HANDED_OVER, f"{peer.node} handed over ({peer.state})"
        if peer.state in (State.STOP, State.STOPPING):
            return Trigger.PEER_STOPPED, f"{peer.node} is {peer.state}: taking over"
        if peer.state == State.SECOND and not self.handover:  # handed over: the peer takes it
            won = self._election(Trigger.WON_ELECTION, Trigger.LOST_ELECTION)
            return won if won[0] == Trigger.WON_ELECTION else None
        return None

    def _decide_primary(self) -> tuple[Trigger, str] | None:
        peer, s = self.peer, self.settings
        if peer is None:
            if self.state == State.PRIM:
                silent = self.peer_silent_for or 0.0
                return Trigger.PEER_LOST, f"{s.peer} lost: no heartbeat for {silent:.1f} s"
            return None
        if peer.claims_primary and peer.state in (State.PRIM, State.ALONE):
            if self._yields_to_peer(peer):
                return Trigger.DUAL_PRIMARY, (
                    f"{peer.node} is also {peer.state}; its primary term is older "
                    f"(epoch {peer.primary_epoch} vs {self.primary_epoch}): yielding"
                )
            return None
        if peer.swap_request and peer.state == State.SECOND and self.state == State.PRIM:
            return Trigger.SWAP_REQUESTED, f"{peer.node} asked to swap"
        if self.state == State.ALONE and peer.state == State.SECOND:
            return Trigger.PEER_SECONDARY, f"{peer.node} is SECOND"
        if self.state == State.PRIM and peer.state not in (State.SECOND, State.STARTING_SECOND):
            return Trigger.PEER_LEFT, f"{peer.node} is {peer.state}"
        return None

    def _election(self, won: Trigger, lost: Trigger) -> tuple[Trigger, str]:
        """Both nodes compute the same winner from the same inputs (see module docstring)."""
        s, peer = self.settings, self.peer
        assert peer is not None

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
            return won, f"election with {peer.node} ({peer.state}): this node wins"
        return lost, f"election with {peer.node} ({peer.state}): {peer.node} wins"

    def _peer_is_current(self, peer: PeerModuleStatus) -> bool:
        """The peer's status was built knowing this node's current status."""
        return peer.acked_version == self.version

    def _yields_to_peer(self, peer: PeerModuleStatus) -> bool:
        """Dual primary: the node whose primary term started later yields; tie → larger name."""
        if self.primary_epoch != peer.primary_epoch:
            return self.primary_epoch > peer.primary_epoch
        return self.settings.node > peer.node

    # ------------------------------------------------------------------ moving
    def _move(self, now: float, trigger: Trigger, why: str, actions: list[Action]) -> None:
        edge: Edge | None = TABLE[self.state].get(trigger)
        if edge is None:
            raise IllegalTransition(f"{self.state} has no edge for {trigger!r}")
        old, new = self.state, edge.to
        keep_goal = self.goal == Goal.STOP and old in SCRIPT_OF and new in SCRIPT_OF
        self.state = new
        self.goal = Goal.STOP if keep_goal else edge.goal
        self.reason = why
        if edge.goal == Goal.STOP and not keep_goal:
            self.stop_cause = why  # the reason STOP will show, whatever the scripts did after
        if new == State.STOP:
            self.reason, self.stop_cause = self.stop_cause or why, ""
        actions.append(Transitioned(old, new, why))
        self.version += 1
        # exit actions and flags
        if old == State.STOPPING_PRIM and new != State.STARTING_PRIM:
            actions.append(DelVips())
        if old == State.SECOND or new in (State.STOP, State.WAIT):
            self.swap_request = False
        if old in (State.PRIM, State.ALONE) and edge.goal == Goal.SECOND:
            self.handover = trigger != Trigger.DUAL_PRIMARY  # leave the role *for* the peer
        elif new in (State.STOP, State.WAIT, State.STARTING_PRIM):
            self.handover = False
        # entry actions
        if new == State.STARTING_PRIM and old != State.STOPPING_PRIM:
            self.epoch = max(self.epoch, self.peer.epoch if self.peer else 0) + 1
            self.primary_epoch = self.epoch
        if new == State.WAIT:
            self.wait_deadline = now + self.settings.startup_wait
        actions.append(Persist(self.wanted, new, self.epoch, self.primary_epoch))
        if old == State.STARTING_PRIM and new in (State.PRIM, State.ALONE):
            actions.append(StartCheckers())
        if old in (State.PRIM, State.ALONE) and new == State.STOPPING_PRIM:
            actions.append(StopCheckers())
        if new == State.STARTING_PRIM:
            actions.append(AddVips())
        script = SCRIPT_OF.get(new)
        if script is not None:
            actions.append(RunScript(script, f"{old}->{new}"))
