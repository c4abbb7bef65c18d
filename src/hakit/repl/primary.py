"""The primary's replication engine: send every change synchronously, or track it.

One :class:`PrimaryReplicator` per module on the primary, shared by the FUSE file systems of
all its directories. Modes:

- ``ALONE``: no secondary in sync. Changes are recorded in the dirty journal (durably at the
  first change of a path) and return at once.
- ``RESYNC``: connected; the resync (:mod:`hakit.repl.resync`) brings the secondary up to date.
  A change to a path the journal still holds is only recorded (the resync sends it later); any
  other change is sent and waited for, as in SYNC.
- ``SYNC``: every change is sent, and returns once the secondary has answered.

Contract for the file systems (see :meth:`change` and :meth:`finish`): hold :attr:`order`
while making the local change and calling :meth:`change`, so that the order of requests on
the wire is the order of the changes on the primary's disk; then, *outside* the lock, call
:meth:`finish`, which waits for the secondary. When :meth:`finish` returns, the change is on
the secondary, or it is recorded in the journal and the node's data record says it ran alone
(rule 3 of docs/replication.md) — both durably — and the agent has permitted this generation
(:meth:`permit`).

**Held changes.** A change the secondary did not get (ALONE, or tracked during a resync) is
acknowledged only once the agent said that its peer or a majority of its arbiters know the
generation this node runs alone with (``PermitAlone``, docs/split-brain.md): until then the
caller waits, at most ``hold_timeout`` seconds, then gets EIO — an error, never a silent loss.
So a node cut from everything cannot acknowledge a write that its peer, taking over, would not
have.
"""

from __future__ import annotations

import enum
import errno
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hakit.core.freshness import DataRecord, DataState
from hakit.repl import protocol as p
from hakit.repl import record as records
from hakit.repl.link import Link, Pending, ReplicaLost, connect
from hakit.repl.tls import SERVER_NAME
from hakit.repl.tracker import DirtyJournal
from hakit.repl.tree import Exclusions

log = logging.getLogger("hakit.repl.primary")

Key = tuple[int, bytes]


class Mode(enum.StrEnum):
    ALONE = "alone"
    RESYNC = "resync"
    SYNC = "sync"


@dataclass(frozen=True)
class PrimarySettings:
    module: str
    node: str
    peer_host: str
    port: int
    timeout: float  # no reply for this long: the secondary is lost
    context: ssl.SSLContext | None  # None: plaintext (explicitly configured)
    record_file: Path
    streams: int = 2
    block_size: int = 128 * 1024
    bandwidth: float | None = None  # resync cap, bytes/s
    checkpoint_interval: float = 2.0  # SYNCFS on the secondary this often (crash window)
    retry_interval: float = 0.25  # reconnection attempts while ALONE (refused at once if down)
    hold_timeout: float = 10.0  # an unreplicated change waits this long for its permit, then EIO
    direct_writes: bool = True  # large aligned writes to this copy with O_DIRECT (fusefs)
    # the fencing token shown to the secondary at HELLO: lease terms by issuer (empty: none)
    terms: dict[str, int] = field(default_factory=dict)


@dataclass
class Ticket:
    """A change sent to the secondary (or only tracked: ``pending`` None), to wait for in
    :meth:`PrimaryReplicator.finish`."""

    pending: Pending | None
    link: Link | None
    keys: tuple[Key, ...]
    what: str


