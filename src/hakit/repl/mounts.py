"""Mounting over replicated directories: FUSE on the primary, read-only binds on the secondary.

All mounts hakit makes over a directory are recognisable: the FUSE ones have the file-system
type ``fuse.hakit``; the read-only binds are registered by a marker file in
``/run/hakit/binds/``, so that a replicator restarted after a crash removes what its
predecessor left and never touches a mount it did not make (the replicated directory may itself
be a real mount point, e.g. a dedicated disk).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("hakit.repl.mounts")

MNT_DETACH = 2
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
FUSE_TYPE = "fuse.hakit"
BIND_REGISTRY = Path(os.environ.get("HAKIT_BIND_REGISTRY", "/run/hakit/binds"))
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    device: str  # "major:minor"
    mountpoint: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounts_at(path: str) -> list[MountEntry]:
    """Mounts whose mount point is exactly ``path``, oldest first (the last one is on top)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if _unescape(fields[4]) != path:
                continue
            fstype = right.split()[0]
            out.append(MountEntry(int(fields[0]), fields[2], path, fstype, fields[5]))
    return out


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _umount(path: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(path), flags), f"umount {path}")


def wait_mounted(path: str, fsname: str, timeout: float) -> None:
    """Return once a hakit FUSE file system serves ``path``; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        top = mounts_at(path)
        if top and top[-1].fstype == FUSE_TYPE:
            return
        time.sleep(0.02)
    raise TimeoutError(f"FUSE mount of {path} ({fsname}) not up after {timeout:g} s")


def unmount_fuse(path: str) -> None:
    """Unmount hakit's FUSE file system at ``path``.

    If the application still holds files open (EBUSY), the mount is detached and its FUSE
    connection aborted: the old primary's application gets ENOTCONN instead of writing data
    that would never be replicated.
    """
    for entry in reversed(mounts_at(path)):
        if entry.fstype != FUSE_TYPE:
            return
        try:
            _umount(path)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTCONN):
                raise
            log.warning("%s busy (%s): detaching and aborting its FUSE connection", path, exc)
            _abort_connection(entry.device)
            _umount(path, MNT_DETACH)


def _abort_connection(device: str) -> None:
    minor = device.partition(":")[2]
    abort = Path("/sys/fs/fuse/connections") / minor / "abort"
    try:
        abort.write_text("1")
    except OSError as exc:
        log.warning("cannot abort FUSE connection %s: %s", minor, exc)


def bind_read_only(path: str) -> None:
    """Bind ``path`` read-only over itself: only descriptors opened before can write."""
    _check(_libc.mount(os.fsencode(path), os.fsencode(path), None, MS_BIND, None), f"bind {path}")
    _register(path, add=True)
    _check(
        _libc.mount(None, os.fsencode(path), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
        f"remount {path} read-only",
    )


def unbind(path: str) -> None:
    """Remove the read-only bind made by :func:`bind_read_only` (if it is there)."""
    top = mounts_at(path)
    if top and _registered(path) and top[-1].options.split(",")[0] == "ro":
        _umount(path, MNT_DETACH)
    _register(path, add=False)


def release_stale(path: str) -> None:
    """Remove what a crashed replicator left on ``path``: FUSE mounts and its read-only bind."""
    for _ in range(8):
        top = mounts_at(path)
        if not top:
            break
        if top[-1].fstype == FUSE_TYPE:
            log.warning("removing a stale hakit FUSE mount on %s", path)
            _abort_connection(top[-1].device)
            _umount(path, MNT_DETACH)
        elif _registered(path) and top[-1].options.split(",")[0] == "ro":
            log.warning("removing a stale read-only bind on %s", path)
            _umount(path, MNT_DETACH)
            _register(path, add=False)
        else:
            break


def _marker(path: str) -> Path:
    return BIND_REGISTRY / hashlib.sha256(os.fsencode(path)).hexdigest()[:32]


def _registered(path: str) -> bool:
    return _marker(path).exists()


def _register(path: str, add: bool) -> None:
    """One marker file per directory (several replicators may run at once)."""
    marker = _marker(path)
    if add:
        BIND_REGISTRY.mkdir(parents=True, exist_ok=True)
        marker.write_text(path + "\n", encoding="utf-8")
    else:
        marker.unlink(missing_ok=True)
