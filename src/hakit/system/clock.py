"""The clock of every deadline that crosses a process or a decision: ``CLOCK_BOOTTIME``.

Like ``CLOCK_MONOTONIC`` it never jumps with the wall clock (NTP, ``date``), and unlike it,
it also counts the time the machine was suspended: a node resumed after a suspend sees its
lease and its peer's silence as old as they really are. The agent's machines, the arbiters'
clients (``sent_at``) and the replicator's watchdog all read this one clock, so their
deadlines compare (one host, one clock).
"""

from __future__ import annotations

import time


def now() -> float:
    """Seconds on ``CLOCK_BOOTTIME``."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
