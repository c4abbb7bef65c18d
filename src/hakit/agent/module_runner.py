"""One mirror module on this node: its machine, and the execution of the machine's actions.

Contract (see :mod:`hakit.core.actions` and :mod:`hakit.agent.runner_base`): ``Persist`` is
written and fsynced before the next action; VIPs are added or removed before the next action; a
script is started and its end comes back as a ``ScriptDone`` event. A peer never sees
"STOPPING" before the VIP is gone.

Arbitration: ``AskArbiters`` sends one request per arbiter in its own task (the worker never
waits for an arbiter); each answer is stepped as ``ArbiterAnswered``. ``PermitAlone`` is passed
to the replicator at once.

Fencing without the agent: with an arbiter, a module's VIPs are guarded by a lease held in the
kernel (:mod:`hakit.agent.vip_lease`), installed before they are added and renewed at every
``FenceAt``; a replicated module's replicator also removes them at that deadline (its
watchdog). So a paused (SIGSTOP) or stuck agent stops serving at the deadline, even if the
replication process died.

Caveats: a VIP that cannot be removed is logged as an error; the module goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from hakit.agent import arbiters
from hakit.agent.replica_proc import ReplicaProcess
from hakit.agent.runner_base import Batch, RunnerBase
from hakit.agent.store import Store
from hakit.agent.vip_lease import KernelLease
from hakit.config import Config, Module
from hakit.core.actions import (
    Action,
    AddVips,
    AnnounceVips,
    AskArbiters,
    DelVips,
    FenceAt,
    PermitAlone,
    Persist,
    RunScript,
    SetReplication,
    StartCheckers,
    StopCheckers,
)
from hakit.core.events import (
    ArbiterAnswered,
    Event,
    ReplicaFailed,
    ReplicaFenced,
    ReplicaReport,
    ScriptDone,
)
from hakit.core.freshness import DataRecord, DataState
from hakit.core.mirror import Durable, MirrorMachine, MirrorSettings, Status
from hakit.core.payload import Ack
from hakit.errors import HakitError
from hakit.model import NodeId, State
from hakit.net import NetError, vip_fence
from hakit.net.vip import add_vip_async, announce, del_vip_async
from hakit.repl import record as data_records

log = logging.getLogger(__name__)


class ModuleRunner(RunnerBase):
    """Owns the machine of one module and everything it touches on this node."""

    def __init__(
        self,
        module: Module,
        config: Config,
        node: str,
        store: Store,
        *,
        clock: Callable[[], float],
        on_change: Callable[[], None],
        incarnation: int = 0,
    ) -> None:
        super().__init__(
            module, config, node, store, clock=clock, on_change=on_change, incarnation=incarnation
        )
        self.peer = next(n for n in module.nodes if n != node)
        self.peers = frozenset({NodeId(self.peer)})
        cfg = module.config
        hb = config.cluster.heartbeat
        settings = MirrorSettings(
            node=NodeId(node),
            peer=NodeId(self.peer),
            preferred=NodeId(cfg.preferred) if cfg.preferred else None,
            failover=cfg.failover,
            failback=cfg.failback,
            startup_wait=hb.timeout,
            max_restarts=cfg.loop_guard.max_restarts,
            guard_max=cfg.loop_guard.max_actions,
            guard_period=cfg.loop_guard.period,
            replicated=module.replicated,
            module=module.name,
            arbitration=arbiters.settings(config),
        )
        self.arbiters = arbiters.clients(config, node, module, incarnation)
        self.arbiter_view: dict[str, str] = {}  # per arbiter: its latest answer, for the log
        self._asks: set[asyncio.Task[None]] = set()
        self.durable: Durable = store.load_module(self.name)
        data: DataRecord | None = None
        self.replica: ReplicaProcess | None = None
        self.replica_view: dict[str, object] = {}  # last report of the replicator, for `state`
        if module.replicated:
            try:
                data = data_records.load(
                    data_records.record_path(config.cluster.state_dir, module.name)
                )
            except ValueError as exc:
                log.error("module %s: %s; treating the data as unknown", module.name, exc)
                data = DataRecord()
        self.machine = MirrorMachine(settings, self.durable, data)
        self.published: Status = self.machine.status()
        # What heartbeats acknowledge goes out only with a status built on it: a peer that sees
        # "acked version v" may rely on this node's published status having taken v into
        # account (elections and hand-overs need it; see hakit.core.mirror).
        self.received_ack = Ack()  # set by the driver before stepping a PeerHeard
        self.published_ack = Ack()
        self.vip_failure: str | None = None  # set by AddVips, reported as the script's failure
        if module.replicated:
            self.replica = ReplicaProcess(
                config_path=config.path,
                module=module.name,
                node=node,
                log_fd=self.log_fd,
                on_report=self._replica_report,
                on_failed=self._replica_failed,
                on_fenced=self._replica_fenced,
            )
        self.kernel_lease: KernelLease | None = None
        if settings.arbitration.enabled and cfg.vips:
            addresses = [vip.address for vip in cfg.vips]
            self.kernel_lease = KernelLease(module.name, addresses, clock, self.note)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Remove VIPs left by a crash or power loss, then their lease tables (whatever the
        configuration says now), then start the worker."""
        for vip in self.module.config.vips:
            try:
                if await del_vip_async(vip.interface, vip.address):
                    self.note(f"removed VIP {vip.address} left on {vip.interface} (agent start)")
            except NetError as exc:
                self.note(f"cannot check VIP {vip.address} on {vip.interface}: {exc}", error=True)
        try:
            await vip_fence.remove(self.name)
        except HakitError as exc:
            self.note(f"cannot remove the VIP lease tables: {exc}", error=True)
        self._start_worker()

    async def close(self) -> None:
        if self.replica is not None:
            await self.replica.close()  # unmounts: the application loses its files
        for task in list(self._asks):
            task.cancel()
        await self._cancel_tasks()

    # ------------------------------------------------------------------ events
    def _machine_step(self, now: float, event: Event) -> list[Action]:
        """Step the machine. ``FenceAt`` and the ``acquire`` requests go out at once: a lease
        renewal or a watchdog deadline must never wait behind a slow role change. A
        ``release`` stays in the queue: it must follow the removal of the VIPs."""
        queued: list[Action] = []
        for action in self.machine.step(now, event):
            if isinstance(action, FenceAt):
                if self.replica is not None:
                    self.replica.fence_at(action.deadline)
                if self.kernel_lease is not None:
                    self.kernel_lease.renew(action.deadline)
            elif isinstance(action, AskArbiters) and action.op == "acquire":
                self._ask_all(action)
            else:
                queued.append(action)
        return queued

    def _ask_all(self, action: AskArbiters) -> None:
        for name, client in self.arbiters.items():
            task = asyncio.create_task(self._ask(name, client, action))
            self._asks.add(task)
            task.add_done_callback(self._asks.discard)

    def _machine_status(self) -> Status:
        return self.machine.status()

    def _current_ack(self) -> Ack:
        return self.received_ack

    # ------------------------------------------------------------------ worker
    async def _execute(self, action: Action, batch: Batch) -> None:
        match action:
            case Persist():
                self.durable = Durable(
                    action.wanted,
                    action.state,
                    action.epoch,
                    action.primary_epoch,
                    action.peer_generation_seen,
                    action.lease,
                )
                # fsync off the event loop: a slow disk must not stall heartbeats (the worker
                # still waits for it before the next action)
                await asyncio.to_thread(self.store.save_module, self.name, self.durable)
            case AddVips():
                await self._add_vips(batch)
            case DelVips():
                await self._del_vips()
            case AnnounceVips():
                self.note(f"{self.peer} let go of the primary role: announcing the VIPs again")
                for vip in self.module.config.vips:
                    self._announce(vip.interface, vip.address, vip.garp_count, vip.garp_interval)
            case SetReplication():
                await self._set_replication(action)
            case AskArbiters():  # a release (acquires go out at once, see _machine_step)
                self._ask_all(action)
            case PermitAlone(generation=generation):
                if self.replica is not None:
                    self.replica.permit(generation)
            case StartCheckers():
                self._start_checkers()
            case StopCheckers():
                self._stop_checkers()
            case RunScript():
                if self.vip_failure is not None:
                    failure, self.vip_failure = self.vip_failure, None
                    self._report(ScriptDone(action.script, False, failure))
                    return
                self._launch_script(action.script, action.transition)

    async def _add_vips(self, batch: Batch) -> None:
        if self.kernel_lease is not None:
            failure = await self.kernel_lease.install()
            if failure is not None:
                self.vip_failure = failure
                self.note(failure, error=True)
                return
        for vip in self.module.config.vips:
            try:
                added = await add_vip_async(vip.interface, vip.address)
            except NetError as exc:
                self.vip_failure = f"VIP {vip.address}: {exc}"
                self.note(self.vip_failure, error=True)
                return
            self.note(f"VIP {vip.address} {'added on' if added else 'already on'} {vip.interface}")
            self._announce(vip.interface, vip.address, vip.garp_count, vip.garp_interval)

    async def _set_replication(self, action: SetReplication) -> None:
        """Give the replicator its role and wait until it is in place (mounted, listening or
        released); a failure fails the script that follows, like a VIP that cannot be added."""
        if self.replica is None:
            return
        role = str(action.role)
        self.note(
            f"replication: role {role}" + (" (full resync forced)" if action.force_full else "")
        )
        error = await self.replica.set_role(
            role, action.force_full, action.peer_generation, action.outdated, dict(action.terms)
        )
        if role == "primary" and self.machine.fence_sent:
            # the watchdog deadline sent with the step may have been reset by a role change
            # queued before this one (idle): give it again
            self.replica.fence_at(self.machine.fence_sent)
        if error is not None:
            self.vip_failure = f"replication ({role}): {error}"
            self.note(self.vip_failure, error=True)

    async def _ask(self, name: str, client: arbiters.Arbiter, action: AskArbiters) -> None:
        term = dict(action.terms).get(name, 0)
        got = await client.request(action.op, term, action.alone, action.synced)
        if action.op != "acquire":
            return
        if got is None:
            view = "no answer"
        else:
            a = got[1]
            # without the seconds left, which change at every answer
            view = (
                f"granted, term {a.term}"
                if a.granted
                else f"refused (held by {a.holder})"
                if a.holder
                else f"refused: {a.reason.split(':')[0]}"
            )
            if a.alone:
                view += "; ran alone: " + ", ".join(f"{n} at generation {g}" for n, g in a.alone)
        if view != self.arbiter_view.get(name):
            self.arbiter_view[name] = view
            self.note(f"arbiter {name}: {view}", error=view == "no answer")
        if got is not None:
            try:
                self.step(ArbiterAnswered(name, got[0], got[1]))
            except Exception:
                log.exception("module %s: BUG stepping an arbiter's answer", self.name)

    def _replica_report(self, msg: dict[str, object]) -> None:
        try:
            record = DataRecord(
                DataState(str(msg["data"])), int(str(msg["generation"])), bool(msg["ran_alone"])
            )
        except (KeyError, ValueError) as exc:
            log.error("module %s: bad report from the replicator %r: %s", self.name, msg, exc)
            return
        old = self.replica_view
        self.replica_view = {k: msg.get(k) for k in ("mode", "detail", "progress", "in_sync")}
        if (old.get("mode"), old.get("detail")) != (msg.get("mode"), msg.get("detail")) and not (
            msg.get("mode") == "resync" and old.get("mode") == "resync"
        ):
            self.note(f"replication: {msg.get('detail')}")
        try:
            self.step(ReplicaReport(record, bool(msg.get("in_sync")), str(msg.get("detail", ""))))
        except Exception:
            log.exception("module %s: BUG stepping a replica report; please report it", self.name)

    def _replica_fenced(self, detail: str) -> None:
        self.note(f"replication process removed the VIPs: {detail}", error=True)
        try:
            self.step(ReplicaFenced(detail))
        except Exception:
            log.exception("module %s: BUG stepping ReplicaFenced; please report it", self.name)

    def _replica_failed(self, detail: str) -> None:
        self.note(f"replication process failed: {detail}", error=True)
        self.replica_view = {"mode": "failed", "detail": detail}
        try:
            self.step(ReplicaFailed(detail))
        except Exception:
            log.exception("module %s: BUG stepping ReplicaFailed; please report it", self.name)
        if self.machine.state in (State.SECOND, State.STARTING_SECOND):
            # a secondary's replicator is simply started again; the primary resyncs it
            asyncio.get_running_loop().create_task(self._restart_secondary())

    async def _restart_secondary(self) -> None:
        await asyncio.sleep(1.0)
        if self.replica is not None and self.machine.state == State.SECOND:
            error = await self.replica.set_role("secondary", False, 0, False)
            self.note(f"replication: secondary restarted{f' — failed: {error}' if error else ''}")

    def _announce(self, interface: str, address: str, count: int, interval: float) -> None:
        task = asyncio.create_task(announce(interface, address, count, interval))
        task.add_done_callback(self._announce_done)

    def _announce_done(self, task: asyncio.Task[int]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.note(f"gratuitous ARP failed: {task.exception()}", error=True)

    async def _del_vips(self) -> None:
        for vip in self.module.config.vips:
            try:
                if await del_vip_async(vip.interface, vip.address):
                    self.note(f"VIP {vip.address} removed from {vip.interface}")
            except NetError as exc:
                self.note(f"VIP {vip.address} could not be removed: {exc}", error=True)
        if self.kernel_lease is not None and self.kernel_lease.installed:
            await self.kernel_lease.remove()

    def _script_env(self) -> dict[str, str]:
        return {"HAKIT_PEER": self.peer}

    def is_serving(self) -> bool:
        return self.published.state in (State.PRIM, State.ALONE)
