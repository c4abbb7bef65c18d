"""Checkers: asyncio tasks that watch the application while this node is primary.

A checker runs every ``period`` after an initial ``grace``; when it decides the application is
unhealthy it calls ``report(CheckerFailed)`` once and ends (the module machine then restarts,
fails over or stops, and starts the checkers again if the application runs again).

- process: the process named by a pid file, or by name, must exist (and not be a zombie).
  Lookups by name only consider processes in this agent's network namespace, so that in the
  one-machine lab a node does not see another node's process.
- tcp: a TCP connection to host:port must open within ``timeout``; ``failures`` consecutive
  failed probes make the checker fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from hakit.config import ProcessChecker, TcpChecker
from hakit.core.events import CheckerAction, CheckerFailed

log = logging.getLogger(__name__)

Report = Callable[[CheckerFailed], None]


def checker_name(index: int, cfg: ProcessChecker | TcpChecker) -> str:
    if isinstance(cfg, ProcessChecker):
        return f"process:{cfg.name or cfg.pidfile}"
    return f"tcp:{cfg.host}:{cfg.port}#{index}" if index else f"tcp:{cfg.host}:{cfg.port}"


async def run_checker(name: str, cfg: ProcessChecker | TcpChecker, report: Report) -> None:
    """Run one checker until it fails (then report and return) or is cancelled."""
    await asyncio.sleep(cfg.grace)
    failures = 0
    while True:
        if isinstance(cfg, ProcessChecker):
            problem = process_problem(cfg)
            needed = 1
        else:
            problem = await tcp_problem(cfg)
            needed = cfg.failures
        if problem is None:
            failures = 0
        else:
            failures += 1
            log.info("checker %s: %s (%d/%d)", name, problem, failures, needed)
            if failures >= needed:
                report(CheckerFailed(name, CheckerAction(cfg.action), problem))
                return
        await asyncio.sleep(cfg.period)


def process_problem(cfg: ProcessChecker) -> str | None:
    """None if the process is alive, else what is wrong."""
    if cfg.pidfile is not None:
        try:
            pid = int(Path(cfg.pidfile).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return f"pid file {cfg.pidfile} missing or unreadable"
        if not _alive(pid):
            return f"process {pid} (from {cfg.pidfile}) is gone"
        return None
    assert cfg.name is not None
    if not any(True for _ in _pids_named(cfg.name)):
        return f"no process named {cfg.name!r}"
    return None


async def tcp_problem(cfg: TcpChecker) -> str | None:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(cfg.host, cfg.port), cfg.timeout)
    except (OSError, TimeoutError) as exc:
        return f"{cfg.host}:{cfg.port} does not answer ({exc.__class__.__name__})"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pids_named(name: str) -> list[int]:
    own_netns = Path("/proc/self/ns/net").stat().st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != name[:15]:
                continue
            if (entry / "ns" / "net").stat().st_ino != own_netns:
                continue
        except OSError:
            continue
        if _alive(int(entry.name)):
            found.append(int(entry.name))
    return found
