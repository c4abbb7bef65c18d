"""Shared vocabulary of hakit: node and module names, module states and their colours.

Everything here is plain data (enums, frozen dataclasses); no I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NewType

NodeId = NewType("NodeId", str)
ModuleName = NewType("ModuleName", str)


class State(StrEnum):
    """States of a module on one node, as the operator sees them.

    Stable states are STOP, WAIT, ALONE, PRIM, SECOND (mirror) and UP (farm). The others are
    transitional: a script is running on the way from one stable state to the next.
    """

    STOP = "STOP"
    WAIT = "WAIT"
    ALONE = "ALONE"
    PRIM = "PRIM"
    SECOND = "SECOND"
    UP = "UP"
    # transitional (a script runs)
    STARTING = "STARTING"  # prestart
    STARTING_PRIM = "STARTING_PRIM"  # VIP added, start_prim
    STOPPING_PRIM = "STOPPING_PRIM"  # stop_prim, then VIP removed
    STARTING_SECOND = "STARTING_SECOND"  # start_second
    STOPPING_SECOND = "STOPPING_SECOND"  # stop_second
    STOPPING = "STOPPING"  # poststop

    @property
    def colour(self) -> str:
        """Colour for terminals and the console: grey, red, orange, green, or yellow (moving)."""
        return _COLOURS.get(self, "yellow")

    @property
    def serves(self) -> bool:
        """True where this node runs the application as primary and holds the VIP."""
        return self in (State.PRIM, State.ALONE, State.UP)

    @property
    def holds_primary_role(self) -> bool:
        """True from the moment a node starts becoming primary until its stop_prim has finished.

        A peer in one of these states may be running the application or holding the VIP; the
        other node must not start as primary while it sees its peer in one of them.
        """
        return self in (State.STARTING_PRIM, State.PRIM, State.ALONE, State.STOPPING_PRIM)

    @property
    def exit_code(self) -> int:
        """Exit code of `hakit state -m M` so that scripts can test the state."""
        return _EXIT_CODES.get(self, 1)


_COLOURS = {
    State.STOP: "grey50",
    State.WAIT: "red",
    State.ALONE: "dark_orange",
    State.PRIM: "green",
    State.SECOND: "green",
    State.UP: "green",
}

_EXIT_CODES = {
    State.STOP: 0,
    State.WAIT: 1,
    State.ALONE: 2,
    State.UP: 2,
    State.PRIM: 3,
    State.SECOND: 4,
}
