"""Who has the latest data of a replicated mirror module, and who may become primary. Pure.

Implements the rules of ``docs/replication.md`` ("Who has the latest data"). Each node's
replication process owns a durable :class:`DataRecord`; the mirror machine
(:mod:`hakit.core.mirror`) receives it (at agent start, then in every ``ReplicaReport``) and asks
the functions below whether its copy may serve. Each refusal is a sentence for the operator (it
becomes the module's reason in ``hakit state``); the machine appends what the node does next
(":func:`waiting_hint`") or, for a refused command, how to override it (:func:`force_hint`).

Comparing two records (:func:`compare`, from the first node's point of view):

1. an ``up to date`` record beats any other (an outdated, resyncing or unknown copy never wins
   against an up-to-date one);
2. then a node that ran alone beats one that did not (its peer is outdated);
3. then the higher generation wins, unless both ran alone: that is a split brain (both served
   during a cut), the records say nothing more and the caller decides on the primary terms
   (the former primary keeps its data);
4. otherwise the records are equal (e.g. both ``unknown``: the first start of a fresh cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DataState(StrEnum):
    """What a node knows of its own copy of the replicated directories."""

    UPTODATE = "up to date"  # a primary's copy, or a secondary's after a finished resync
    OUTDATED = "outdated"  # consistent but older than the peer's (e.g. lost a split brain)
    RESYNCING = "resyncing"  # a resync from the primary started and has not finished
    UNKNOWN = "unknown"  # never synchronised


@dataclass(frozen=True)
class DataRecord:
    """The durable data record of one node (``<state_dir>/<module>.data.json``).

    Written (fsynced) by the replication process; the machine only reads it. ``generation`` is
    bumped by a primary each time it starts running without a connected, in-sync secondary;
    ``ran_alone``: this node changed the data while its peer was not in sync.
    """

    data: DataState = DataState.UNKNOWN
    generation: int = 0
    ran_alone: bool = False


def describe(record: DataRecord) -> str:
    """``up to date, generation 7, ran alone`` (for reasons and logs)."""
    text = f"{record.data}, generation {record.generation}"
    return text + (", ran alone" if record.ran_alone else "")


def compare(mine: DataRecord, theirs: DataRecord) -> int:
    """1 if ``mine`` is newer, -1 if ``theirs`` is, 0 if the records cannot tell (module doc).

    Antisymmetric: ``compare(a, b) == -compare(b, a)``, so both nodes reach the same verdict.
    """
    mine_ok, theirs_ok = mine.data == DataState.UPTODATE, theirs.data == DataState.UPTODATE
    if mine_ok != theirs_ok:
        return 1 if mine_ok else -1
    if mine.ran_alone != theirs.ran_alone:
        return 1 if mine.ran_alone else -1
    if mine.ran_alone or mine.generation == theirs.generation:
        return 0  # both ran alone (split brain), or equal generations
    return 1 if mine.generation > theirs.generation else -1


def split_brain(mine: DataRecord, theirs: DataRecord) -> bool:
    """Both copies changed without the other: only the primary terms can tell them apart."""
    return compare(mine, theirs) == 0 and mine.ran_alone and theirs.ran_alone


def lead_refusal(
    mine: DataRecord, theirs: DataRecord, order: int, peer: str, *, peer_kept: bool = False
) -> str | None:
    """Why this node may not become primary while ``peer`` is present (not primary), or None.

    ``order`` is the caller's final verdict on the two copies (:func:`compare`, with the split
    brain tie already broken; ``peer_kept`` says the tie was broken for the peer). The node may
    lead only if its copy is not older than the peer's, and is provably up to date: ``up to date``
    itself, or both copies unknown (a fresh cluster, where any node may start).
    """
    if order < 0:
        if peer_kept:
            return (
                f"both nodes ran alone (split brain); {peer}'s primary term is older, so its "
                f"data is kept and this node's changes since generation {mine.generation} are "
                f"to be discarded"
            )
        return f"data is older than {peer}'s ({peer}: {describe(theirs)}; this node: " + (
            f"{describe(mine)})"
        )
    return neither_provable(mine, theirs, peer)


def neither_provable(mine: DataRecord, theirs: DataRecord, peer: str) -> str | None:
    """Why neither copy may serve with both nodes present, or None (symmetric).

    A copy that is not older than its peer's may serve if one of them is ``up to date`` (it is
    then that one), or if both are ``unknown`` (a fresh cluster, where any node may start).
    """
    if DataState.UPTODATE in (mine.data, theirs.data):
        return None
    if mine.data == theirs.data == DataState.UNKNOWN:
        return None
    return (
        f"neither copy is provably up to date ({peer}: {describe(theirs)}; "
        f"this node: {describe(mine)})"
    )


def alone_refusal(
    mine: DataRecord, peer_generation_seen: int, peer: str, *, in_sync_secondary: bool = False
) -> str | None:
    """Why this node may not become primary without its peer, or None.

    Allowed only if the copy is up to date, its generation is at least the highest one the peer
    announced, and either this node ran alone last (it has the newest data) or it was an in-sync
    secondary when the peer was lost (``in_sync_secondary``).
    """
    if mine.data == DataState.UNKNOWN:
        return f"data has never been synchronised with {peer}"
    if mine.data == DataState.RESYNCING:
        return f"data is incomplete: a resynchronisation from {peer} did not finish"
    if mine.data != DataState.UPTODATE:
        return f"data is {mine.data} ({describe(mine)})"
    if mine.generation < peer_generation_seen:
        return (
            f"data is outdated: {peer} announced generation {peer_generation_seen}, "
            f"this node has generation {mine.generation}"
        )
    if not (mine.ran_alone or in_sync_secondary):
        return (
            f"data may be outdated: {peer} may have run without this node since generation "
            f"{mine.generation}"
        )
    return None


def waiting_hint(peer: str, module: str) -> str:
    """What the node does about a refusal: it waits, and how the operator can override."""
    return f"; waiting for {peer} (or {_force_command(module)})"


def force_hint(peer: str) -> str:
    """Appended to a refused ``prim`` command."""
    return (
        f"; add --force to accept losing the changes {peer} may have that this node lacks "
        f"({peer} is then fully resynchronised from this node)"
    )


def _force_command(module: str) -> str:
    return f"`hakit prim --force -m {module}`" if module else "`hakit prim --force`"
