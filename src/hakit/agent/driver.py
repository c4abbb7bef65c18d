"""The agent: one per node. Owns the clock, the heartbeat sockets and the module runners.

One asyncio loop. Every ``tick`` (a fifth of the heartbeat interval, at most 50 ms) the peer
tracker is checked for lost peers and every machine gets a ``Tick``; a heartbeat carrying every
module's *published* status goes out every ``interval``, and at once whenever a published
status changes or a new status of the peer must be acknowledged (acknowledgements do not
change versions, so this never ping-pongs). An acknowledgement goes out only together with
the status this node built on it (see :mod:`hakit.agent.module_runner`).
Scripts, VIP changes and checkers run in their own tasks, so heartbeats never wait for them.

Start-up order: bump the incarnation (persisted) → load module records → remove VIPs left
behind → bind heartbeat sockets and the API → start the modules that were running before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from typing import Any

from hakit.agent.farm_runner import FarmRunner
from hakit.agent.heartbeat_size import heartbeat_problems
from hakit.agent.module_runner import ModuleRunner
from hakit.agent.store import Store
from hakit.api.server import ApiServer
from hakit.config import Config
from hakit.core import farm_payload, payload
from hakit.core.events import Command, PeerHeard, PeerLost, PeerModuleStatus, Tick, Verb
from hakit.core.farm import FarmPeerHeard, FarmPeerStatus
from hakit.core.peers import PeerTracker
from hakit.model import ModuleName, NodeId, State
from hakit.net import farm as farm_net
from hakit.net.heartbeat import HeartbeatTransport
from hakit.net.wire import Envelope, WireError
from hakit.system import clock

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: Config, node: str) -> None:
        if node not in config.cluster.nodes:
            raise ValueError(
                f"node {node!r} is not in {config.path} (nodes: {sorted(config.cluster.nodes)})"
            )
        too_big = [p for p in heartbeat_problems(config) if p.startswith(f"node {node}:")]
        if too_big:
            raise ValueError(too_big[0])
        self.config = config
        self.node = node
        self.clock = clock.now  # CLOCK_BOOTTIME: see hakit.system.clock
        self.store = Store(config.cluster.state_dir)
        self.incarnation = 0
        self.seq = 0
        hb = config.cluster.heartbeat
        self.interval = hb.interval
        self.tick_period = min(hb.interval / 5, 0.05)
        peers = [n for n in config.cluster.nodes if n != node]
        self.tracker = PeerTracker([NodeId(p) for p in peers], hb.timeout)
        self.modules: dict[str, ModuleRunner | FarmRunner] = {}
        self.send_soon = asyncio.Event()
        self.stopping = asyncio.Event()
        self.transport: HeartbeatTransport | None = None
        self.api: ApiServer | None = None
        self.started_at = time.time()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; on it, stop every module (handing over) then return."""
        cfg = self.config.cluster
        self.incarnation = self.store.next_incarnation()
        log.info(
            "agent %s starting (cluster %s, incarnation %d, %d module(s))",
            self.node,
            cfg.name,
            self.incarnation,
            len(self.config.modules),
        )
        for name, module in self.config.modules.items():
            if self.node not in module.nodes:
                continue
            kind = FarmRunner if module.farm else ModuleRunner
            runner = kind(
                module,
                self.config,
                self.node,
                self.store,
                clock=self.clock,
                on_change=self.send_soon.set,
                incarnation=self.incarnation,
            )
            self.modules[name] = runner
            await runner.start()
        if not cfg.arbitration.arbiters and any(
            isinstance(r, ModuleRunner) for r in self.modules.values()
        ):
            log.warning(
                "NO ARBITER CONFIGURED: if the nodes lose each other but both keep running, "
                "both become primary until the network heals (the loser's changes are kept in "
                "a recovery folder); add [arbitration] witnesses = [...] (docs/split-brain.md)"
            )
        await self._remove_stale_farms()
        me = cfg.nodes[self.node].addresses
        self.transport = HeartbeatTransport(
            self.config.key(),
            cfg.name,
            self.node,
            networks=me,
            peers={n: c.addresses for n, c in cfg.nodes.items() if n != self.node},
            port=cfg.heartbeat.port,
            on_envelope=self._on_envelope,
        )
        await self.transport.start()
        self.api = ApiServer(self)
        await self.api.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        for runner in self.modules.values():
            if runner.durable.wanted:
                runner.note(f"starting at agent start (was {runner.durable.state})")
                runner.step(Command(Verb.START))
        log.info("agent %s started", self.node)
        tasks = [asyncio.create_task(self._ticker()), asyncio.create_task(self._sender())]
        await self.stopping.wait()
        await self._shutdown()
        for t in tasks:
            t.cancel()

    async def _remove_stale_farms(self) -> None:
        """Undo the kernel changes of farm modules that a crashed run left and that are no
        longer configured here (configured ones are cleaned by their runner)."""
        farm_dir = self.config.cluster.state_dir / "farm"
        for name in await asyncio.to_thread(farm_net.leftover_modules, farm_dir):
            if name in self.modules:
                continue
            for line in await asyncio.to_thread(farm_net.teardown, name, farm_dir):
                log.info("farm module %s (no longer configured): removed %s", name, line)

    async def _shutdown(self) -> None:
        """Stop every running module (handing over to the peer), keeping it wanted for the next
        start of the agent; give up after the scripts' timeouts."""
        log.info("agent %s stopping: stopping modules", self.node)
        wanted = {n for n, r in self.modules.items() if r.durable.wanted}
        for runner in self.modules.values():
            with contextlib.suppress(Exception):
                runner.step(Command(Verb.STOP))
        deadline = self.clock() + max((_stop_time(r) for r in self.modules.values()), default=0)
        while self.clock() < deadline and any(  # noqa: ASYNC110 - polls every runner
            r.published.state != State.STOP for r in self.modules.values()
        ):
            await asyncio.sleep(0.05)
        if self.api:
            await self.api.close()
        if self.transport:
            self.transport.close()
        for runner in self.modules.values():
            await runner.close()  # its worker ends: nothing persists a record after this
        for name in wanted:  # a service stop is not an operator stop: start again at boot
            r = self.modules[name]
            if isinstance(r, FarmRunner):
                r.store.save_farm(name, dataclasses.replace(r.durable, wanted=True))
            else:
                r.store.save_module(name, dataclasses.replace(r.durable, wanted=True))
        log.info("agent %s stopped", self.node)

    # ------------------------------------------------------------------ loops
    async def _ticker(self) -> None:
        while True:
            now = self.clock()
            for change in self.tracker.tick(now):
                log.warning("peer %s lost: no heartbeat for %.1f s", change.node, change.silent_for)
                for runner in self.modules.values():
                    if change.node in runner.peers:
                        self._safe_step(runner, PeerLost(change.node, change.silent_for))
            for runner in self.modules.values():
                self._safe_step(runner, Tick())
            await asyncio.sleep(self.tick_period)

    async def _sender(self) -> None:
        while True:
            try:
                self._send_heartbeat()
            except Exception:  # a heartbeat that cannot go out must not end the loop
                log.exception("heartbeat not sent: BUG, please report it")
            self.send_soon.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.send_soon.wait(), self.interval)

    def _send_heartbeat(self) -> None:
        assert self.transport is not None
        self.seq += 1
        mirrors = {n: r for n, r in self.modules.items() if isinstance(r, ModuleRunner)}
        farms = {n: r for n, r in self.modules.items() if isinstance(r, FarmRunner)}
        body = payload.encode(
            {ModuleName(n): r.published for n, r in mirrors.items()},
            {ModuleName(n): r.published_ack for n, r in mirrors.items()},
        )
        if farms:
            statuses = {ModuleName(n): r.published for n, r in farms.items()}
            acks = {ModuleName(n): r.published_ack for n, r in farms.items()}
            counters = {ModuleName(n): r.counters for n, r in farms.items()}
            body |= farm_payload.encode(statuses, acks, counters)
        env = Envelope(self.config.cluster.name, self.node, self.incarnation, self.seq, body)
        try:
            self.transport.send(env)
        except WireError as exc:
            if exc.reason != "too_big" or not farms:
                raise
            # the packet counters are for display only: send the statuses without them
            body |= farm_payload.encode(statuses, acks)
            self.transport.send(
                Envelope(self.config.cluster.name, self.node, self.incarnation, self.seq, body)
            )

    def _on_envelope(self, network: str, env: Envelope) -> None:
        now = self.clock()
        sender = NodeId(env.sender)
        try:  # a peer whose statuses cannot be read is not counted as heard (it may be lost)
            received = payload.decode(env.payload, sender, self.incarnation)
            farms = farm_payload.decode(env.payload, sender, NodeId(self.node), self.incarnation)
            counters = farm_payload.decode_counters(env.payload)
        except payload.PayloadError as exc:
            log.warning("heartbeat from %s dropped: bad payload: %s", env.sender, exc)
            return
        change = self.tracker.heard(now, sender, network, env.incarnation)
        if change is not None:
            log.info(
                "peer %s %s (incarnation %d, on %s)",
                env.sender,
                "restarted" if change.restarted else "up",
                env.incarnation,
                network,
            )
            if change.restarted:  # its agent removed its farm filters when it started again
                for runner in self.modules.values():
                    if isinstance(runner, FarmRunner) and change.node in runner.peers:
                        self._safe_step(runner, PeerLost(change.node, 0.0))
        for name, runner in self.modules.items():
            if sender not in runner.peers:
                continue
            if isinstance(runner, FarmRunner):
                self._farm_heard(
                    runner,
                    sender=sender,
                    incarnation=env.incarnation,
                    got=farms.get(ModuleName(name)),
                    counters=counters.get(ModuleName(name), {}),
                )
                continue
            entry = received.get(ModuleName(name))
            if entry is None:
                # the peer does not run this module: it will not take it over
                status = PeerModuleStatus(
                    NodeId(env.sender),
                    State.STOP,
                    False,
                    0,
                    0,
                    acked_version=runner.machine.version,
                )
                self._safe_step(runner, PeerHeard(status))
                continue
            # acknowledged at once, but only with the status this node builds on it (the
            # runner publishes both together)
            runner.received_ack = payload.Ack(env.incarnation, entry.version)
            self._safe_step(runner, PeerHeard(entry.status))

    def _farm_heard(
        self,
        runner: FarmRunner,
        *,
        sender: NodeId,
        incarnation: int,
        got: tuple[FarmPeerStatus, int] | None,
        counters: dict[str, int],
    ) -> None:
        runner.peer_counters[sender] = counters
        if got is None:  # the peer does not run this module: it claims nothing
            status = FarmPeerStatus(
                sender, State.STOP, False, frozenset(), 0, runner.machine.status.version
            )
            runner.received_acks[sender] = payload.Ack(incarnation, 0)
        else:
            status, version = got
            runner.received_acks[sender] = payload.Ack(incarnation, version)
        self._safe_step(runner, FarmPeerHeard(status))

    def _safe_step(self, runner: ModuleRunner | FarmRunner, event: Any) -> None:
        try:
            runner.step(event)
        except Exception:
            log.exception("module %s: BUG handling %s; please report it", runner.name, event)

    # ------------------------------------------------------------------ views
    def state_view(self) -> dict[str, Any]:
        """Everything `hakit state --json` shows."""
        now = self.clock()
        peers = {}
        for node, p in self.tracker.peers.items():
            peers[node] = {
                "alive": p.alive,
                "silent_for": None if not p.last_heard else round(p.silent_for(now), 2),
                "networks_up": p.networks_up(now, self.tracker.timeout),
            }
        modules: dict[str, dict[str, Any]] = {}
        for name, r in self.modules.items():
            if isinstance(r, FarmRunner):
                modules[name] = r.view()
                continue
            st = r.published
            peer_status = r.machine.peer
            modules[name] = {
                "state": st.state.value,
                "colour": st.state.colour,
                "reason": st.reason,
                "since": r.since,
                "wanted": st.wanted,
                "epoch": st.epoch,
                "primary_epoch": st.primary_epoch,
                "peer": r.peer,
                "peer_state": peer_status.state.value if peer_status else None,
                "vips": [v.address for v in r.module.config.vips],
            }
            arb = r.machine.arb
            if arb.enabled:
                now = self.clock()
                modules[name]["arbitration"] = {
                    "lease": arb.valid(now),
                    "term": arb.term(),
                    "valid_for": max(0.0, round(arb.valid_until() - now, 3)),
                    "arbiters": dict(r.arbiter_view),
                }
            if r.module.replicated:
                modules[name]["replication"] = {
                    "data": str(st.data),
                    "generation": st.generation,
                    "ran_alone": st.ran_alone,
                    "in_sync": st.in_sync,
                    "peer_data": str(peer_status.data) if peer_status else None,
                    "mode": r.replica_view.get("mode"),
                    "detail": r.replica_view.get("detail"),
                    "resync": r.replica_view.get("progress") or {},
                    "replicator_pid": r.replica.pid if r.replica else None,
                }
        counters = self.transport.counters.as_dict() if self.transport else {}
        return {
            "node": self.node,
            "cluster": self.config.cluster.name,
            "incarnation": self.incarnation,
            "peers": peers,
            "heartbeat": counters,
            "modules": modules,
        }


def _stop_time(runner: ModuleRunner | FarmRunner) -> float:
    """The longest a clean stop of the module may take (its scripts' timeouts, the drain)."""
    m = runner.module
    if isinstance(runner, FarmRunner):
        assert m.config.farm is not None
        return (
            m.config.farm.drain_timeout
            + m.script_timeout("stop_both")
            + m.script_timeout("poststop")
        )
    return m.script_timeout("stop_prim") + m.script_timeout("poststop")
