"""Checkers: asyncio tasks that watch the application while this node is primary.

A checker runs every ``period`` after an initial ``grace``; when it decides the application is
unhealthy it calls ``report(CheckerFailed)`` once and ends (the module machine then restarts,
fails over or stops, and starts the checkers again if the application runs again). Farm
modules pass ``recovered``: a failed checker then keeps probing and calls ``recovered(name)``
once the check has passed as many times in a row as it had to fail (the node rejoins the
membership), then watches again.

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
Recovered = Callable[[str], None]


def checker_name(index: int, cfg: ProcessChecker | TcpChecker) -> str:
    if isinstance(cfg, ProcessChecker):
        return f"process:{cfg.name or cfg.pidfile}"
    return f"tcp:{cfg.host}:{cfg.port}#{index}" if index else f"tcp:{cfg.host}:{cfg.port}"


async def run_checker(
    name: str,
    cfg: ProcessChecker | TcpChecker,
    report: Report,
    recovered: Recovered | None = None,
) -> None:
    """Run one checker until it fails (then report and return, unless ``recovered`` is given)
    or is cancelled."""
    await asyncio.sleep(cfg.grace)
    failures = passes = 0
    failing = False
    while True:
        if isinstance(cfg, ProcessChecker):
            problem = process_problem(cfg)
            needed = 1
        else:
            problem = await tcp_problem(cfg)
            needed = cfg.failures
        if problem is None:
            failures = 0
            passes += 1
            if failing and recovered is not None and passes >= needed:
                failing = False
                log.info("checker %s: healthy again", name)
                recovered(name)
        elif not failing:
            failures += 1
            passes = 0
            log.info("checker %s: %s (%d/%d)", name, problem, failures, needed)
            if failures >= needed:
                report(CheckerFailed(name, CheckerAction(cfg.action), problem))
                if recovered is None:
                    return
                failing = True
        else:
            passes = 0
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
