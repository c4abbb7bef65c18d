"""The secondary's side of replication: apply decoded requests to the replicated directories.

:class:`Applier` receives one descriptor per replicated directory (``roots[i]`` for ``root = i``),
opened by the caller before anything is mounted over the directories. Every access is relative
to those descriptors (``dir_fd=``): a path is checked with :func:`protocol.check_path`, its
parent is resolved component by component with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink on the
way is ``ENOTDIR``, never followed), and the last component is never followed either.

Contracts of :meth:`Applier.apply`:

- When it returns a reply with ``err == 0``, the change is in the file system (page cache) with
  the exact mode, owner and modification times of the request (``KEEP`` fields untouched, parent
  times set after the operation). With ``durable=True`` it is also on disk: ``fdatasync`` of the
  written file (``fsync`` for CREATE), ``fsync`` of the parent directory (both for RENAME) for
  namespace changes, and for metadata changes ``fsync`` of the object when it is a regular file
  or directory, else of its parent.
- :meth:`Applier.open_write` and :meth:`Applier.end_write` apply a WRITE whose data the caller
  writes itself to the descriptor as it arrives (the server's large WRITEs), with the same
  checks, reply and caching as :meth:`Applier.apply`.
- An ``OSError`` never escapes: the reply carries its errno and a UTF-8 message. So do values
  the system refuses (``ValueError``/``OverflowError`` → ``EINVAL``). A failed request may have
  been partly applied (as the same failure would be locally); the primary decides what to do.
- :class:`ProtocolError` is raised (the connection must be closed) for a refused path, a root
  index out of range, a bad symlink target, or an op the server handles (HELLO, SYNCFS, …).

Per operation, beyond the table in :mod:`hakit.repl.protocol`:

- ``.`` (the replicated directory itself) may be stat'ed, listed, fsync'ed, checksummed and have
  its metadata changed, but not created, removed or renamed: ``EINVAL``.
- CREATE replaces whatever is at the path (a directory with its whole tree); REMOVE of a missing
  path succeeds. RENAME accepts flags 0 and ``RENAME_EXCHANGE`` (``EINVAL`` otherwise).
- SUMS covers ``[b, b + c)`` clipped at the end of the file: one digest per block of ``a`` bytes,
  the block holding the end of file is short, none for blocks past it.
- LIST replies are sorted by name; a listing larger than ``MAX_DATA`` is refused with ``E2BIG``
  (the protocol has no continuation: about 300,000 entries with short names).
- META: size (regular files, ``d != KEEP``), owner, mode (not for symlinks), then mtime. A mode
  with type bits that differ from the object's type is ``EINVAL``.

Caveats:

- The applier assumes it is the only writer of the directories (they are bind-mounted read-only
  over themselves): it caches descriptors of files (``O_WRONLY``, for WRITE, TRUNCATE,
  FALLOCATE, FSYNC, META) and of directories (parents) by path, dropping them when hakit itself
  unlinks, renames or removes that path (all of them when a directory is moved or removed).
- CHMOD, SETXATTR and REMOVEXATTR go through ``/proc/self/fd`` of an ``O_PATH`` descriptor, so
  ``/proc`` must be mounted. A symlink's mode cannot be changed (``EOPNOTSUPP``, as on Linux).
- MKNOD carries no modification time: the node keeps the time of its creation.
- Not thread-safe: one connection applies at a time (the server guarantees it). :func:`syncfs`
  may be called from another thread on :attr:`Applier.roots`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hakit.repl import protocol as p
from hakit.repl.protocol import KEEP, Op, ProtocolError, Reply, RequestHead, StatRec

FILE_CACHE_SIZE = 64  # open regular files kept for WRITE streams (LRU)
DIR_CACHE_SIZE = 64  # open parent directories kept for path resolution (LRU)
SUMS_CHUNK = 1 << 20  # bytes read at once while hashing a block
_METADATA = frozenset({Op.CHMOD, Op.CHOWN, Op.UTIMENS, Op.SETXATTR, Op.REMOVEXATTR, Op.META})
#: the operations :meth:`Applier.apply` takes (the server handles HELLO, SYNCFS and resync marks)
APPLIED = frozenset(p.MUTATING | {Op.FSYNC, Op.STAT, Op.LIST, Op.SUMS})

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_UTIME_OMIT = (1 << 30) - 2
_AT_SYMLINK_NOFOLLOW = 0x100

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)
_Times = ctypes.c_long * 4  # struct timespec[2]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, _Times, ctypes.c_int]
_libc.futimens.argtypes = [ctypes.c_int, _Times]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes += [ctypes.c_uint]
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _check(ret: int) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _times(atime_ns: int, mtime_ns: int) -> ctypes.Array[ctypes.c_long]:
    a_sec, a_nsec = (0, _UTIME_OMIT) if atime_ns == KEEP else divmod(atime_ns, 1_000_000_000)
    m_sec, m_nsec = (0, _UTIME_OMIT) if mtime_ns == KEEP else divmod(mtime_ns, 1_000_000_000)
    return _Times(a_sec, a_nsec, m_sec, m_nsec)


def set_times(fd: int, name: bytes | None, atime_ns: int, mtime_ns: int) -> None:
    """Set times of ``name`` in directory ``fd`` (not following it), or of ``fd`` itself.

    ``KEEP`` leaves that time exactly as it is (``UTIME_OMIT``); both ``KEEP`` does nothing.
    """
    if atime_ns == KEEP and mtime_ns == KEEP:
        return
    if name is None:
        _check(_libc.futimens(fd, _times(atime_ns, mtime_ns)))
    else:
        _check(_libc.utimensat(fd, name, _times(atime_ns, mtime_ns), _AT_SYMLINK_NOFOLLOW))


DIRECT_ALIGN = 4096  # O_DIRECT writes: file offset, length and buffer address multiples


def open_direct(fd: int) -> int:
    """A second, ``O_DIRECT`` write descriptor of the file ``fd`` is open on (the same file
    even if renamed or unlinked since), or -1 where the file system has no direct I/O."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def write_direct(direct_fd: int, view: memoryview, offset: int) -> tuple[memoryview, int]:
    """Write the aligned start of ``view`` (a page-aligned buffer) at ``offset`` through
    ``direct_fd``, past the page cache; returns what is left to write through the page cache
    (an unaligned tail, everything if ``offset`` is not aligned, or the rest after a failure
    once some bytes were written). Raises ``OSError`` only if nothing was written
    (``EINVAL``: the file system does not take this alignment)."""
    if offset % DIRECT_ALIGN:
        return view, offset
    start = offset
    while len(view) >= DIRECT_ALIGN:
        try:
            n = os.pwrite(direct_fd, view[: len(view) - len(view) % DIRECT_ALIGN], offset)
        except OSError:
            if offset == start:
                raise
            break  # the caller's buffered write of the rest reports it
        view, offset = view[n:], offset + n
        if n % DIRECT_ALIGN:
            break  # short: the rest is not aligned any more
    return view, offset


