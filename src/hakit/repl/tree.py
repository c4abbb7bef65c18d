"""Local tree and checksum primitives for resync, ``hakit verify`` and ``hakit diff``. No network.

Everything works relative to a directory descriptor opened before any mount (see
docs/replication.md) and never follows a symbolic link: :func:`open_beneath` resolves a
protocol path one component at a time with ``O_NOFOLLOW``, so a symlink inside the replicated
tree cannot lead a listing or a checksum outside it.

Block checksums are ``blake2b(digest_size=DIGEST_SIZE)`` of each block, as in SUMS replies.

Caveats: hard links are not recognised (each name is compared on its own); ``walk`` lists a
live tree, so entries that vanish while it runs are skipped and the result is a best effort,
not a snapshot; it does not stop at mount points below the directory.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field

from hakit.repl.protocol import DIGEST_SIZE, StatRec

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per pread by block_sums
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: errors meaning "this entry is gone or is not what it was": skip it in a live walk
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


# -- checksums ---------------------------------------------------------------------------------


def block_sums(fd: int, block: int, offset: int, length: int) -> bytes:
    """Digests of the blocks of ``[offset, offset + length)`` of the file open on ``fd``,
    concatenated: block ``k`` covers ``offset + k * block`` up to the next block, the end of the
    range or the end of the file, whichever comes first. Nothing past the end of the file (an
    empty result if ``offset`` is at or past it). ``offset`` must be a multiple of ``block``.
    Reads with ``pread`` in chunks of :data:`CHUNK` (the file position is not used)."""
    if block <= 0 or offset < 0 or length < 0 or offset % block:
        raise ValueError(f"bad range: block {block}, offset {offset}, length {length}")
    per_read = max(block, CHUNK // block * block)
    buf = bytearray(per_read)
    view = memoryview(buf)
    out = bytearray()
    pos, end = offset, offset + length
    blake2b = hashlib.blake2b
    while pos < end:
        want = min(per_read, end - pos)
        got = 0
        while got < want:  # a short read is only final when pread returns 0 (end of file)
            n = os.preadv(fd, [view[got:want]], pos + got)
            if n <= 0:
                break
            got += n
        for start in range(0, got, block):
            out += blake2b(view[start : min(start + block, got)], digest_size=DIGEST_SIZE).digest()
        pos += got
        if got < want:
            break
    return bytes(out)


def differing_blocks(
    local: bytes,
    remote: bytes,
    block: int,
    size: int,
    *,
    offset: int = 0,
    length: int | None = None,
) -> list[tuple[int, int]]:
    """The ``(offset, length)`` ranges to send so that the remote copy's ``[offset, offset +
    length)`` (default: up to ``size``) equals the local one, given both sides'
    :func:`block_sums` of that range and the local file's ``size``. A block differs if its
    digests differ or either side lacks it (the remote file is shorter, or the local file grew
    after its sums); adjacent blocks are merged and ranges are clipped to the range and to
    ``size``. Remote blocks past ``size`` are not listed (the caller truncates)."""
    if block <= 0 or offset % block:
        raise ValueError(f"bad block {block} or offset {offset}")
    if length is not None:
        size = min(size, offset + length)
    count = -(-(size - offset) // block) if size > offset else 0
    common = min(len(local), len(remote)) // DIGEST_SIZE
    common = min(common, count)
    diff: list[int] = []
    step = 1024  # compare this many digests at once, then look inside the chunks that differ
    for first in range(0, common, step):
        last = min(first + step, common)
        lo, hi = first * DIGEST_SIZE, last * DIGEST_SIZE
        if local[lo:hi] == remote[lo:hi]:
            continue
        for k in range(first, last):
            a = k * DIGEST_SIZE
            if local[a : a + DIGEST_SIZE] != remote[a : a + DIGEST_SIZE]:
                diff.append(k)
    diff.extend(range(common, count))
    out: list[tuple[int, int]] = []
    for k in diff:
        start, end = offset + k * block, min(offset + (k + 1) * block, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


# -- listings ----------------------------------------------------------------------------------


def open_beneath(dir_fd: int, path: bytes, flags: int = _DIR_FLAGS) -> int:
    """Open protocol path ``path`` below ``dir_fd`` without following any symbolic link (every
    component is opened with ``O_NOFOLLOW``; a symlink raises ``ELOOP`` or ``ENOTDIR``). The
    last component is opened with ``flags | O_NOFOLLOW | O_CLOEXEC``; ``b"."`` opens
    ``dir_fd``'s own directory. The caller closes the returned descriptor."""
    parts = [] if path == b"." else path.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts) or path.startswith(b"/"):
        raise ValueError(f"not a relative protocol path: {path!r}")
    if not parts:
        return os.open(".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    fd = dir_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)


def _list_fd(fd: int) -> dict[bytes, StatRec]:
    """``lstat`` of each entry of the directory open on ``fd``; entries that vanish are skipped."""
    out: dict[bytes, StatRec] = {}
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            out[os.fsencode(entry.name)] = StatRec.of(st)
    return out


def scan_dir(dir_fd: int, path: bytes) -> dict[bytes, StatRec]:
    """Names (bytes) of the directory ``path`` below ``dir_fd`` and the ``lstat`` of each.
    Raises ``OSError`` (``ELOOP``/``ENOTDIR`` if ``path`` or a parent is not a real directory)."""
    fd = open_beneath(dir_fd, path)
    try:
        return _list_fd(fd)
    finally:
        os.close(fd)


def join(parent: bytes, name: bytes) -> bytes:
    """Protocol path of ``name`` in directory ``parent`` (``b"."`` is the root)."""
    return name if parent == b"." else parent + b"/" + name


def walk(
    dir_fd: int, exclude: Callable[[bytes], bool] | None = None
) -> Generator[tuple[bytes, StatRec], None, None]:
    """Every object below ``dir_fd`` as ``(path, lstat)``: ``b"."`` first, then depth first in
    byte order of names, each directory before its contents. Symbolic links are listed, never
    followed. Paths for which ``exclude(path)`` is true are skipped with everything under them.
    Entries that vanish during the walk are skipped. Holds one descriptor per directory level."""
    root = os.open(".", _DIR_FLAGS, dir_fd=dir_fd)
    stack: list[tuple[int, bytes, Iterator[tuple[bytes, StatRec]]]] = []
    try:
        stack.append((root, b".", iter(())))
        yield b".", StatRec.of(os.fstat(root))
        stack[0] = (root, b".", iter(sorted(_list_fd(root).items())))
        while stack:
            fd, parent, entries = stack[-1]
            nxt = next(entries, None)
            if nxt is None:
                stack.pop()
                os.close(fd)
                continue
            name, st = nxt
            path = join(parent, name)
            if exclude is not None and exclude(path):
                continue
            yield path, st
            if not stat.S_ISDIR(st.mode):
                continue
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in _VANISHED:
                    raise
                log.debug("walk: %r vanished (%s)", path, exc)
                continue
            try:
                listing = _list_fd(child)
            except BaseException:
                os.close(child)
                raise
            stack.append((child, path, iter(sorted(listing.items()))))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


# -- comparison --------------------------------------------------------------------------------


@dataclass
class Comparison:
    """How a directory's local listing differs from the remote one (sorted names in each).

    - ``remove``: only on the remote side, or of another file type there;
    - ``create``: only local, or of another file type (so a type change is in both);
    - ``changed``: regular files or symlinks whose size or mtime differ (compare by checksums,
      or read the link), device files whose ``rdev`` differs;
    - ``meta``: the same content signature but another mode, owner or mtime (directories
      included);
    - ``same``: identical (not directories);
    - ``dirs``: directories on both sides, to recurse into.
    """

    remove: list[bytes] = field(default_factory=list)
    create: list[bytes] = field(default_factory=list)
    changed: list[bytes] = field(default_factory=list)
    meta: list[bytes] = field(default_factory=list)
    same: list[bytes] = field(default_factory=list)
    dirs: list[bytes] = field(default_factory=list)


def _owner_mode_differ(a: StatRec, b: StatRec) -> bool:
    return (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid)


def compare_listings(local: dict[bytes, StatRec], remote: dict[bytes, StatRec]) -> Comparison:
    """Classify every name of two listings of the same directory (see :class:`Comparison`).
    Hard-link counts and atimes are ignored."""
    out = Comparison()
    for name in sorted(local.keys() | remote.keys()):
        mine, theirs = local.get(name), remote.get(name)
        if mine is None:
            out.remove.append(name)
            continue
        if theirs is None:
            out.create.append(name)
            continue
        kind = stat.S_IFMT(mine.mode)
        if kind != stat.S_IFMT(theirs.mode):
            out.remove.append(name)
            out.create.append(name)
        elif kind == stat.S_IFDIR:
            out.dirs.append(name)
            if _owner_mode_differ(mine, theirs) or mine.mtime_ns != theirs.mtime_ns:
                out.meta.append(name)
        elif kind in (stat.S_IFREG, stat.S_IFLNK):
            if mine.size != theirs.size or mine.mtime_ns != theirs.mtime_ns:
                out.changed.append(name)
            elif _owner_mode_differ(mine, theirs):
                out.meta.append(name)
            else:
                out.same.append(name)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK) and mine.rdev != theirs.rdev:
            out.changed.append(name)
        elif _owner_mode_differ(mine, theirs) or mine.mtime_ns != theirs.mtime_ns:
            out.meta.append(name)
        else:
            out.same.append(name)
    return out


