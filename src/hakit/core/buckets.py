"""Buckets of a farm module: which member owns which share of the clients. Pure.

A farm module splits its clients into :data:`BUCKETS` buckets (the kernel computes a client's
bucket with ``jhash … mod 256 seed S``, the same seed on every node). The buckets are owned by
the module's *members* (the nodes that are UP and healthy) by **weighted rendezvous hashing**
(highest random weight): for bucket ``b`` and member ``n`` of weight ``w``, a uniform value
``u`` in (0, 1) is derived from ``blake2b("{seed}:{b}:{n}")`` and the member with the highest
score ``w / -ln(u)`` owns the bucket (ties: the smaller node name). So:

- every node computes the same owners from the same membership, whatever process or machine
  (no use of Python's randomised ``hash()``);
- a change of membership moves only the buckets it must: a newcomer takes about ``1/N`` of
  the buckets, from every member alike; a leaver's buckets are spread over the others; no
  bucket moves between two nodes that both stay;
- a member's share is proportional to its weight (on average over buckets).

Caveat: the score uses the platform's ``math.log``. Two nodes could disagree on an owner only
if two scores of one bucket were within one unit in the last place, which no realistic
configuration meets (the ``u`` values are 52-bit).

:func:`encode_set` / :func:`decode_set` carry a set of buckets in heartbeats as 64 hex
characters (a 256-bit bitmap); decoding checks its input, which comes from the network.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

from hakit.model import NodeId

BUCKETS = 256  # buckets of a farm module; the kernel rule uses ``mod 256``

_HEX = re.compile(r"[0-9a-f]{64}")
_U_BITS = 52  # u = (x + 0.5) / 2**52: exact in a double, strictly inside (0, 1)


@lru_cache(maxsize=1024)
def _keys(seed: int, node: str, buckets: int) -> tuple[float, ...]:
    """``-ln(u)`` of every bucket for one node (cached: memberships change rarely)."""
    out = []
    for b in range(buckets):
        digest = hashlib.blake2b(f"{seed}:{b}:{node}".encode(), digest_size=8).digest()
        x = int.from_bytes(digest, "big") >> (64 - _U_BITS)
        out.append(-math.log((x + 0.5) / (1 << _U_BITS)))
    return tuple(out)


def owners(
    members: Mapping[NodeId, int], seed: int, buckets: int = BUCKETS
) -> tuple[NodeId | None, ...]:
    """The owner of each bucket (index = bucket) among ``members`` (node -> weight).

    Members of weight ≤ 0 own nothing. No member: every owner is None.
    """
    ranked = sorted((n, w) for n, w in members.items() if w > 0)  # smaller name first
    if not ranked:
        return (None,) * buckets
    keys = [(n, w, _keys(seed, n, buckets)) for n, w in ranked]
    result: list[NodeId | None] = []
    for b in range(buckets):
        best: NodeId | None = None
        best_score = -1.0
        for n, w, k in keys:
            score = w / k[b]
            if score > best_score:  # strict: on a tie the smaller name (seen first) stays
                best, best_score = n, score
        result.append(best)
    return tuple(result)


def owned_by(owner_of: Iterable[NodeId | None], node: NodeId) -> frozenset[int]:
    """The buckets ``node`` owns in an :func:`owners` result."""
    return frozenset(b for b, n in enumerate(owner_of) if n == node)


def shares(owner_of: Iterable[NodeId | None]) -> dict[NodeId, int]:
    """How many buckets each owner has (nodes owning nothing are absent), sorted by node."""
    counts: dict[NodeId, int] = {}
    for n in owner_of:
        if n is not None:
            counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))


def encode_set(buckets: frozenset[int]) -> str:
    """A set of buckets as 64 lowercase hex characters: a 256-bit number, bit b = bucket b."""
    value = 0
    for b in buckets:
        if not 0 <= b < BUCKETS:
            raise ValueError(f"bucket {b} out of range 0..{BUCKETS - 1}")
        value |= 1 << b
    return f"{value:064x}"


def decode_set(text: str) -> frozenset[int]:
    """Inverse of :func:`encode_set`. Raises ValueError unless ``text`` is exactly 64
    lowercase hex characters (network input: no sign, prefix, space or underscore)."""
    if not isinstance(text, str) or _HEX.fullmatch(text) is None:
        raise ValueError("bucket set: expected 64 lowercase hex characters")
    value = int(text, 16)
    return frozenset(b for b in range(BUCKETS) if value >> b & 1)
