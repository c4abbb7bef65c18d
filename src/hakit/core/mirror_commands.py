"""Operator commands on a mirror module: part of :class:`hakit.core.mirror.MirrorMachine`. Pure.

Split out of :mod:`hakit.core.mirror` to keep files readable; these functions act on the
machine exactly as its own methods would (same state, same ``_move``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hakit.core import freshness
from hakit.core.actions import Action
from hakit.core.events import Command, Verb
from hakit.core.freshness import DataState
from hakit.core.mirror_table import SCRIPT_OF, Goal, Trigger
from hakit.model import State

if TYPE_CHECKING:
    from hakit.core.mirror import MirrorMachine


class CommandRefused(Exception):
    """An operator command that cannot apply in the current state; the text says why."""


def apply(m: MirrorMachine, now: float, cmd: Command, actions: list[Action]) -> None:
    """Apply an operator command (raises :class:`CommandRefused`, changing nothing)."""
    verb, state, peer = cmd.verb, m.state, m.peer
    if verb == Verb.STOP:
        m.wanted = False
        if state == State.STOP:
            raise CommandRefused("the module is already stopped")
        if state in SCRIPT_OF:  # a script runs: stop once it has finished
            m.goal = Goal.STOP
            m.reason = "stop requested: stopping once the running script has finished"
            actions.append(m._persist())
            return
        m._move(now, Trigger.STOP, "stop requested by the operator", actions)
        return
    if state in SCRIPT_OF:
        raise CommandRefused(
            f"busy: {SCRIPT_OF[state]} is running ({state}); try again when it has finished"
        )
    if verb in (Verb.START, Verb.PRIM, Verb.SECOND) and state == State.STOP:
        if verb == Verb.PRIM and peer is not None and peer.claims_primary:
            raise CommandRefused(f"peer {peer.node} is {peer.state}: use `swap` instead")
        if verb == Verb.PRIM:
            _accept_prim(m, cmd)
        m.wanted = True
        trigger = {Verb.START: Trigger.START, Verb.PRIM: Trigger.PRIM}.get(verb, Trigger.SECOND)
        m._move(now, trigger, f"{verb} requested by the operator", actions)
        return
    if verb == Verb.START:
        raise CommandRefused(f"the module is already started ({state})")
    if verb == Verb.PRIM:
        if state in (State.PRIM, State.ALONE):
            raise CommandRefused(f"this node is already primary ({state})")
        if peer is not None and peer.claims_primary:
            raise CommandRefused(f"peer {peer.node} is {peer.state}: use `swap` instead")
        _accept_prim(m, cmd)
        forced = " --force" if m.force else ""
        if state == State.WAIT and m.arb.enabled:
            m.goal = Goal.PRIM  # taken by _settle once the lease is held
            m.reason = f"prim{forced} requested by the operator"
            return
        m._move(now, Trigger.PRIM, f"prim{forced} requested by the operator", actions)
        return
    if verb in (Verb.SWAP, Verb.SECOND):
        _swap(m, now, verb, actions)
        return
    if verb == Verb.RESTART:
        if state not in (State.PRIM, State.ALONE):
            raise CommandRefused(f"restart applies to the primary; this node is {state}")
        m._move(now, Trigger.RESTART, "restart requested by the operator", actions)
        return
    if verb == Verb.STOPSTART:
        if state not in (State.PRIM, State.ALONE, State.SECOND):
            raise CommandRefused(f"stopstart needs a started module; this node is {state}")
        m._move(now, Trigger.STOPSTART, "stopstart requested by the operator", actions)
        return
    raise CommandRefused(f"{verb} does not apply in state {state}")  # pragma: no cover


def _accept_prim(m: MirrorMachine, cmd: Command) -> None:
    """Data rules for `prim` (replicated): refuse, or remember ``--force`` (changes nothing
    before it may raise)."""
    if not m.settings.replicated:
        return
    if not cmd.force:
        refusal = m._data_refusal()
        if refusal is not None:
            hint = freshness.force_hint(m.settings.peer)
            raise CommandRefused(f"prim refused: {refusal}{hint}")
    m.force = cmd.force


def _swap(m: MirrorMachine, now: float, verb: Verb, actions: list[Action]) -> None:
    state, peer = m.state, m.peer
    has_secondary = peer is not None and peer.state in (State.SECOND, State.STARTING_SECOND)
    if state in (State.PRIM, State.ALONE):
        if not has_secondary:
            raise CommandRefused(f"{verb}: no secondary to hand over to (this node is {state})")
        assert peer is not None
        if m.settings.replicated and not (state == State.PRIM and peer.data == DataState.UPTODATE):
            raise CommandRefused(
                f"{verb}: {peer.node} is not in sync yet ({freshness.describe(peer.record)})"
                f" and could not take over; try again once this node is PRIM"
            )
        m._move(now, Trigger.SWAP, f"{verb} requested: handing over", actions)
        return
    if verb == Verb.SECOND and state == State.WAIT:
        m._move(now, Trigger.SECOND, "second requested by the operator", actions)
        return
    if state == State.SECOND and verb == Verb.SWAP:
        if peer is None or not peer.claims_primary or peer.state == State.STOPPING_PRIM:
            raise CommandRefused("swap: the peer is not primary")
        m.swap_request = True
        m.version += 1
        m.reason = f"swap requested: asking {peer.node} to hand over"
        return
    raise CommandRefused(f"{verb} does not apply in state {state}")
