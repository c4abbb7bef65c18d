"""The agent's HTTP API.

Two listeners, one application each:

- **control**, on the Unix socket ``<run_dir>/agent.sock`` (mode 0600, owned by root): the
  CLI's channel. ``GET /state``, ``POST /modules/<m>/<verb>`` (JSON ``{"force": bool}``),
  ``GET /modules/<m>/log?lines=N``. Only root can connect; nothing on the network can change a
  module's state (the peer's influence arrives only through authenticated heartbeats).
- **health**, on TCP ``api.port`` of every address: ``GET /modules/<m>/ready`` answers
  ``200 OK`` where this node should receive traffic (PRIM or ALONE), ``404 NOT FOUND``
  otherwise — for load balancers. Read-only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hakit.core.events import Command, Verb
from hakit.core.mirror import CommandRefused

if TYPE_CHECKING:
    from hakit.agent.driver import Agent

log = logging.getLogger(__name__)


class ApiServer:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.socket_path = Path(agent.config.cluster.run_dir) / "agent.sock"
        self.runners: list[web.AppRunner] = []

    async def start(self) -> None:
        """Bind both listeners; return once they accept connections."""
        control = web.Application()
        control.add_routes(
            [
                web.get("/state", self._state),
                web.post("/modules/{module}/{verb}", self._command),
                web.get("/modules/{module}/log", self._log),
                web.get("/modules/{module}/compare", self._compare),
                web.post("/modules/{module}/replication/fullsync", self._fullsync),
            ]
        )
        health = web.Application()
        health.add_routes([web.get("/modules/{module}/ready", self._ready)])
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old_umask = os.umask(0o177)  # the socket is created 0600
        try:
            await self._serve(control, web.UnixSite, path=str(self.socket_path))
        finally:
            os.umask(old_umask)
        port = self.agent.config.cluster.api.port
        await self._serve(health, web.TCPSite, host="0.0.0.0", port=port, reuse_address=True)
        log.info("API on %s (control) and TCP port %d (health)", self.socket_path, port)

    async def _serve(self, app: web.Application, site_type: Any, **kwargs: Any) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await site_type(runner, **kwargs).start()
        self.runners.append(runner)

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    # ------------------------------------------------------------------ handlers
    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.state_view())

    async def _command(self, request: web.Request) -> web.Response:
        runner = self.agent.modules.get(request.match_info["module"])
        if runner is None:
            return _error(404, f"no module {request.match_info['module']!r} on this node")
        try:
            verb = Verb(request.match_info["verb"])
        except ValueError:
            return _error(404, f"unknown command {request.match_info['verb']!r}")
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return _error(400, "body must be JSON")
        try:
            status = runner.command(Command(verb, bool(body.get("force", False))))
        except CommandRefused as exc:
            return _error(409, str(exc))
        return web.json_response(
            {"module": runner.name, "state": status.state.value, "reason": status.reason}
        )

    async def _log(self, request: web.Request) -> web.Response:
        runner = self.agent.modules.get(request.match_info["module"])
        if runner is None:
            return _error(404, f"no module {request.match_info['module']!r} on this node")
        try:
            lines = int(request.query.get("lines", "50"))
        except ValueError:
            return _error(400, "lines must be an integer")
        return web.Response(text=runner.log_tail(max(1, min(lines, 10_000))))

    async def _compare(self, request: web.Request) -> web.Response:
        """``?checksums=1``: verify (scrub); else diff. Runs in the primary's replicator."""
        runner = self.agent.modules.get(request.match_info["module"])
        if runner is None:
            return _error(404, f"no module {request.match_info['module']!r} on this node")
        if runner.replica is None:
            return _error(409, f"module {runner.name} replicates no directory")
        answer = await runner.replica.compare(request.query.get("checksums") == "1")
        if not answer.get("ok"):
            return _error(409, f"cannot compare: {answer.get('error')} (run it on the primary)")
        return web.json_response(answer["report"])

    async def _fullsync(self, request: web.Request) -> web.Response:
        runner = self.agent.modules.get(request.match_info["module"])
        if runner is None:
            return _error(404, f"no module {request.match_info['module']!r} on this node")
        if runner.replica is None:
            return _error(409, f"module {runner.name} replicates no directory")
        answer = await runner.replica.fullsync()
        if not answer.get("ok"):
            return _error(409, f"cannot resync: {answer.get('error')} (run it on the primary)")
        runner.note(f"full resync asked by the operator: {answer['report']['detail']}")
        return web.json_response(answer["report"])

    async def _ready(self, request: web.Request) -> web.Response:
        runner = self.agent.modules.get(request.match_info["module"])
        if runner is not None and runner.is_serving():
            return web.Response(text="OK\n")
        return web.Response(status=404, text="NOT FOUND\n")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
