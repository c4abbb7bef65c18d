"""A deterministic simulated farm for the pure core: N nodes, simulated time, in-memory network.

Every node runs the real :class:`FarmMachine` and :class:`PeerTracker`. The simulated driver
executes the actions at once, in order (scripts and drains take simulated time), keeps what
the kernel would hold (the applied buckets, the application), and publishes a node's status
only after its batch of actions ran. Heartbeats go every ``interval`` and at once when a status
or an acknowledgement changes; each carries the sender's published status and, per peer, the
(incarnation, version) of that peer's status it last processed, turned into ``acked_version``
on arrival. A node can be powered off and on (its kernel state is lost, its durable record
kept, its agent comes back with a new incarnation), and ``cut`` off the network, then
``heal``-ed.

``run(seconds)`` advances time in 10 ms steps and, after every step, checks:

- **safety**: no two powered nodes that can hear each other (neither is cut) both have a bucket
  in their applied claims — except after a ``cut`` (no arbitration: the cut node takes every
  bucket), until the first moment after ``heal`` when every node has heard every other and the
  claims are disjoint again;
- **convergence**: once nothing has changed for ``2 × timeout`` (and no partition is being
  resolved), every bucket is claimed by exactly one UP node, the one that
  ``buckets.owners`` gives for the UP nodes' weights, and exactly one UP node (the smallest
  name) answers ARP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hakit.core.actions import RunScript, StartCheckers, StopCheckers, Transitioned
from hakit.core.buckets import owners
from hakit.core.events import (
    CheckerAction,
    CheckerFailed,
    Command,
    PeerLost,
    ScriptDone,
    Tick,
    Verb,
)
from hakit.core.farm import (
    ApplyBuckets,
    AwaitDrain,
    CheckerRecovered,
    CommandRefused,
    Drained,
    FarmAction,
    FarmDurable,
    FarmEvent,
    FarmMachine,
    FarmPeerHeard,
    FarmPeerStatus,
    FarmPersist,
    FarmSettings,
    FarmStatus,
    SetupFarm,
    TeardownFarm,
)
from hakit.core.peers import PeerTracker
from hakit.model import NodeId, State
from tests.core.simclock import SimClock

NETWORK = "lan"


@dataclass
class Message:
    at: float  # delivery time
    src: NodeId
    dst: NodeId
    incarnation: int
    status: FarmStatus
    acks: dict[NodeId, tuple[int, int]]  # peer -> (its incarnation, its version processed)


@dataclass
class SimFarmNode:
    """One node: its agent (machine, tracker, acks) and what its kernel holds."""

    name: NodeId
    settings: FarmSettings
    machine: FarmMachine
    tracker: PeerTracker
    durable: FarmDurable = field(default_factory=FarmDurable)
    powered: bool = True
    incarnation: int = 1
    acks: dict[NodeId, tuple[int, int]] = field(default_factory=dict)
    published: FarmStatus | None = None
    next_heartbeat: float = 0.0
    # kernel and processes
    setup: bool = False
    owned: frozenset[int] = frozenset()
    loose: frozenset[int] = frozenset()
    arp: bool = False
    app: bool = False
    checkers: bool = False
    script: tuple[str, float, bool] | None = None  # (name, done at, ok)
    drain_at: float | None = None


class FarmSim(SimClock):
    """``n`` nodes ``n1``…``nN`` running one farm module ``web``."""

    def __init__(
        self,
        n: int = 3,
        *,
        weights: dict[str, int] | None = None,
        seed: int = 7,
        interval: float = 0.5,
        timeout: float = 3.0,
        script_seconds: float = 0.2,
        drain_seconds: float = 0.3,
    ) -> None:
        self.now = 0.0
        self.interval, self.timeout = interval, timeout
        self.script_seconds: dict[tuple[str, str], float] = {}  # (node, script) -> seconds
        self.default_script_seconds = script_seconds
        self.drain_seconds = drain_seconds
        self.failing_scripts: set[tuple[str, str]] = set()
        self.cut_nodes: set[str] = set()
        self.partitioned = False
        self.healed_at = 0.0
        self.last_change = 0.0
        self.checked_stable = False
        self.transcript: list[str] = []
        self.in_flight: list[Message] = []
        self.on_step: list[Callable[[FarmSim], None]] = []
        names = self.names = tuple(NodeId(f"n{i}") for i in range(1, n + 1))
        self.weights = {NodeId(k): v for k, v in (weights or {}).items()}
        self.seed = seed
        self.nodes: dict[str, SimFarmNode] = {}
        for name in names:
            settings = FarmSettings(
                node=name,
                nodes=names,
                weights=self.weights,
                seed=seed,
                startup_wait=timeout,
                module="web",
            )
            node = SimFarmNode(name, settings, self._machine(settings), self._tracker(name))
            self.nodes[name] = node
            self._boot(node)

    # -------------------------------------------------------------- operator
    def command(self, node: str, verb: Verb | str) -> None:
        """Run a command; raises CommandRefused like the agent would report it."""
        self._step(self.nodes[node], Command(Verb(verb)))

    def start(self, *nodes: str) -> None:
        for n in nodes or tuple(self.nodes):
            self.command(n, Verb.START)

    def checker_fails(self, node: str, checker: str = "http") -> None:
        n = self.nodes[node]
        if n.checkers:  # only running checkers report
            self.log(f"-- checker {checker} fails on {node}")
            self._step(n, CheckerFailed(checker, CheckerAction.RESTART, "no answer on port 80"))

    def checker_recovers(self, node: str, checker: str = "http") -> None:
        n = self.nodes[node]
        if n.checkers:
            self.log(f"-- checker {checker} recovers on {node}")
            self._step(n, CheckerRecovered(checker))

    def fail_script(self, node: str, script: str) -> None:
        self.failing_scripts.add((node, script))

    # -------------------------------------------------------------- faults
    def cut(self, node: str) -> None:
        self.cut_nodes.add(node)
        self.partitioned = True
        self._changed()
        self.log(f"-- cut {node}")

    def heal(self) -> None:
        self.cut_nodes.clear()
        self.healed_at = self.now
        self._changed()
        self.log("-- heal")

    def poweroff(self, node: str) -> None:
        n = self.nodes[node]
        n.powered = False
        n.setup = n.app = n.checkers = n.arp = False
        n.owned = n.loose = frozenset()
        n.script, n.drain_at, n.published = None, None, None
        self._changed()
        self.log(f"-- poweroff {node}")

    def poweron(self, node: str) -> None:
        n = self.nodes[node]
        n.powered = True
        n.incarnation += 1
        self._changed()
        self.log(f"-- poweron {node}")
        n.machine = self._machine(n.settings, n.durable)
        n.tracker = self._tracker(n.name)
        n.acks = {}
        self._boot(n)

    # -------------------------------------------------------------- observation
    def state(self, node: str) -> State:
        return self.nodes[node].machine.state

    def states(self) -> dict[str, State]:
        return {name: n.machine.state for name, n in self.nodes.items()}

    def claims(self) -> dict[str, frozenset[int]]:
        """Applied claims of the powered nodes."""
        return {name: n.owned for name, n in self.nodes.items() if n.powered}

    def owner_map(self) -> dict[int, str]:
        """bucket -> the node whose filter accepts it (one, when safe and converged)."""
        return {b: name for name, owned in self.claims().items() for b in owned}

    def up_nodes(self) -> list[str]:
        return sorted(name for name, n in self.nodes.items() if n.powered and n.machine.member)

    def expected_owners(self) -> tuple[NodeId | None, ...]:
        members = {NodeId(n): self.weights.get(NodeId(n), 1) for n in self.up_nodes()}
        return owners(members, self.seed)

    # -------------------------------------------------------------- time
    def run_until_stable(self, limit: float = 60.0) -> None:
        """Advance until the convergence check has passed (nothing changed for 2 × timeout)."""
        self.checked_stable = False
        self.run_until(lambda: self.checked_stable, limit)

    # -------------------------------------------------------------- internals
    def _machine(self, settings: FarmSettings, durable: FarmDurable | None = None) -> FarmMachine:
        return FarmMachine(settings, durable or FarmDurable(), self.now)

    def _tracker(self, name: NodeId) -> PeerTracker:
        return PeerTracker([p for p in self.names if p != name], self.timeout)

    def _boot(self, node: SimFarmNode) -> None:
        node.next_heartbeat = self.now
        node.published = node.machine.status
        if node.durable.wanted:
            self._step(node, Command(Verb.START))

    def _changed(self) -> None:
        self.last_change = self.now
        self.checked_stable = False

    def _step(self, node: SimFarmNode, event: FarmEvent) -> None:
        try:
            actions = node.machine.step(self.now, event)
        except CommandRefused as exc:
            self.log(f"{node.name}: refused: {exc}")
            raise
        for action in actions:
            self._execute(node, action)
        status = node.machine.status
        if node.published is None or status != node.published:
            if node.published is None or status.version != node.published.version:
                self._changed()
            node.published = status  # published only once the batch has run
            node.next_heartbeat = self.now  # send the new status at once

    def _execute(self, node: SimFarmNode, action: FarmAction) -> None:
        match action:
            case Transitioned(old=old, new=new, reason=reason):
                self.log(f"{node.name}: {old} -> {new} ({reason})")
            case FarmPersist(wanted=wanted, state=state):
                node.durable = FarmDurable(wanted, state)
            case SetupFarm():
                assert not node.setup, f"{node.name}: SetupFarm twice"
                node.setup = True
                node.owned, node.loose, node.arp = frozenset(), frozenset(), False
            case ApplyBuckets(owned=owned, loose=loose, arp=arp, reason=reason):
                assert node.setup, f"{node.name}: ApplyBuckets without SetupFarm"
                assert loose <= owned, f"{node.name}: loose buckets not owned"
                gained, lost = len(owned - node.owned), len(node.owned - owned)
                extra = (f", {len(loose)} loose" if loose else "") + (", ARP" if arp else "")
                self.log(f"{node.name}: buckets {len(owned)} (+{gained} -{lost}{extra}): {reason}")
                node.owned, node.loose, node.arp = owned, loose, arp
            case TeardownFarm():
                node.setup = False
                node.owned, node.loose, node.arp = frozenset(), frozenset(), False
            case AwaitDrain(timeout=timeout):
                self.log(f"{node.name}: drains its connections (at most {timeout:g} s)")
                node.drain_at = self.now + min(timeout, self.drain_seconds)
            case StartCheckers():
                node.checkers = True
            case StopCheckers():
                node.checkers = False
            case RunScript(script=script, transition=transition):
                self.log(f"{node.name}: runs {script} ({transition})")
                took = self.script_seconds.get((node.name, script), self.default_script_seconds)
                ok = (node.name, script) not in self.failing_scripts
                if script == "start_both":
                    node.app = True
                node.script = (script, self.now + took, ok)

    def _advance(self) -> None:
        due = [m for m in self.in_flight if m.at <= self.now]
        if due:
            self.in_flight = [m for m in self.in_flight if m.at > self.now]
            for msg in due:
                self._deliver(msg)
        for node in self.nodes.values():
            if not node.powered:
                continue
            if node.script is not None and node.script[1] <= self.now:
                script, _, ok = node.script
                node.script = None
                if script == "stop_both":
                    node.app = False
                self._step(node, ScriptDone(script, ok, "" if ok else "exit 1"))
            if node.drain_at is not None and node.drain_at <= self.now:
                node.drain_at = None
                self._step(node, Drained(0))
            for change in node.tracker.tick(self.now):
                self._step(node, PeerLost(change.node, change.silent_for))
            self._step(node, Tick())
            if self.now >= node.next_heartbeat:
                self._send(node)
                node.next_heartbeat = self.now + self.interval
        for hook in self.on_step:
            hook(self)
        self._check()

    def _can_talk(self, a: SimFarmNode, b: SimFarmNode) -> bool:
        return a.powered and b.powered and not ({a.name, b.name} & self.cut_nodes)

    def _send(self, node: SimFarmNode) -> None:
        assert node.published is not None
        for dst in self.nodes:
            if dst != node.name:
                self.in_flight.append(
                    Message(
                        self.now + 0.001,
                        node.name,
                        NodeId(dst),
                        node.incarnation,
                        node.published,
                        dict(node.acks),
                    )
                )

    def _deliver(self, msg: Message) -> None:
        src, dst = self.nodes[msg.src], self.nodes[msg.dst]
        if not self._can_talk(src, dst):
            return
        dst.tracker.heard(self.now, msg.src, NETWORK, msg.incarnation)
        ack = (msg.incarnation, msg.status.version)
        if dst.acks.get(msg.src) != ack:
            dst.acks[msg.src] = ack
            dst.next_heartbeat = self.now  # acknowledge the peer's new status at once
        inc, version = msg.acks.get(dst.name, (-1, -1))
        st = msg.status
        peer = FarmPeerStatus(
            node=msg.src,
            state=st.state,
            member=st.member,
            claims=st.claims,
            version=st.version,
            acked_version=version if inc == dst.incarnation else -1,
        )
        self._step(dst, FarmPeerHeard(peer))

    # -------------------------------------------------------------- invariants
    def _check(self) -> None:
        powered = [n for n in self.nodes.values() if n.powered]
        if self.partitioned and not self.cut_nodes and self._resolved(powered):
            self.partitioned = False  # the split brain of the cut has been resolved
            self._changed()
        if not self.partitioned:
            for i, a in enumerate(powered):
                for b in powered[i + 1 :]:
                    if self._can_talk(a, b) and not a.owned.isdisjoint(b.owned):
                        both = sorted(a.owned & b.owned)
                        raise AssertionError(
                            f"buckets {both[:8]} accepted by both {a.name} and {b.name} at "
                            f"{self.now}:\n" + "\n".join(self.transcript[-40:])
                        )
        stable = self.now - self.last_change >= 2 * self.timeout
        if stable and not self.partitioned and not self.checked_stable:
            self._check_converged()
            self.checked_stable = True

    def _resolved(self, powered: list[SimFarmNode]) -> bool:
        for a in powered:
            for b in powered:
                if a is not b:
                    last = a.tracker.peers[b.name].last_heard.get(NETWORK, -1.0)
                    if last <= self.healed_at:
                        return False
        return all(
            a.owned.isdisjoint(b.owned) for i, a in enumerate(powered) for b in powered[i + 1 :]
        )

    def _check_converged(self) -> None:
        expected = self.expected_owners()
        got = self.owner_map()
        wrong = [b for b, owner in enumerate(expected) if got.get(b) != owner]
        context = f" at {self.now} (UP: {self.up_nodes()}):\n" + "\n".join(self.transcript[-40:])
        assert not wrong, f"stable but buckets {wrong[:8]} not owned as expected" + context
        up = self.up_nodes()
        arp = sorted(name for name, n in self.nodes.items() if n.powered and n.arp)
        assert arp == up[:1], f"ARP answered by {arp}, expected {up[:1]}" + context
