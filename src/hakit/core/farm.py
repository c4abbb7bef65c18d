"""The farm module state machine of one node: events and ticks in, actions out. Pure.

Every node of a farm runs the application and receives the module's VIP; the clients are split
into 256 buckets (:mod:`hakit.core.buckets`) and each node's kernel filter accepts only the
buckets it *claims*. One :class:`FarmMachine` per (node, farm module); the driver feeds it events
with the current time (``step(now, event)``) and executes the returned actions in order.

States (transitions as data in :data:`TABLE`)::

    STOP --start--> STARTING (prestart, then start_both) --ok--> UP
    STARTING --a script failed--> WAIT (farm torn down, application not started)
    UP --checker failed--> WAIT (buckets released, application kept) --all recovered--> UP
    UP | WAIT --stop | restart--> STOPPING (release, drain, stop_both, poststop) --> STOP
                                                                  (restart: --> STARTING)

**Membership.** A node is a *member* while it is UP (a failing checker moves it to WAIT, which
is not). Each node computes the membership from what it knows: itself if member, plus every
peer that is alive (heard, not lost) and whose latest status says member. The *target* is
``buckets.owners`` of the members' weights: the same on every node that has the same view.

**Claims evolve safely.** A bucket is released as soon as the target no longer gives it to this
node. A bucket of the target is acquired only when (a) every peer is lost, or was never heard
although ``startup_wait`` has passed since the machine started, or is heard and its latest
status acknowledges this node's *current* status version (``acked_version``), and (b) no alive
peer's latest status claims it. Every change of state, membership, claims, loose set or ARP
role bumps the status version, and the driver publishes a status only after the actions of
its batch ran. Together these guarantee that two nodes which hear each other never both claim
a bucket: when both decide, each knows the other's current membership, and rendezvous hashing
gives a bucket to one of two members whatever the other members are.

**Loose buckets.** A bucket acquired whose last known claimer is now lost (it died, or is cut
off) is *loose*: the node also accepts that bucket's packets that belong to no connection it
tracks, so the dead node's clients get a TCP reset at once instead of hanging. A bucket taken
over from a node that released it cleanly (its established connections keep going there), or
that nobody claimed, is not loose. A loose flag ends when the node releases the bucket.

**ARP.** Exactly one member answers ARP for the VIP (with the virtual MAC): the member with the
smallest node name, which every node computes from the same membership. The role is dropped at
once and taken like a bucket (once every peer acknowledged this node's current status), so
nodes that start together do not all answer for a moment.

**Checkers.** A failing checker (whatever its configured action) takes the node out of the
membership: UP -> WAIT, every bucket released cleanly (its established connections continue),
the application keeps running and the checkers keep checking. When every failing checker has
reported :class:`CheckerRecovered`, the node goes back to UP and takes its buckets again.

**A failed start** (prestart or start_both) leaves the node in WAIT with the farm torn down and
the reason saying so; ``hakit restart`` tries again (stop_both, poststop, then a new start) and
``hakit stop`` stops it (stop_both if start_both had run, then poststop).

**A clean stop** (``stop``; ``restart`` is a stop then a start): the checkers stop, every
bucket is released and the new status published (the other members take the buckets as a
clean leave), then the node waits for its established connections to the VIP to end (at most
``drain_timeout``), runs stop_both, removes the farm, runs poststop.

Driver contract, for every list of actions returned by :meth:`FarmMachine.step`:

- execute the actions in list order; every action but :class:`RunScript` and
  :class:`AwaitDrain` completes before the next one runs: :class:`FarmPersist` is durable on
  disk ("persist, then act"), :class:`SetupFarm`, :class:`ApplyBuckets` (one atomic nftables
  transaction) and :class:`TeardownFarm` are in effect in the kernel;
- at most one :class:`RunScript` or :class:`AwaitDrain` is in a list and it comes last; its end
  is reported as :class:`ScriptDone` (same script name) or :class:`Drained`. If an action
  before a ``RunScript`` fails, the driver skips the script and reports
  ``ScriptDone(script, ok=False, detail=<what failed>)``; a script absent from the module
  folder is reported done and ok. ``AwaitDrain`` is answered when the established connections
  to the VIP on this node have ended, or after its timeout with the number still open;
- the status (:attr:`FarmMachine.status`, read after ``step`` returned) goes into heartbeats
  only once every action of the batch has run (the last one, ``RunScript`` or ``AwaitDrain``,
  once started): a peer never sees a bucket released before the kernel has stopped accepting
  it, nor this node's new version before the change it stands for is applied;
- heartbeats carry, per peer, the version of that peer's status this node had processed (for
  the peer's current incarnation), which the receiver turns into ``acked_version`` (-1 for
  another incarnation); a peer's statuses are fed in the order it sent them;
- at agent start, before the first heartbeat carrying this module is sent, whatever an earlier
  run left in the kernel (nftables, VIP on ``lo``) is removed as by ``TeardownFarm``: a new
  machine claims nothing, so the peers may take its buckets at once. The driver then sends
  ``Command(START)`` if the durable record says ``wanted``.

Caveats: without arbitration, a node cut off from the others believes them dead and claims
every bucket until the network heals (then the claims converge again). Loose is decided from
what this node saw (the driver reports a peer whose agent restarted as lost, first): a node
that powers off and whose new agent is heard only after its buckets moved is seen as having
released them cleanly, so its clients' old connections hang until their own timeouts; and a
node that takes a loose bucket resets the connections that a third node, which had released
that bucket cleanly earlier, may still be draining.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hakit.core.actions import RunScript, StartCheckers, StopCheckers, Transitioned
from hakit.core.buckets import BUCKETS, owned_by, owners, shares
from hakit.core.events import CheckerFailed, Command, PeerLost, ScriptDone, Tick, Verb
from hakit.core.mirror import CommandRefused as CommandRefused  # noqa: PLC0414 (re-exported)
from hakit.model import NodeId, State

MAX_NODES = 32

_Members = tuple[tuple[NodeId, int], ...]  # (node, weight) of each member, sorted


class IllegalTransition(Exception):
    """A trigger with no edge from the current state: a bug in the machine, never expected."""


# ---------------------------------------------------------------------- data


@dataclass(frozen=True)
class FarmSettings:
    """What the machine needs from the configuration (durations in seconds)."""

    node: NodeId
    nodes: tuple[NodeId, ...]  # every node of the farm, this one included; 2 to 32
    weights: Mapping[NodeId, int] = field(default_factory=dict)  # share weight ≥ 1; absent: 1
    seed: int = 0  # bucket hash seed: the same on every node (the kernel rules use it too)
    startup_wait: float = 3.0  # a starting node waits this long to hear every peer; ≥ hb timeout
    drain_timeout: float = 30.0  # a clean stop waits this long for open connections to end
    module: str = ""  # module name, for the commands suggested in reasons

    def __post_init__(self) -> None:
        if self.node not in self.nodes:
            raise ValueError(f"nodes: {self.node} (this node) is not listed")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("nodes: a node is listed twice")
        if not 2 <= len(self.nodes) <= MAX_NODES:
            raise ValueError(f"nodes: a farm has 2 to {MAX_NODES} nodes, not {len(self.nodes)}")
        for node, weight in self.weights.items():
            if node not in self.nodes or weight < 1:
                raise ValueError(f"weights: {node} = {weight}: expected a farm node and ≥ 1")
        if self.startup_wait < 0 or self.drain_timeout < 0:
            raise ValueError("startup_wait, drain_timeout: expected ≥ 0 seconds")

    def weight(self, node: NodeId) -> int:
        return self.weights.get(node, 1)

    @property
    def peers(self) -> tuple[NodeId, ...]:
        return tuple(n for n in self.nodes if n != self.node)


@dataclass(frozen=True)
class FarmPeerStatus:
    """A peer's status of the module, as carried in its latest heartbeat.

    ``claims``: the buckets whose new connections the peer's filter accepts now. ``acked_version``:
    the version of this node's status (current incarnation) the peer had processed when it sent
    this heartbeat, or -1.
    """

    node: NodeId
    state: State
    member: bool
    claims: frozenset[int]
    version: int
    acked_version: int = -1


@dataclass(frozen=True)
class FarmStatus:
    """This node's status of the module: what heartbeats carry and `hakit state` shows."""

    state: State
    member: bool  # UP with no failing checker: counted in the membership
    claims: frozenset[int]  # buckets this node's filter accepts (new connections)
    loose: frozenset[int]  # ⊆ claims: taken from a node that died (stray packets get a reset)
    reason: str
    wanted: bool
    version: int  # bumped at every change of the other fields but reason
    arp: bool  # this node answers ARP for the VIP


