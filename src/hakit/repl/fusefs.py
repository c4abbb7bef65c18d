"""The FUSE file system mounted over a replicated directory on the primary.

:class:`ReplicatedFs` is a passthrough: every operation goes to the *underlying* directory
through a descriptor opened before the mount (``os.*(…, dir_fd=root)``), reads included, so
reads never touch the network. Each change is made locally and handed to the module's
:class:`~hakit.repl.primary.PrimaryReplicator` under its order lock, then waited for outside the
lock (see that module for the contract): a change returns to the application once the
secondary has applied it, or once it is durably recorded for the resync. A ``write`` is handed
over first and made locally while the secondary receives it (:meth:`ReplicatedFs.write`).

Choices (measured in docs/fuse-binding.md): mfusepy on libfuse3, multithreaded loop, 1 MiB
writes, no writeback cache (it would acknowledge writes before they are replicated),
``hard_remove`` (no ``.fuse_hidden`` files: a file unlinked while open has no name, so later
writes to it are not replicated — nobody can reach them), ``use_ino``.

``fsync``/``fdatasync`` (and O_SYNC/O_DSYNC writes, which the kernel follows with an FSYNC
request) flush the local file and the secondary's copy at the same time and return when both
are done. The daemon opens files without O_SYNC/O_DSYNC/O_DIRECT for that reason.

A WRITE on an O_SYNC/O_DSYNC handle is flagged (``FLAG_SYNC``/``FLAG_DSYNC``): the secondary
makes the file durable before it answers. It does not wait for that answer: the kernel sends
an FSYNC before the application's ``write`` returns, and that FSYNC waits for both the local
flush and the answer (so does the ``release`` of the handle, should no FSYNC come); when the
flagged WRITE was the latest change of the file (and the file has one name), that FSYNC does
not go to the secondary at all. The application's ``write`` still returns only once the data
is durable on both nodes, with one network round trip in all.

Caveats: ``RENAME_NOREPLACE`` and ``RENAME_EXCHANGE`` are honoured (renameat2); atime is
not replicated; ctime cannot be set, so it differs between the copies.
"""

from __future__ import annotations

import _thread
import ctypes
import errno
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Iterable
from typing import Any

from mfusepy import FUSE, FuseOSError, Operations, c_stat, fuse_get_context

from hakit.repl import protocol as p
from hakit.repl.applier import (
    DIRECT_ALIGN,
    RENAME_EXCHANGE,
    fallocate,
    open_direct,
    renameat2,
    set_times,
    write_direct,
)
from hakit.repl.link import Link
from hakit.repl.primary import PrimaryReplicator, Ticket

_STAT_KEYS = (
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_ino",
    "st_rdev",
)
_STATFS_KEYS = (
    "f_bavail",
    "f_bfree",
    "f_blocks",
    "f_bsize",
    "f_favail",
    "f_ffree",
    "f_files",
    "f_flag",
    "f_frsize",
    "f_namemax",
)
_DROP_FLAGS = os.O_SYNC | os.O_DSYNC | getattr(os, "O_DIRECT", 0)
log = logging.getLogger(__name__)
_NS = 1_000_000_000
RENAME_NOREPLACE = 1


_pinned: set[int] = set()  # libfuse threads whose Python thread state is kept between calls


MAX_THREADS = 64  # libfuse worker threads per mount (requests waiting for the secondary)
LARGE_WRITE = 256 << 10  # writes of this many bytes or more go past the page cache (_pwrite)