class PrimaryReplicator:
    """See the module docstring. ``emit`` reports records, progress and log lines to the agent."""

    def __init__(  # noqa: PLR0917
        self,
        settings: PrimarySettings,
        roots: list[int],
        exclusions: list[Exclusions],
        journal: DirtyJournal,
        record: DataRecord,
        emit: Callable[[dict[str, Any]], None],
    ) -> None:
        self.s = settings
        self.roots = roots
        self.exclusions = exclusions
        self.journal = journal
        self.record = record
        self.emit = emit
        self.order = threading.Lock()
        self.mode = Mode.ALONE
        self.link: Link | None = None
        self.peer_record: DataRecord | None = None
        self.peer_unclean = False
        self.detail = "starting"
        self._stop = threading.Event()
        # paths sent since the secondary's last durable checkpoint: [(checkpoint seq, keys)]
        self._recent: list[tuple[int, set[Key]]] = [(0, set())]
        self._threads: list[threading.Thread] = []
        self.resync_progress: dict[str, Any] = {}
        self._checksum_request = False  # set by full_resync, taken by the next resync
        self.permitted = 0  # unreplicated changes may be acknowledged up to this generation
        self._permit = threading.Condition()
        self._holding_since: float | None = None  # for the log: when changes started waiting

    # ------------------------------------------------------------------ lifecycle
    def start(self, force_full: bool, peer_generation: int) -> None:
        """Become primary: bump the generation and start tracking, durably, then connect.

        Call before the file systems are mounted (nothing has changed yet).
        """
        self.journal.load()
        rec = self.record
        if force_full or rec.data != DataState.UPTODATE:
            base: int | None = None
        elif rec.ran_alone and self.journal.active:
            base = self.journal.base_generation
        else:
            base = rec.generation  # in sync at our last stop: the secondary had this generation
        if not (rec.ran_alone and self.journal.active and not force_full):
            self.journal.start(base)
        if force_full:
            self.journal.force_full()
        self._set_record(
            DataRecord(
                DataState.UPTODATE, max(rec.generation, peer_generation) + 1, ran_alone=True
            ),
            "primary: running without an in-sync secondary until it connects",
        )
        for target in (self._connect_loop, self._checkpoint_loop, self._flush_loop):
            t = threading.Thread(target=target, name=target.__name__, daemon=True)
            t.start()
            self._threads.append(t)

    def permit(self, generation: int) -> None:
        """The agent's ``PermitAlone``: release the changes held for generations up to it."""
        with self._permit:
            if generation > self.permitted:
                self.permitted = generation
                if self._holding_since is not None:
                    held = time.monotonic() - self._holding_since
                    log.info(
                        "generation %d permitted: held changes go on (%.2f s)", generation, held
                    )
                    self._holding_since = None
                self._permit.notify_all()

    def _await_permit(self) -> None:
        """Return once the current generation is permitted; EIO after ``hold_timeout`` or when
        the primary role ends (the change stays on this disk, tracked, unacknowledged)."""
        if self.permitted >= self.record.generation:
            return
        deadline = time.monotonic() + self.s.hold_timeout
        with self._permit:
            while self.permitted < self.record.generation:
                left = deadline - time.monotonic()
                if self._stop.is_set() or left <= 0:
                    why = "primary role ended" if self._stop.is_set() else "no permit in time"
                    raise OSError(errno.EIO, f"unreplicated change not acknowledged: {why}")
                if self._holding_since is None:
                    self._holding_since = time.monotonic()
                    log.warning(
                        "holding unreplicated changes until generation %d is known to the peer "
                        "or the arbiters",
                        self.record.generation,
                    )
                self._permit.wait(min(left, 0.5))

    def stop(self) -> None:
        """Stop replicating (after the file systems are unmounted): flush ranges, close."""
        self._stop.set()
        with self._permit:
            self._permit.notify_all()
        link = self.link
        if link is not None:
            link.close("primary role ended")
        for t in self._threads:
            t.join(timeout=10)
        if self.journal.active:
            self.journal.flush_ranges()

    def full_resync(self, reason: str) -> str:
        """The operator's ``fullsync``: compare both trees completely (every file by block
        checksums, every object's metadata and xattrs) and send every difference, while the
        application keeps writing. Until it ends the secondary is ``resyncing``: it cannot
        take over if this node dies meanwhile (docs/operator-guide.md says so).

        The link to the secondary is dropped and the journal marked full (durably) under the
        order lock, exactly as if the secondary had been lost: from here on every change is
        tracked, the generation moves on, and the reconnection runs a full resync. Returns what
        happens, for the operator."""
        if self._stop.is_set():
            return "not primary any more: nothing done"
        with self.order:
            link = self.link
            self._degrade_locked(reason)
            self.journal.force_full()
            self._checksum_request = True
        if link is not None:
            link.close(reason)
            return "secondary disconnected: a full compare starts when it reconnects (at once)"
        return "no secondary connected: a full compare runs when it connects"

    def take_checksum_request(self) -> bool:
        """True once after :meth:`full_resync`: the resync then compares every file."""
        asked, self._checksum_request = self._checksum_request, False
        return asked

    # ------------------------------------------------------------------ file-system API
    def excluded(self, root: int, path: bytes) -> bool:
        return path != b"." and self.exclusions[root].excluded(path)

    def change(
        self,
        root: int,
        req: p.Request,
        *,
        rng: tuple[int, int] | None = None,
        tree: bool = False,
        also: bytes | None = None,
    ) -> Ticket | None:
        """Send or record one change (caller holds :attr:`order`; see module docstring).

        ``rng`` is the byte range written; ``tree`` marks a whole subtree (directory created,
        renamed or removed); ``also`` is a second path touched (rename, link).
        """
        keys: tuple[Key, ...] = (
            ((root, req.path),)
            if also is None
            else (
                (root, req.path),
                (root, also),
            )
        )
        if all(self.excluded(root, k[1]) for k in keys):
            return None
        link = self.link
        what = f"{req.op.name} {req.path!r}"
        if (
            self.mode == Mode.ALONE
            or link is None
            or (self.mode == Mode.RESYNC and any(self.journal.contains(*k) for k in keys))
        ):
            self._track(keys, rng, tree)
            return Ticket(None, None, keys, what)
        try:
            pending = link.submit(replace(req, root=root))
        except ReplicaLost as exc:
            self._degrade_locked(str(exc))
            self._track(keys, rng, tree)
            return Ticket(None, None, keys, what)
        self._recent[-1][1].update(keys)
        return Ticket(pending, link, keys, what)

    def finish(self, ticket: Ticket | None) -> None:
        """Wait for the secondary; on failure, record the change and run alone (durably). A
        change the secondary did not get then waits for its permit (module docstring)."""
        if ticket is None:
            return
        if ticket.pending is None:
            self._await_permit()
            return
        try:
            reply = ticket.pending.wait()
        except ReplicaLost as exc:
            self._not_applied(ticket, str(exc))
            return
        if reply.err:
            self._not_applied(ticket, f"secondary could not apply {ticket.what}: {reply.message}")

    def _not_applied(self, ticket: Ticket, why: str) -> None:
        """The secondary did not apply a change (lost link, or an error such as a full disk,
        maybe after writing part of it): run alone, track the change for the resync, then wait
        for its permit. The link to drop is the ticket's if it is still current — or a NEWER
        link already in sync (its resync ended before this answer came): only a new resync
        can carry the change now, or the secondary would keep a torn copy."""
        with self.order:
            drop = self.diverged_locked(ticket, why)
        if drop is not None:
            drop.close(why)  # outside the order lock: closing calls back into us
        self._await_permit()

    def diverged_locked(self, ticket: Ticket, why: str) -> Link | None:
        """The secondary's copy of the ticket's paths may differ from this one (caller holds
        :attr:`order`): track them whole and run alone. Returns the link to close — after
        releasing the lock — if it must be dropped (the ticket's, or a newer one in sync,
        see :meth:`_not_applied`)."""
        current = self.link
        drop = current if current is ticket.link or self.mode == Mode.SYNC else None
        if drop is not None:
            self._degrade_locked(why)
        self._track(ticket.keys, None, False)
        return drop

    # ------------------------------------------------------------------ internals
    def _track(self, keys: tuple[Key, ...], rng: tuple[int, int] | None, tree: bool) -> None:
        for root, path in keys:
            if self.excluded(root, path):
                continue
            if tree:
                self.journal.mark_tree(root, path)
            elif rng is not None:
                self.journal.mark(root, path, rng[0], rng[1])
            else:
                self.journal.mark(root, path)

    def _degrade_locked(self, reason: str) -> None:
        """Lose the secondary (caller holds :attr:`order`): track from now on, durably."""
        if self.mode == Mode.ALONE:
            return
        was_sync = self.mode == Mode.SYNC
        self.mode = Mode.ALONE
        self.link = None
        if was_sync:  # in RESYNC, the journal is active already
            self.journal.start(self.record.generation)
        else:
            self.journal.requeue_taken()  # what the resync took out is not done
        for _, keys in self._recent:
            for root, path in keys:
                self.journal.mark(root, path)
        self._recent = [(0, set())]
        gen = self.record.generation + (1 if was_sync else 0)
        self._set_record(
            DataRecord(DataState.UPTODATE, gen, ran_alone=True), f"secondary lost: {reason}"
        )
        log.warning("secondary lost (%s): running alone, tracking changes", reason)

    def _set_record(self, rec: DataRecord, detail: str) -> None:
        records.save(self.s.record_file, rec)
        self.record = rec
        self.detail = detail
        self.report()

    def report(self) -> None:
        self.emit(
            records.event(
                self.record,
                in_sync=self.mode == Mode.SYNC,
                mode=str(self.mode),
                detail=self.detail,
                progress=self.resync_progress,
            )
        )

    def _on_broken(self, link: Link, reason: str) -> None:
        if self._stop.is_set():
            return  # our own close at the end of the primary role: nothing was lost
        with self.order:
            if self.link is link:
                self._degrade_locked(reason)

    # ------------------------------------------------------------------ threads
    def _connect_loop(self) -> None:
        from hakit.repl.resync import Resync, ResyncError  # noqa: PLC0415  (import cycle)

        failures = refusals = 0
        while not self._stop.is_set():
            if self.mode != Mode.ALONE:
                self._stop.wait(0.2)
                continue
            try:
                link, peer = self._connect()
            except ValueError as exc:  # the secondary refused us (version, term, …)
                refusals += 1
                if refusals == 1:
                    log.error("%s; trying again, less and less often", exc)
                self.detail = str(exc)
                self._stop.wait(min(30.0, self.s.retry_interval * 2 ** min(refusals - 1, 7)))
                continue
            except (OSError, ssl.SSLError, ReplicaLost, p.ProtocolError) as exc:
                self.detail = f"secondary {self.s.peer_host}:{self.s.port} unreachable: {exc}"
                self._stop.wait(self.s.retry_interval)
                continue
            refusals = 0
            full = (
                self.journal.full
                or self.peer_unclean
                or peer.data == DataState.UNKNOWN
                or peer.generation != self.journal.base_generation
            )
            log.info(
                "secondary connected (its data: %s, generation %d): %s resync",
                peer.data,
                peer.generation,
                "full" if full else "incremental",
            )
            try:
                Resync(self, link, full).run()
                failures = 0
                continue
            except (ReplicaLost, OSError, ResyncError, p.ProtocolError) as exc:
                failures += 1
                why = f"resync interrupted: {exc}"
                log.warning("%s (attempt %d)", why, failures)
            except Exception as exc:  # a bug: said loudly, but this loop must never die
                failures += 1
                why = f"resync failed: {exc!r}"
                log.exception("%s (attempt %d); please report it", why, failures)
            # after any failure: run alone again, back off, reconnect
            with self.order:
                if self.link is link:
                    self._degrade_locked(why)
            link.close(why)
            # back off on repeated failures (e.g. the secondary's disk is full)
            self._stop.wait(min(30.0, self.s.retry_interval * 2 ** min(failures - 1, 5)))

    def _connect(self) -> tuple[Link, DataRecord]:
        sock = connect(
            self.s.peer_host,
            self.s.port,
            self.s.context,
            connect_timeout=min(2.0, self.s.timeout),
            server_name=SERVER_NAME,
        )
        holder: list[Link] = []
        link = Link(sock, self.s.timeout, lambda why: self._on_broken(holder[0], why))
        holder.append(link)
        hello = {
            "proto": p.PROTOCOL_VERSION,
            "module": self.s.module,
            "node": self.s.node,
            "generation": self.record.generation,
            "roots": len(self.roots),
            "terms": self.s.terms,
        }
        reply = link.call(p.Request(p.Op.HELLO, data=p.encode_json(hello)))
        if reply.err:
            link.close("refused")
            raise ValueError(f"secondary refused: {reply.message}")
        obj = p.decode_json(reply.data)
        peer = DataRecord(
            DataState(obj["data"]), int(obj["generation"]), bool(obj.get("ran_alone", False))
        )
        self.peer_record = peer
        # the secondary was a primary that crashed: it may hold changes nobody tracked
        self.peer_unclean = bool(obj.get("unclean", False))
        return link, peer

    def _checkpoint_loop(self) -> None:
        """Every few seconds, have the secondary flush (SYNCFS): older changes are durable."""
        while not self._stop.wait(self.s.checkpoint_interval):
            with self.order:
                link = self.link
                if link is None or self.mode != Mode.SYNC:
                    continue
                try:
                    pending = link.submit(p.Request(p.Op.SYNCFS))
                except ReplicaLost:
                    continue
                self._recent.append((pending.seq, set()))
            try:
                pending.wait()
            except ReplicaLost:
                continue
            with self.order:
                self.checkpointed(link, pending.seq)

    def checkpointed(self, link: Link, seq: int) -> None:
        """Everything ``link`` carried before request ``seq`` is durable on the secondary
        (caller holds :attr:`order`). Nothing to forget if the link was replaced meanwhile:
        the list then belongs to the new link (its sequence numbers start again)."""
        if self.link is link:
            self._recent = [(s, k) for s, k in self._recent if s >= seq] or [(seq, set())]

    def _flush_loop(self) -> None:
        while not self._stop.wait(1.0):
            if self.journal.active:
                self.journal.flush_ranges()
            if self.mode == Mode.RESYNC:
                self.report()  # progress

    def mark_in_sync(self, link: Link) -> None:
        """The secondary acknowledged the end of the resync: clear ``ran_alone``, go SYNC."""
        with self.order:
            if self.link is not link or self.mode != Mode.RESYNC:
                return
            self.mode = Mode.SYNC
            self.journal.discard()
            self.resync_progress = {}
            self._set_record(
                replace(self.record, ran_alone=False),
                f"in sync with the secondary at generation {self.record.generation}",
            )
        log.info("secondary in sync (generation %d)", self.record.generation)
