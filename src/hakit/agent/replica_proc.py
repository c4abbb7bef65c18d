"""The agent's side of a module's replicator process (``hakit replicator``): start, drive, watch.

The process is started at the first role change and kept while the agent runs. Contracts:

- :meth:`ReplicaProcess.set_role` returns once the replicator reports the role change done
  (mounted, listening, or released) or failed; it never blocks the event loop;
- records and progress reported by the process reach ``on_report`` as they come;
- the process is *hung* when it has not answered a ping for ``hang_timeout`` seconds: it is
  killed (SIGKILL, its own process group) and ``on_failed`` is called, as when it dies. Either
  way its FUSE mounts are gone (the kernel aborts them with the process), so the application
  on a primary has lost its files: the module's machine decides what to do
  (:class:`hakit.core.events.ReplicaFailed`).

Caveats: the process's stderr goes straight to the module log (it is the replicator's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0


class ReplicaProcess:
    """One replicator process (see module docstring)."""

    def __init__(
        self,
        *,
        config_path: Path,
        module: str,
        node: str,
        log_fd: int,
        on_report: Callable[[dict[str, Any]], None],
        on_failed: Callable[[str], None],
        on_fenced: Callable[[str], None] = lambda _: None,
        hang_timeout: float = 10.0,
        role_timeout: float = 120.0,
    ) -> None:
        self.config_path = config_path
        self.module = module
        self.node = node
        self.log_fd = log_fd
        self.on_report = on_report
        self.on_failed = on_failed
        self.on_fenced = on_fenced
        self.hang_timeout = hang_timeout
        self.role_timeout = role_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.role = "idle"
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_pong = time.monotonic()
        self._closing = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self.proc is not None and self.proc.returncode is None:
            return self.proc
        argv = [
            sys.executable,
            "-m",
            "hakit.repl.process",
            "--config",
            str(self.config_path),
            "--module",
            self.module,
            "--node",
            self.node,
        ]
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log_fd,
            start_new_session=True,
            limit=1 << 20,
        )
        self.role = "idle"
        self._last_pong = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._read(self.proc), name=f"replicator {self.module} out"),
            asyncio.create_task(self._watch(self.proc), name=f"replicator {self.module} ping"),
        ]
        log.info("module %s: replicator started (pid %d)", self.module, self.proc.pid)
        return self.proc

    async def set_role(
        self,
        role: str,
        force_full: bool,
        peer_generation: int,
        outdated: bool = False,
        terms: dict[str, int] | None = None,
    ) -> str | None:
        """Change role; None when done, else the reason it failed."""
        if (
            role == "idle"
            and not outdated
            and (self.proc is None or self.proc.returncode is not None)
        ):
            self.role = "idle"
            return None  # nothing runs: nothing mounted, nothing listening
        proc = await self._ensure()
        reply = await self._call(
            proc,
            {
                "cmd": "role",
                "role": role,
                "force_full": force_full,
                "peer_generation": peer_generation,
                "terms": terms or {},
                "outdated": outdated,
            },
            self.role_timeout,
        )
        if reply is None:
            return f"replicator did not complete role {role} in {self.role_timeout:g} s"
        if not reply.get("ok"):
            return str(reply.get("error") or "replicator failed")
        self.role = role
        return None

    def fence_at(self, deadline: float) -> None:
        """Set the primary replicator's watchdog (``FenceAt``) at once: written without
        waiting, so that it never queues behind a slow action."""
        self._notify({"cmd": "fence_at", "t": deadline})

    def permit(self, generation: int) -> None:
        """Tell the primary's replicator it may acknowledge unreplicated changes up to
        ``generation`` (a replicator that died will be told again)."""
        self._notify({"cmd": "permit", "generation": generation})

    def _notify(self, obj: dict[str, Any]) -> None:
        """Write one command that has no answer (the pipe's buffer takes it at once)."""
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        try:
            proc.stdin.write((json.dumps(obj) + "\n").encode())
        except (ConnectionError, BrokenPipeError) as exc:
            log.warning("module %s: %s not sent to the replicator: %s", self.module, obj, exc)

    async def compare(self, checksums: bool, timeout: float = 3600.0) -> dict[str, Any]:
        """Run ``verify`` (with checksums) or ``diff`` in the replicator; its answer."""
        if self.proc is None or self.proc.returncode is not None:
            return {"ok": False, "error": "no replicator running on this node"}
        answer = await self._call(self.proc, {"cmd": "verify" if checksums else "diff"}, timeout)
        return answer or {"ok": False, "error": "the replicator did not answer"}

    async def fullsync(self, timeout: float = 30.0) -> dict[str, Any]:
        """Have the primary's replicator resynchronise the secondary completely; its answer."""
        if self.proc is None or self.proc.returncode is not None:
            return {"ok": False, "error": "no replicator running on this node"}
        answer = await self._call(self.proc, {"cmd": "fullsync"}, timeout)
        return answer or {"ok": False, "error": "the replicator did not answer"}

    async def _call(
        self, proc: asyncio.subprocess.Process, obj: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        self._ids += 1
        obj["id"] = self._ids
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._ids] = fut
        try:
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(obj) + "\n").encode())
            await proc.stdin.drain()
            return await asyncio.wait_for(fut, timeout)
        except (TimeoutError, ConnectionError, BrokenPipeError):
            return None
        finally:
            self._waiting.pop(obj["id"], None)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("ev")
            if ev == "pong":
                self._last_pong = time.monotonic()
            elif ev in ("done", "report"):
                fut = self._waiting.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif ev == "record":
                self.on_report(msg)
            elif ev == "fenced":
                self.on_fenced(str(msg.get("detail", "")))
        code = await proc.wait()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result({"ok": False, "error": f"replicator exited ({code})"})
        if not self._closing and proc is self.proc:
            role, self.role = self.role, "idle"
            self.on_failed(f"replicator process exited with status {code} (role was {role})")

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        while proc.returncode is None:
            await asyncio.sleep(PING_INTERVAL)
            if proc.returncode is not None:
                return
            if time.monotonic() - self._last_pong > self.hang_timeout:
                log.error(
                    "module %s: replicator hung (no answer for %gs): killing it",
                    self.module,
                    self.hang_timeout,
                )
                self.kill()
                return
            with contextlib.suppress(ConnectionError, BrokenPipeError, RuntimeError):
                assert proc.stdin is not None
                proc.stdin.write(b'{"cmd":"ping"}\n')
                await proc.stdin.drain()

    def kill(self) -> None:
        """SIGKILL the replicator's process group (it runs in its own session)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Agent shutdown: release everything (closing stdin makes the process unmount, exit)."""
        self._closing = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                self.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
