"""Fixtures of the data-path tests: two real replicator processes, real FUSE mounts.

They need root (mounts) and /dev/fuse; without them they are skipped, with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pair import Replicator

ROOT = Path("/tmp/hk-repl-tests")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return int(s.getsockname()[1])


def why_no_fuse() -> str | None:
    if os.geteuid() != 0:
        return "the data-path tests mount file systems: they need root"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "libfuse3 (Debian package fuse3) is not installed"
    return None


class Pair:
    """Primary ``a`` and secondary ``b`` of module ``m``; :meth:`start` puts them in sync."""

    def __init__(self, root: Path, *, plaintext: bool = False, extra: str = "") -> None:
        self.root = root
        self.port = _free_port()
        self.plaintext = plaintext
        self.extra = extra
        self.a = Replicator(root, "a", self.port, extra, plaintext=plaintext)
        self.b = Replicator(root, "b", self.port, extra, plaintext=plaintext)

    def start(self) -> None:
        self.b.role("secondary")
        self.a.role("primary")
        self.a.wait_in_sync()

    def restart(self, node: str) -> Replicator:
        """A new replicator process for ``node`` (the old one must be gone)."""
        rep = Replicator(self.root, node, self.port, self.extra, plaintext=self.plaintext)
        setattr(self, node, rep)
        return rep

    def close(self) -> None:
        for rep in (self.a, self.b):
            rep.close()


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    reason = why_no_fuse()
    if reason is not None:
        pytest.skip(reason)
    root = ROOT / request.node.name[:60].replace("/", "_").replace("[", "_").replace("]", "")
    _clean(root)
    root.mkdir(parents=True)
    p = Pair(root, extra=getattr(request, "param", ""))  # indirect parametrization: module.toml
    try:
        yield p
    finally:
        p.close()
        _clean(root)


def _clean(root: Path) -> None:
    """Remove a previous run's tree, first detaching anything still mounted in it."""
    if not root.exists():
        return
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    for mp in sorted((m for m in points if m.startswith(str(root))), key=len, reverse=True):
        os.system(f"umount -l '{mp}' 2>/dev/null")
    shutil.rmtree(root, ignore_errors=True)


def _record(path: Path) -> tuple[object, ...]:
    st = path.lstat()
    content: object = None
    if stat.S_ISREG(st.st_mode):
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    try:
        names = os.listxattr(path, follow_symlinks=False)
        xattrs = tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False)) for k in names))
    except OSError:
        xattrs = ()
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
    return (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, content, xattrs)


def tree_state(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything both copies must agree on: type, mode, owner, size, mtime, content, xattrs.

    Directory mtimes are included; atime and ctime are not (not replicated, cannot be set).
    """
    out = {".": _record(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(top))] = _record(path)
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    sa, sb = tree_state(a), tree_state(b)
    only_a = sorted(set(sa) - set(sb))
    only_b = sorted(set(sb) - set(sa))
    differ = sorted(k for k in set(sa) & set(sb) if sa[k] != sb[k])
    details = [f"{k}: {sa[k]} != {sb[k]}" for k in differ[:5]]
    assert not (only_a or only_b or differ), (
        f"copies differ: only on primary {only_a[:10]}, only on secondary {only_b[:10]}, "
        f"different {details}"
    )
