"""Liveness of the other nodes, from heartbeat arrivals and ticks. Pure.

A peer is *alive* from the first accepted heartbeat until ``timeout`` seconds pass without
one on **every** heartbeat network; then it is *lost*. A heartbeat from a new incarnation of
the peer (its agent restarted) is reported so the driver can tell the machines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hakit.model import NodeId


@dataclass
class PeerLiveness:
    """What is known of one peer."""

    node: NodeId
    alive: bool = False
    incarnation: int = -1
    last_heard: dict[str, float] = field(default_factory=dict)  # network -> time

    def silent_for(self, now: float) -> float:
        return now - max(self.last_heard.values(), default=float("-inf"))

    def networks_up(self, now: float, timeout: float) -> list[str]:
        return sorted(n for n, t in self.last_heard.items() if now - t <= timeout)


@dataclass(frozen=True)
class LivenessChange:
    """A peer became alive (``alive`` true, maybe a new incarnation) or was lost."""

    node: NodeId
    alive: bool
    silent_for: float = 0.0
    restarted: bool = False


class PeerTracker:
    """Tracks every peer of this node. ``timeout`` in seconds (> 2 × heartbeat interval)."""

    def __init__(self, peers: Iterable[NodeId], timeout: float) -> None:
        self.timeout = timeout
        self.peers: dict[NodeId, PeerLiveness] = {p: PeerLiveness(p) for p in peers}

    def heard(
        self, now: float, node: NodeId, network: str, incarnation: int
    ) -> LivenessChange | None:
        """Record a heartbeat (already authenticated and replay-checked)."""
        peer = self.peers.get(node)
        if peer is None:
            return None
        peer.last_heard[network] = now
        restarted = peer.incarnation not in (-1, incarnation)
        peer.incarnation = incarnation
        if not peer.alive or restarted:
            peer.alive = True
            return LivenessChange(node, True, restarted=restarted)
        return None

    def tick(self, now: float) -> list[LivenessChange]:
        """Declare lost every alive peer silent on all networks for longer than the timeout."""
        changes = []
        for peer in self.peers.values():
            if peer.alive and peer.silent_for(now) > self.timeout:
                peer.alive = False
                changes.append(LivenessChange(peer.node, False, silent_for=peer.silent_for(now)))
        return changes
