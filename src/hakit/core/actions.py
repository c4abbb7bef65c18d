"""Outputs of the pure core: what the driver must do, in order.

Contract for the driver, for every list of actions returned by a machine's ``step``:
- execute the actions in list order;
- every action but :class:`RunScript` completes before the driver does anything else (in
  particular before it builds the next heartbeat, which carries the new state): ``Persist`` is
  durable on disk before the next action runs ("persist, then act"), VIPs are added or removed;
- at most one :class:`RunScript` is in a list and it comes last; its end is reported back as
  :class:`hakit.core.events.ScriptDone` with the same script name. If an action before it
  fails (a VIP cannot be added), the driver skips the script and reports
  ``ScriptDone(script, ok=False, detail=<what failed>)``. A script that does not exist in the
  module folder is reported done and ok.
"""

from __future__ import annotations

from dataclasses import dataclass

from hakit.model import State


@dataclass(frozen=True)
class Transitioned:
    """The module changed state; the driver logs ``from -> to (reason)`` at INFO."""

    old: State
    new: State
    reason: str


@dataclass(frozen=True)
class Persist:
    """Write the module's durable record (atomically, fsynced) before the next action."""

    wanted: bool  # the module should run (restart it when the agent starts)
    state: State
    epoch: int
    primary_epoch: int


@dataclass(frozen=True)
class RunScript:
    """Run a module script (prestart, start_prim, …) with the transition in its environment."""

    script: str
    transition: str  # e.g. "SECOND->PRIM", given to the script as an argument


@dataclass(frozen=True)
class AddVips:
    """Add every VIP of the module on its interface, then announce it (gratuitous ARP)."""


@dataclass(frozen=True)
class DelVips:
    """Remove every VIP of the module from its interface (no error if already absent)."""


@dataclass(frozen=True)
class AnnounceVips:
    """Announce the VIPs again (gratuitous ARP): the peer held them too and has let go, so
    hosts that learned the peer's MAC while both were primary must learn ours again."""


@dataclass(frozen=True)
class StartCheckers:
    """Start the module's checkers (the application now runs as primary)."""


@dataclass(frozen=True)
class StopCheckers:
    """Stop the module's checkers (before the application is stopped)."""


Action = (
    Transitioned
    | Persist
    | RunScript
    | AddVips
    | DelVips
    | AnnounceVips
    | StartCheckers
    | StopCheckers
)