@dataclass(frozen=True)
class FarmDurable:
    """The record persisted by the driver and given back at the next start of the agent."""

    wanted: bool = False
    state: State = State.STOP


# ---------------------------------------------------------------------- events


@dataclass(frozen=True)
class FarmPeerHeard:
    """A heartbeat from a peer arrived carrying its status of this module."""

    status: FarmPeerStatus


@dataclass(frozen=True)
class CheckerRecovered:
    """A checker that had failed reports the application healthy again."""

    checker: str


@dataclass(frozen=True)
class Drained:
    """Answer to :class:`AwaitDrain`: the connections ended (0), or the timeout passed with
    ``remaining`` still open."""

    remaining: int = 0


FarmEvent = (
    Tick
    | FarmPeerHeard
    | PeerLost
    | ScriptDone
    | CheckerFailed
    | CheckerRecovered
    | Drained
    | Command
)


# ---------------------------------------------------------------------- actions


@dataclass(frozen=True)
class SetupFarm:
    """Prepare the node for the farm, owning no bucket: the VIP on ``lo``, the ARP sysctls,
    promiscuous mode, the nftables tables (replacing any left by an earlier run). Afterwards no
    new connection to the VIP is accepted."""


@dataclass(frozen=True)
class ApplyBuckets:
    """Set the filter in one atomic nftables transaction.

    For every bucket of ``owned``, new connections (TCP SYN, new UDP flows) are accepted; for
    the ``loose`` ones (⊆ owned) also packets outside any tracked connection, so that the kernel
    resets the dead owner's connections. Packets of this node's own tracked connections are
    always accepted, whatever their bucket. ``arp``: answer ARP for the VIP with the virtual MAC.
    ``reason`` says why, for the log.
    """

    owned: frozenset[int]
    loose: frozenset[int]
    arp: bool
    reason: str = ""


