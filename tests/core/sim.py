"""A deterministic simulated cluster for the pure core: simulated time, in-memory network.

Nodes run the real :class:`MirrorMachine` and :class:`PeerTracker` and exchange the real
heartbeat payload (:mod:`hakit.core.payload`) through an in-memory network that can be
``cut`` (one node isolated), ``heal``-ed, and whose nodes can be powered off and on. Scripts
take a configurable simulated time. The application is modelled as running on a node from the
start of ``start_prim`` until the end of ``stop_prim``; the VIP from ``AddVips`` to ``DelVips``.

``run(seconds)`` advances time in 10 ms steps and, after every step, checks the safety
invariant: at most one node serves a module — except, without a witness, after a ``cut`` (both
may run ALONE), until the first moment after ``heal`` when the nodes hear each other again and
have converged. Serving means: running the application or holding a VIP; with a witness
(``witness=DURATION``: the real :class:`LeaseTable` as a third party, reachable unless
``cut_witness`` or ``witness_down``), holding a VIP: a fenced node's application may still be
stopping, but no client reaches it any more (what it acknowledged is checked by the second
invariant).

``pause(node)`` freezes a node's agent (SIGSTOP): no ticks, no heartbeats sent, script ends
and everything received kept until ``resume``; its application, VIPs and replication process
go on. The replication process's watchdog (``FenceAt``) removes the VIPs when its deadline
passes and reports ``ReplicaFenced``; and, with a witness, every module's VIPs carry a
lease held by the kernel (docs/split-brain.md): from ``AddVips`` to ``DelVips`` a VIP serves
only until the latest ``FenceAt`` the agent executed, whatever runs or not on the node.

Replicated modules (``replicated=True`` in a module's options) also get a simulated replication
process per node (:class:`SimReplica`) that follows docs/replication.md: ``SetReplication``
sets its role; a primary connected to its peer's secondary resyncs it (``resync_seconds``),
then reports it in sync; losing an in-sync secondary bumps the generation. Its reports reach
the machine as ``ReplicaReport`` events. The application is modelled as acknowledging one write
per step while its node is PRIM or ALONE with the replica mounted; an acknowledged write is on
the secondary only if the replica is in sync at that moment, and a resync copies everything.
Second invariant, checked whenever a node enters STARTING_PRIM without ``--force``: **no
acknowledged write is lost** — the node's copy holds every write acknowledged so far. Writes
acknowledged during a split brain (after a ``cut``, until it is resolved) are not counted
without a witness (the documented behaviour); with one, every write counts. A forced start
forgets what the node lacks. Writes the secondary does not get are acknowledged only up to the
generation the machine permitted (``PermitAlone``); the others are held, never acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hakit.core import payload
from hakit.core.actions import (
    Action,
    AddVips,
    AnnounceVips,
    AskArbiters,
    DelVips,
    FenceAt,
    PermitAlone,
    Persist,
    ReplicaRole,
    RunScript,
    SetReplication,
    Transitioned,
)
from hakit.core.arbitration import ArbitrationSettings
from hakit.core.events import (
    ArbiterAnswered,
    CheckerAction,
    CheckerFailed,
    Command,
    Event,
    PeerHeard,
    PeerLost,
    ReplicaFailed,
    ReplicaFenced,
    ReplicaReport,
    ScriptDone,
    Tick,
    Verb,
)
from hakit.core.freshness import DataRecord, DataState
from hakit.core.lease import LeaseTable
from hakit.core.mirror import CommandRefused, Durable, MirrorMachine, MirrorSettings
from hakit.core.peers import PeerTracker
from hakit.model import ModuleName, NodeId, State
from tests.core.simclock import SimClock


@dataclass
class SimReplica:
    """A node's replication process for one module, and the copy it keeps (writes held)."""

    record: DataRecord = field(default_factory=DataRecord)  # on disk: survives power-offs
    data: set[int] = field(default_factory=set)  # acknowledged writes this copy holds
    role: ReplicaRole = ReplicaRole.IDLE
    connected: bool = False  # primary: connected to the peer's secondary
    in_sync: bool = False  # primary: the secondary is connected and in sync
    resync_done_at: float | None = None  # primary: the running resync of the secondary ends
    down_until: float | None = None  # the process failed; the driver restarts it then
    permitted: int = 0  # PermitAlone: unreplicated writes acknowledged up to this generation
    fence_at: float = 0.0  # FenceAt: the watchdog removes the VIPs after this (0: never)

    def acknowledges(self) -> bool:
        return self.role == ReplicaRole.PRIMARY and (
            self.in_sync or self.permitted >= self.record.generation
        )


