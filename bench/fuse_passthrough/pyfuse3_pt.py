#!/usr/bin/env python3
"""pyfuse3 passthrough (Cython, libfuse3 low-level inode API, trio), mounted OVER DIR.

  python pyfuse3_pt.py DIR [--offload] [--allow-other]

DIR is opened first; every operation goes to the underlying directory through
that descriptor (os.*(..., dir_fd=root)), data via pread/pwrite.
Inodes: the FUSE inode number is the underlying st_ino (root -> 1); each known
inode keeps (parent inode, name), so a path relative to the root fd is rebuilt
by walking up (directory renames move whole subtrees for free; that path is
also what a replicator would send). Hard links: the last name looked up wins.
--offload: run the blocking syscalls of read/write/fsync/create in trio worker
threads (trio.to_thread) instead of inline in the event loop.
Env HK_REPL=127.0.0.1:PORT: synchronous simulated replication (see _common.py).
"""

import errno
import functools
import os
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyfuse3
import trio
from _common import Stats, TrioRepl, open_root

ROOT = pyfuse3.ROOT_INODE


def _errs(fn):
    """pyfuse3 only understands FUSEError: any other exception kills the loop."""

    @functools.wraps(fn)
    async def w(*a, **k):
        try:
            return await fn(*a, **k)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    return w


