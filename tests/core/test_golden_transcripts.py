"""Scripted scenarios replayed against golden transcripts (tests/core/testdata/*.txt).

Each transcript lists every transition with its simulated time and reason. A change of
behaviour shows as a readable diff; when the change is intended, regenerate with
``HAKIT_UPDATE_GOLDEN=1 pytest tests/core/test_golden_transcripts.py`` and review the diff.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hakit.core.events import CheckerAction, Verb

from . import test_arbitration
from .sim import SimCluster
from .test_mirror_replicated import (
    REPLICATED,
    fresh_cluster_both_unknown_start_together,
    primary_dies_then_secondary_dies_then_old_primary_returns,
    secondary_powered_off_during_resync_cannot_become_primary,
)

TESTDATA = Path(__file__).parent / "testdata"


def both_start_then_primary_powers_off_and_returns(c: SimCluster) -> None:
    c.start_both()
    c.run(3)
    c.poweroff("n1")
    c.run(5)
    c.poweron("n1")
    c.run(3)


def swap_from_the_secondary(c: SimCluster) -> None:
    c.start_both()
    c.run(3)
    c.command("n2", Verb.SWAP)
    c.run(3)


def partition_then_heal(c: SimCluster) -> None:
    c.start_both()
    c.run(3)
    c.cut("n2")
    c.run(5)
    c.heal()
    c.run(3)


def checker_restarts_then_fails_over(c: SimCluster) -> None:
    c.start_both()
    c.run(3)
    for _ in range(3):
        c.checker_fails("n1", CheckerAction.RESTART)
        c.run(2)


SCENARIOS: dict[str, Callable[[SimCluster], None]] = {
    f.__name__: f
    for f in (
        both_start_then_primary_powers_off_and_returns,
        swap_from_the_secondary,
        partition_then_heal,
        checker_restarts_then_fails_over,
    )
}
# replicated modules (see test_mirror_replicated.py)
REPLICATED_SCENARIOS: dict[str, Callable[[SimCluster], None]] = {
    f.__name__: f
    for f in (
        primary_dies_then_secondary_dies_then_old_primary_returns,
        secondary_powered_off_during_resync_cannot_become_primary,
        fresh_cluster_both_unknown_start_together,
    )
}

# replicated modules with a witness (see test_arbitration.py)
WITNESS_SCENARIOS: dict[str, Callable[[SimCluster], None]] = {
    f.__name__: f for f in test_arbitration.SCENARIOS
}


@pytest.mark.parametrize(
    "name", sorted(SCENARIOS) + sorted(REPLICATED_SCENARIOS) + sorted(WITNESS_SCENARIOS)
)
def test_scenario_matches_golden_transcript(name: str) -> None:
    if name in WITNESS_SCENARIOS:
        c = test_arbitration.witnessed()
        WITNESS_SCENARIOS[name](c)
    elif name in REPLICATED_SCENARIOS:
        c = SimCluster(REPLICATED)
        REPLICATED_SCENARIOS[name](c)
    else:
        c = SimCluster()
        SCENARIOS[name](c)
    got = "\n".join(c.transcript) + "\n"
    path = TESTDATA / f"{name}.txt"
    if os.environ.get("HAKIT_UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.exists(), f"no golden transcript: run with HAKIT_UPDATE_GOLDEN=1 to create {path}"
    assert got == path.read_text()