class _Fuse(FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with the rename flags passed on (so RENAME_NOREPLACE is honoured), and
    cheaper paths for the frequent requests.

    - Each libfuse worker thread keeps its Python thread state: without it, every request
      (a ctypes callback from a thread Python does not know) creates and destroys one, with
      its frame stack (an mmap and munmap per request). The states of the (at most
      ``max_threads``) workers stay allocated after the unmount: a few KiB each.
    - ``create`` without mfusepy's ``inspect.signature`` call per file; ``getattr`` fills the
      kernel's stat buffer straight from ``os.stat_result``; ``getxattr`` answers a missing
      attribute (asked for before every write: security.capability) without the logging
      path of mfusepy's exception handler.
    """

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        ident = _thread.get_ident()
        if ident not in _pinned:
            _pinned.add(ident)
            ctypes.pythonapi.PyGILState_Ensure()  # never released: the state stays
        return super()._wrapper(func, *args, **kwargs)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(  # type: ignore[no-any-return]
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
        )

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, fi.flags)
        return 0

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        ops: ReplicatedFs = self.operations
        if fip:
            st = os.fstat(fip.contents.fh)
        elif path is None:
            return -errno.ENOENT
        else:
            st = os.stat(
                p.fuse_path(path.decode(self.encoding, self.errors)),
                dir_fd=ops.fd,
                follow_symlinks=False,
            )
        ctypes.memset(buf, 0, ctypes.sizeof(c_stat))
        out = buf.contents
        out.st_mode = st.st_mode
        out.st_nlink = st.st_nlink
        out.st_uid = st.st_uid
        out.st_gid = st.st_gid
        out.st_size = st.st_size
        out.st_blocks = st.st_blocks
        out.st_ino = st.st_ino
        out.st_rdev = st.st_rdev
        out.st_atimespec.tv_sec, out.st_atimespec.tv_nsec = divmod(st.st_atime_ns, _NS)
        out.st_mtimespec.tv_sec, out.st_mtimespec.tv_nsec = divmod(st.st_mtime_ns, _NS)
        out.st_ctimespec.tv_sec, out.st_ctimespec.tv_nsec = divmod(st.st_ctime_ns, _NS)
        return 0

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        try:
            return super().getxattr(path, name, value, size, *args)  # type: ignore[no-any-return]
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return -errno.ENODATA
            raise


def _dtype(e: os.DirEntry[str]) -> int:
    if e.is_symlink():
        return stat.S_IFLNK
    if e.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if e.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)


class ReplicatedFs(Operations):  # type: ignore[misc]
    """One mounted directory (index ``root`` in the module's list). See module docstring."""

    use_ns = True

    def __init__(self, repl: PrimaryReplicator, root: int) -> None:
        self.repl = repl
        self.root = root
        self.fd = repl.roots[root]
        self.me = (os.geteuid(), os.getegid())
        # O_SYNC/O_DSYNC handles -> FLAG_SYNC/FLAG_DSYNC: their WRITEs are made durable by
        # the secondary and waited for by the FSYNC that follows each
        self._sync_fhs: dict[int, int] = {}
        # path -> (handle, flag) while the latest change sent for it is such a WRITE: the
        # FSYNC that follows need not go to the secondary (under the order lock)
        self._durable_last: dict[bytes, tuple[int, int]] = {}
        self._deferred: dict[int, list[Ticket]] = {}
        self._deferred_lock = threading.Lock()
        self._direct = repl.s.direct_writes
        self._direct_fds: dict[int, int] = {}  # handle -> its O_DIRECT twin (-1: none)
        self._buffers = threading.local()  # per worker thread: a page-aligned copy buffer

    # ------------------------------------------------------------------ helpers
    def _rel(self, path: str) -> bytes:
        return p.fuse_path(path)

    def _proc(self, rel: bytes) -> bytes:
        """A path reaching the underlying object even for calls without dir_fd (xattrs)."""
        return b"/proc/self/fd/%d/%s" % (self.fd, rel)

    def _mtime(self, rel: bytes) -> int:
        return os.stat(rel, dir_fd=self.fd, follow_symlinks=False).st_mtime_ns

    def _caller(self) -> tuple[int, int]:
        uid, gid, _ = fuse_get_context()
        return uid, gid

    def _owner_for(self, rel: bytes) -> tuple[int, int]:
        """Owner of a new object at ``rel``: the caller, as if it had made the object itself
        — with the directory's group if the directory is set-group-id."""
        uid, gid = self._caller()
        parent = os.stat(p.parent_of(rel), dir_fd=self.fd, follow_symlinks=False)
        if parent.st_mode & stat.S_ISGID:
            gid = parent.st_gid
        return uid, gid

    def _own(self, rel: bytes, fd: int | None = None, owner: tuple[int, int] | None = None) -> int:
        """New objects belong to the caller, not to the (root) daemon (:meth:`_owner_for`,
        unless ``owner`` is given); returns the owner."""
        uid, gid = owner or self._owner_for(rel)
        if (uid, gid) != self.me:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(rel, uid, gid, dir_fd=self.fd, follow_symlinks=False)
        return p.pack_owner(uid, gid)

    def _send(self, req: p.Request, **kw: Any) -> Any:
        """Every change goes through here (caller holds the order lock): a change of a path
        ends what :attr:`_durable_last` knows of it, and a rename or link of everything
        below the names involved."""
        durable = self._durable_last
        if durable:
            durable.pop(req.path, None)
            if req.op in (p.Op.RENAME, p.Op.LINK):
                names = (req.path, req.path2)
                for key in [k for k in durable if any(p.is_within(k, n) for n in names)]:
                    del durable[key]
        return self.repl.change(self.root, req, **kw)

    # ------------------------------------------------------------------ setup
    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.entry_timeout = 1.0
            config.attr_timeout = 0.0  # hard links: another name of the inode may change it
            config.negative_timeout = 0.0
            config.use_ino = 1
            config.hard_remove = 1
        if conn is not None:
            conn.max_write = 1 << 20

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.fd)
        return {k: getattr(sv, k) for k in _STATFS_KEYS}

    # ------------------------------------------------------------------ reading
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = (
            os.fstat(fh)
            if fh is not None
            else os.stat(self._rel(path), dir_fd=self.fd, follow_symlinks=False)
        )
        d = {k: getattr(st, k) for k in _STAT_KEYS}
        d["st_atime"], d["st_mtime"], d["st_ctime"] = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return d

    def access(self, path: str, amode: int) -> None:
        if not os.access(self._rel(path), amode, dir_fd=self.fd):
            raise FuseOSError(errno.EACCES)

    def readlink(self, path: str) -> str:
        return os.fsdecode(os.readlink(self._rel(path), dir_fd=self.fd))

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        d = os.open(self._rel(path), os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            with os.scandir(d) as it:
                out = [(e.name, {"st_ino": e.inode(), "st_mode": _dtype(e)}, 0) for e in it]
        finally:
            os.close(d)
        dots = {"st_ino": 1, "st_mode": stat.S_IFDIR}
        return [(".", dots, 0), ("..", dots, 0), *out]

    def open(self, path: str, flags: int) -> int:
        rel = self._rel(path)
        if not flags & os.O_TRUNC:
            return self._opened(os.open(rel, flags & ~_DROP_FLAGS, dir_fd=self.fd), flags)
        with self.repl.order:
            fd = os.open(rel, flags & ~_DROP_FLAGS, dir_fd=self.fd)
            t = self._send(p.Request(p.Op.TRUNCATE, rel, a=0, b=os.fstat(fd).st_mtime_ns))
        self.repl.finish(t)
        return self._opened(fd, flags)

    def _opened(self, fd: int, flags: int) -> int:
        if flags & os.O_DSYNC:  # O_SYNC includes it
            self._sync_fhs[fd] = p.FLAG_SYNC if flags & os.O_SYNC == os.O_SYNC else p.FLAG_DSYNC
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return os.getxattr(self._proc(self._rel(path)), name, follow_symlinks=False)

    def listxattr(self, path: str) -> Iterable[str]:
        return os.listxattr(self._proc(self._rel(path)), follow_symlinks=False)

    # ------------------------------------------------------------------ data
    def create(self, path: str, mode: int, flags: int) -> int:
        """Like :meth:`write`, the CREATE goes to the secondary *before* the local file is
        created, both under the order lock, so the two creations run at the same time. What
        the CREATE says is chosen first: the mode asked for (the process's umask is 0), the
        owner (:meth:`_owner_for`), one timestamp as the file's and its directory's mtime (set
        here too). Should this copy end up with another mode or owner (the chown to a caller
        clears set-id bits), a CHMOD/CHOWN follows; should the local creation fail, an UNLINK
        takes it back on the secondary — both before returning.

        The kernel asks to create only names its lookup did not find, and holds the
        directory's lock meanwhile; a name that exists anyway (made beside the mount, through
        a descriptor opened before it) is opened as it is, never created again."""
        rel = self._rel(path)
        try:
            os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            log.warning("create of %r, which exists already: opened as it is", rel)
            if flags & os.O_EXCL:
                raise FuseOSError(errno.EEXIST)
            return self.open(path, flags & ~os.O_CREAT)
        parent = p.parent_of(rel)
        uid, gid = self._owner_for(rel)
        want = stat.S_IMODE(mode)
        tickets: list[Ticket | None] = []
        error: OSError | None = None
        with self.repl.order:
            now = time.time_ns()
            owner = p.pack_owner(uid, gid)
            tickets.append(self._send(p.Request(p.Op.CREATE, rel, a=want, b=now, c=owner, d=now)))
            try:
                fd = os.open(rel, (flags & ~_DROP_FLAGS) | os.O_CREAT, mode, dir_fd=self.fd)
            except OSError as exc:
                error = exc
                tickets.append(self._send(p.Request(p.Op.UNLINK, rel, d=self._mtime(parent))))
            else:
                self._own(rel, fd, (uid, gid))
                set_times(fd, None, p.KEEP, now)
                set_times(self.fd, parent, p.KEEP, now)
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    chown = p.Request(p.Op.CHOWN, rel, c=p.pack_owner(st.st_uid, st.st_gid))
                    tickets.append(self._send(chown))
                if stat.S_IMODE(st.st_mode) != want:
                    chmod = p.Request(p.Op.CHMOD, rel, a=stat.S_IMODE(st.st_mode))
                    tickets.append(self._send(chmod))
        for ticket in tickets:  # waited for outside the order lock, as every change
            self.repl.finish(ticket)
        if error is not None:
            raise error
        return self._opened(fd, flags)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        """The WRITE is sent to the secondary *before* the local ``pwrite``, both under the
        order lock (so the order of changes is kept): the two copies are written at the same
        time. Its mtime is chosen first and set on this copy after the write, so both copies
        carry the same one. If the local write fails or is short, what this copy holds where
        the secondary got the rest of the data is sent back to it (:meth:`_undo_write`), and
        the error or the short count returns only once that is applied.

        A write on an O_SYNC/O_DSYNC handle does not wait here: the kernel follows it with
        an FSYNC request before the application's write returns, and :meth:`fsync` waits for
        both (so does :meth:`release`, in case no FSYNC comes)."""
        if path is None:  # unlinked while open: nobody can reach these bytes
            return os.pwrite(fh, data, offset)
        rel = self._rel(path)
        error: OSError | None = None
        n = 0
        undo: list[Ticket | None] = []
        drop = None
        sync = self._sync_fhs.get(fh, 0)
        with self.repl.order:
            mtime = time.time_ns()
            t = self._send(
                p.Request(p.Op.WRITE, rel, data=data, a=offset, b=mtime, flags=sync),
                rng=(offset, len(data)),
            )
            try:
                n = self._pwrite(fh, data, offset)
                if n:
                    set_times(fh, None, p.KEEP, mtime)
            except OSError as exc:
                error = exc
            if n < len(data) and t is not None and t.pending is not None:
                undo, drop = self._undo_write(rel, fh, offset + n, len(data) - n, t)
            elif sync and n == len(data) and os.fstat(fh).st_nlink == 1:
                self._durable_last[rel] = (fh, sync)  # one name: no other path reaches it
        if drop is not None:
            drop.close(f"{rel!r}: this copy could not be read back after a failed write")
        if error is not None or n < len(data):
            for ticket in (t, *undo):
                self.repl.finish(ticket)
            if error is not None:
                raise error
            return n
        if t is not None and sync:
            with self._deferred_lock:
                self._deferred.setdefault(fh, []).append(t)
        else:
            self.repl.finish(t)
        return n

    def _pwrite(self, fh: int, data: bytes, offset: int) -> int:
        """This copy's part of a write (caller holds the order lock). A write of
        :data:`LARGE_WRITE` bytes or more at an aligned offset goes past the page cache
        (``large_writes = "direct"``, the default): through an ``O_DIRECT`` twin of the handle,
        from a page-aligned copy of the data; an unaligned tail, and every write where the file
        system refuses direct I/O, through the page cache. The application's reads still find
        the data in the FUSE mount's own cache while the file stays open; a read after it is
        opened again comes from the disk (the mount's cache starts empty at each open)."""
        if not self._direct or len(data) < LARGE_WRITE or offset % DIRECT_ALIGN:
            return os.pwrite(fh, data, offset)
        dfd = self._direct_fds.get(fh)
        if dfd is None:
            dfd = self._direct_fds[fh] = open_direct(fh)
        if dfd < 0:
            return os.pwrite(fh, data, offset)
        buf: mmap.mmap | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < len(data):
            buf = self._buffers.buf = mmap.mmap(-1, max(len(data), 1 << 20))
        view = memoryview(buf)[: len(data)]
        view[:] = data
        try:
            rest, at = write_direct(dfd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct_fds[fh] = -1  # this file system does not take it: page cache
            os.close(dfd)
            return os.pwrite(fh, data, offset)
        done = at - offset
        if rest:
            try:
                done += os.pwrite(fh, rest, at)
            except OSError:
                if not done:
                    raise
        return done

    def _undo_write(
        self, rel: bytes, fh: int, start: int, length: int, sent: Ticket
    ) -> tuple[list[Ticket | None], Link | None]:
        """Put back on the secondary what this copy holds in ``[start, start + length)``,
        which a WRITE already sent covers but the local write did not take: this copy's bytes
        there and its size (caller holds the order lock). The requests to wait for, and None;
        or, if this copy cannot be read, none, and the link to close once the lock is released
        (the path is then tracked whole, for the resync)."""
        try:
            st = os.fstat(fh)
            reqs = []
            if start < st.st_size:
                want = min(length, st.st_size - start)
                old = os.pread(fh, want, start)
                if len(old) != want:
                    raise OSError(errno.EIO, f"read {len(old)} of {want} bytes back")
                write = p.Request(p.Op.WRITE, rel, data=old, a=start, b=st.st_mtime_ns)
                reqs.append((write, (start, want)))
            if start + length > st.st_size:
                cut = p.Request(p.Op.TRUNCATE, rel, a=st.st_size, b=st.st_mtime_ns)
                reqs.append((cut, (st.st_size, 1 << 62)))
        except OSError as exc:
            return [], self.repl.diverged_locked(sent, f"{rel!r} could not be read back: {exc}")
        return [self._send(req, rng=rng) for req, rng in reqs], None

    def _finish_deferred(self, fh: int) -> None:
        with self._deferred_lock:
            tickets = self._deferred.pop(fh, None)
        for t in tickets or ():
            self.repl.finish(t)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if path is None:
            if fh is not None:
                os.ftruncate(fh, length)
            return
        rel = self._rel(path)
        with self.repl.order:
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._proc(rel), length)
            t = self._send(
                p.Request(p.Op.TRUNCATE, rel, a=length, b=self._mtime(rel)),
                rng=(min(length, 1 << 62), 1 << 62),
            )
        self.repl.finish(t)

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> None:
        if path is None:
            fallocate(fh, mode, offset, size)
            return
        rel = self._rel(path)
        with self.repl.order:
            fallocate(fh, mode, offset, size)
            t = self._send(
                p.Request(
                    p.Op.FALLOCATE, rel, a=offset, b=size, c=mode, d=os.fstat(fh).st_mtime_ns
                ),
                rng=(offset, size),
            )
        self.repl.finish(t)

    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        """Both copies flushed at once; returns when both are durable. The FSYNC the kernel
        sends after each write of an O_DSYNC/O_SYNC handle stays here when that write was the
        latest change of the file: the secondary made it durable before answering it, and
        the answer is waited for with the handle's other deferred writes."""
        t = None
        if path is not None:
            rel = self._rel(path)
            with self.repl.order:
                last = self._durable_last.get(rel)
                if last is None or last[0] != fh or not (datasync or last[1] == p.FLAG_SYNC):
                    t = self._send(p.Request(p.Op.FSYNC, rel, a=1 if datasync else 0))
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        finally:
            self._finish_deferred(fh)
            self.repl.finish(t)

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        rel = self._rel(path or "/")
        with self.repl.order:
            t = self._send(p.Request(p.Op.FSYNC, rel, a=0))
        fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.repl.finish(t)

    def flush(self, path: str | None, fh: int) -> None:
        return None

    def release(self, path: str | None, fh: int) -> None:
        if self._sync_fhs.pop(fh, None) is not None:
            with self.repl.order:
                for key in [k for k, v in self._durable_last.items() if v[0] == fh]:
                    del self._durable_last[key]
            self._finish_deferred(fh)
        dfd = self._direct_fds.pop(fh, -1)
        if dfd >= 0:
            os.close(dfd)
        os.close(fh)

    # ------------------------------------------------------------------ namespace
    def mkdir(self, path: str, mode: int) -> None:
        rel = self._rel(path)
        with self.repl.order:
            os.mkdir(rel, mode, dir_fd=self.fd)
            owner = self._own(rel)
            st = os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
            t = self._send(
                p.Request(
                    p.Op.MKDIR,
                    rel,
                    a=stat.S_IMODE(st.st_mode),
                    b=st.st_mtime_ns,
                    c=owner,
                    d=self._mtime(p.parent_of(rel)),
                ),
                tree=True,
            )
        self.repl.finish(t)

    def mknod(self, path: str, mode: int, dev: int) -> None:
        rel = self._rel(path)
        with self.repl.order:
            os.mknod(rel, mode, dev, dir_fd=self.fd)
            owner = self._own(rel)
            st = os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
            t = self._send(
                p.Request(
                    p.Op.MKNOD, rel, a=st.st_mode, b=dev, c=owner, d=self._mtime(p.parent_of(rel))
                )
            )
            t2 = self._send(p.Request(p.Op.UTIMENS, rel, a=st.st_atime_ns, b=st.st_mtime_ns))
        self.repl.finish(t)
        self.repl.finish(t2)

    def symlink(self, target: str, source: str) -> None:
        """Create the link ``target`` whose content is ``source`` (mfusepy's naming)."""
        rel = self._rel(target)
        with self.repl.order:
            os.symlink(source, rel, dir_fd=self.fd)
            owner = self._own(rel)
            t = self._send(
                p.Request(
                    p.Op.SYMLINK,
                    rel,
                    os.fsencode(source),
                    b=self._mtime(rel),
                    c=owner,
                    d=self._mtime(p.parent_of(rel)),
                )
            )
        self.repl.finish(t)

    def link(self, target: str, source: str) -> None:
        """Create the hard link ``target`` to the existing ``source``."""
        new, old = self._rel(target), self._rel(source)
        with self.repl.order:
            os.link(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
            t = self._send(
                p.Request(p.Op.LINK, new, old, d=self._mtime(p.parent_of(new))), also=old
            )
        self.repl.finish(t)

    def unlink(self, path: str) -> None:
        rel = self._rel(path)
        with self.repl.order:
            os.unlink(rel, dir_fd=self.fd)
            t = self._send(p.Request(p.Op.UNLINK, rel, d=self._mtime(p.parent_of(rel))))
        self.repl.finish(t)

    def rmdir(self, path: str) -> None:
        rel = self._rel(path)
        with self.repl.order:
            os.rmdir(rel, dir_fd=self.fd)
            t = self._send(p.Request(p.Op.RMDIR, rel, d=self._mtime(p.parent_of(rel))), tree=True)
        self.repl.finish(t)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        src, dst = self._rel(old), self._rel(new)
        if flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            raise FuseOSError(errno.EINVAL)
        with self.repl.order:
            # NOREPLACE is checked here: the secondary then does a plain rename; EXCHANGE
            # swaps both names on both sides
            renameat2(self.fd, src, self.fd, dst, flags)
            is_dir = stat.S_ISDIR(os.stat(dst, dir_fd=self.fd, follow_symlinks=False).st_mode)
            if flags == RENAME_EXCHANGE:
                is_dir |= stat.S_ISDIR(os.stat(src, dir_fd=self.fd, follow_symlinks=False).st_mode)
            t = self._send(
                p.Request(
                    p.Op.RENAME,
                    src,
                    dst,
                    a=flags & RENAME_EXCHANGE,
                    c=self._mtime(p.parent_of(src)),
                    d=self._mtime(p.parent_of(dst)),
                ),
                also=dst,
                tree=is_dir,
            )
        self.repl.finish(t)

    # ------------------------------------------------------------------ metadata
    def chmod(self, path: str | None, mode: int) -> None:
        if path is None:
            raise FuseOSError(errno.ENOENT)
        rel = self._rel(path)
        with self.repl.order:
            os.chmod(self._proc(rel), mode)  # noqa: PTH101  (bytes path under /proc)
            t = self._send(p.Request(p.Op.CHMOD, rel, a=stat.S_IMODE(mode)))
        self.repl.finish(t)

    def chown(self, path: str | None, uid: int, gid: int) -> None:
        if path is None:
            raise FuseOSError(errno.ENOENT)
        rel = self._rel(path)
        with self.repl.order:
            os.chown(rel, uid, gid, dir_fd=self.fd, follow_symlinks=False)
            t = self._send(p.Request(p.Op.CHOWN, rel, c=p.pack_owner(uid, gid)))
        self.repl.finish(t)

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> None:
        if path is None:
            raise FuseOSError(errno.ENOENT)
        rel = self._rel(path)
        with self.repl.order:
            if times:
                os.utime(rel, ns=times, dir_fd=self.fd, follow_symlinks=False)
            else:
                os.utime(rel, dir_fd=self.fd, follow_symlinks=False)
            st = os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
            t = self._send(p.Request(p.Op.UTIMENS, rel, a=st.st_atime_ns, b=st.st_mtime_ns))
        self.repl.finish(t)

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> None:
        rel = self._rel(path)
        with self.repl.order:
            os.setxattr(self._proc(rel), name, value, options, follow_symlinks=False)
            t = self._send(p.Request(p.Op.SETXATTR, rel, os.fsencode(name), data=value, a=options))
        self.repl.finish(t)

    def removexattr(self, path: str, name: str) -> None:
        rel = self._rel(path)
        with self.repl.order:
            os.removexattr(self._proc(rel), name, follow_symlinks=False)
            t = self._send(p.Request(p.Op.REMOVEXATTR, rel, os.fsencode(name)))
        self.repl.finish(t)


def mount(repl: PrimaryReplicator, root: int, mountpoint: str, fsname: str) -> None:
    """Serve ``mountpoint`` until it is unmounted (blocks; run it in a thread)."""
    _Fuse(
        ReplicatedFs(repl, root),
        mountpoint,
        foreground=True,
        allow_other=True,
        default_permissions=True,
        fsname=fsname,
        subtype="hakit",
        # libfuse 3.14's default is UINT_MAX, which it rejects with a warning at every mount
        max_threads=MAX_THREADS,
    )
