"""Arbitration of the mirror machine: part of :class:`hakit.core.mirror.MirrorMachine`. Pure.

Split out of :mod:`hakit.core.mirror` to keep files readable; these functions act on the
machine exactly as its own methods would. The rules are in :mod:`hakit.core.arbitration` and
``docs/split-brain.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hakit.core.actions import (
    Action,
    DelVips,
    FenceAt,
    PermitAlone,
    ReplicaRole,
    RunScript,
)
from hakit.model import State

if TYPE_CHECKING:
    from hakit.core.mirror import MirrorMachine


def arbitrate(m: MirrorMachine, now: float, actions: list[Action]) -> None:
    """Fence, ask or release the lease, and permit writes made alone; inserted before the
    ``RunScript`` of the list, if any (contract of :mod:`hakit.core.actions`)."""
    extra: list[Action] = []
    arb = m.arb
    primary_role = m.replica_role == ReplicaRole.PRIMARY
    if arb.enabled:
        lapsed = m.claims_primary and must_fence(m, now) is not None
        if lapsed and not m.fenced:  # the lease ran out alone: clients must not reach us
            m.fenced = True
            extra.append(DelVips())
        alone = m.data.generation if primary_role and m.data.ran_alone else 0
        synced = m.data.generation if m.state == State.PRIM and m.in_sync else 0
        ask = arb.ask(now, m.claims_primary or m.lease_wanted, alone, synced)
        if ask is not None:
            extra.append(ask)
    if m.settings.replicated and primary_role:
        generation, peer = m.data.generation, m.peer
        # no arbiter: a lost peer cannot be asked, the node goes on alone
        elsewhere = arb.recorded() >= generation if arb.enabled else peer is None
        known = elsewhere or (peer is not None and m._peer_is_current(peer))
        if known and generation > m.permitted:
            m.permitted = generation
            extra.append(PermitAlone(generation))
    # a replicated module's watchdogs run from its replication process's primary role on;
    # without replication only the kernel's VIP lease, while the node claims the role
    if arb.enabled and (primary_role if m.settings.replicated else m.claims_primary):
        _watchdog(m, extra)
    at = next((i for i, a in enumerate(actions) if isinstance(a, RunScript)), len(actions))
    actions[at:at] = extra


def _watchdog(m: MirrorMachine, extra: list[Action]) -> None:
    """Keep the watchdogs that do not need this agent (FenceAt: the replication process's, and
    the VIPs' lease held by the kernel) just after the moment this node
    would fence itself if nothing more came — the lease's end, or, with a peer that does not
    claim the role, a later silence of the peer — plus ``grace`` (half the smaller of margin
    and silence: still before the peer can start, see docs/split-brain.md), so that a
    running agent always fences first. Later deadlines are sent in steps of a tenth of
    ``silence``; earlier ones at once; none once this node fenced."""
    a = m.settings.arbitration
    if m.fenced:
        return
    deadline = m.arb.valid_until()
    peer = m.peer
    if peer is not None and not peer.claims_primary:
        deadline = max(deadline, m.peer_heard_at + a.silence)
    grace = min(a.margin, a.silence) / 2
    deadline = max(deadline + grace, 1e-9)  # no lease, no peer: at once (0 means "never")
    if deadline < m.fence_sent or deadline > m.fence_sent + a.silence / 10:
        m.fence_sent = deadline
        extra.append(FenceAt(deadline))


def must_fence(m: MirrorMachine, now: float) -> str | None:
    """Why this node, claiming the primary role without a valid lease, must stop serving
    (None: it may go on). Its peer could take over: the peer is lost, claims the role, or
    has been silent for longer than ``silence`` (a cut seen later here than there: the
    peer takes over only after a whole heartbeat timeout of silence)."""
    refusal = m.arb.refusal(now)
    peer = m.peer
    if refusal is None:
        return None
    if peer is None:
        return f"{m.settings.peer} lost and {refusal}"
    if peer.claims_primary:
        return f"{peer.node} is {peer.state} and {refusal}"
    silent = now - m.peer_heard_at
    if silent > m.settings.arbitration.silence:
        return f"{peer.node} silent for {silent:.1f} s and {refusal}"
    return None
