"""The dirty journal: what changed while a primary ran without an in-sync secondary.

Keys are ``(root, path)``: the index of the replicated directory and a protocol relative path
(``b"."`` for the directory itself). A key is either a single object (optionally with the byte
ranges of a file that changed) or, marked with :meth:`DirtyJournal.mark_tree`, a whole subtree.

On disk (the directory given to the constructor, e.g. ``<state_dir>/<module>.dirty/``):

- ``header``: JSON ``{"version", "base", "full"}``, replaced atomically (temp file, fsync,
  rename, directory fsync) by :meth:`~DirtyJournal.start` and :meth:`~DirtyJournal.force_full`;
- ``paths.log``: append-only records ``magic | kind | root | len(path) | path | crc32`` (kind:
  path or tree), fdatasync'd before :meth:`~DirtyJournal.mark` returns;
- ``ranges``: the log size it covers, then every key's byte ranges as of the last
  :meth:`~DirtyJournal.flush_ranges` (binary, crc32 at the end), replaced atomically.

Contracts:

- **Mark first, then change.** The caller marks a key *before* it changes the object locally:
  once :meth:`~DirtyJournal.mark` returns, a crash (of the process or the node) still leaves the
  key in the journal. Marking something whose change then fails is harmless.
- **The first mark of a key in each flush window costs I/O.** It appends a record and
  fdatasyncs (group commit: concurrent marks share one fdatasync). Later marks of the key until
  the next :meth:`flush_ranges` take the lock, look the key up and merge a range: no I/O. The
  record appended again after each flush is what makes flushed ranges safe: on load, a key with
  a record past the log size the ranges file covers has ranges "unknown" — otherwise a write
  made after the last flush, to a key already marked, would be lost by an incremental resync.
- **Conservative until discarded.** :meth:`take` removes a key from the working set (the resync
  is handling it) but the files keep it, with its ranges, until :meth:`discard`: a crash in the
  middle of a resync loses nothing. :meth:`requeue_taken` puts taken keys back (resync aborted).

Caveats — what survives a crash:

- every key whose :meth:`mark` returned (the paths log; a torn last record is one whose
  ``mark`` had not returned, and is ignored); a damaged record followed by more data makes the
  journal ``full`` instead;
- byte ranges only for keys not marked since the last :meth:`flush_ranges`; any other key (and
  any key without flushed ranges) comes back with ``ranges=None`` ("unknown"), which the resync
  handles by comparing block checksums;
- ``base_generation`` and ``full`` exactly (header); a missing or unreadable header makes the
  journal ``full`` (a full compare is always correct, only slower).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from hakit.repl.protocol import parent_of

log = logging.getLogger(__name__)

Key = tuple[int, bytes]

HEADER = "header"
PATHS = "paths.log"
RANGES = "ranges"
VERSION = 1

_REC = struct.Struct("!BBHH")  # magic, kind, root, len(path); then path, then crc32
_REC_MAGIC = 0xD1
_KIND_PATH, _KIND_TREE = 1, 2
_CRC = struct.Struct("!I")
_RANGES_MAGIC = b"HKDR\x02\n"
_COVERS = struct.Struct("!q")  # log size the ranges file accounts for
_RENT = struct.Struct("!HBHI")  # root, flags, len(path), number of intervals
_F_TREE, _F_WHOLE = 1, 2
_BOUND = struct.Struct("!qq")


@dataclass(frozen=True, slots=True)
class DirtyEntry:
    """One changed key. ``ranges``: ``(offset, length)`` sorted and disjoint; ``None`` when
    unknown or the whole object changed (compare by checksums); ``[]`` when the object changed
    but no byte of its content is known to have (metadata or size only)."""

    root: int
    path: bytes
    ranges: list[tuple[int, int]] | None
    tree: bool = False


class _Entry:
    """In-memory state of a key: ``bounds`` is a flat sorted list ``[s0, e0, s1, e1, …]`` of
    half-open intervals (``None``: whole/unknown); ``seq`` the log record that makes it durable;
    ``epoch`` the flush window in which that record was appended (-1: none this run)."""

    __slots__ = ("bounds", "epoch", "seq", "tree")

    def __init__(self, bounds: list[int] | None, tree: bool, seq: int = 0, epoch: int = -1) -> None:
        self.bounds = bounds
        self.tree = tree
        self.seq = seq
        self.epoch = epoch

    def copy(self) -> _Entry:
        return _Entry(None if self.bounds is None else list(self.bounds), self.tree)

    def merge(self, other: _Entry, cap: int) -> None:
        self.tree = self.tree or other.tree
        self.seq = max(self.seq, other.seq)
        self.epoch = min(self.epoch, other.epoch)
        if self.bounds is None or other.bounds is None:
            self.bounds = None
            return
        for i in range(0, len(other.bounds), 2):
            self.bounds = add_interval(self.bounds, other.bounds[i], other.bounds[i + 1], cap)
            if self.bounds is None:
                return


def add_interval(bounds: list[int], start: int, end: int, cap: int) -> list[int] | None:
    """Merge the half-open interval ``[start, end)`` into ``bounds`` (flat, sorted, disjoint,
    non-touching), in place; touching intervals are coalesced. Returns ``bounds``, or ``None``
    once it would hold more than ``cap`` intervals (the caller then treats the file as whole)."""
    if end <= start:
        return bounds
    i = bisect.bisect_left(bounds, start)  # boundaries < start
    j = bisect.bisect_right(bounds, end)  # boundaries <= end
    lo, new_start = (i - 1, bounds[i - 1]) if i % 2 else (i, start)
    hi, new_end = (j + 1, bounds[j]) if j % 2 else (j, end)
    bounds[lo:hi] = [new_start, new_end]
    return None if len(bounds) > 2 * cap else bounds


def _pairs(bounds: list[int] | None) -> list[tuple[int, int]] | None:
    if bounds is None:
        return None
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(0, len(bounds), 2)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: temp file, fsync, rename, directory fsync."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    _fsync_dir(path.parent)


def _encode_record(kind: int, key: Key) -> bytes:
    root, path = key
    body = _REC.pack(_REC_MAGIC, kind, root, len(path)) + path
    return body + _CRC.pack(zlib.crc32(body))


def _parse_log(raw: bytes) -> tuple[list[tuple[int, int, Key]], int, bool]:
    """``(records, good_size, damaged)``: ``(position, kind, key)`` up to the first invalid
    record; ``damaged`` when that record is followed by non-zero data (not a torn append)."""
    out: list[tuple[int, int, Key]] = []
    pos = 0
    while pos < len(raw):
        end = pos + _REC.size
        ok = end <= len(raw)
        if ok:
            magic, kind, root, plen = _REC.unpack_from(raw, pos)
            end += plen + _CRC.size
            ok = (
                end <= len(raw)
                and magic == _REC_MAGIC
                and kind in (_KIND_PATH, _KIND_TREE)
                and _CRC.unpack_from(raw, end - _CRC.size)[0]
                == zlib.crc32(raw[pos : end - _CRC.size])
            )
        if not ok:
            torn = end >= len(raw) or not raw[pos:].strip(b"\0")
            return out, pos, not torn
        out.append((pos, kind, (root, raw[pos + _REC.size : end - _CRC.size])))
        pos = end
    return out, pos, False


def _encode_ranges(covers: int, items: dict[Key, _Entry]) -> bytes:
    out = bytearray(_RANGES_MAGIC + _COVERS.pack(covers))
    for (root, path), entry in sorted(items.items()):
        bounds = entry.bounds or []
        flags = (_F_TREE if entry.tree else 0) | (_F_WHOLE if entry.bounds is None else 0)
        out += _RENT.pack(root, flags, len(path), len(bounds) // 2) + path
        for i in range(0, len(bounds), 2):
            out += _BOUND.pack(bounds[i], bounds[i + 1])
    out += _CRC.pack(zlib.crc32(out))
    return bytes(out)


def _decode_ranges(raw: bytes) -> tuple[int, dict[Key, _Entry]]:
    """``(covers, entries)`` of a ranges file; raises ``ValueError`` if it is damaged."""
    body = raw[: -_CRC.size]
    if not raw.startswith(_RANGES_MAGIC) or _CRC.unpack(raw[-_CRC.size :])[0] != zlib.crc32(body):
        raise ValueError("bad magic or checksum")
    pos = len(_RANGES_MAGIC)
    (covers,) = _COVERS.unpack_from(body, pos)
    pos += _COVERS.size
    out: dict[Key, _Entry] = {}
    while pos < len(body):
        root, flags, plen, count = _RENT.unpack_from(body, pos)
        pos += _RENT.size
        path = body[pos : pos + plen]
        pos += plen
        bounds = [v for i in range(count) for v in _BOUND.unpack_from(body, pos + i * _BOUND.size)]
        pos += count * _BOUND.size
        out[(root, path)] = _Entry(None if flags & _F_WHOLE else bounds, bool(flags & _F_TREE))
    if pos != len(body):
        raise ValueError("trailing bytes")
    return covers, out


class DirtyJournal:
    """Changed keys of one module while its secondary is not in sync. Thread-safe.

    Lifecycle: :meth:`load` at process start (picks up what a crashed run left), :meth:`start`
    when tracking begins, :meth:`mark`/:meth:`mark_tree` for each change, :meth:`flush_ranges`
    every second, :meth:`take` by the resync, :meth:`discard` once the secondary is in sync.
    :meth:`discard` must not run concurrently with :meth:`mark`.
    """

    def __init__(self, directory: Path | str, *, max_intervals: int = 1024) -> None:
        self.dir = Path(directory)
        self.max_intervals = max_intervals  # beyond this many ranges a file counts as whole
        self._lock = threading.Lock()  # the in-memory state below
        self._sync_lock = threading.Lock()  # fdatasync of the log (group commit)
        self._flush_lock = threading.Lock()  # whole-file writes: header, ranges, discard
        self._reset()

    def _reset(self) -> None:
        self._active = False
        self._loaded = False
        self._base: int | None = None
        self._full = False
        self._pending: dict[Key, _Entry] = {}  # the working set
        self._taken: dict[Key, _Entry] = {}  # taken by the resync, kept on disk until discard
        self._trees: set[Key] = set()  # tree keys in the working set
        self._fd = -1
        self._log_size = 0
        self._appended = 0  # log records appended by this run
        self._synced = 0  # … of which durable
        self._failure: OSError | None = None
        self._epoch = 0  # flush windows: bumped when flush_ranges takes its snapshot
        self._version = 0  # bumped by every mark
        self._flushed_version = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Tracking is on (started, or left by a previous run and loaded)."""
        return self._active

    @property
    def base_generation(self) -> int | None:
        """The secondary's generation when tracking started; ``None``: unknown."""
        return self._base

    @property
    def full(self) -> bool:
        """The next resync must compare everything: base unknown, forced, or journal damaged.
        Also true when not active (nothing trustworthy is recorded)."""
        return self._full or self._base is None

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Read what a previous run left (inactive if nothing). Call once, before :meth:`start`."""
        with self._flush_lock, self._lock:
            self._close_fd()
            self._reset()
            self._loaded = True
            header, paths = self.dir / HEADER, self.dir / PATHS
            if not header.exists() and not paths.exists():
                return
            self._active = True
            self._full = True
            try:
                meta = json.loads(header.read_bytes())
                base = meta["base"]
                self._base = base if isinstance(base, int) else None
                self._full = bool(meta["full"]) or meta.get("version") != VERSION
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dirty journal %s: header unreadable (%s): full resync", self.dir, exc)
            raw = paths.read_bytes() if paths.exists() else b""
            records, good, damaged = _parse_log(raw)
            covers, flushed = self._read_ranges()
            self._pending = flushed  # conservative: a flushed key is dirty even without record
            for pos, kind, key in records:
                entry = self._pending.setdefault(key, _Entry(None, False))
                entry.tree = entry.tree or kind == _KIND_TREE
                if pos >= covers:  # marked after the last flush: its ranges are unknown
                    entry.bounds = None
            self._trees = {k for k, e in self._pending.items() if e.tree}
            self._open_log()
            if good != len(raw):
                what = "damaged record" if damaged else "torn last record"
                log.warning("dirty journal %s: %s dropped at byte %d", self.dir, what, good)
                os.ftruncate(self._fd, good)
                os.fsync(self._fd)
                self._log_size = good
                if damaged:
                    self._full = True
                    self._write_header()
            full = ", full" if self.full else ""
            log.info(
                "dirty journal %s: %d keys, base %s%s",
                self.dir,
                len(self._pending),
                self._base,
                full,
            )

    def _read_ranges(self) -> tuple[int, dict[Key, _Entry]]:
        try:
            return _decode_ranges((self.dir / RANGES).read_bytes())
        except FileNotFoundError:
            return 0, {}
        except (OSError, ValueError, struct.error) as exc:
            log.warning("dirty journal %s: ranges unreadable (%s): unknown", self.dir, exc)
            return 0, {}

    def start(self, base_generation: int | None) -> None:
        """Begin tracking, durably, against the secondary's ``base_generation`` (``None``:
        unknown). An existing journal keeps its keys; a different base makes it ``full``."""
        if not self._loaded:
            self.load()
        with self._flush_lock, self._lock:
            if self._active:
                if base_generation != self._base:
                    self._full = True
            else:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                _fsync_dir(self.dir.parent)
                self._active = True
                self._full = False
            self._base = base_generation
            self._write_header()
            if self._fd < 0:
                self._open_log()
                _fsync_dir(self.dir)

    def force_full(self) -> None:
        """Require a full compare at the next resync (durable)."""
        with self._flush_lock, self._lock:
            self._require_active()
            self._full = True
            self._write_header()

    def discard(self) -> None:
        """Tracking is over (the secondary is in sync): delete the journal durably."""
        with self._flush_lock, self._lock:
            self._close_fd()
            self._reset()
            self._loaded = True
            if not self.dir.exists():
                return
            for name in (RANGES, PATHS, HEADER):  # header last: a partial discard stays full
                for path in (self.dir / name, self.dir / f".{name}.tmp"):
                    path.unlink(missing_ok=True)
            _fsync_dir(self.dir)
            try:
                self.dir.rmdir()
            except OSError as exc:
                log.warning("dirty journal %s: not removed: %s", self.dir, exc)
                return
            _fsync_dir(self.dir.parent)

    def close(self) -> None:
        """Release the log's descriptor (process exit); the journal stays on disk as it is."""
        with self._flush_lock, self._lock:
            self._close_fd()
            self._reset()

    # -- the hot path --------------------------------------------------------------------------

    def mark(
        self,
        root: int,
        path: bytes,
        offset: int | None = None,
        length: int | None = None,
        *,
        durable: bool = True,
    ) -> None:
        """Record a change of ``(root, path)``, BEFORE making it: bytes ``[offset, offset +
        length)`` of a file (``length`` 0: size or metadata only), or with ``offset=None`` the
        whole object (creation, metadata, namespace). Durable when it returns; raises ``OSError``
        if the journal cannot be written (the change must then fail).

        ``durable=False`` only adds the key to the working set, without any I/O: for a key that
        something on disk already covers (the resync expanding a tree key it took)."""
        if offset is not None and (length is None or offset < 0 or length < 0):
            raise ValueError(f"bad range: offset {offset}, length {length}")
        self._mark((root, path), False, offset, length or 0, durable)

    def mark_tree(self, root: int, path: bytes, *, durable: bool = True) -> None:
        """Record, BEFORE making the change, that everything under ``path`` (itself included)
        may change: directory rename or removal, and the like. ``durable`` as for :meth:`mark`."""
        self._mark((root, path), True, None, 0, durable)

    def _mark(self, key: Key, tree: bool, offset: int | None, length: int, durable: bool) -> None:
        with self._lock:
            entry = self._pending.get(key)
            if not durable:
                self._require_active()
                if entry is None:
                    entry = self._pending[key] = _Entry([] if offset is not None else None, tree)
            elif entry is None or entry.epoch != self._epoch or (tree and not entry.tree):
                seq = self._log(tree or (entry is not None and entry.tree), key)  # may raise
                if entry is None:
                    entry = self._pending[key] = _Entry([] if offset is not None else None, tree)
                entry.seq, entry.epoch = seq, self._epoch
            if tree:
                entry.tree = True
                self._trees.add(key)
            if offset is None:
                entry.bounds = None
            elif entry.bounds is not None:
                end = offset + length
                entry.bounds = add_interval(entry.bounds, offset, end, self.max_intervals)
            self._version += 1
            seq = entry.seq
        if seq > self._synced:
            self._sync(seq)

    def _log(self, tree: bool, key: Key) -> int:
        """Append a record of ``key`` to the paths log (not yet synced); return its seq."""
        self._require_active()
        if self._failure is not None:
            raise OSError(self._failure.errno, f"dirty journal unusable: {self._failure}")
        record = _encode_record(_KIND_TREE if tree else _KIND_PATH, key)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            try:
                os.ftruncate(self._fd, self._log_size)  # no half record before the next one
            except OSError as exc:
                self._failure = exc
            raise
        self._log_size += len(record)
        self._appended += 1
        return self._appended

    def _sync(self, seq: int) -> None:
        """Wait until log record ``seq`` is durable; one fdatasync serves every waiter."""
        with self._sync_lock:
            if self._failure is not None:
                raise OSError(self._failure.errno, f"dirty journal unusable: {self._failure}")
            if self._synced >= seq or self._fd < 0:
                return
            target = self._appended
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._failure = exc  # a later fdatasync may "succeed" without the lost data
                raise
            self._synced = target

    # -- the resync's side ---------------------------------------------------------------------

    def snapshot(self) -> list[DirtyEntry]:
        """The working set, sorted by ``(root, path)``."""
        with self._lock:
            items = sorted(self._pending.items())
            return [DirtyEntry(r, p, _pairs(e.bounds), e.tree) for (r, p), e in items]

    def take(self, root: int, path: bytes) -> DirtyEntry | None:
        """Remove a key from the working set and return it (``None`` if absent). It stays in
        the files until :meth:`discard`; a later mark puts it back in the working set."""
        key = (root, path)
        with self._lock:
            entry = self._pending.pop(key, None)
            if entry is None:
                return None
            self._trees.discard(key)
            result = DirtyEntry(root, path, _pairs(entry.bounds), entry.tree)
            kept = self._taken.setdefault(key, entry)
            if kept is not entry:
                kept.merge(entry, self.max_intervals)
            return result

    def requeue_taken(self) -> None:
        """The resync was interrupted: put every key taken since :meth:`start` back."""
        with self._lock:
            for key, entry in self._taken.items():
                mine = self._pending.get(key)
                if mine is None:
                    self._pending[key] = entry
                else:
                    mine.merge(entry, self.max_intervals)
                if entry.tree:
                    self._trees.add(key)
            self._taken = {}
            self._version += 1

    def contains(self, root: int, path: bytes) -> bool:
        """The key is in the working set, or lies under a tree key that is."""
        with self._lock:
            if (root, path) in self._pending:
                return True
            if not self._trees:
                return False
            while path != b".":
                path = parent_of(path)
                if (root, path) in self._trees:
                    return True
            return False

    def flush_ranges(self) -> None:
        """Write every key's ranges (working set and taken) atomically; no-op if unchanged.
        Starts a new flush window: the next mark of each key appends a record again."""
        with self._flush_lock:
            with self._lock:
                if not self._active or self._version == self._flushed_version:
                    return
                version, covers = self._version, self._log_size
                self._epoch += 1
                items = {k: e.copy() for k, e in self._taken.items()}
                for key, entry in self._pending.items():
                    if key in items:
                        items[key].merge(entry, self.max_intervals)
                    else:
                        items[key] = entry.copy()
            _write_atomic(self.dir / RANGES, _encode_ranges(covers, items))
            self._flushed_version = version

    # -- helpers (called with the locks held) --------------------------------------------------

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError(f"dirty journal {self.dir} is not started")

    def _write_header(self) -> None:
        meta = {"version": VERSION, "base": self._base, "full": self._full}
        _write_atomic(self.dir / HEADER, json.dumps(meta).encode())

    def _open_log(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.dir / PATHS, flags, 0o600)
        self._log_size = os.fstat(self._fd).st_size

    def _close_fd(self) -> None:
        with self._sync_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