@dataclass
class SimModule:
    machine: MirrorMachine
    durable: Durable = field(default_factory=Durable)
    script: tuple[str, float, bool] | None = None  # (name, done at, ok)
    app: bool = False
    vip: bool = False
    lease_tables: bool = False  # the VIPs' lease is held in the kernel (from AddVips to DelVips)
    kernel_deadline: float = 0.0  # the latest FenceAt the agent gave the kernel (0: none)
    ack: payload.Ack = field(default_factory=payload.Ack)
    replica: SimReplica | None = None  # replicated modules only


@dataclass
class SimNode:
    name: NodeId
    peer: NodeId
    settings: dict[ModuleName, MirrorSettings]
    powered: bool = True
    incarnation: int = 1
    modules: dict[ModuleName, SimModule] = field(default_factory=dict)
    tracker: PeerTracker | None = None
    next_heartbeat: float = 0.0
    paused: bool = False  # the agent is SIGSTOPped
    backlog: list[Callable[[], None]] = field(default_factory=list)  # received while paused


class SimCluster(SimClock):
    """Two nodes, ``n1`` and ``n2``, running the given mirror modules."""

    def __init__(
        self,
        modules: dict[str, dict[str, object]] | None = None,
        *,
        interval: float = 0.5,
        timeout: float = 3.0,
        script_seconds: float = 0.2,
        resync_seconds: float = 1.0,
        witness: float | None = None,
    ) -> None:
        self.now = 0.0
        self.interval, self.timeout = interval, timeout
        self.script_seconds: dict[tuple[str, str, str], float] = {}
        self.default_script_seconds = script_seconds
        self.failing_scripts: set[tuple[str, str, str]] = set()
        self.cut_nodes: set[str] = set()
        self.partitioned = False  # a cut happened since the last heal with both nodes up
        self.healed_at = 0.0
        self.transcript: list[str] = []
        self.in_flight: list[tuple[float, NodeId, NodeId, int, dict[str, object]]] = []
        self.on_step: list[Callable[[SimCluster], None]] = []
        self.resync_seconds = resync_seconds
        self.link_broken: set[str] = set()  # modules whose replication link is broken
        self.writes = 0  # last write id acknowledged by an application
        self.acked: dict[ModuleName, set[int]] = {}  # acknowledged writes that must survive
        self.reports: list[tuple[SimNode, ModuleName, Event]] = []  # replica events to deliver
        mods = modules or {"app": {}}
        # the witness: started one duration ago (no quiet period left), 1 ms away
        self.witness = LeaseTable(witness, -witness) if witness else None
        self.witness_cut: set[str] = set()
        self.witness_down = False
        self.to_witness: list[tuple[float, NodeId, int, ModuleName, AskArbiters, float]] = []
        self.from_witness: list[tuple[float, NodeId, int, ModuleName, ArbiterAnswered]] = []
        arbitration = (
            ArbitrationSettings(("w",), witness, margin=0.5, renew=witness / 3, retry=0.25)
            if witness
            else ArbitrationSettings()
        )
        self.nodes: dict[str, SimNode] = {}
        for name, peer in (("n1", "n2"), ("n2", "n1")):
            settings = {
                ModuleName(m): MirrorSettings(
                    node=NodeId(name),
                    peer=NodeId(peer),
                    startup_wait=timeout,
                    arbitration=arbitration,
                    **opts,  # type: ignore[arg-type]
                )
                for m, opts in mods.items()
            }
            node = SimNode(NodeId(name), NodeId(peer), settings)
            self.nodes[name] = node
            self._boot(node)

    # -------------------------------------------------------------- operator
    def command(
        self, node: str, verb: Verb | str, module: str = "app", force: bool = False
    ) -> None:
        """Run a command; raises CommandRefused like the agent would report it."""
        n = self.nodes[node]
        self._step(n, ModuleName(module), Command(Verb(verb), force))

    def start_both(self, module: str = "app") -> None:
        self.command("n1", Verb.START, module)
        self.command("n2", Verb.START, module)

    def checker_fails(self, node: str, action: CheckerAction, module: str = "app") -> None:
        n = self.nodes[node]
        self._step(n, ModuleName(module), CheckerFailed("proc", action, "process gone"))

    def fail_script(self, node: str, module: str, script: str) -> None:
        self.failing_scripts.add((node, module, script))

    def break_replication(self, module: str = "app") -> None:
        """The replication link fails while heartbeats still pass."""
        self.link_broken.add(module)
        self.log(f"-- replication link of {module} broken")

    def repair_replication(self, module: str = "app") -> None:
        self.link_broken.discard(module)
        self.log(f"-- replication link of {module} repaired")

    def replica_dies(self, node: str, module: str = "app", restart_after: float = 0.5) -> None:
        """The replication process dies; the driver restarts it (idle if it was primary) once
        the agent runs (a paused agent learns of the death when it resumes)."""
        n = self.nodes[node]
        rep = n.modules[ModuleName(module)].replica
        assert rep is not None
        self.log(f"-- replication process of {module} on {node} dies")
        if rep.role == ReplicaRole.PRIMARY:
            rep.role = ReplicaRole.IDLE
        rep.permitted = 0
        rep.fence_at = 0.0
        rep.connected = rep.in_sync = False
        rep.resync_done_at = None
        rep.down_until = self.now + restart_after
        failed = ReplicaFailed("process exited (killed)")
        if n.paused:
            n.backlog.append(lambda: self._step(n, ModuleName(module), failed))
        else:
            self._step(n, ModuleName(module), failed)

    # -------------------------------------------------------------- faults
    def cut(self, node: str) -> None:
        self.cut_nodes.add(node)
        self.partitioned = True
        self.log(f"-- cut {node}")

    def heal(self) -> None:
        self.cut_nodes.clear()
        self.witness_cut.clear()
        self.healed_at = self.now
        self.log("-- heal")

    def pause(self, node: str) -> None:
        self.nodes[node].paused = True
        self.log(f"-- pause the agent of {node}")

    def resume(self, node: str) -> None:
        n = self.nodes[node]
        n.paused = False
        self.log(f"-- resume the agent of {node}")
        backlog, n.backlog = n.backlog, []
        for deliver in backlog:  # what its sockets and pipes kept, in order
            deliver()

    def recover_all(self, limit: float = 25.0) -> None:
        """Undo every fault (resume, heal, repair, witness up, power on), start the module
        where it stopped, and wait for one PRIM and one SECOND (AssertionError if not)."""
        for n in self.nodes.values():
            if n.paused:
                self.resume(n.name)
        self.heal()
        for module in self.acked:
            self.repair_replication(module)
        if self.witness is not None:
            self.set_witness_down(False)
        for name, n in self.nodes.items():
            if not n.powered:
                self.poweron(name)
        self.run(8)
        for name in self.nodes:
            if self.state(name) == State.STOP:
                self.command(name, Verb.START)
        self.run_until(lambda: sorted(self.states()) == [State.PRIM, State.SECOND], limit=limit)

    def cut_witness(self, node: str) -> None:
        """``node`` no longer reaches the witness (nor the witness it)."""
        self.witness_cut.add(node)
        self.log(f"-- {node} cut from the witness")

    def set_witness_down(self, down: bool) -> None:
        self.witness_down = down
        self.log(f"-- witness {'down' if down else 'up'}")

    def poweroff(self, node: str) -> None:
        n = self.nodes[node]
        n.powered = False
        n.paused, n.backlog = False, []
        for m in n.modules.values():
            m.app = m.vip = m.lease_tables = False
            m.script = None
            if m.replica is not None:  # the record and the copy are on disk
                m.replica = SimReplica(m.replica.record, m.replica.data)
        self.log(f"-- poweroff {node}")

    def poweron(self, node: str) -> None:
        n = self.nodes[node]
        n.powered = True
        n.incarnation += 1
        self.log(f"-- poweron {node}")
        self._boot(n)

    # -------------------------------------------------------------- observation
    def state(self, node: str, module: str = "app") -> State:
        return self.nodes[node].modules[ModuleName(module)].machine.state

    def states(self, module: str = "app") -> tuple[State, State]:
        return self.state("n1", module), self.state("n2", module)

    def serving(self, module: str = "app") -> list[str]:
        """Nodes that serve ``module`` (see the module docstring)."""
        out = []
        for name, n in self.nodes.items():
            m = n.modules[ModuleName(module)]
            vip = m.vip and not (m.lease_tables and self.now > m.kernel_deadline)
            serves = (m.app or vip) if self.witness is None else vip
            if n.powered and serves:
                out.append(name)
        return out

    def transcript_of(self, node: str) -> str:
        """The transcript lines about ``node``'s machines."""
        return "\n".join(line for line in self.transcript if line[8:].startswith(f"{node} "))

    def record(self, node: str, module: str = "app") -> DataRecord:
        rep = self.nodes[node].modules[ModuleName(module)].replica
        assert rep is not None
        return rep.record

    # -------------------------------------------------------------- internals
    def _boot(self, node: SimNode) -> None:
        node.tracker = PeerTracker([node.peer], self.timeout)
        node.next_heartbeat = self.now
        old = node.modules
        node.modules = {}
        for name, settings in node.settings.items():
            durable = old[name].durable if name in old else Durable()
            replica = None
            if settings.replicated:
                replica = old[name].replica if name in old else None
                replica = replica or SimReplica()
                self.acked.setdefault(name, set())
            data = replica.record if replica else None
            machine = MirrorMachine(settings, durable, data)
            node.modules[name] = SimModule(machine, durable, replica=replica)
        for name, m in node.modules.items():
            if m.durable.wanted:
                self._step(node, name, Command(Verb.START))

    def _step(self, node: SimNode, module: ModuleName, event: Event) -> None:
        m = node.modules[module]
        before = m.machine.status()
        try:
            actions = m.machine.step(self.now, event)
        except CommandRefused as exc:
            self.log(f"{node.name} {module}: refused: {exc}")
            raise
        for action in actions:
            match action:
                case Transitioned(old=old, new=new, reason=reason):
                    self.log(f"{node.name} {module}: {old} -> {new} ({reason})")
                    if new == State.STARTING_PRIM and m.replica is not None:
                        self._check_no_write_lost(node, module, m.replica, actions)
                case Persist():
                    m.durable = Durable(
                        action.wanted,
                        action.state,
                        action.epoch,
                        action.primary_epoch,
                        action.peer_generation_seen,
                        action.lease,
                    )
                case SetReplication():
                    self._set_replication(node, module, action)
                case AddVips():
                    m.vip = True
                    m.lease_tables = self.witness is not None
                case DelVips():
                    m.vip = m.lease_tables = False
                case AnnounceVips():
                    self.log(f"{node.name} {module}: announces its VIP again")
                case AskArbiters():
                    msg = (self.now + 0.001, node.name, node.incarnation, module, action, self.now)
                    self.to_witness.append(msg)
                case PermitAlone(generation=generation):
                    assert m.replica is not None
                    m.replica.permitted = max(m.replica.permitted, generation)
                case FenceAt(deadline=deadline):
                    if m.replica is not None:
                        m.replica.fence_at = deadline
                    m.kernel_deadline = deadline
                case RunScript(script=script):
                    key = (node.name, module, script)
                    took = self.script_seconds.get(key, self.default_script_seconds)
                    if script == "start_prim":
                        m.app = True
                    m.script = (script, self.now + took, key not in self.failing_scripts)
        after = m.machine.status()
        if (
            m.replica is not None
            and after.reason != before.reason
            and not any(isinstance(a, Transitioned) for a in actions)
        ):
            self.log(f"{node.name} {module}: {after.state}: {after.reason}")
        if actions or after != before:
            node.next_heartbeat = self.now  # send the new status at once
        self._deliver_reports()

    def _deliver_reports(self) -> None:
        """Feed the replication processes' reports to their machines, in order."""
        while self.reports:
            to, name, report = self.reports.pop(0)
            if to.paused:
                to.backlog.append(
                    lambda to=to, name=name, report=report: self._step(to, name, report)
                )
            elif to.powered:
                self._step(to, name, report)

    # -------------------------------------------------------------- replication
    def _report(self, node: SimNode, module: ModuleName, detail: str) -> None:
        rep = node.modules[module].replica
        assert rep is not None
        self.reports.append((node, module, ReplicaReport(rep.record, rep.in_sync, detail)))

    def _set_replication(self, node: SimNode, module: ModuleName, action: SetReplication) -> None:
        rep = node.modules[module].replica
        assert rep is not None
        rep.connected = rep.in_sync = False
        rep.resync_done_at = None
        rep.role = action.role
        rep.permitted = 0
        rep.fence_at = 0.0
        if action.role == ReplicaRole.PRIMARY:
            generation = max(rep.record.generation, action.peer_generation) + 1
            rep.record = DataRecord(DataState.UPTODATE, generation, ran_alone=True)
            forced = ", forced: full resync" if action.force_full else ""
            self.log(f"{node.name} {module}: replica primary, generation {generation}{forced}")
        else:
            if action.outdated:
                rep.record = DataRecord(DataState.OUTDATED, rep.record.generation)
            outdated = ", data marked outdated" if action.outdated else ""
            self.log(f"{node.name} {module}: replica {action.role}{outdated}")
        self._report(node, module, f"role {action.role}")

    def _check_no_write_lost(
        self, node: SimNode, module: ModuleName, rep: SimReplica, actions: list[Action]
    ) -> None:
        if self.partitioned and self.witness is None:
            return  # split brain: documented, not counted
        forced = any(isinstance(a, SetReplication) and a.force_full for a in actions)
        acked = self.acked[module]
        if forced:
            acked &= rep.data  # the operator accepted losing the rest
            return
        lost = acked - rep.data
        assert not lost, (
            f"{module}: {node.name} becomes primary without {len(lost)} acknowledged writes "
            f"(first {min(lost)}) at {self.now}:\n" + "\n".join(self.transcript[-40:])
        )

    def _replicate(self, module: ModuleName) -> None:
        """One step of both nodes' replication processes of ``module``, then the writes."""
        for node in self.nodes.values():
            rep = node.modules[module].replica
            assert rep is not None
            up = node.powered and not node.paused  # the driver restarts it
            if up and rep.down_until is not None and self.now >= rep.down_until:
                rep.down_until = None  # restarted by the driver, in the role it had
                self._report(node, module, "process restarted")
            if not node.powered or rep.role != ReplicaRole.PRIMARY:
                continue
            if rep.fence_at and self.now > rep.fence_at:  # the watchdog: no word from the agent
                rep.fence_at = 0.0
                node.modules[module].vip = False
                self.log(f"{node.name} {module}: replica removes the VIPs (watchdog)")
                self.reports.append((node, module, ReplicaFenced("watchdog: VIPs removed")))
            peer = self.nodes[node.peer]
            prep = peer.modules[module].replica
            assert prep is not None
            link = (
                peer.powered
                and module not in self.link_broken
                and not ({node.name, peer.name} & self.cut_nodes)
                and prep.role == ReplicaRole.SECONDARY
                and prep.down_until is None
                and rep.down_until is None
            )
            if rep.connected and not link:
                rep.connected = False
                rep.resync_done_at = None
                if rep.in_sync:  # lost an in-sync secondary: runs alone from now on
                    rep.in_sync = False
                    rep.record = DataRecord(
                        DataState.UPTODATE, rep.record.generation + 1, ran_alone=True
                    )
                self.log(f"{node.name} {module}: replica lost its secondary")
                self._report(node, module, "secondary lost: connection reset")
            elif link and not rep.connected:
                rep.connected = True
                rep.resync_done_at = self.now + self.resync_seconds
                prep.record = DataRecord(DataState.RESYNCING, prep.record.generation)
                self.log(f"{peer.name} {module}: replica resyncing from {node.name}")
                self._report(peer, module, f"resync from {node.name} started")
            elif link and rep.resync_done_at is not None and self.now >= rep.resync_done_at:
                rep.resync_done_at = None
                prep.data = set(rep.data)
                prep.record = DataRecord(DataState.UPTODATE, rep.record.generation)
                rep.record = DataRecord(DataState.UPTODATE, rep.record.generation)
                rep.in_sync = True
                self.log(
                    f"{peer.name} {module}: replica up to date, generation {rep.record.generation}"
                )
                self._report(peer, module, "resync done")
                self._report(node, module, "secondary in sync")
        self._write(module)

    def _write(self, module: ModuleName) -> None:
        """The application on the serving node acknowledges one write."""
        for node in self.nodes.values():
            m = node.modules[module]
            rep = m.replica
            assert rep is not None
            serving = m.machine.state in (State.PRIM, State.ALONE) and m.vip
            if not (node.powered and serving and rep.acknowledges()):
                continue  # not primary, no client reaches it, or the change is held
            self.writes += 1
            rep.data.add(self.writes)
            if rep.in_sync:
                prep = self.nodes[node.peer].modules[module].replica
                assert prep is not None
                prep.data.add(self.writes)
            if not self.partitioned or self.witness is not None:
                self.acked[module].add(self.writes)

    def _advance(self) -> None:
        # deliver heartbeats due now
        due = [msg for msg in self.in_flight if msg[0] <= self.now]
        self.in_flight = [msg for msg in self.in_flight if msg[0] > self.now]
        for _, src, dst, inc, body in due:
            self._deliver(src, dst, inc, body)
        self._witness_exchange()
        for module in self.acked:
            self._replicate(module)
            self._deliver_reports()
        for node in self.nodes.values():
            if not node.powered or node.paused:
                continue
            for name, m in node.modules.items():
                if m.script and m.script[1] <= self.now:
                    script, _, ok = m.script
                    m.script = None
                    if script == "stop_prim":
                        m.app = False
                    self._step(node, name, ScriptDone(script, ok, "" if ok else "exit 1"))
            assert node.tracker is not None
            for change in node.tracker.tick(self.now):
                for name in node.modules:
                    self._step(node, name, PeerLost(change.node, change.silent_for))
            for name in node.modules:
                self._step(node, name, Tick())
            if self.now >= node.next_heartbeat:
                self._send(node)
                node.next_heartbeat = self.now + self.interval
        if (
            self.partitioned
            and not self.cut_nodes
            and all(self._heard_since_heal(n) for n in self.nodes.values())
            and all(len(self.serving(m)) <= 1 for m in self.nodes["n1"].modules)
        ):
            self.partitioned = False  # the split brain of the cut has been resolved
        for hook in self.on_step:
            hook(self)
        if not self.partitioned or self.witness is not None:
            for module in self.nodes["n1"].modules:
                serving = self.serving(module)
                assert len(serving) <= 1, (
                    f"{module} served by {serving} at {self.now}:\n"
                    + "\n".join(self.transcript[-30:])
                )

    def _witness_exchange(self) -> None:
        """Requests reach the witness, answers reach their node (1 ms each way)."""
        due = [r for r in self.to_witness if r[0] <= self.now]
        self.to_witness = [r for r in self.to_witness if r[0] > self.now]
        for _, name, inc, module, ask, sent_at in due:
            if self.witness is None or self.witness_down or name in self.witness_cut:
                continue
            if ask.op == "acquire":
                term = dict(ask.terms).get("w", 0)
                answer = self.witness.acquire(self.now, module, name, term, ask.alone, ask.synced)
            else:
                self.witness.release(self.now, module, name)
                continue
            ev = ArbiterAnswered("w", sent_at, answer)
            self.from_witness.append((self.now + 0.001, name, inc, module, ev))
        answers = [r for r in self.from_witness if r[0] <= self.now]
        self.from_witness = [r for r in self.from_witness if r[0] > self.now]
        for _, name, inc, module, ev in answers:
            node = self.nodes[name]
            if node.powered and node.incarnation == inc and name not in self.witness_cut:
                if node.paused:
                    node.backlog.append(
                        lambda node=node, module=module, ev=ev: self._step(node, module, ev)
                    )
                else:
                    self._step(node, module, ev)

    def _heard_since_heal(self, node: SimNode) -> bool:
        assert node.tracker is not None
        last = node.tracker.peers[node.peer].last_heard.get("lan", -1.0)
        return node.powered and last > self.healed_at

    def _send(self, node: SimNode) -> None:
        statuses = {name: m.machine.status() for name, m in node.modules.items()}
        acks = {name: m.ack for name, m in node.modules.items()}
        body = payload.encode(statuses, acks)
        self.in_flight.append((self.now + 0.001, node.name, node.peer, node.incarnation, body))

    def _deliver(self, src: NodeId, dst: NodeId, inc: int, body: dict[str, object]) -> None:
        s, d = self.nodes[src], self.nodes[dst]
        if not (s.powered and d.powered) or src in self.cut_nodes or dst in self.cut_nodes:
            return
        if d.paused:  # kept in its socket until it runs again
            d.backlog.append(lambda: self._deliver_now(src, dst, inc, body))
            return
        self._deliver_now(src, dst, inc, body)

    def _deliver_now(self, src: NodeId, dst: NodeId, inc: int, body: dict[str, object]) -> None:
        d = self.nodes[dst]
        if not d.powered:
            return
        assert d.tracker is not None
        d.tracker.heard(self.now, src, "lan", inc)
        for name, received in payload.decode(body, src, d.incarnation).items():
            if name in d.modules:
                ack = payload.Ack(inc, received.version)
                if d.modules[name].ack != ack:
                    d.modules[name].ack = ack
                    d.next_heartbeat = self.now  # acknowledge the peer's new status at once
                self._step(d, name, PeerHeard(received.status))
