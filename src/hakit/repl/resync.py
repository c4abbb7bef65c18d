"""Reintegration: bring a connected secondary up to date while the application writes on.

The dirty journal is the work list. Each entry (a path, maybe with byte ranges, maybe a whole
subtree) is processed so that the secondary ends identical to the primary *at that moment*,
and later changes follow on the same ordered connection:

1. read the secondary's state of the path (it cannot change meanwhile: a path still in the
   journal receives no live change, only more journal marks);
2. under the order lock: take the entry out of the journal, compare with the local object and
   queue what makes the secondary's object the same kind and size (create, remove, mkdir,
   symlink …); for a directory, mark every child that differs as a new entry before releasing
   the lock — from here on, live changes to the path are sent at once, and they follow these
   requests on the wire;
3. send the content: the known ranges, or, without ranges, the blocks whose checksums differ
   (whole file when the secondary has none); each chunk is read and queued under the order
   lock, so a live write to the same bytes is either before it (and included) or after it;
4. under the order lock, set size and metadata (mode, owner, mtime).

A full resync starts by marking each whole directory as a tree, so every path is compared
(size and mtime, then block checksums). Entries are processed parents first; ``streams``
worker threads process independent entries at once. When the journal is empty under the lock,
END_RESYNC is queued; the secondary answers once it is up to date and has flushed.

Hard links: a file with several names on the primary is linked, on the secondary, to a name
the secondary already has (same device and inode on the primary), then compared by checksums; a
secondary file whose link count differs from the primary's is replaced rather than written into
(its other names would change too). Each file's and directory's META carries its whole xattr
set (left as it is when the primary cannot read it, or above ``MAX_XATTRS``). The operator's
``fullsync`` also compares every file by checksums and sends every object's META.

Paths are resolved on the primary without following symbolic links in their parents (a path
below what is now a link is treated as gone). Caveat: two names with the same link count on both
nodes are taken to be the same link group (not checked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from hakit.repl import protocol as p
from hakit.repl.link import Link, Pending, ReplicaLost
from hakit.repl.tracker import DirtyEntry
from hakit.repl.tree import block_sums, differing_blocks, open_beneath, scan_dir

if TYPE_CHECKING:
    from hakit.repl.primary import PrimaryReplicator

log = logging.getLogger("hakit.repl.resync")

CHUNK = 4 << 20  # bytes per WRITE of file data (read under the order lock)
WINDOW = 32 << 20  # bytes queued per worker before it waits for replies
MAX_XATTRS = 1 << 20  # bytes of one object's xattr set a resync sends, at most


class ResyncError(Exception):
    """The secondary refused a resync request: the resync stops, the link is closed."""


class Resync:
    def __init__(self, prim: PrimaryReplicator, link: Link, full: bool) -> None:
        self.prim = prim
        self.link = link
        self.full = full
        self.started = time.monotonic()
        self.paths_done = 0
        self.bytes_sent = 0
        self._count_lock = threading.Lock()
        self._throttle_at = time.monotonic()
        # directories whose entries the resync changed: their mtimes are set at the end
        self._touched: set[tuple[int, bytes]] = set()
        # what the secondary has at paths listed with their parent (None: nothing)
        self._known: dict[tuple[int, bytes], p.StatRec | None] = {}
        # the operator's fullsync: every file compared by block checksums, every object's META
        self.checksums = full and prim.take_checksum_request()
        # per root, inode -> names of the primary's multiply-linked files (built when needed)
        self._links: dict[int, dict[int, list[bytes]]] = {}

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        prim, link, journal = self.prim, self.link, self.prim.journal
        gen = prim.record.generation
        from hakit.repl.primary import Mode  # noqa: PLC0415

        with prim.order:
            prim.link = link
            prim.mode = Mode.RESYNC
            begin = link.submit(
                p.Request(
                    p.Op.BEGIN_RESYNC, data=p.encode_json({"generation": gen, "full": self.full})
                )
            )
            if self.full:
                for root in range(len(prim.roots)):
                    journal.mark_tree(root, b".")
        self._check(begin.wait(), "begin resync")
        prim.detail = f"{'full' if self.full else 'incremental'} resync started"
        self._progress()
        with ThreadPoolExecutor(max_workers=prim.s.streams, thread_name_prefix="resync") as pool:
            while True:
                with prim.order:
                    if prim.link is not link:
                        raise ReplicaLost(link.broken or "link replaced")
                    entries = journal.snapshot()
                    if not entries:
                        self._fix_dir_times_locked()
                        end = link.submit(
                            p.Request(p.Op.END_RESYNC, data=p.encode_json({"generation": gen}))
                        )
                        prim._recent.append((end.seq, set()))
                        break
                ready = [
                    e
                    for e in entries
                    if e.path == b"." or not journal.contains(e.root, p.parent_of(e.path))
                ]
                ready.sort(key=lambda e: (e.path.count(b"/"), e.root, e.path))
                # entries are queued without waiting for their replies (pipelined); the
                # round waits for all of them before the next snapshot
                futures = [pool.submit(self._sync_entry, e) for e in ready]
                pendings = [pend for fut in futures for pend in fut.result()]
                for pend in pendings:
                    self._check(pend.wait(), "resync")
                with self._count_lock:
                    self.paths_done += len(ready)
                self._progress()
        self._check(end.wait(), "end resync")
        with prim.order:
            prim.checkpointed(link, end.seq)
        took = time.monotonic() - self.started
        log.info(
            "resync done: %d paths, %.1f MB in %.2f s",
            self.paths_done,
            self.bytes_sent / 1e6,
            took,
        )
        prim.resync_progress = {"done": True, "seconds": round(took, 3), "bytes": self.bytes_sent}
        prim.mark_in_sync(link)

    def _fix_dir_times_locked(self) -> None:
        """Give the directories whose entries changed their primary's mtime (under the lock:
        live changes queued later carry their own parent mtimes)."""
        for root, path in sorted(self._touched):
            local = _lstat(self.prim.roots[root], path)
            if local is not None and stat.S_ISDIR(local.st_mode):
                self._meta_locked(root, path, local)
        self._touched.clear()

    def _touch(self, root: int, path: bytes) -> None:
        with self._count_lock:
            self._touched.add((root, p.parent_of(path)))

    # ------------------------------------------------------------------ one entry
    def _sync_entry(self, seen: DirtyEntry) -> list[Pending]:
        """Queue what brings one path up to date; returns the requests to wait for."""
        prim, root, path = self.prim, seen.root, seen.path
        with self._count_lock:
            known = self._known.pop((root, path), _UNKNOWN)
        first = _lstat(prim.roots[root], path)
        single = first is None or first.st_nlink == 1
        if known is not _UNKNOWN:
            remote = known  # listed with its parent; a path in the journal did not change since
        elif seen.ranges is not None and not seen.tree and single:
            # only written while tracked: it existed at the base, so the secondary has it
            # (with links, their number on the secondary is asked)
            remote = _SOME_FILE
        else:
            remote = self._remote_stat(root, path)
        sends: list[Pending] = []
        content: list[tuple[int, int]] | None = []
        names = self._other_names(root, path, first) if first is not None else []
        with prim.order:
            entry = prim.journal.take(root, path)
            if entry is None:
                return []
            local = _lstat(prim.roots[root], path)
            keys = {(root, path)}
            if local is None:
                if remote is not None:
                    sends.append(self._submit(p.Request(p.Op.REMOVE, path, root=root)))
                content = None
            elif stat.S_ISDIR(local.st_mode):
                sends += self._sync_dir_locked(root, path, local, remote, entry.tree)
                content = None
            elif stat.S_ISREG(local.st_mode):
                same_kind = remote is not None and stat.S_ISREG(remote.mode)
                regroup = same_kind and remote is not None and remote.nlink != local.st_nlink
                linked = False
                if names and (remote is None or regroup):
                    source = self._link_source_locked(root, local, names)
                    if source is not None:  # one inode, as on the primary
                        if remote is not None:
                            sends.append(self._submit(p.Request(p.Op.REMOVE, path, root=root)))
                        sends.append(
                            self._submit(p.Request(p.Op.LINK, path, source, root=root, d=p.KEEP))
                        )
                        same_kind = linked = True  # its content is then compared as usual
                        entry = dataclasses.replace(entry, ranges=None)
                if regroup and not linked:
                    # the secondary's file shares its inode with names the primary's does not:
                    # writing into it would change those too — replace it with a file of its own
                    sends.append(self._submit(p.Request(p.Op.REMOVE, path, root=root)))
                    same_kind = False
                if not same_kind:
                    sends.append(self._create_locked(root, path, local))
                sends.append(self._meta_locked(root, path, local))
                if not same_kind:
                    content = [(0, local.st_size)] if local.st_size else []
                elif entry.ranges is not None and not entry.tree:
                    content = [(o, n) for o, n in entry.ranges if o < local.st_size]
                else:
                    content = None  # compare by checksums below
                    keys.add((root, path))
            else:
                sends += self._recreate_special_locked(root, path, local, remote)
                content = []
            prim._recent[-1][1].update(keys)
        if local is not None and stat.S_ISREG(local.st_mode):
            if content is None:
                content = self._differing(root, path, local.st_size)
            sends += self._send_ranges(root, path, content)
            with prim.order:
                now = _lstat(prim.roots[root], path)
                if now is not None and stat.S_ISREG(now.st_mode):
                    sends.append(self._meta_locked(root, path, now))
        return sends

    def _other_names(self, root: int, path: bytes, st: os.stat_result) -> list[bytes]:
        """The other names of a multiply-linked regular file (outside the order lock: it may
        walk the whole tree once per resync, or again when a link appeared meanwhile)."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return []
        index = self._links.get(root)
        if index is None or path not in index.get(st.st_ino, ()):
            index = _multi_linked(self.prim.roots[root])
            self._links[root] = index
        return [n for n in index.get(st.st_ino, ()) if n != path]

    def _link_source_locked(
        self, root: int, local: os.stat_result, names: list[bytes]
    ) -> bytes | None:
        """A name of the same inode that the secondary has as it is (not waiting in the
        journal, not excluded): the new name is made a hard link to it."""
        for name in names:
            if self.prim.excluded(root, name) or self.prim.journal.contains(root, name):
                continue
            other = _lstat(self.prim.roots[root], name)
            if other is not None and (other.st_dev, other.st_ino) == (local.st_dev, local.st_ino):
                return name
        return None

    def _sync_dir_locked(
        self, root: int, path: bytes, local: os.stat_result, remote: p.StatRec | None, tree: bool
    ) -> list[Pending]:
        prim = self.prim
        sends: list[Pending] = []
        created = remote is None or not stat.S_ISDIR(remote.mode)
        if created:
            if remote is not None:
                sends.append(self._submit(p.Request(p.Op.REMOVE, path, root=root)))
            sends.append(
                self._submit(
                    p.Request(
                        p.Op.MKDIR,
                        path,
                        root=root,
                        a=stat.S_IMODE(local.st_mode),
                        b=local.st_mtime_ns,
                        c=p.pack_owner(local.st_uid, local.st_gid),
                    )
                )
            )
        if tree or created:
            mine = scan_dir(prim.roots[root], path)
            theirs: dict[bytes, p.StatRec] = {}
            if not created:
                reply = self.link.call(p.Request(p.Op.LIST, path, root=root))
                self._check(reply, f"listing {path!r}")
                theirs = p.decode_listing(reply.data)
            for name, gone in theirs.items():
                here = mine.get(name)
                if here is None or stat.S_IFMT(here.mode) != stat.S_IFMT(gone.mode):
                    child = name if path == b"." else path + b"/" + name
                    if not prim.excluded(root, child):
                        sends.append(self._submit(p.Request(p.Op.REMOVE, child, root=root)))
            for name, ours in mine.items():
                child = name if path == b"." else path + b"/" + name
                if prim.excluded(root, child):
                    continue
                other = theirs.get(name)
                with self._count_lock:
                    self._known[(root, child)] = other
                if stat.S_ISDIR(ours.mode):
                    prim.journal.mark_tree(root, child, durable=False)
                elif other is None or _differs(ours, other) or self.checksums:
                    prim.journal.mark(root, child, durable=False)
        sends.append(self._meta_locked(root, path, local))
        return sends

    def _recreate_special_locked(
        self, root: int, path: bytes, local: os.stat_result, remote: p.StatRec | None
    ) -> list[Pending]:
        fd = self.prim.roots[root]
        sends: list[Pending] = []
        if remote is not None:
            sends.append(self._submit(p.Request(p.Op.REMOVE, path, root=root)))
        owner = p.pack_owner(local.st_uid, local.st_gid)
        if stat.S_ISLNK(local.st_mode):
            target = os.fsencode(os.readlink(path, dir_fd=fd))
            req = p.Request(p.Op.SYMLINK, path, target, root=root, b=local.st_mtime_ns, c=owner)
        else:
            req = p.Request(p.Op.MKNOD, path, root=root, a=local.st_mode, b=local.st_rdev, c=owner)
        sends.append(self._submit(req))
        return sends

    # ------------------------------------------------------------------ content
    def _differing(self, root: int, path: bytes, size: int) -> list[tuple[int, int]]:
        """Ranges whose block checksums differ, asked in slices that fit in one reply."""
        block = self.prim.s.block_size
        span = (p.MAX_DATA // p.DIGEST_SIZE) * block
        fd = _open_read(self.prim.roots[root], path)
        if fd is None:
            return []
        out: list[tuple[int, int]] = []
        try:
            for off in range(0, size, span):
                n = min(span, size - off)
                reply = self.link.call(p.Request(p.Op.SUMS, path, root=root, a=block, b=off, c=n))
                if reply.err:
                    out.append((off, n))
                    continue
                mine = block_sums(fd, block, off, n)
                out += differing_blocks(mine, reply.data, block, size, offset=off, length=n)
        finally:
            os.close(fd)
        return out

    def _send_ranges(self, root: int, path: bytes, ranges: list[tuple[int, int]]) -> list[Pending]:
        prim = self.prim
        fd = _open_read(prim.roots[root], path)
        if fd is None:
            return []
        sends: list[Pending] = []
        queued = 0
        try:
            for start, length in ranges:
                off, end = start, start + length
                while off < end:
                    n = min(CHUNK, end - off)
                    with prim.order:
                        data = os.pread(fd, n, off)
                        if not data:
                            break
                        mtime = os.fstat(fd).st_mtime_ns
                        sends.append(
                            self._submit(
                                p.Request(
                                    p.Op.WRITE,
                                    path,
                                    root=root,
                                    data=data,
                                    a=off,
                                    b=mtime,
                                    flags=p.FLAG_BULK,
                                )
                            )
                        )
                    off += len(data)
                    queued += len(data)
                    self._account(len(data))
                    if queued >= WINDOW:
                        for pend in sends:
                            self._check(pend.wait(), f"resync of {path!r}")
                        sends, queued = [], 0
                if off < end:
                    break
        finally:
            os.close(fd)
        return sends

    # ------------------------------------------------------------------ helpers
    def _submit(self, req: p.Request) -> Pending:
        if req.op in _NAMESPACE and req.path != b".":
            self._touch(req.root, req.path)
        return self.link.submit(req)

    def _create_locked(self, root: int, path: bytes, st: os.stat_result) -> Pending:
        return self._submit(
            p.Request(
                p.Op.CREATE,
                path,
                root=root,
                a=stat.S_IMODE(st.st_mode),
                b=st.st_mtime_ns,
                c=p.pack_owner(st.st_uid, st.st_gid),
            )
        )

    def _meta_locked(self, root: int, path: bytes, st: os.stat_result) -> Pending:
        """Size, mode, owner, mtime and (files, directories) the whole xattr set."""
        size = st.st_size if stat.S_ISREG(st.st_mode) else p.KEEP
        xattrs = b""
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            attrs = _xattrs(self.prim.roots[root], path)
            if attrs is not None:
                xattrs = p.encode_xattrs(attrs)
            if len(xattrs) > MAX_XATTRS:
                log.warning("%r: %d bytes of xattrs left as they are", path, len(xattrs))
                xattrs = b""
        return self._submit(
            p.Request(
                p.Op.META,
                path,
                root=root,
                a=stat.S_IMODE(st.st_mode),
                b=st.st_mtime_ns,
                c=p.pack_owner(st.st_uid, st.st_gid),
                d=size,
                data=xattrs,
            )
        )

    def _remote_stat(self, root: int, path: bytes) -> p.StatRec | None:
        reply = self.link.call(p.Request(p.Op.STAT, path, root=root))
        if reply.err:
            return None
        return p.StatRec.decode(reply.data)

    def _check(self, reply: p.Reply, what: str) -> None:
        if reply.err:
            raise ResyncError(f"{what}: the secondary answered: {reply.message}")

    def _account(self, n: int) -> None:
        with self._count_lock:
            self.bytes_sent += n
        cap = self.prim.s.bandwidth
        if cap:
            self._throttle_at = max(self._throttle_at, time.monotonic()) + n / cap
            delay = self._throttle_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _progress(self) -> None:
        remaining = len(self.prim.journal.snapshot())
        total = self.paths_done + remaining
        elapsed = time.monotonic() - self.started
        pct = 100.0 * self.paths_done / total if total else 100.0
        rate = self.bytes_sent / elapsed if elapsed > 0 else 0.0
        per_path = elapsed / self.paths_done if self.paths_done else 0.0
        self.prim.resync_progress = {
            "kind": "full" if self.full else "incremental",
            "percent": round(pct, 1),
            "paths_done": self.paths_done,
            "paths_left": remaining,
            "bytes_sent": self.bytes_sent,
            "rate_Bps": round(rate),
            "eta_s": round(per_path * remaining, 1),
        }
        self.prim.detail = (
            f"{self.prim.resync_progress['kind']} resync {pct:.0f} %: {self.paths_done} paths, "
            f"{self.bytes_sent / 1e6:.1f} MB sent"
        )
        self.prim.report()


_UNKNOWN: Any = object()
# stands for "a regular file" when the secondary's copy is known to be one without asking
_SOME_FILE = p.StatRec(stat.S_IFREG, 0, 0, 0, 0)

_NAMESPACE = frozenset({p.Op.REMOVE, p.Op.CREATE, p.Op.MKDIR, p.Op.SYMLINK, p.Op.MKNOD, p.Op.LINK})


def _differs(a: p.StatRec, b: p.StatRec) -> bool:
    """Worth a closer look: size, mtime, mode, owner, or (files) the number of links."""
    if stat.S_ISREG(a.mode) and stat.S_ISREG(b.mode) and a.nlink != b.nlink:
        return True
    return (a.size, a.mtime_ns, a.mode, a.uid, a.gid) != (b.size, b.mtime_ns, b.mode, b.uid, b.gid)


def _same_dev(dir_fd: int, name: bytes, dev: int) -> bool:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev == dev
    except OSError:
        return False


def _lstat(root_fd: int, path: bytes) -> os.stat_result | None:
    """``lstat`` of ``path`` below ``root_fd``, None if it is not there — also when one of its
    parents is now a symbolic link: then ``path`` is no object of the tree (the secondary, which
    never follows links, would refuse it for ever)."""
    parent, _, name = path.rpartition(b"/")
    with _gone_as_none():
        if not parent:
            return os.stat(path, dir_fd=root_fd, follow_symlinks=False)
        fd = open_beneath(root_fd, parent)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
    return None


@contextlib.contextmanager
def _gone_as_none() -> Iterator[None]:
    """Swallow the errors that mean "no such object below the root": missing, or a parent
    that is not a real directory (a file, or a symbolic link refused by O_NOFOLLOW)."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise


def _multi_linked(root_fd: int) -> dict[int, list[bytes]]:
    """inode -> names (protocol paths) of every regular file below ``root_fd`` with links."""
    out: dict[int, list[bytes]] = {}
    dev = os.fstat(root_fd).st_dev  # mount points below the directory are not walked
    for top, dirs, files, dir_fd in os.fwalk(b".", dir_fd=root_fd):
        dirs[:] = [d for d in dirs if _same_dev(dir_fd, d, dev)]
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    rel = name if top == b"." else top.removeprefix(b"./") + b"/" + name
                    out.setdefault(st.st_ino, []).append(rel)
    return out


def _xattrs(root_fd: int, path: bytes) -> dict[bytes, bytes] | None:
    """Every extended attribute of ``path`` (not following a symlink): {} if it has none, if
    its file system has none, or if it vanished; None if they cannot be read (the secondary's
    are then left as they are)."""
    proc = f"/proc/self/fd/{root_fd}/".encode() + path
    try:
        names = os.listxattr(proc, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        log.warning("%r: xattrs not readable (%s): left as they are", path, exc)
        return None
    out: dict[bytes, bytes] = {}
    for attr in names:
        try:
            out[os.fsencode(attr)] = os.getxattr(proc, attr, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # ENODATA: removed meanwhile, gone on both sides
                log.warning("%r: xattr %s not readable (%s): left as they are", path, attr, exc)
                return None
    return out


def _open_read(root_fd: int, path: bytes) -> int | None:
    with _gone_as_none():
        return open_beneath(root_fd, path, os.O_RDONLY)
    return None
