#!/usr/bin/env python3
"""mfusepy passthrough (ctypes, libfuse3 high-level path API), mounted OVER DIR.

  FUSE_LIBRARY_NAME=fuse3 python mfusepy_pt.py DIR [--single] [--allow-other]

DIR is opened first; every operation then goes to the underlying directory
through that descriptor (os.*(..., dir_fd=root)); data via pread/pwrite.
--single: libfuse single-threaded loop (-s); default: libfuse multithreaded loop.
Env HK_REPL=127.0.0.1:PORT: synchronous simulated replication (see _common.py).
"""

import errno
import os
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
from _common import Stats, ThreadRepl, open_root, rel
from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context


def _dtype(e):
    if e.is_symlink():
        return stat.S_IFLNK
    if e.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if e.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return e.stat(follow_symlinks=False).st_mode & 0o170000


STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_ino", "st_rdev")


class Passthrough(Operations):
    use_ns = True

    def __init__(self, root_fd):
        self.fd = root_fd
        self.stats = Stats()
        self.rep = ThreadRepl()
        self.me = (os.geteuid(), os.getegid())

    def _own(self, r, fd=None):
        """New objects belong to the caller, not to the (root) daemon."""
        uid, gid, _ = fuse_get_context()
        if (uid, gid) != self.me:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(r, uid, gid, dir_fd=self.fd, follow_symlinks=False)

    # --- metadata -------------------------------------------------------
    def init_with_config(self, conn, config):
        if config is not None:  # same as the libfuse high-level defaults, made explicit
            config.entry_timeout = 1.0
            config.attr_timeout = 1.0
            config.use_ino = 1
        if conn is not None:
            conn.max_write = 1 << 20

    def getattr(self, path, fh=None):
        st = (
            os.fstat(fh)
            if fh is not None
            else os.stat(rel(path), dir_fd=self.fd, follow_symlinks=False)
        )
        d = {k: getattr(st, k) for k in STAT_KEYS}
        d["st_atime"], d["st_mtime"], d["st_ctime"] = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return d

    def access(self, path, amode):
        if not os.access(rel(path), amode, dir_fd=self.fd):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        os.chmod(rel(path), mode, dir_fd=self.fd)
        self.rep.call("chmod", path, offset=mode)

    def chown(self, path, uid, gid):
        os.chown(rel(path), uid, gid, dir_fd=self.fd, follow_symlinks=False)
        self.rep.call("chown", path)

    def utimens(self, path, times=None):
        os.utime(rel(path), ns=times, dir_fd=self.fd, follow_symlinks=False) if times else os.utime(
            rel(path), dir_fd=self.fd, follow_symlinks=False
        )
        self.rep.call("utimens", path)

    def readlink(self, path):
        return os.readlink(rel(path), dir_fd=self.fd)

    def statfs(self, path):
        sv = os.statvfs(self.fd)
        return {
            k: getattr(sv, k)
            for k in (
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
        }

    # --- namespace ------------------------------------------------------
    def readdir(self, path, fh):
        # use_ino=1: entries must carry st_ino (ino 0 entries are hidden by the kernel)
        # fresh open file description (a dup of self.fd would share its offset between threads)
        d = os.open(rel(path), os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            with os.scandir(d) as it:
                out = [(e.name, {"st_ino": e.inode(), "st_mode": _dtype(e)}, 0) for e in it]
        finally:
            os.close(d)
        return [
            (".", {"st_ino": 1, "st_mode": stat.S_IFDIR}, 0),
            ("..", {"st_ino": 1, "st_mode": stat.S_IFDIR}, 0),
        ] + out

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

    def symlink(self, target, source):  # mfusepy: symlink(name_of_link, its_content)
        os.symlink(source, rel(target), dir_fd=self.fd)
        self._own(rel(target))
        self.rep.call("symlink", target, source.encode())

    def link(self, target, source):
        os.link(rel(source), rel(target), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.rep.call("link", target, source.encode())

    def rename(self, old, new):
        os.rename(rel(old), rel(new), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.rep.call("rename", old, new.encode())

    # --- data -----------------------------------------------------------
    def create(self, path, mode, flags):
        fd = os.open(rel(path), flags | os.O_CREAT, mode, dir_fd=self.fd)
        self._own(None, fd)
        self.rep.call("create", path, offset=mode)
        return fd

    def open(self, path, flags):
        return os.open(rel(path), flags, dir_fd=self.fd)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        n = os.pwrite(fh, data, offset)
        self.stats.write(n)
        self.rep.call("write", path or "", data[:n], offset)
        return n

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            fd = os.open(rel(path), os.O_WRONLY, dir_fd=self.fd)
            try:
                os.ftruncate(fd, length)
            finally:
                os.close(fd)
        self.rep.call("truncate", path or "", offset=length)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        (os.fdatasync if datasync else os.fsync)(fh)
        self.rep.call("fsync", path or "")  # real thing: peer acks after ITS fsync

    def release(self, path, fh):
        os.close(fh)

    def destroy(self, path):
        self.stats.dump()


def main():
    args = sys.argv[1:]
    pos = [a for a in args if not a.startswith("--")]
    if len(pos) != 1:
        raise SystemExit(__doc__)
    mnt = os.path.abspath(pos[0])
    root = open_root(mnt)  # BEFORE the mount: this fd sees the underlying directory
    opts = dict(foreground=True, nothreads="--single" in args, fsname="hk-mfusepy", subtype="hk")
    if "--allow-other" in args:
        opts.update(allow_other=True, default_permissions=True)
    FUSE(Passthrough(root), mnt, **opts)


if __name__ == "__main__":
    main()
