"""The committed state diagram is the one generated from the transition table."""

from pathlib import Path

from hakit.core.diagram import render, render_farm
from hakit.core.mirror_table import SCRIPT_OF, TABLE
from hakit.model import State


def test_committed_diagram_matches_the_table() -> None:
    committed = Path(__file__).parents[2] / "docs" / "state-diagram.md"
    assert committed.read_text() == render(), (
        "regenerate: python -m hakit.core.diagram > docs/state-diagram.md"
    )


def test_every_state_but_up_is_reachable_and_every_target_has_a_row() -> None:
    targets = {edge.to for edges in TABLE.values() for edge in edges.values()}
    assert targets <= set(TABLE)
    assert set(TABLE) - targets <= {State.STOP}
    assert set(SCRIPT_OF) <= set(TABLE)


def test_committed_farm_diagram_matches_the_farm_table() -> None:
    committed = Path(__file__).parents[2] / "docs" / "farm-state-diagram.md"
    assert committed.read_text() == render_farm(), (
        "regenerate: python -m hakit.core.diagram farm > docs/farm-state-diagram.md"
    )