def syncfs(fd: int) -> None:
    """``syncfs(2)``: everything written to the file system holding ``fd`` is on disk."""
    _check(_libc.syncfs(fd))


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    """``renameat2(2)``: ``RENAME_EXCHANGE`` swaps both names atomically, ``RENAME_NOREPLACE``
    fails with EEXIST instead of replacing."""
    _check(_libc.renameat2(old_dir, old, new_dir, new, flags))


def _xattr_step(path: bytes, attr: str | bytes, change: Callable[..., None], *args: Any) -> None:
    """One xattr change of a resync; an attribute this file system or this process may not
    set (SELinux labels, trusted.*, ACLs on a noacl mount) is logged, not fatal."""
    try:
        change(*args)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        log.warning("%r: xattr %r left as it is on this node: %s", path, attr, exc.strerror)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with any mode (``os.posix_fallocate`` only does mode 0)."""
    _check(_libc.fallocate(fd, mode, offset, length))


class _FdCache:
    """LRU of open descriptors keyed by ``(root, path)``; closes what it drops.

    :meth:`put` never closes a descriptor handed out during the current operation: eviction
    happens in :meth:`trim`, which the applier calls once the operation is over.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._fds: collections.OrderedDict[tuple[int, bytes], int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._fds)

    def get(self, key: tuple[int, bytes]) -> int | None:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
        return fd

    def put(self, key: tuple[int, bytes], fd: int) -> None:
        self.drop(key)
        self._fds[key] = fd

    def drop(self, key: tuple[int, bytes]) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def trim(self) -> None:
        while len(self._fds) > self._size:
            os.close(self._fds.popitem(last=False)[1])

    def clear(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


Handler = Callable[[RequestHead, bytes, bytes, "bytes | memoryview"], bytes | None]


class Applier:
    """Applies requests to the directories ``roots`` (see the module docstring for contracts).

    ``roots`` stay owned by the caller: :meth:`close` closes only the applier's cached
    descriptors, and the applier may still be used afterwards (it reopens what it needs).
    """

    def __init__(self, roots: Sequence[int], *, durable: bool = False) -> None:
        for fd in roots:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise ValueError(f"root descriptor {fd} is not a directory")
        self._roots = tuple(roots)
        self.durable = durable
        self._files = _FdCache(FILE_CACHE_SIZE)
        self._dirs = _FdCache(DIR_CACHE_SIZE)
        self._stale = False  # a directory moved or vanished: drop every cached descriptor
        self._mtime_only = _Times(0, _UTIME_OMIT, 0, 0)  # reused by _done_file
        self._handlers: dict[Op, Handler] = {
            op: getattr(self, f"_{op.name.lower()}") for op in APPLIED
        }

    @property
    def roots(self) -> tuple[int, ...]:
        """The directory descriptors, by root index (owned by the caller)."""
        return self._roots

    @property
    def cached_files(self) -> int:
        """How many regular files are held open (for tests and status)."""
        return len(self._files)

    def close(self) -> None:
        """Close every cached descriptor (not the roots)."""
        self._files.clear()
        self._dirs.clear()

    def apply(
        self, head: RequestHead, path: bytes, path2: bytes, data: bytes | memoryview
    ) -> Reply:
        """Apply one request; the reply has ``head.seq``. Raises only :class:`ProtocolError`."""
        handler = self._handlers.get(head.op)
        if handler is None:
            raise ProtocolError(f"{head.op.name} is not for the applier")
        if not 0 <= head.root < len(self._roots):
            raise ProtocolError(f"no replicated directory {head.root}")
        p.check_path(path)
        try:
            out = handler(head, path, path2, data)
            if self.durable and head.op in _METADATA:
                self._sync_object(head.root, path)
        except OSError as exc:
            code = exc.errno or errno.EIO
            text = f"{head.op.name} {os.fsdecode(path)}: {exc.strerror or os.strerror(code)}"
            return Reply(head.seq, code, text.encode("utf-8", "backslashreplace"))
        except (ValueError, OverflowError) as exc:
            text = f"{head.op.name} {os.fsdecode(path)}: {exc}"
            return Reply(head.seq, errno.EINVAL, text.encode("utf-8", "backslashreplace"))
        finally:
            self._settle()
        return Reply(head.seq, 0, out or b"")

    # ------------------------------------------------------------------ streamed writes
    def open_write(self, head: RequestHead, path: bytes) -> int:
        """For a WRITE whose data is written as it arrives: the descriptor to ``pwrite`` it to
        (borrowed, valid until :meth:`end_write`). Raises ``OSError`` (answer it with
        :meth:`end_write`) or :class:`ProtocolError`, as :meth:`apply` would."""
        if head.op != Op.WRITE:
            raise ProtocolError(f"{head.op.name} is not a WRITE")
        if not 0 <= head.root < len(self._roots):
            raise ProtocolError(f"no replicated directory {head.root}")
        p.check_path(path)
        return self._file(head.root, path)

    def end_write(
        self, head: RequestHead, path: bytes, fd: int, error: OSError | None = None
    ) -> Reply:
        """The reply of a streamed WRITE once its data is in ``fd``, or ``error`` (the first
        failure: of :meth:`open_write` or of a ``pwrite``); same contract as :meth:`apply`."""
        try:
            if error is not None:
                raise error
            self._done_file(fd, head.b, head.flags)
        except OSError as exc:
            code = exc.errno or errno.EIO
            text = f"{head.op.name} {os.fsdecode(path)}: {exc.strerror or os.strerror(code)}"
            return Reply(head.seq, code, text.encode("utf-8", "backslashreplace"))
        finally:
            self._settle()
        return Reply(head.seq)

    # ------------------------------------------------------------------ resolution
    def _settle(self) -> None:
        if self._stale:
            self._stale = False
            self.close()
        self._files.trim()
        self._dirs.trim()

    def _dir(self, root: int, path: bytes) -> int:
        """A descriptor of directory ``path``, walked without following symlinks (borrowed)."""
        if path == b".":
            return self._roots[root]
        fd = self._dirs.get((root, path))
        if fd is not None:
            return fd
        parts = path.split(b"/")
        base, start = self._roots[root], 0
        for i in range(len(parts) - 1, 0, -1):
            hit = self._dirs.get((root, b"/".join(parts[:i])))
            if hit is not None:
                base, start = hit, i
                break
        fd = base
        try:
            for part in parts[start:]:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != base:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != base:
                os.close(fd)
            raise
        self._dirs.put((root, path), fd)
        return fd

    def _at(self, root: int, path: bytes) -> tuple[int, bytes]:
        """``(parent descriptor, name)``; ``.`` is ``(root, b".")``."""
        if path == b".":
            return self._roots[root], path
        parent, _, name = path.rpartition(b"/")
        return self._dir(root, parent or b"."), name

    def _entry(self, root: int, path: bytes) -> tuple[int, bytes]:
        """Like :meth:`_at` for namespace changes, which the root itself refuses."""
        if path == b".":
            raise OSError(errno.EINVAL, "not allowed on the replicated directory itself")
        return self._at(root, path)

    def _file(self, root: int, path: bytes) -> int:
        """A cached ``O_WRONLY`` descriptor of regular file ``path`` (borrowed)."""
        fd = self._files.get((root, path))
        if fd is not None:
            return fd
        parent, name = self._at(root, path)
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, "not a file")
        fd = os.open(name, _WRITE_FLAGS, dir_fd=parent)
        self._files.put((root, path), fd)
        return fd

    @contextmanager
    def _opath(self, root: int, path: bytes) -> Iterator[str]:
        """A ``/proc/self/fd`` name of the object itself (a symlink is not followed)."""
        parent, name = self._at(root, path)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def _chmod_object(self, root: int, path: bytes, mode: int) -> None:
        """chmod without following a final symlink (on a symlink: ``EOPNOTSUPP``)."""
        with self._opath(root, path) as proc:
            os.chmod(proc, stat.S_IMODE(mode))  # noqa: PTH101 (a /proc magic link, not a Path)

    def _sync_object(self, root: int, path: bytes) -> None:
        """Durable metadata: fsync the object (a file or directory), else its parent."""
        parent, name = self._at(root, path)
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            os.fsync(parent)
            return
        fd = os.open(name, _READ_FLAGS, dir_fd=parent)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _done_file(self, fd: int, mtime: int, flags: int = 0) -> None:
        """After a change of a file's content: its mtime, then durability (a WRITE flagged
        ``FLAG_SYNC`` is ``fsync``ed, mtime included; ``FLAG_DSYNC``, as every change with
        ``durable``, ``fdatasync``ed)."""
        if mtime != KEEP:
            times = self._mtime_only
            times[2], times[3] = divmod(mtime, 1_000_000_000)
            _check(_libc.futimens(fd, times))
        if flags & p.FLAG_SYNC:
            os.fsync(fd)
        elif self.durable or flags & p.FLAG_DSYNC:
            os.fdatasync(fd)

    def _done_entry(self, parent: int, pmtime: int) -> None:
        """After a namespace change in ``parent``: its mtime, then durability."""
        set_times(parent, None, KEEP, pmtime)
        if self.durable:
            os.fsync(parent)

    def _set_owner_mode(self, parent: int, name: bytes, owner: int, mode: int) -> None:
        """Owner first (it clears set-id bits), then mode; ``name`` was just created here."""
        uid, gid = p.unpack_owner(owner)
        if (uid, gid) != (-1, -1):
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        if mode != KEEP:
            os.chmod(name, stat.S_IMODE(mode), dir_fd=parent)

    # ------------------------------------------------------------------ file content
    def _write(self, h: RequestHead, path: bytes, _p2: bytes, data: bytes | memoryview) -> None:
        fd = self._file(h.root, path)
        view, off = memoryview(data), h.a
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
        self._done_file(fd, h.b, h.flags)

    def _truncate(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        fd = self._file(h.root, path)
        os.ftruncate(fd, h.a)
        self._done_file(fd, h.b)

    def _fallocate(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        fd = self._file(h.root, path)
        if h.c == 0:
            os.posix_fallocate(fd, h.a, h.b)
        else:
            fallocate(fd, h.c, h.a, h.b)
        self._done_file(fd, h.d)

    def _fsync(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        fd = self._files.get((h.root, path))  # a cached descriptor names a regular file
        if fd is not None:
            (os.fdatasync if h.a == 1 else os.fsync)(fd)
            return
        parent, name = self._at(h.root, path)
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISREG(mode):
            fd = self._file(h.root, path)
        elif stat.S_ISDIR(mode):
            fd = self._dir(h.root, path)
        else:
            fd = parent
        (os.fdatasync if h.a == 1 else os.fsync)(fd)

    # ------------------------------------------------------------------ namespace
    def _create(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        parent, name = self._entry(h.root, path)
        self._files.drop((h.root, path))
        try:
            old = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(old):
                self._stale = True
                shutil.rmtree(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)
        mode = stat.S_IMODE(h.a)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, mode, dir_fd=parent)
        self._files.put((h.root, path), fd)
        uid, gid = p.unpack_owner(h.c)
        if (uid, gid) != (-1, -1):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        set_times(fd, None, KEEP, h.b)
        if self.durable:
            os.fsync(fd)
        self._done_entry(parent, h.d)

    def _mknod(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        parent, name = self._entry(h.root, path)
        os.mknod(name, h.a, h.b, dir_fd=parent)
        self._set_owner_mode(parent, name, h.c, h.a)
        self._done_entry(parent, h.d)

    def _mkdir(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        parent, name = self._entry(h.root, path)
        os.mkdir(name, stat.S_IMODE(h.a), dir_fd=parent)
        self._set_owner_mode(parent, name, h.c, h.a)
        set_times(parent, name, KEEP, h.b)
        self._done_entry(parent, h.d)

    def _symlink(self, h: RequestHead, path: bytes, target: bytes, _d: object) -> None:
        if not target or b"\0" in target:
            raise ProtocolError(f"bad symlink target {target!r}")
        parent, name = self._entry(h.root, path)
        os.symlink(target, name, dir_fd=parent)
        self._set_owner_mode(parent, name, h.c, KEEP)
        set_times(parent, name, KEEP, h.b)
        self._done_entry(parent, h.d)

    def _link(self, h: RequestHead, path: bytes, existing: bytes, _d: object) -> None:
        p.check_path(existing)
        src_parent, src_name = self._entry(h.root, existing)
        parent, name = self._entry(h.root, path)
        os.link(src_name, name, src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False)
        self._done_entry(parent, h.d)

    def _unlink(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        parent, name = self._entry(h.root, path)
        self._files.drop((h.root, path))
        os.unlink(name, dir_fd=parent)
        self._done_entry(parent, h.d)

    def _rmdir(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        parent, name = self._entry(h.root, path)
        os.rmdir(name, dir_fd=parent)
        self._dirs.drop((h.root, path))
        self._done_entry(parent, h.d)

    def _rename(self, h: RequestHead, path: bytes, new: bytes, _d: object) -> None:
        p.check_path(new)
        if h.a not in (0, RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, f"rename flags {h.a:#x} are not supported")
        old_parent, old_name = self._entry(h.root, path)
        new_parent, new_name = self._entry(h.root, new)
        moved = os.stat(old_name, dir_fd=old_parent, follow_symlinks=False).st_mode
        tree = stat.S_ISDIR(moved)
        if h.a == RENAME_EXCHANGE:
            other = os.stat(new_name, dir_fd=new_parent, follow_symlinks=False).st_mode
            tree = tree or stat.S_ISDIR(other)
        self._files.drop((h.root, path))
        self._files.drop((h.root, new))
        if h.a == RENAME_EXCHANGE:
            renameat2(old_parent, old_name, new_parent, new_name, RENAME_EXCHANGE)
        else:
            os.rename(old_name, new_name, src_dir_fd=old_parent, dst_dir_fd=new_parent)
        if tree:
            self._stale = True  # cached paths below it are wrong now (cleared after this op)
        set_times(old_parent, None, KEEP, h.c)
        set_times(new_parent, None, KEEP, h.d)
        if self.durable:
            os.fsync(old_parent)
            if new_parent != old_parent:
                os.fsync(new_parent)

    def _remove(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        try:
            parent, name = self._entry(h.root, path)
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISDIR(mode):
            self._stale = True
            shutil.rmtree(name, dir_fd=parent)
        else:
            self._files.drop((h.root, path))
            os.unlink(name, dir_fd=parent)
        if self.durable:
            os.fsync(parent)

    # ------------------------------------------------------------------ metadata
    def _chmod(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        self._chmod_object(h.root, path, h.a)

    def _chown(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        uid, gid = p.unpack_owner(h.c)
        if (uid, gid) != (-1, -1):
            parent, name = self._at(h.root, path)
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)

    def _utimens(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> None:
        parent, name = self._at(h.root, path)
        set_times(parent, name, h.a, h.b)

    def _setxattr(self, h: RequestHead, path: bytes, attr: bytes, data: bytes | memoryview) -> None:
        with self._opath(h.root, path) as proc:
            os.setxattr(proc, attr, data, h.a)

    def _removexattr(self, h: RequestHead, path: bytes, attr: bytes, _d: object) -> None:
        with self._opath(h.root, path) as proc:
            os.removexattr(proc, attr)

    def _meta(self, h: RequestHead, path: bytes, _p2: bytes, data: bytes | memoryview) -> None:
        wanted = p.decode_xattrs(data) if len(data) else None  # refused before any change
        parent, name = self._at(h.root, path)
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if h.a != KEEP and stat.S_IFMT(h.a) not in (0, stat.S_IFMT(mode)):
            raise OSError(errno.EINVAL, "META: the object has another type")
        if stat.S_ISREG(mode) and h.d != KEEP:
            fd = self._file(h.root, path)
            os.ftruncate(fd, h.d)
            if self.durable:
                os.fdatasync(fd)
        uid, gid = p.unpack_owner(h.c)
        if (uid, gid) != (-1, -1):
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        if h.a != KEEP and not stat.S_ISLNK(mode):
            self._chmod_object(h.root, path, h.a)
        if wanted is not None:  # after chown, which clears security.capability
            self._replace_xattrs(h.root, path, wanted)
        set_times(parent, name, KEEP, h.b)

    def _replace_xattrs(self, root: int, path: bytes, wanted: dict[bytes, bytes]) -> None:
        """Make the object's extended attributes exactly ``wanted``."""
        with self._opath(root, path) as proc:
            try:
                have = os.listxattr(proc)
            except OSError as exc:  # a file system without xattrs has none to remove
                if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and not wanted:
                    return
                raise
            for attr in have:
                if os.fsencode(attr) not in wanted:
                    _xattr_step(path, attr, os.removexattr, proc, attr)
            for attr_name, value in wanted.items():
                with contextlib.suppress(OSError):
                    if os.getxattr(proc, attr_name) == value:
                        continue
                _xattr_step(path, attr_name, os.setxattr, proc, attr_name, value)

    # ------------------------------------------------------------------ reads (resync)
    def _stat(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> bytes:
        parent, name = self._at(h.root, path)
        return StatRec.of(os.stat(name, dir_fd=parent, follow_symlinks=False)).encode()

    def _list(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> bytes:
        # a fresh open file description: scandir must not move a cached descriptor's offset
        fd = os.open(b".", _DIR_FLAGS, dir_fd=self._dir(h.root, path))
        entries: list[tuple[bytes, StatRec]] = []
        size = 0
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = os.fsencode(entry.name)
                    size += p.LIST_HEAD.size + len(name)
                    if size > p.MAX_DATA:
                        raise OSError(errno.E2BIG, "listing larger than a reply")
                    entries.append((name, StatRec.of(entry.stat(follow_symlinks=False))))
        finally:
            os.close(fd)
        entries.sort()
        return p.encode_listing(entries)

    def _sums(self, h: RequestHead, path: bytes, _p2: bytes, _d: object) -> bytes:
        block, start, length = h.a, h.b, h.c
        if block <= 0 or start < 0 or length < 0:
            raise OSError(errno.EINVAL, f"bad SUMS range (block {block}, {start}+{length})")
        if -(-length // block) * p.DIGEST_SIZE > p.MAX_DATA:
            raise OSError(errno.E2BIG, "too many blocks for one reply")
        parent, name = self._at(h.root, path)
        if not stat.S_ISREG(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        fd = os.open(name, _READ_FLAGS, dir_fd=parent)
        try:
            end = min(start + length, os.fstat(fd).st_size)
            buf = memoryview(bytearray(min(block, SUMS_CHUNK)))
            out = bytearray()
            for off in range(start, end, block):
                digest = hashlib.blake2b(digest_size=p.DIGEST_SIZE)
                pos, stop = off, min(off + block, end)
                while pos < stop:
                    n = os.preadv(fd, [buf[: min(len(buf), stop - pos)]], pos)
                    if n == 0:
                        break
                    digest.update(buf[:n])
                    pos += n
                out += digest.digest()
        finally:
            os.close(fd)
        return bytes(out)
