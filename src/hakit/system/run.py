"""The one helper for running external commands (argv lists, timeout, captured output).

Every external command hakit runs goes through :func:`run` (synchronous, for the CLI and the
lab) or :func:`run_async` (for the agent's event loop). Neither ever uses a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hakit.errors import CommandError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    """Outcome of a command. ``returncode`` is None when it was killed for its timeout."""

    argv: tuple[str, ...]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            return f"timed out after {self.seconds:.1f} s"
        if self.returncode < 0:
            return f"killed by signal {-self.returncode}"
        return f"exit {self.returncode}"


def run(
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
) -> Completed:
    """Run ``argv`` and wait at most ``timeout`` seconds; raise CommandError if ``check``."""
    start = time.monotonic()
    log.debug("run %s", argv)
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            input=input_text,
            check=False,
        )
        result = Completed(
            tuple(argv), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start
        )
    except subprocess.TimeoutExpired as exc:
        result = Completed(
            tuple(argv),
            None,
            _text(exc.stdout),
            _text(exc.stderr),
            time.monotonic() - start,
        )
    if check and not result.ok:
        raise CommandError(argv, result.returncode, result.stderr)
    return result


async def run_async(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    output: int | None = None,
) -> Completed:
    """Run ``argv`` in its own process group; on timeout kill the whole group.

    ``output``: a file descriptor receiving stdout and stderr together (a module log), or None
    to capture them into the result. Never raises for a failing command: callers decide.
    """
    start = time.monotonic()
    capture = output is None
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else output,
        stderr=subprocess.PIPE if capture else subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        rc: int | None = proc.returncode
    except TimeoutError:
        _kill_group(proc.pid)
        out, err = await proc.communicate()
        rc = None
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    return Completed(tuple(argv), rc, _text(out), _text(err), time.monotonic() - start)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (a script and everything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data
