#!/usr/bin/env python3
"""fuse-python (python-fuse, C extension; its PyPI wheel bundles libfuse 2.9.7)
passthrough, high-level path API, mounted OVER DIR.

  python fusepython_pt.py DIR [--single] [--allow-other]

DIR is opened first; every operation goes to the underlying directory through
that descriptor (os.*(..., dir_fd=root)), data via pread/pwrite.
libfuse2: big writes need -o big_writes (max 128 KiB per WRITE request), and
mounting over a non-empty directory needs -o nonempty.
--single: libfuse single-threaded loop; default multithreaded.
Env HK_REPL=127.0.0.1:PORT: synchronous simulated replication (see _common.py).
"""

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuse
from _common import Stats, ThreadRepl, open_root, rel

fuse.fuse_python_api = (0, 2)


class Passthrough(fuse.Fuse):
    def __init__(self, root_fd, *a, **k):
        super().__init__(*a, **k)
        self.fd = root_fd
        self.stats = Stats()
        self.rep = ThreadRepl()
        self.me = (os.geteuid(), os.getegid())

    def _own(self, r, fd=None):
        ctx = self.GetContext()
        uid, gid = ctx["uid"], ctx["gid"]
        if (uid, gid) != self.me:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(r, uid, gid, dir_fd=self.fd, follow_symlinks=False)

    def getattr(self, path):
        return os.stat(rel(path), dir_fd=self.fd, follow_symlinks=False)

    def access(self, path, mode):
        if not os.access(rel(path), mode, dir_fd=self.fd):
            return -errno.EACCES

    def readlink(self, path):
        return os.readlink(rel(path), dir_fd=self.fd)

    def readdir(self, path, offset):
        d = os.open(rel(path), os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            names = os.listdir(d)
        finally:
            os.close(d)
        for n in [".", ".."] + names:
            yield fuse.Direntry(n)

    def statfs(self):
        return os.statvfs(self.fd)

    def chmod(self, path, mode):
        os.chmod(rel(path), mode, dir_fd=self.fd)
        self.rep.call("chmod", path, offset=mode)

    def chown(self, path, uid, gid):
        os.chown(rel(path), uid, gid, dir_fd=self.fd, follow_symlinks=False)
        self.rep.call("chown", path)

    def utimens(self, path, ts_acc, ts_mod):
        ns = (ts_acc.tv_sec * 10**9 + ts_acc.tv_nsec, ts_mod.tv_sec * 10**9 + ts_mod.tv_nsec)
        os.utime(rel(path), ns=ns, dir_fd=self.fd, follow_symlinks=False)
        self.rep.call("utimens", path)

    def mkdir(self, path, mode):
        os.mkdir(rel(path), mode, dir_fd=self.fd)
        self._own(rel(path))
        self.rep.call("mkdir", path, offset=mode)

    def rmdir(self, path):
        os.rmdir(rel(path), dir_fd=self.fd)
        self.rep.call("rmdir", path)

    def mknod(self, path, mode, dev):
        os.mknod(rel(path), mode, dev, dir_fd=self.fd)
        self._own(rel(path))
        self.rep.call("mknod", path, offset=mode)

    def unlink(self, path):
        os.unlink(rel(path), dir_fd=self.fd)
        self.rep.call("unlink", path)

    def symlink(self, target, path):
        os.symlink(target, rel(path), dir_fd=self.fd)
        self._own(rel(path))
        self.rep.call("symlink", path, target.encode())

    def link(self, target, path):
        os.link(rel(target), rel(path), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.rep.call("link", path, target.encode())

    def rename(self, old, new):
        os.rename(rel(old), rel(new), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.rep.call("rename", old, new.encode())

    def truncate(self, path, length):
        fd = os.open(rel(path), os.O_WRONLY, dir_fd=self.fd)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        self.rep.call("truncate", path, offset=length)

    # file handle = a Python object (an int would be taken as an error code)
    class FH:
        __slots__ = ("fd",)

        def __init__(self, fd):
            self.fd = fd

    def open(self, path, flags):
        return self.FH(os.open(rel(path), flags, dir_fd=self.fd))

    def create(self, path, flags, mode):
        fd = os.open(rel(path), flags | os.O_CREAT, mode, dir_fd=self.fd)
        self._own(None, fd)
        self.rep.call("create", path, offset=mode)
        return self.FH(fd)

    def read(self, path, size, offset, fh):
        return os.pread(fh.fd, size, offset)

    def write(self, path, buf, offset, fh):
        n = os.pwrite(fh.fd, buf, offset)
        self.stats.write(n)
        self.rep.call("write", path, buf[:n], offset)
        return n

    def ftruncate(self, path, length, fh):
        os.ftruncate(fh.fd, length)
        self.rep.call("truncate", path, offset=length)

    def fgetattr(self, path, fh=None):
        return os.fstat(fh.fd) if fh is not None else self.getattr(path)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        (os.fdatasync if datasync else os.fsync)(fh.fd)
        self.rep.call("fsync", path)

    def release(self, path, flags, fh):
        os.close(fh.fd)


def main():
    args = sys.argv[1:]
    pos = [a for a in args if not a.startswith("--")]
    if len(pos) != 1:
        raise SystemExit(__doc__)
    mnt = os.path.abspath(pos[0])
    root = open_root(mnt)  # BEFORE the mount
    o = "nonempty,big_writes,max_write=131072,fsname=hk-fusepython,subtype=hk"
    if "--allow-other" in args:
        o += ",allow_other,default_permissions"
    server = Passthrough(root, dash_s_do="setsingle")
    server.parse(["-f", "-o", o, mnt] + (["-s"] if "--single" in args else []), errex=1)
    try:
        server.main()
    finally:
        server.stats.dump()


if __name__ == "__main__":
    main()