class Node:
    __slots__ = ("name", "nlookup", "open", "parent")

    def __init__(self, parent, name):
        self.parent, self.name, self.nlookup, self.open = parent, name, 0, set()


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False  # must stay off: writes would return before replication

    def __init__(self, root_fd, offload):
        super().__init__()
        self.fd = root_fd
        self.root_ino = os.fstat(root_fd).st_ino
        self.nodes = {ROOT: Node(None, b".")}
        self.nodes[ROOT].nlookup = 1 << 60
        self.fh_ino = {}
        self.dirs = {}
        self.stats = Stats()
        self.rep = TrioRepl()
        self.offload = offload
        self.me = (os.geteuid(), os.getegid())

    async def _io(self, fn, *a):
        if self.offload:
            return await trio.to_thread.run_sync(fn, *a)
        return fn(*a)

    # --- inode table ------------------------------------------------------
    def _ino(self, st):
        return ROOT if st.st_ino == self.root_ino else st.st_ino

    def path(self, ino):
        parts = []
        n = self.nodes[ino]
        while n.parent is not None:
            if n.name is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            parts.append(n.name)
            n = self.nodes[n.parent]
        return b"/".join(reversed(parts)) if parts else b"."

    def _child(self, parent, name):
        p = self.path(parent)
        return name if p == b"." else p + b"/" + name

    def _entry(self, st):
        e = pyfuse3.EntryAttributes()
        for k in (
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_rdev",
            "st_size",
            "st_blksize",
            "st_blocks",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            setattr(e, k, getattr(st, k))
        e.st_ino = self._ino(st)
        e.entry_timeout = 1.0  # libfuse high-level defaults
        e.attr_timeout = 1.0
        return e

    def _remember(self, parent, name, st):
        ino = self._ino(st)
        n = self.nodes.get(ino)
        if n is None:
            n = self.nodes[ino] = Node(parent, name)
        elif ino != ROOT:
            n.parent, n.name = parent, name
        n.nlookup += 1
        return self._entry(st)

    def _own(self, rel_or_fd, ctx):
        if (ctx.uid, ctx.gid) != self.me:
            if isinstance(rel_or_fd, int):
                os.fchown(rel_or_fd, ctx.uid, ctx.gid)
            else:
                os.chown(rel_or_fd, ctx.uid, ctx.gid, dir_fd=self.fd, follow_symlinks=False)

    def _lstat(self, r):
        return os.stat(r, dir_fd=self.fd, follow_symlinks=False)

    # --- metadata -----------------------------------------------------------
    @_errs
    async def lookup(self, parent, name, ctx=None):
        return self._remember(parent, name, self._lstat(self._child(parent, name)))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is not None and ino != ROOT:
                node.nlookup -= n
                if node.nlookup <= 0 and not node.open:
                    del self.nodes[ino]

    @_errs
    async def getattr(self, ino, ctx=None):
        n = self.nodes[ino]
        if n.name is None and n.open:  # unlinked but still open
            return self._entry(os.fstat(next(iter(n.open))))
        return self._entry(self._lstat(self.path(ino)))

    @_errs
    async def setattr(self, ino, attr, fields, fh, ctx):
        r = self.path(ino) if fh is None else None
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                fd = os.open(r, os.O_WRONLY, dir_fd=self.fd)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
            await self.rep.call("truncate", self._relstr(ino), offset=attr.st_size)
        if fields.update_mode:
            os.chmod(
                fh if fh is not None else r,
                stat.S_IMODE(attr.st_mode),
                **({} if fh is not None else {"dir_fd": self.fd}),
            )
            await self.rep.call("chmod", self._relstr(ino), offset=attr.st_mode)
        if fields.update_uid or fields.update_gid:
            u = attr.st_uid if fields.update_uid else -1
            g = attr.st_gid if fields.update_gid else -1
            os.chown(r or self.path(ino), u, g, dir_fd=self.fd, follow_symlinks=False)
            await self.rep.call("chown", self._relstr(ino))
        if fields.update_atime or fields.update_mtime:
            st = self._lstat(self.path(ino)) if fh is None else os.fstat(fh)
            a = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            m = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            if fh is not None:
                os.utime(fh, ns=(a, m))
            else:
                os.utime(r, ns=(a, m), dir_fd=self.fd, follow_symlinks=False)
            await self.rep.call("utimens", self._relstr(ino))
        return await self.getattr(ino, ctx)

    def _relstr(self, ino):
        try:
            return self.path(ino).decode("utf-8", "surrogateescape")
        except pyfuse3.FUSEError:
            return ""

    @_errs
    async def readlink(self, ino, ctx):
        return os.readlink(self.path(ino), dir_fd=self.fd)

    @_errs
    async def statfs(self, ctx):
        sv = os.statvfs(self.fd)
        s = pyfuse3.StatvfsData()
        for k in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(s, k, getattr(sv, k))
        return s

    # --- directories ----------------------------------------------------------
    @_errs
    async def opendir(self, ino, ctx):
        fd = os.open(self.path(ino), os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            with os.scandir(fd) as it:
                names = sorted(os.fsencode(e.name) for e in it)
        finally:
            os.close(fd)
        fh = max(self.dirs, default=0) + 1
        self.dirs[fh] = (ino, names)
        return fh

    @_errs
    async def readdir(self, fh, start_id, token):
        ino, names = self.dirs[fh]
        base = self.path(ino)
        for i in range(start_id, len(names)):
            name = names[i]
            try:
                st = self._lstat(name if base == b"." else base + b"/" + name)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry(st), i + 1):
                return
            self._remember(ino, name, st)  # readdirplus: counts as a lookup

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    @_errs
    async def mkdir(self, parent, name, mode, ctx):
        r = self._child(parent, name)
        os.mkdir(r, mode, dir_fd=self.fd)
        self._own(r, ctx)
        await self.rep.call("mkdir", os.fsdecode(r), offset=mode)
        return self._remember(parent, name, self._lstat(r))

    @_errs
    async def mknod(self, parent, name, mode, rdev, ctx):
        r = self._child(parent, name)
        os.mknod(r, mode, rdev, dir_fd=self.fd)
        self._own(r, ctx)
        await self.rep.call("mknod", os.fsdecode(r), offset=mode)
        return self._remember(parent, name, self._lstat(r))

    @_errs
    async def symlink(self, parent, name, target, ctx):
        r = self._child(parent, name)
        os.symlink(target, r, dir_fd=self.fd)
        self._own(r, ctx)
        await self.rep.call("symlink", os.fsdecode(r), target)
        return self._remember(parent, name, self._lstat(r))

    @_errs
    async def link(self, ino, new_parent, new_name, ctx):
        r = self._child(new_parent, new_name)
        os.link(self.path(ino), r, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        await self.rep.call("link", os.fsdecode(r), self.path(ino))
        return self._remember(new_parent, new_name, self._lstat(r))

    def _forget_name(self, parent, name, st):
        n = self.nodes.get(self._ino(st))
        if n is not None and n.parent == parent and n.name == name:
            n.name = None

    @_errs
    async def unlink(self, parent, name, ctx):
        r = self._child(parent, name)
        st = self._lstat(r)
        os.unlink(r, dir_fd=self.fd)
        self._forget_name(parent, name, st)
        await self.rep.call("unlink", os.fsdecode(r))

    @_errs
    async def rmdir(self, parent, name, ctx):
        r = self._child(parent, name)
        st = self._lstat(r)
        os.rmdir(r, dir_fd=self.fd)
        self._forget_name(parent, name, st)
        await self.rep.call("rmdir", os.fsdecode(r))

    @_errs
    async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE/NOREPLACE not done here
        ro, rn = self._child(p_old, n_old), self._child(p_new, n_new)
        st = self._lstat(ro)
        try:
            st_victim = self._lstat(rn)
        except FileNotFoundError:
            st_victim = None
        os.rename(ro, rn, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        if st_victim is not None:
            self._forget_name(p_new, n_new, st_victim)
        n = self.nodes.get(self._ino(st))
        if n is not None:
            n.parent, n.name = p_new, n_new
        await self.rep.call("rename", os.fsdecode(ro), rn)

    # --- files ------------------------------------------------------------------
    def _opened(self, ino, fd):
        self.fh_ino[fd] = ino
        self.nodes[ino].open.add(fd)
        return pyfuse3.FileInfo(fh=fd)

    @_errs
    async def open(self, ino, flags, ctx):
        fd = await self._io(
            functools.partial(os.open, self.path(ino), flags & ~os.O_CREAT, dir_fd=self.fd)
        )
        return self._opened(ino, fd)

    @_errs
    async def create(self, parent, name, mode, flags, ctx):
        r = self._child(parent, name)
        fd = await self._io(functools.partial(os.open, r, flags | os.O_CREAT, mode, dir_fd=self.fd))
        self._own(fd, ctx)
        await self.rep.call("create", os.fsdecode(r), offset=mode)
        e = self._remember(parent, name, os.fstat(fd))
        return self._opened(e.st_ino, fd), e

    @_errs
    async def read(self, fh, off, size):
        return await self._io(os.pread, fh, size, off)

    @_errs
    async def write(self, fh, off, buf):
        n = await self._io(os.pwrite, fh, buf, off)
        self.stats.write(n)
        if self.rep.enabled:
            await self.rep.call(
                "write", self._relstr(self.fh_ino[fh]), buf[:n] if n < len(buf) else buf, off
            )
        return n

    async def flush(self, fh):
        pass

    @_errs
    async def fsync(self, fh, datasync):
        await self._io(os.fdatasync if datasync else os.fsync, fh)
        await self.rep.call("fsync", self._relstr(self.fh_ino[fh]))

    @_errs
    async def release(self, fh):
        ino = self.fh_ino.pop(fh)
        os.close(fh)
        n = self.nodes.get(ino)
        if n is not None:
            n.open.discard(fh)
            if n.nlookup <= 0 and not n.open:
                del self.nodes[ino]


def main():
    args = sys.argv[1:]
    pos = [a for a in args if not a.startswith("--")]
    if len(pos) != 1:
        raise SystemExit(__doc__)
    mnt = os.path.abspath(pos[0])
    root = open_root(mnt)  # BEFORE the mount
    ops = Passthrough(root, "--offload" in args)
    opts = set(pyfuse3.default_options)  # {'default_permissions'}? see doc
    opts |= {"fsname=hk-pyfuse3", "subtype=hk"}
    if "--allow-other" in args:
        opts |= {"allow_other", "default_permissions"}
    pyfuse3.init(ops, mnt, opts)

    async def run():
        async with trio.open_nursery() as nursery:
            if ops.rep.enabled:
                await ops.rep.connect()
                nursery.start_soon(ops.rep.reader)
            await pyfuse3.main(max_tasks=64)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=False)  # unmounted from outside (fusermount3 -u)
        ops.stats.dump()


if __name__ == "__main__":
    main()
