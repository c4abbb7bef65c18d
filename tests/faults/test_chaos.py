"""The fault-injection suite in `make test`: a few fixed seeds, 36 faults in all, against a
2-node mirror with a witness while a client writes records through the VIP (hakit.lab.chaos).
Fails on any lost or unexpected record, any dual primary, any difference between the copies,
or a pair that does not come back.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from hakit.lab import chaos
from hakit.lab.cli import run_chaos_lab
from hakit.lab.lab import Lab
from tests.integration.conftest import why_no_lab

ROOT = Path("/var/lib/hakit-lab-faults")
SEEDS = (11, 22, 33)
FAULTS = 12  # per seed: 36 in all, every kind at least once per seed


@pytest.mark.parametrize("seed", SEEDS)
def test_random_faults_lose_no_acknowledged_record(seed: int, tmp_path: Path) -> None:
    reason = why_no_lab()
    if reason is not None:
        pytest.skip(reason)
    out = io.StringIO()
    report = run_chaos_lab(Lab(ROOT), seed, FAULTS, chaos.KINDS, Console(file=out))
    chaos.print_report(report, out)
    (tmp_path / "chaos.json").write_text(json.dumps(report.to_dict(), indent=2))
    summary = out.getvalue()
    assert len(report.faults) == FAULTS, summary
    assert {f.kind for f in report.faults} == set(chaos.KINDS), summary
    assert report.acknowledged > 100, summary  # the workload really ran through the faults
    assert report.ok, summary