@dataclass(frozen=True)
class AwaitDrain:
    """Wait for the established connections to the VIP on this node to end, at most
    ``timeout`` seconds; answered by :class:`Drained`."""

    timeout: float


@dataclass(frozen=True)
class TeardownFarm:
    """Remove everything :class:`SetupFarm` added (no error for what is already gone)."""


@dataclass(frozen=True)
class FarmPersist:
    """Write the module's durable record (atomically, fsynced) before the next action."""

    wanted: bool
    state: State


FarmAction = (
    Transitioned
    | FarmPersist
    | SetupFarm
    | ApplyBuckets
    | AwaitDrain
    | TeardownFarm
    | RunScript
    | StartCheckers
    | StopCheckers
)


# ---------------------------------------------------------------------- transitions


class FarmTrigger(StrEnum):
    """Named reasons to move, computed by the machine from events."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    STARTED = "start_both ok"
    START_FAILED = "start script failed"
    THEN_STOP = "then stop"  # a stop was requested while a start script ran
    CHECK_FAILED = "checker failed"
    CHECKS_OK = "checkers recovered"
    STOPPED = "poststop done"
    THEN_START = "then start again"  # restart


_S, _T = State, FarmTrigger

#: ``TABLE[state][trigger] -> next state``: the machine moves only along these edges.
TABLE: dict[State, dict[FarmTrigger, State]] = {
    _S.STOP: {_T.START: _S.STARTING},
    _S.STARTING: {_T.STARTED: _S.UP, _T.START_FAILED: _S.WAIT, _T.THEN_STOP: _S.STOPPING},
    _S.UP: {_T.STOP: _S.STOPPING, _T.RESTART: _S.STOPPING, _T.CHECK_FAILED: _S.WAIT},
    _S.WAIT: {_T.STOP: _S.STOPPING, _T.RESTART: _S.STOPPING, _T.CHECKS_OK: _S.UP},
    _S.STOPPING: {_T.STOPPED: _S.STOP, _T.THEN_START: _S.STARTING},
}


# ---------------------------------------------------------------------- machine


class FarmMachine:
    """Farm module on one node. Call :meth:`step` for every event; read :attr:`status`.

    ``now``: the time the machine (the agent) started, which begins the start-up wait.
    """

    def __init__(self, settings: FarmSettings, durable: FarmDurable, now: float) -> None:
        self.settings = settings
        self.state = State.STOP
        self.wanted = durable.wanted
        self.reason = (
            "agent started"
            if durable.state == State.STOP
            else f"agent restarted (was {durable.state})"
        )
        self.started_at = now
        self.version = 0
        # the sequence of a transitional state: the script or drain under way, and what next
        self.phase: str | None = None  # prestart, start_both, drain, stop_both, poststop
        self.goal: State | None = None  # STARTING: STOP; STOPPING: STARTING (restart)
        self.left: State = State.STOP  # the state STOPPING was entered from
        self.stop_cause = ""
        self.farm_set_up = False
        self.served = False  # some bucket was owned since SetupFarm: drain before stopping
        self.app_started = False  # start_both ran and stop_both has not
        self.checkers_on = False
        self.failing: dict[str, str] = {}  # failing checker -> detail
        # claims, as last applied
        self.owned: frozenset[int] = frozenset()
        self.loose: frozenset[int] = frozenset()
        self.arp = False
        # the peers
        self.peers: dict[NodeId, FarmPeerStatus] = {}  # latest status (kept while lost)
        self.lost: dict[NodeId, float] = {}  # lost peer -> silent for (s)
        # bucket -> (the peer that claimed it last, whether its latest status still claims it)
        self.previous: dict[int, tuple[NodeId, bool]] = {}
        # membership (node, weight)... -> (owners, this node's buckets)
        self._targets: dict[_Members, tuple[tuple[NodeId | None, ...], frozenset[int]]] = {}
        self._calm: tuple[object, ...] = ()  # nothing to do while members and claims stay so
        self._key = self._status_key()

    # ------------------------------------------------------------------ public
    @property
    def member(self) -> bool:
        """Counted in the membership: UP (a failing checker moves the node to WAIT)."""
        return self.state == State.UP

    @property
    def status(self) -> FarmStatus:
        return FarmStatus(
            state=self.state,
            member=self.member,
            claims=self.owned,
            loose=self.loose,
            reason=self.reason,
            wanted=self.wanted,
            version=self.version,
            arp=self.arp,
        )

    def command(self, now: float, cmd: Command) -> list[FarmAction]:
        """Apply an operator command; raises :class:`CommandRefused` (nothing changed) if it
        does not apply now."""
        return self.step(now, cmd)

    def step(self, now: float, event: FarmEvent) -> list[FarmAction]:
        """Apply one event; return the actions to execute, in order (module docstring).

        Raises :class:`CommandRefused` for a command that does not apply now (nothing changed).
        """
        actions: list[FarmAction] = []
        last: list[FarmAction] = []  # the one RunScript / AwaitDrain, appended at the end
        match event:
            case Command():
                self._command(event, actions, last)
            case ScriptDone():
                self._script_done(event, actions, last)
            case Drained(remaining=remaining):
                if self.phase == "drain":
                    self.phase = None
                    if remaining:
                        self.reason = f"drain timeout: {remaining} connections still open"
                    self._stop_application(actions, last)
            case FarmPeerHeard(status=status):
                self._heard(status)
            case PeerLost(node=node, silent_for=silent):
                if node in self.settings.peers:
                    self.lost[node] = silent
                    # its last claims stay "claimed" in ``previous``: a status heard later (a
                    # new incarnation that claims nothing) is not a clean release
                    self.peers.pop(node, None)
            case CheckerFailed():
                self._checker_failed(event, actions)
            case CheckerRecovered(checker=checker):
                known = self.failing.pop(checker, None) is not None
                if known and not self.failing and self.state == State.WAIT:
                    why = f"checker {checker} recovered: rejoining the farm"
                    self._move(FarmTrigger.CHECKS_OK, why, actions, last)
            case Tick():
                pass
        self._sync_version()  # peers must acknowledge a new state before this node acquires
        self._rebalance(now, actions)
        self._sync_version()
        return actions + last

    def view(self) -> dict[str, Any]:
        """The module as `hakit state` shows it on this node (JSON-ready):

        ``members``: the membership as this node sees it, sorted; ``shares``: buckets each
        member should own (the target), e.g. ``{"n1": 86, "n2": 85, "n3": 85}``; ``claimed``:
        buckets each node (this one and the alive peers) accepts now, from the latest statuses;
        ``buckets``, ``loose``: this node's claims and how many of them are loose; ``arp``: this
        node answers ARP for the VIP; ``state``, ``reason``.
        """
        members = self._members()
        claimed = {self.settings.node: len(self.owned)}
        for node, st in self.peers.items():
            if node not in self.lost:
                claimed[node] = len(st.claims)
        return {
            "state": self.state.value,
            "members": members,
            "shares": shares(self._owners(members)),
            "claimed": dict(sorted(claimed.items())),
            "buckets": len(self.owned),
            "loose": len(self.loose),
            "arp": self.arp,
            "reason": self.reason,
        }

    # ------------------------------------------------------------------ commands
    def _command(self, cmd: Command, actions: list[FarmAction], last: list[FarmAction]) -> None:
        verb, state, module = cmd.verb, self.state, self.settings.module
        doing = "the connection drain" if self.phase == "drain" else self.phase
        busy = f"busy: {doing} is running ({state}); try again when it has finished"
        if verb == Verb.START:
            if state == State.STOP:
                self.wanted = True
                self._move(FarmTrigger.START, "start requested by the operator", actions, last)
                return
            if state == State.WAIT and not self.failing:
                raise CommandRefused(
                    f"the module is already started (WAIT: its start failed); "
                    f"`hakit restart -m {module}` tries again"
                )
            raise CommandRefused(f"the module is already started ({state})")
        if verb == Verb.STOP:
            if state == State.STOP:
                raise CommandRefused("the module is already stopped")
            if state == State.STOPPING and self.goal != State.STARTING:
                raise CommandRefused(f"the module is already stopping ({doing} is running)")
            self.wanted = False
            if state in (State.STARTING, State.STOPPING):
                starting = state == State.STARTING
                self.goal = State.STOP if starting else None
                self.reason = (
                    f"stop requested: stopping once {doing} has finished"
                    if starting
                    else "stop requested: not starting again"
                )
                self.stop_cause = "stop requested by the operator"
                actions.append(FarmPersist(self.wanted, self.state))
                return
            self._move(FarmTrigger.STOP, "stop requested by the operator", actions, last)
            return
        if verb in (Verb.RESTART, Verb.STOPSTART):
            if state in (State.UP, State.WAIT):
                self._move(FarmTrigger.RESTART, f"{verb} requested by the operator", actions, last)
                return
            if state == State.STOP:
                raise CommandRefused(f"the module is stopped: `hakit start -m {module}`")
            raise CommandRefused(busy)
        raise CommandRefused(f"{verb} applies to mirror modules only")

    # ------------------------------------------------------------------ events
    def _script_done(
        self, done: ScriptDone, actions: list[FarmAction], last: list[FarmAction]
    ) -> None:
        if done.script != self.phase:
            return  # stale completion (cannot happen with a correct driver): ignore
        self.phase = None
        what = f"{done.script} {'ok' if done.ok else 'failed'}"
        if done.detail:
            what += f" ({done.detail})"
        if done.script in ("prestart", "start_both"):
            if self.goal == State.STOP:
                self._move(FarmTrigger.THEN_STOP, f"{what}; stop was requested", actions, last)
            elif not done.ok:
                module = self.settings.module
                why = (
                    f"{what}: the application did not start; `hakit restart -m {module}` "
                    f"tries again, `hakit stop -m {module}` stops"
                )
                self._move(FarmTrigger.START_FAILED, why, actions, last)
            elif done.script == "prestart":
                self.app_started = True
                self.phase = "start_both"
                self.reason = f"{what}: starting the application"
                last.append(RunScript("start_both", f"{State.STARTING}->{State.UP}"))
            else:
                self._move(FarmTrigger.STARTED, what, actions, last)
        elif done.script == "stop_both":
            self.app_started = False
            if not done.ok:
                self.reason = what
            self._poststop(actions, last)
        elif done.script == "poststop":
            if self.goal == State.STARTING:
                self._move(FarmTrigger.THEN_START, f"{what}; starting again", actions, last)
            else:
                self._move(FarmTrigger.STOPPED, what, actions, last)

    def _heard(self, status: FarmPeerStatus) -> None:
        node = status.node
        if node not in self.settings.peers:
            return
        old = self.peers.get(node)
        self.peers[node] = status
        self.lost.pop(node, None)
        if old is not None and old.claims == status.claims:
            return
        for b in (old.claims if old else frozenset()) - status.claims:
            if self.previous.get(b, (None,))[0] == node:
                self.previous[b] = (node, False)  # released cleanly
        for b in status.claims:
            self.previous[b] = (node, True)

    def _checker_failed(self, ev: CheckerFailed, actions: list[FarmAction]) -> None:
        if not self.checkers_on:
            return  # a late report from a checker being stopped
        self.failing[ev.checker] = ev.detail
        what = f"checker {ev.checker} failed: {ev.detail}"
        if self.state == State.UP:
            why = f"{what}; leaving the farm (buckets released), the application keeps running"
            self._move(FarmTrigger.CHECK_FAILED, why, actions, [])
        elif self.state == State.WAIT:
            self.reason = f"{what}; out of the farm until every checker recovers"

    # ------------------------------------------------------------------ moving
    def _move(
        self, trigger: FarmTrigger, why: str, actions: list[FarmAction], last: list[FarmAction]
    ) -> None:
        new = TABLE[self.state].get(trigger)
        if new is None:
            raise IllegalTransition(f"{self.state} has no edge for {trigger!r}")
        old, self.state, self.reason = self.state, new, why
        actions.append(Transitioned(old, new, why))
        actions.append(FarmPersist(self.wanted, new))
        if new == State.STARTING:
            self.goal, self.stop_cause = None, ""
            self.farm_set_up, self.served = True, False
            actions.append(SetupFarm())
            self.phase = "prestart"
            last.append(RunScript("prestart", f"{old}->{new}"))
        elif new == State.UP:
            if not self.checkers_on:
                self.checkers_on = True
                actions.append(StartCheckers())
        elif new == State.WAIT:
            if trigger == FarmTrigger.START_FAILED:
                self._teardown(actions)
        elif new == State.STOPPING:
            self.left = old
            self.stop_cause = self.stop_cause if trigger == FarmTrigger.THEN_STOP else why
            self.goal = State.STARTING if trigger == FarmTrigger.RESTART else None
            if self.checkers_on:
                self.checkers_on = False
                self.failing.clear()
                actions.append(StopCheckers())
            self._release_all(why, actions)
            if self.served and self.app_started:
                self.phase = "drain"
                last.append(AwaitDrain(self.settings.drain_timeout))
            else:
                self._stop_application(actions, last)
        elif new == State.STOP:
            self.reason, self.stop_cause = self.stop_cause or why, ""

    def _stop_application(self, actions: list[FarmAction], last: list[FarmAction]) -> None:
        """STOPPING, drained: stop_both if the application was started, else poststop."""
        if self.app_started:
            self.phase = "stop_both"
            last.append(RunScript("stop_both", f"{self.left}->{State.STOPPING}"))
        else:
            self._poststop(actions, last)

    def _poststop(self, actions: list[FarmAction], last: list[FarmAction]) -> None:
        self._teardown(actions)
        self.phase = "poststop"
        last.append(RunScript("poststop", f"{State.STOPPING}->{State.STOP}"))

    def _teardown(self, actions: list[FarmAction]) -> None:
        if self.farm_set_up:
            self.farm_set_up = self.served = False
            self.owned, self.loose, self.arp = frozenset(), frozenset(), False
            actions.append(TeardownFarm())

    def _release_all(self, why: str, actions: list[FarmAction]) -> None:
        if self.owned or self.arp:
            n = len(self.owned)
            self.owned, self.loose, self.arp = frozenset(), frozenset(), False
            actions.append(ApplyBuckets(self.owned, self.loose, False, f"released {n} buckets"))
            self.reason = f"{why}; released {n} buckets"

    def _status_key(self) -> tuple[object, ...]:
        return (self.state, self.member, self.owned, self.loose, self.arp, self.wanted)

    def _sync_version(self) -> None:
        key = self._status_key()
        if key != self._key:
            self._key = key
            self.version += 1

    # ------------------------------------------------------------------ buckets
    def _alive(self) -> list[FarmPeerStatus]:
        return [st for node, st in self.peers.items() if node not in self.lost]

    def _members(self) -> list[NodeId]:
        members = [st.node for st in self._alive() if st.member]
        if self.member:
            members.append(self.settings.node)
        return sorted(members)

    def _owners(self, members: list[NodeId]) -> tuple[NodeId | None, ...]:
        return self._target(members)[0]

    def _target(self, members: list[NodeId]) -> tuple[tuple[NodeId | None, ...], frozenset[int]]:
        """Owners of the buckets among ``members``, and this node's share (cached)."""
        key = tuple((n, self.settings.weight(n)) for n in members)
        found = self._targets.get(key)
        if found is None:
            if len(self._targets) > 64:
                self._targets.clear()
            owner_of = owners(dict(key), self.settings.seed)
            found = self._targets[key] = (owner_of, owned_by(owner_of, self.settings.node))
        return found

    def _gate(self, now: float) -> str | None:
        """Why this node may not acquire buckets now (None: it may): some peer, neither lost
        nor silent since the start-up wait, has not acknowledged this node's current status."""
        waiting = now - self.started_at < self.settings.startup_wait
        unheard: list[NodeId] = []
        behind: list[NodeId] = []
        for node in self.settings.peers:
            if node in self.lost:
                continue
            st = self.peers.get(node)
            if st is None:
                if waiting:
                    unheard.append(node)
            elif st.acked_version != self.version:
                behind.append(node)
        if unheard:
            left = self.started_at + self.settings.startup_wait - now
            return f"waiting up to {left:.1f} s to hear {' '.join(unheard)}"
        if behind:
            return f"waiting for {' '.join(behind)} to acknowledge this node's status"
        return None

    def _rebalance(self, now: float, actions: list[FarmAction]) -> None:
        """Release what the target no longer gives this node, acquire what it may (safely).

        The ARP role follows the same rule as a bucket: dropped at once, taken only once the
        peers have acknowledged this node's current status.
        """
        if not self.farm_set_up:
            return
        s = self.settings
        members = self._members()
        calm = (self.state, members, self.owned, self.arp)
        if calm == self._calm:
            return
        target = self._target(members)[1] if self.member else frozenset()
        arp_target = self.member and members[0] == s.node
        owned = self.owned & target
        released = self.owned - owned
        missing = target - owned
        loose = self.loose & owned
        arp = self.arp and arp_target
        waits: list[str] = []
        taken: dict[str, int] = {}
        gate = self._gate(now) if missing or arp != arp_target else None
        if gate is not None:
            waits.append(gate)
        elif missing or arp != arp_target:
            arp = arp_target
            claimed = {b: st.node for st in self._alive() for b in st.claims & missing}
            acquired = missing - claimed.keys()
            for b in acquired:
                was, claiming = self.previous.pop(b, (None, False))
                if was is None:
                    source = "free buckets"
                elif claiming:  # its claimer is lost (an alive claimer blocks the bucket)
                    loose |= {b}
                    source = f"buckets of {was} (lost)"
                else:
                    source = f"buckets released by {was}"
                taken[source] = taken.get(source, 0) + 1
            owned |= acquired
            missing -= acquired
            holders: dict[NodeId, int] = {}
            for b in missing:
                holders[claimed[b]] = holders.get(claimed[b], 0) + 1
            waits += [f"waiting for {n} to release {k} buckets" for n, k in sorted(holders.items())]
        if self.member:
            tail = "; ".join(waits) if waits else f"members {' '.join(members)}"
            self.reason = f"UP {len(owned)}/{BUCKETS}: {tail}"
        if (owned, loose, arp) == (self.owned, self.loose, self.arp):
            if not waits:
                self._calm = calm
            return
        parts = [f"took {k} {source}" for source, k in sorted(taken.items())]
        if released:
            parts.append(
                f"released {len(released)} buckets (members {' '.join(members)})"
                if self.member
                else f"released {len(released)} buckets (left the membership)"
            )
        if arp != self.arp:
            parts.append("answers ARP for the VIP" if arp else "no longer answers ARP")
        self.owned, self.loose, self.arp = owned, loose, arp
        self.served = self.served or bool(owned)
        actions.append(ApplyBuckets(owned, loose, arp, "; ".join(parts)))
