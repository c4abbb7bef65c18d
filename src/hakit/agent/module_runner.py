"""One module on this node: its machine, and the execution of the machine's actions.

Contract (see :mod:`hakit.core.actions`): events are stepped into the machine at once, in the
order they arrive; the resulting actions are queued and executed in order by one worker task
per module. ``Persist`` is written and fsynced before the next action; VIPs are added or
removed before the next action; a script is started and its end comes back as a
``ScriptDone`` event. The status that heartbeats carry (:attr:`published`) is updated only once
every action of the step that produced it, but the script, has been executed: a peer never
sees "STOPPING" before the VIP is gone. The acknowledgement of the peer's status that
heartbeats carry is published together with the status built on it, never before.

Caveats: a VIP that cannot be removed is logged as an error; the module goes on (there is
nothing better to do without fencing, which comes with arbitration).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hakit.agent.checkers import checker_name, run_checker
from hakit.agent.replica_proc import ReplicaProcess
from hakit.agent.store import Store
from hakit.config import Config, Module
from hakit.core.actions import (
    Action,
    AddVips,
    AnnounceVips,
    DelVips,
    Persist,
    RunScript,
    SetReplication,
    StartCheckers,
    StopCheckers,
    Transitioned,
)
from hakit.core.events import CheckerFailed, Event, ReplicaFailed, ReplicaReport, ScriptDone
from hakit.core.freshness import DataRecord, DataState
from hakit.core.mirror import CommandRefused, Durable, MirrorMachine, MirrorSettings, Status
from hakit.core.payload import Ack
from hakit.model import NodeId, State
from hakit.net import NetError
from hakit.net.vip import add_vip_async, announce, del_vip_async
from hakit.repl import record as data_records
from hakit.system.run import run_async

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    actions: list[Action]
    status: Status
    ack: Ack  # the peer's status version the machine had processed when it produced ``status``


class ModuleRunner:
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
    ) -> None:
        self.module = module
        self.name = module.name
        self.node = node
        self.peer = next(n for n in module.nodes if n != node)
        self.store = store
        self.clock = clock
        self.on_change = on_change  # called when the published status changed (send heartbeat)
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
        )
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
        self.unpublished = 0  # batches queued or running
        self.last_queued: tuple[Status, Ack] = (self.published, self.published_ack)
        self.since = time.time()  # wall clock of the last transition, for display only
        self.queue: asyncio.Queue[_Batch] = asyncio.Queue()
        self.script_task: asyncio.Task[None] | None = None
        self.checker_tasks: list[asyncio.Task[None]] = []
        self.worker: asyncio.Task[None] | None = None
        self.vip_failure: str | None = None  # set by AddVips, reported as the script's failure
        log_dir = config.cluster.log_dir or config.cluster.state_dir / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        if module.replicated:
            self.replica = ReplicaProcess(
                config_path=config.path,
                module=module.name,
                node=node,
                log_fd=self.log_fd,
                on_report=self._replica_report,
                on_failed=self._replica_failed,
            )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Remove VIPs left by a crash or power loss, then start the worker."""
        for vip in self.module.config.vips:
            try:
                if await del_vip_async(vip.interface, vip.address):
                    self.note(f"removed VIP {vip.address} left on {vip.interface} (agent start)")
            except NetError as exc:
                self.note(f"cannot check VIP {vip.address} on {vip.interface}: {exc}", error=True)
        self.worker = asyncio.create_task(self._work(), name=f"module {self.name}")

    async def close(self) -> None:
        if self.replica is not None:
            await self.replica.close()  # unmounts: the application loses its files
        for task in [self.worker, self.script_task, *self.checker_tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        os.close(self.log_fd)

    # ------------------------------------------------------------------ events
    def step(self, event: Event) -> None:
        """Feed one event to the machine now; queue its actions. Raises CommandRefused."""
        actions = self.machine.step(self.clock(), event)
        status, ack = self.machine.status(), self.received_ack
        promised = self.last_queued if self.unpublished else (self.published, self.published_ack)
        if actions or (status, ack) != promised:
            if actions or self.unpublished or status != self.published:
                self.unpublished += 1
                self.last_queued = (status, ack)
                self.queue.put_nowait(_Batch(actions, status, ack))
            else:  # only the acknowledgement is new, and the published status reflects it
                self.published_ack = ack
                self.on_change()  # acknowledge the peer's new status at once

    def command(self, event: Event) -> Status:
        try:
            self.step(event)
        except CommandRefused as exc:
            self.note(f"command refused: {exc}")
            raise
        return self.machine.status()

    # ------------------------------------------------------------------ worker
    async def _work(self) -> None:
        while True:
            batch = await self.queue.get()
            try:
                for action in batch.actions:
                    await self._execute(action, batch)
            except Exception:
                log.exception("module %s: BUG executing %s; please report it", self.name, batch)
            self.unpublished -= 1
            if batch.status != self.published or batch.ack != self.published_ack:
                self.published, self.published_ack = batch.status, batch.ack
                self.on_change()

    async def _execute(self, action: Action, batch: _Batch) -> None:
        match action:
            case Transitioned(old=old, new=new, reason=reason):
                self.since = time.time()
                self.note(f"{old} -> {new} ({reason})")
            case Persist():
                self.durable = Durable(
                    action.wanted,
                    action.state,
                    action.epoch,
                    action.primary_epoch,
                    action.peer_generation_seen,
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
            case StartCheckers():
                self._start_checkers()
            case StopCheckers():
                self._stop_checkers()
            case RunScript():
                if self.vip_failure is not None:
                    failure, self.vip_failure = self.vip_failure, None
                    self._report(ScriptDone(action.script, False, failure))
                    return
                self.script_task = asyncio.create_task(self._run_script(action))

    async def _add_vips(self, batch: _Batch) -> None:
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
            role, action.force_full, action.peer_generation, action.outdated
        )
        if error is not None:
            self.vip_failure = f"replication ({role}): {error}"
            self.note(self.vip_failure, error=True)

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

    def _start_checkers(self) -> None:
        self._stop_checkers()
        for i, cfg in enumerate(self.module.config.checkers):
            name = checker_name(i, cfg)
            self.checker_tasks.append(
                asyncio.create_task(run_checker(name, cfg, self._report), name=f"checker {name}")
            )

    def _stop_checkers(self) -> None:
        for task in self.checker_tasks:
            task.cancel()
        self.checker_tasks.clear()

    def _report(self, event: CheckerFailed | ScriptDone) -> None:
        if isinstance(event, CheckerFailed):
            self.note(f"checker {event.checker} failed: {event.detail} -> {event.action}")
        try:
            self.step(event)
        except Exception:
            log.exception("module %s: BUG stepping %s; please report it", self.name, event)

    async def _run_script(self, action: RunScript) -> None:
        name = action.script
        path = self.module.script(name)
        if path is None:
            self._report(ScriptDone(name, True, "no script"))
            return
        old, _, new = action.transition.partition("->")
        env = {
            **os.environ,
            "HAKIT_MODULE": self.name,
            "HAKIT_NODE": self.node,
            "HAKIT_PEER": self.peer,
            "HAKIT_SCRIPT": name,
            "HAKIT_TRANSITION": action.transition,
            "HAKIT_OLD_STATE": old,
            "HAKIT_NEW_STATE": new,
            "HAKIT_MODULE_DIR": str(self.module.folder),
            "HAKIT_VIPS": " ".join(v.address for v in self.module.config.vips),
        }
        timeout = self.module.script_timeout(name)
        self.note(f"running {name} {old} {new} (timeout {timeout:g} s)")
        result = await run_async(
            [str(path), old, new],
            timeout=timeout,
            env=env,
            cwd=str(self.module.folder),
            output=self.log_fd,
        )
        self.note(f"{name} finished: {result.describe()} in {result.seconds:.2f} s")
        self._report(ScriptDone(name, result.ok, result.describe()))

    # ------------------------------------------------------------------ logging
    def note(self, text: str, *, error: bool = False) -> None:
        """One line in the agent log and in the module's log file."""
        (log.error if error else log.info)("module %s: %s", self.name, text)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError):
            os.write(self.log_fd, f"{stamp} [{self.node}] {text}\n".encode())

    def log_tail(self, lines: int) -> str:
        try:
            data = Path(self.log_path).read_bytes()[-200_000:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:]) + "\n"

    def is_serving(self) -> bool:
        return self.published.state in (State.PRIM, State.ALONE)