# -- exclusions --------------------------------------------------------------------------------


class Exclusions:
    """The ``exclude`` list of a ``[[replicate]]`` directory, as a predicate on protocol paths.

    Rules (``fnmatch`` syntax: ``*``, ``?``, ``[...]``; case-sensitive; a ``*`` never matches
    ``/``; ``**`` is not special):

    - a trailing ``/`` is dropped: ``cache/`` means the same as ``cache`` (paths carry no file
      type, so a *file* named ``cache`` is excluded too);
    - a pattern without ``/`` matches any single component at any depth: ``*.tmp`` excludes
      ``a.tmp`` and ``x/y/a.tmp``; ``cache`` excludes ``cache`` and ``srv/cache``;
    - a pattern with a ``/`` (or a leading ``/``, which is dropped) is anchored at the
      replicated directory and matched component by component against the path's leading
      components: ``logs/*.log`` excludes ``logs/a.log`` (and anything below it) but neither
      ``x/logs/a.log`` nor ``logs/sub/a.log``; ``/cache`` excludes only the top-level ``cache``;
    - an excluded path excludes everything below it; ``.`` (the directory itself) is never
      excluded.

    Patterns are matched on bytes (``os.fsencode``): a non-ASCII character inside ``[...]``
    matches any of its UTF-8 bytes. Raises ``ValueError`` for an empty pattern or one with
    ``.``/``..``/empty components.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = list(patterns)
        self._anywhere: list[re.Pattern[bytes]] = []
        self._anchored: list[list[re.Pattern[bytes]]] = []
        for pattern in self.patterns:
            anchored = pattern.startswith("/") or "/" in pattern.strip("/")
            parts = pattern.strip("/").split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"exclude pattern {pattern!r}: empty, '.' or '..' component")
            compiled = [re.compile(os.fsencode(fnmatch.translate(p)), re.DOTALL) for p in parts]
            if anchored:
                self._anchored.append(compiled)
            else:
                self._anywhere.append(compiled[0])

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __call__(self, path: bytes) -> bool:
        return self.excluded(path)

    def excluded(self, path: bytes) -> bool:
        """``path`` (a protocol path) or one of its parent directories matches a pattern."""
        if path == b"." or not self.patterns:
            return False
        parts = path.split(b"/")
        if any(rx.match(part) for rx in self._anywhere for part in parts):
            return True
        return any(
            len(comps) <= len(parts)
            and all(rx.match(p) for rx, p in zip(comps, parts, strict=False))
            for comps in self._anchored
        )
