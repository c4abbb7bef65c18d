"""What every module runner shares: the action queue and its publication rule, scripts,
checkers and the module log.

Contract (see :mod:`hakit.core.actions` and :mod:`hakit.core.farm`): events are stepped into
the machine at once, in the order they arrive; the resulting actions are queued and executed in
order by one worker task per module. The status that heartbeats carry (:attr:`published`) is
updated only once every action of the step that produced it, but the script, has been executed:
a peer never sees a state (or a released bucket) before the node acts on it. The
acknowledgement of the peers' statuses that heartbeats carry is published together with the
status built on it, never before.

Subclasses provide the machine (:meth:`_machine_step`, :meth:`_machine_status`), the
acknowledgement they publish (:meth:`_current_ack`) and :meth:`_execute` for their own actions
(``Transitioned`` is logged here, for every kind of module).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hakit.agent.checkers import Recovered, checker_name, run_checker
from hakit.agent.store import Store
from hakit.config import Config, Module
from hakit.core.actions import Transitioned
from hakit.core.events import CheckerFailed, ScriptDone
from hakit.core.mirror import CommandRefused
from hakit.system.run import run_async

log = logging.getLogger(__name__)


@dataclass
class Batch:
    actions: list[Any]
    status: Any
    ack: Any  # what the machine had processed of the peers' statuses when it produced ``status``


def _sans_reason(status: Any) -> Any:
    """The status as heartbeats carry it (every status dataclass has a ``reason`` field)."""
    if dataclasses.is_dataclass(status) and not isinstance(status, type):
        return dataclasses.replace(status, reason="")
    return status


class RunnerBase:
    """The queue, the worker, scripts, checkers and the log of one module on this node."""

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
        self.module = module
        self.incarnation = incarnation  # of this agent (requests to the arbiters carry it)
        self.name = module.name
        self.node = node
        self.store = store
        self.clock = clock
        self.on_change = on_change  # called when the published status changed (send heartbeat)
        self.published: Any = None  # set by the subclass once its machine exists
        self.published_ack: Any = None
        self.unpublished = 0  # batches queued or running
        self.last_queued: tuple[Any, Any] = (None, None)
        self.since = time.time()  # wall clock of the last transition, for display only
        self.queue: asyncio.Queue[Batch] = asyncio.Queue()
        self.script_task: asyncio.Task[None] | None = None
        self.checker_tasks: list[asyncio.Task[None]] = []
        self.worker: asyncio.Task[None] | None = None
        log_dir = config.cluster.log_dir or config.cluster.state_dir / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    # ------------------------------------------------------------------ subclass hooks
    def _machine_step(self, now: float, event: Any) -> list[Any]:
        raise NotImplementedError

    def _machine_status(self) -> Any:
        raise NotImplementedError

    def _current_ack(self) -> Any:
        raise NotImplementedError

    async def _execute(self, action: Any, batch: Batch) -> None:
        raise NotImplementedError

    def _script_env(self) -> Mapping[str, str]:
        """Variables a subclass adds to its scripts' environment."""
        return {}

    # ------------------------------------------------------------------ lifecycle
    def _start_worker(self) -> None:
        self.last_queued = (self.published, self.published_ack)
        self.worker = asyncio.create_task(self._work(), name=f"module {self.name}")

    async def _cancel_tasks(self) -> None:
        for task in [self.worker, self.script_task, *self.checker_tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        os.close(self.log_fd)

    # ------------------------------------------------------------------ events
    def command(self, event: Any) -> Any:
        """Step an operator command; the new status, or CommandRefused (logged)."""
        try:
            self.step(event)
        except CommandRefused as exc:
            self.note(f"command refused: {exc}")
            raise
        return self._machine_status()

    def step(self, event: Any) -> None:
        """Feed one event to the machine now; queue its actions. Raises CommandRefused."""
        actions = self._machine_step(self.clock(), event)
        status, ack = self._machine_status(), self._current_ack()
        promised = self.last_queued if self.unpublished else (self.published, self.published_ack)
        if actions or (status, ack) != promised:
            if actions or self.unpublished or status != self.published:
                self.unpublished += 1
                self.last_queued = (status, ack)
                self.queue.put_nowait(Batch(actions, status, ack))
            else:  # only the acknowledgement is new, and the published status reflects it
                self.published_ack = ack
                self.on_change()  # acknowledge the peer's new status at once

    async def _work(self) -> None:
        while True:
            batch = await self.queue.get()
            for action in batch.actions:  # one failing action does not skip the others
                try:
                    if isinstance(action, Transitioned):
                        self.since = time.time()
                        self.note(f"{action.old} -> {action.new} ({action.reason})")
                    else:
                        await self._execute(action, batch)
                except Exception:
                    log.exception(
                        "module %s: BUG executing %s; please report it", self.name, action
                    )
            self.unpublished -= 1
            if batch.status != self.published or batch.ack != self.published_ack:
                # heartbeats do not carry the reason: a new sentence alone waits for the next
                urgent = batch.ack != self.published_ack or _sans_reason(
                    batch.status
                ) != _sans_reason(self.published)
                self.published, self.published_ack = batch.status, batch.ack
                if urgent:
                    self.on_change()

    def _report(self, event: Any) -> None:
        """Step an event that comes from a task of this runner (script end, checker)."""
        if isinstance(event, CheckerFailed):
            self.note(f"checker {event.checker} failed: {event.detail} -> {event.action}")
        try:
            self.step(event)
        except Exception:
            log.exception("module %s: BUG stepping %s; please report it", self.name, event)

    # ------------------------------------------------------------------ checkers
    def _start_checkers(self, recovered: Recovered | None = None) -> None:
        """Start every checker; with ``recovered``, a failed checker keeps probing and calls it
        once the application is healthy again (farm modules)."""
        self._stop_checkers()
        for i, cfg in enumerate(self.module.config.checkers):
            name = checker_name(i, cfg)
            self.checker_tasks.append(
                asyncio.create_task(
                    run_checker(name, cfg, self._report, recovered), name=f"checker {name}"
                )
            )

    def _stop_checkers(self) -> None:
        for task in self.checker_tasks:
            task.cancel()
        self.checker_tasks.clear()

    # ------------------------------------------------------------------ scripts
    def _launch_script(self, script: str, transition: str) -> None:
        self.script_task = asyncio.create_task(self._run_script(script, transition))

    async def _run_script(self, name: str, transition: str) -> None:
        path = self.module.script(name)
        if path is None:
            self._report(ScriptDone(name, True, "no script"))
            return
        old, _, new = transition.partition("->")
        env = {
            **os.environ,
            "HAKIT_MODULE": self.name,
            "HAKIT_NODE": self.node,
            "HAKIT_SCRIPT": name,
            "HAKIT_TRANSITION": transition,
            "HAKIT_OLD_STATE": old,
            "HAKIT_NEW_STATE": new,
            "HAKIT_MODULE_DIR": str(self.module.folder),
            "HAKIT_VIPS": " ".join(v.address for v in self.module.config.vips),
            **self._script_env(),
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
