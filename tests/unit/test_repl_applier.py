"""The secondary's applier on real files: every operation, its errors, and the tree's boundary."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hakit.repl import protocol as p
from hakit.repl.applier import FILE_CACHE_SIZE, Applier
from hakit.repl.protocol import KEEP, Op, ProtocolError, Reply, Request

T1 = 1_600_000_000_123_456_789  # distinct, nanosecond-precise times
T2 = 1_650_000_000_987_654_321
T3 = 1_700_000_000_000_000_001
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


@dataclass
class Tree:
    root: Path
    app: Applier

    def do(
        self, op: Op, path: bytes = b".", path2: bytes = b"", data: bytes = b"", **kw: Any
    ) -> Reply:
        """Encode a request as the primary would, decode its header, apply it."""
        req = Request(op, path, path2, data, seq=7, **kw)
        head = p.decode_request_head(bytes(req.encode()[0])[: p.REQ.size])
        return self.app.apply(head, path, path2, data)

    def ok(
        self, op: Op, path: bytes = b".", path2: bytes = b"", data: bytes = b"", **kw: Any
    ) -> bytes:
        reply = self.do(op, path, path2, data, **kw)
        assert reply.err == 0, reply.message
        assert reply.seq == 7
        return reply.data

    def err(
        self, op: Op, path: bytes = b".", path2: bytes = b"", data: bytes = b"", **kw: Any
    ) -> int:
        reply = self.do(op, path, path2, data, **kw)
        assert reply.err, f"{op.name} {path!r} succeeded"
        assert reply.message
        return reply.err


def open_tree(base: Path, durable: bool) -> Iterator[Tree]:
    root = base / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    app = Applier([fd], durable=durable)
    try:
        yield Tree(root, app)
    finally:
        app.close()
        os.close(fd)


@pytest.fixture(params=[False, True], ids=["receipt", "durable"])
def tree(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tree]:
    yield from open_tree(tmp_path, request.param)


@pytest.fixture
def fast(tmp_path: Path) -> Iterator[Tree]:
    yield from open_tree(tmp_path, False)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- file content -------------------------------------------------------------------------


@AS_ROOT
def test_create_sets_exact_mode_owner_and_times_then_write_lands_at_offset(tree: Tree) -> None:
    tree.ok(Op.CREATE, b"f", a=0o4750, b=T1, c=p.pack_owner(1234, 5678), d=T2)
    st = os.stat(tree.root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 1234, 5678)
    assert st.st_mtime_ns == T1
    assert os.stat(tree.root).st_mtime_ns == T2
    tree.ok(Op.WRITE, b"f", data=b"abc", a=3, b=T3)
    assert (tree.root / "f").read_bytes() == b"\0\0\0abc"
    assert os.stat(tree.root / "f").st_mtime_ns == T3


def test_write_stream_reuses_one_descriptor(fast: Tree) -> None:
    fast.ok(Op.CREATE, b"log", a=0o644)
    fast.ok(Op.WRITE, b"log", data=b"x")
    before = open_fds()
    for i in range(1, 200):
        fast.ok(Op.WRITE, b"log", data=b"x", a=i)
    assert open_fds() == before
    assert (fast.root / "log").read_bytes() == b"x" * 200
    assert fast.app.cached_files == 1


def test_descriptor_cache_stays_bounded(fast: Tree) -> None:
    for i in range(FILE_CACHE_SIZE + 20):
        fast.ok(Op.CREATE, b"f%d" % i, a=0o600)
        fast.ok(Op.WRITE, b"f%d" % i, data=b"%d" % i)
    assert fast.app.cached_files == FILE_CACHE_SIZE
    assert (fast.root / "f3").read_bytes() == b"3"
    fast.app.close()
    assert fast.app.cached_files == 0
    fast.ok(Op.WRITE, b"f3", data=b"4")  # usable after close: reopens
    assert (fast.root / "f3").read_bytes() == b"4"


def test_truncate_and_fallocate_including_punch_hole(tree: Tree) -> None:
    (tree.root / "f").write_bytes(b"y" * 8192)
    tree.ok(Op.TRUNCATE, b"f", a=5000, b=T1)
    st = os.stat(tree.root / "f")
    assert (st.st_size, st.st_mtime_ns) == (5000, T1)
    tree.ok(Op.FALLOCATE, b"f", a=0, b=65536, c=0, d=T2)
    st = os.stat(tree.root / "f")
    assert (st.st_size, st.st_mtime_ns) == (65536, T2)
    punch = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    tree.ok(Op.FALLOCATE, b"f", a=0, b=4096, c=punch, d=T3)
    data = (tree.root / "f").read_bytes()
    assert len(data) == 65536
    assert data[:4096] == b"\0" * 4096
    assert data[4096:5000] == b"y" * 904


def test_sparse_write_beyond_4_gib_allocates_almost_nothing(fast: Tree) -> None:
    fast.ok(Op.CREATE, b"sparse", a=0o600)
    fast.ok(Op.WRITE, b"sparse", data=b"tail", a=5 << 30)
    st = os.stat(fast.root / "sparse")
    assert st.st_size == (5 << 30) + 4
    assert st.st_blocks * 512 < 1 << 20
    with (fast.root / "sparse").open("rb") as f:
        f.seek(5 << 30)
        assert f.read() == b"tail"


def test_write_to_a_directory_or_missing_file_is_an_error(fast: Tree) -> None:
    (fast.root / "d").mkdir()
    assert fast.err(Op.WRITE, b"d", data=b"x") == errno.EISDIR
    assert fast.err(Op.WRITE, b"missing", data=b"x") == errno.ENOENT
    assert fast.err(Op.WRITE, b"no/such/dir/f", data=b"x") == errno.ENOENT
    assert fast.err(Op.TRUNCATE, b"missing", a=1) == errno.ENOENT


# --- namespace ----------------------------------------------------------------------------


def test_create_replaces_a_stale_file_and_a_stale_tree(tree: Tree) -> None:
    (tree.root / "f").write_bytes(b"old")
    tree.ok(Op.WRITE, b"f", data=b"OLD")  # cached descriptor of the stale file
    tree.ok(Op.CREATE, b"f", a=0o600, b=T1)
    tree.ok(Op.WRITE, b"f", data=b"new")
    assert (tree.root / "f").read_bytes() == b"new"
    (tree.root / "d" / "sub").mkdir(parents=True)
    (tree.root / "d" / "sub" / "x").write_text("x")
    tree.ok(Op.CREATE, b"d", a=0o644)
    assert (tree.root / "d").is_file()


@AS_ROOT
def test_mkdir_mknod_and_symlink_carry_owner_mode_and_times(tree: Tree) -> None:
    owner = p.pack_owner(42, 43)
    tree.ok(Op.MKDIR, b"d", a=0o1750, b=T1, c=owner, d=T2)
    st = os.stat(tree.root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o1750, 42, 43, T1)
    assert os.stat(tree.root).st_mtime_ns == T2
    tree.ok(Op.MKNOD, b"d/fifo", a=stat.S_IFIFO | 0o640, b=0, c=owner, d=T3)
    st = os.stat(tree.root / "d" / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 42
    assert os.stat(tree.root / "d").st_mtime_ns == T3
    tree.ok(Op.SYMLINK, b"d/ln", b"/etc/passwd", b=T1, c=owner, d=T2)
    st = os.lstat(tree.root / "d" / "ln")
    assert os.readlink(tree.root / "d" / "ln") == "/etc/passwd"
    assert (st.st_uid, st.st_mtime_ns) == (42, T1)
    assert os.stat("/etc/passwd").st_uid == 0  # the target was not touched
    assert tree.err(Op.MKDIR, b"d", a=0o755) == errno.EEXIST


def test_link_unlink_rmdir_and_their_errors(tree: Tree) -> None:
    (tree.root / "a").write_text("A")
    (tree.root / "d").mkdir()
    tree.ok(Op.LINK, b"d/b", b"a", d=T1)
    assert os.stat(tree.root / "d" / "b").st_ino == os.stat(tree.root / "a").st_ino
    assert os.stat(tree.root / "a").st_nlink == 2
    assert os.stat(tree.root / "d").st_mtime_ns == T1
    assert tree.err(Op.LINK, b"d/b", b"a") == errno.EEXIST
    assert tree.err(Op.RMDIR, b"d") == errno.ENOTEMPTY
    tree.ok(Op.UNLINK, b"d/b", d=T2)
    assert os.stat(tree.root / "d").st_mtime_ns == T2
    assert tree.err(Op.UNLINK, b"d/b") == errno.ENOENT
    tree.ok(Op.RMDIR, b"d", d=T3)
    assert not (tree.root / "d").exists()
    assert os.stat(tree.root).st_mtime_ns == T3
    assert tree.err(Op.RMDIR, b"d") == errno.ENOENT


def test_rename_sets_both_parent_times_and_refuses_flags(tree: Tree) -> None:
    (tree.root / "src").mkdir()
    (tree.root / "dst").mkdir()
    (tree.root / "src" / "f").write_text("F")
    tree.ok(Op.RENAME, b"src/f", b"dst/g", c=T1, d=T2)
    assert (tree.root / "dst" / "g").read_text() == "F"
    assert os.stat(tree.root / "src").st_mtime_ns == T1
    assert os.stat(tree.root / "dst").st_mtime_ns == T2
    assert tree.err(Op.RENAME, b"dst/g", b"src/f", a=1) == errno.EINVAL
    assert tree.err(Op.RENAME, b"nothing", b"x") == errno.ENOENT
    assert tree.err(Op.RENAME, b".", b"x") == errno.EINVAL


def test_rename_drops_cached_descriptors_of_both_names(fast: Tree) -> None:
    for name in (b"a", b"b"):
        fast.ok(Op.CREATE, name, a=0o644)
        fast.ok(Op.WRITE, name, data=name)
    fast.ok(Op.RENAME, b"a", b"b")  # b's old file is gone; a's file is now b
    fast.ok(Op.WRITE, b"b", data=b"B", a=1)
    assert (fast.root / "b").read_bytes() == b"aB"
    fast.ok(Op.CREATE, b"a", a=0o644)
    fast.ok(Op.WRITE, b"a", data=b"new a")
    assert (fast.root / "a").read_bytes() == b"new a"
    assert (fast.root / "b").read_bytes() == b"aB"


def test_directory_rename_drops_every_cached_path_below_it(fast: Tree) -> None:
    fast.ok(Op.MKDIR, b"d", a=0o755)
    fast.ok(Op.CREATE, b"d/f", a=0o644)
    fast.ok(Op.WRITE, b"d/f", data=b"first")
    fast.ok(Op.RENAME, b"d", b"e")
    fast.ok(Op.MKDIR, b"d", a=0o755)
    fast.ok(Op.CREATE, b"d/f", a=0o644)
    fast.ok(Op.WRITE, b"d/f", data=b"second")
    assert (fast.root / "e" / "f").read_bytes() == b"first"
    assert (fast.root / "d" / "f").read_bytes() == b"second"


def test_remove_deletes_files_and_trees_and_ignores_missing(tree: Tree) -> None:
    (tree.root / "t" / "a" / "b").mkdir(parents=True)
    (tree.root / "t" / "a" / "b" / "f").write_text("x")
    (tree.root / "g").write_text("g")
    tree.ok(Op.WRITE, b"t/a/b/f", data=b"y")  # cached below the tree
    tree.ok(Op.REMOVE, b"t")
    tree.ok(Op.REMOVE, b"g")
    tree.ok(Op.REMOVE, b"missing")
    tree.ok(Op.REMOVE, b"missing/below")
    assert os.listdir(tree.root) == []
    assert tree.err(Op.REMOVE, b".") == errno.EINVAL
    assert tree.err(Op.WRITE, b"t/a/b/f", data=b"z") == errno.ENOENT


# --- metadata -----------------------------------------------------------------------------


@AS_ROOT
def test_chmod_chown_utimens_with_keep(tree: Tree) -> None:
    (tree.root / "f").write_text("x")
    os.utime(tree.root / "f", ns=(T1, T2))
    tree.ok(Op.CHMOD, b"f", a=0o2711)
    tree.ok(Op.CHOWN, b"f", c=p.pack_owner(7, -1))
    st = os.stat(tree.root / "f")
    assert (st.st_uid, st.st_gid) == (7, 0)
    tree.ok(Op.CHMOD, b"f", a=0o2711)  # chown cleared the set-gid bit, as locally
    tree.ok(Op.UTIMENS, b"f", a=KEEP, b=T3)
    st = os.stat(tree.root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns) == (0o2711, T1, T3)
    tree.ok(Op.UTIMENS, b"f", a=T2, b=KEEP)
    st = os.stat(tree.root / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (T2, T3)
    tree.ok(Op.CHMOD, b".", a=0o750)
    assert stat.S_IMODE(os.stat(tree.root).st_mode) == 0o750
    assert tree.err(Op.CHMOD, b"missing", a=0o600) == errno.ENOENT


@AS_ROOT
def test_meta_sets_size_owner_mode_and_mtime_at_once(tree: Tree) -> None:
    (tree.root / "f").write_bytes(b"z" * 100)
    tree.ok(Op.META, b"f", a=0o600, b=T1, c=p.pack_owner(5, 6), d=10)
    st = os.stat(tree.root / "f")
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (10, 0o600, 5, 6)
    assert st.st_mtime_ns == T1
    os.symlink("target", tree.root / "ln")
    tree.ok(Op.META, b"ln", a=0o600, b=T2, c=p.pack_owner(8, 9), d=KEEP)
    st = os.lstat(tree.root / "ln")
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (8, 9, T2)
    tree.ok(Op.META, b".", a=0o711, b=T3)
    assert os.stat(tree.root).st_mtime_ns == T3
    assert tree.err(Op.META, b"f", a=stat.S_IFDIR | 0o755) == errno.EINVAL


def test_user_xattrs_are_set_and_removed(tree: Tree) -> None:
    (tree.root / "f").write_text("x")
    try:
        os.setxattr(tree.root / "f", "user.probe", b"1")
    except OSError as exc:
        pytest.skip(f"the temporary file system refuses user xattrs: {exc}")
    tree.ok(Op.SETXATTR, b"f", b"user.k", b"v\0binary", a=0)
    assert os.getxattr(tree.root / "f", "user.k") == b"v\0binary"
    assert tree.err(Op.SETXATTR, b"f", b"user.k", a=os.XATTR_CREATE) == errno.EEXIST
    tree.ok(Op.REMOVEXATTR, b"f", b"user.k")
    assert "user.k" not in os.listxattr(tree.root / "f")
    assert tree.err(Op.REMOVEXATTR, b"f", b"user.k") == errno.ENODATA


# --- reads for resync ---------------------------------------------------------------------


def test_stat_list_with_spaces_utf8_and_undecodable_names(fast: Tree) -> None:
    names = [b"plain", b"with space", "été ✓".encode(), b"\xff\xfe raw"]
    for name in names:
        (fast.root / os.fsdecode(name)).write_bytes(name)
    os.utime(fast.root / "plain", ns=(T1, T2))
    rec = p.StatRec.decode(fast.ok(Op.STAT, b"plain"))
    assert (rec.size, rec.mtime_ns, stat.S_ISREG(rec.mode)) == (5, T2, True)
    assert fast.err(Op.STAT, b"missing") == errno.ENOENT
    listing = p.decode_listing(fast.ok(Op.LIST, b"."))
    assert sorted(listing) == sorted(names)
    assert all(listing[n].size == len(n) for n in names)
    fast.ok(Op.WRITE, "été ✓".encode(), data=b"E")
    assert (fast.root / "été ✓").read_bytes()[:1] == b"E"
    assert p.decode_listing(fast.ok(Op.LIST, b".")) == p.decode_listing(fast.ok(Op.LIST, b"."))
    assert fast.err(Op.LIST, b"plain") == errno.ENOTDIR


def test_sums_digest_each_block_and_clip_at_end_of_file(fast: Tree) -> None:
    content = os.urandom(10_000)
    (fast.root / "f").write_bytes(content)

    def digest(chunk: bytes) -> bytes:
        return hashlib.blake2b(chunk, digest_size=p.DIGEST_SIZE).digest()

    sums = fast.ok(Op.SUMS, b"f", a=4096, b=0, c=10_000)
    assert sums == b"".join(digest(content[i : i + 4096]) for i in range(0, 10_000, 4096))
    assert fast.ok(Op.SUMS, b"f", a=4096, b=8192, c=1 << 20) == digest(content[8192:])
    assert fast.ok(Op.SUMS, b"f", a=4096, b=20_000, c=100) == b""
    assert fast.err(Op.SUMS, b"f", a=0, b=0, c=1) == errno.EINVAL
    assert fast.err(Op.SUMS, b"f", a=1, b=0, c=1 << 40) == errno.E2BIG


def test_fsync_of_file_directory_and_missing(tree: Tree) -> None:
    (tree.root / "d").mkdir()
    (tree.root / "f").write_text("x")
    tree.ok(Op.FSYNC, b"f", a=1)
    tree.ok(Op.FSYNC, b"f", a=0)
    tree.ok(Op.FSYNC, b"d")
    tree.ok(Op.FSYNC, b".")
    assert tree.err(Op.FSYNC, b"missing") == errno.ENOENT


def test_fsync_after_a_write_uses_the_cached_descriptor_until_the_name_changes(
    fast: Tree,
) -> None:
    fast.ok(Op.CREATE, b"f", a=0o644)
    fast.ok(Op.WRITE, b"f", data=b"x")
    fast.ok(Op.FSYNC, b"f", a=1)
    fast.ok(Op.RENAME, b"f", b"g", c=T1, d=T1)
    assert fast.err(Op.FSYNC, b"f", a=1) == errno.ENOENT  # not the stale descriptor
    fast.ok(Op.FSYNC, b"g", a=0)


def test_streamed_write_has_the_contract_of_apply(tree: Tree) -> None:
    tree.ok(Op.CREATE, b"f", a=0o644)
    head = p.decode_request_head(
        bytes(Request(Op.WRITE, b"f", data=b"abc", a=2, b=T2, seq=9).encode()[0])[: p.REQ.size]
    )
    fd = tree.app.open_write(head, b"f")
    os.pwrite(fd, b"abc", 2)
    reply = tree.app.end_write(head, b"f", fd)
    assert (reply.seq, reply.err) == (9, 0)
    assert (tree.root / "f").read_bytes() == b"\0\0abc"
    assert os.stat(tree.root / "f").st_mtime_ns == T2
    failed = tree.app.end_write(head, b"f", fd, OSError(errno.ENOSPC, "No space left on device"))
    assert failed.err == errno.ENOSPC
    assert "WRITE f" in failed.message
    (tree.root / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        tree.app.open_write(head, b"d")
    with pytest.raises(ProtocolError):
        tree.app.open_write(head, b"../f")
    create = p.decode_request_head(bytes(Request(Op.CREATE, b"f").encode()[0])[: p.REQ.size])
    with pytest.raises(ProtocolError):
        tree.app.open_write(create, b"f")


# --- the tree's boundary ------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [b"../x", b"/etc/passwd", b"a/../../x", b"a//b", b"", b"a/./b", b"a\0b"]
)
def test_paths_that_could_leave_the_tree_are_protocol_errors(fast: Tree, bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        fast.do(Op.CREATE, bad, a=0o644)
    with pytest.raises(ProtocolError):
        fast.do(Op.RENAME, b"x", bad)
    with pytest.raises(ProtocolError):
        fast.do(Op.LINK, b"x", bad)


def test_symlinks_inside_the_tree_are_never_followed(tmp_path: Path, fast: Tree) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep")
    os.chmod(outside / "secret", 0o600)
    os.symlink(outside, fast.root / "out")
    os.symlink(outside / "secret", fast.root / "ln")
    assert fast.err(Op.CREATE, b"out/new", a=0o644) == errno.ENOTDIR
    assert fast.err(Op.WRITE, b"out/secret", data=b"pwned") == errno.ENOTDIR
    assert fast.err(Op.WRITE, b"ln", data=b"pwned") == errno.EINVAL
    assert fast.err(Op.TRUNCATE, b"ln", a=0) == errno.EINVAL
    assert fast.err(Op.CHMOD, b"ln", a=0o777) == errno.EOPNOTSUPP
    assert fast.err(Op.LINK, b"hard", b"out/secret") == errno.ENOTDIR
    assert fast.err(Op.LIST, b"out") == errno.ENOTDIR
    assert fast.err(Op.SUMS, b"ln", a=4096, b=0, c=4) == errno.EINVAL
    assert stat.S_ISLNK(p.StatRec.decode(fast.ok(Op.STAT, b"ln")).mode)
    fast.ok(Op.REMOVE, b"out")
    fast.ok(Op.UNLINK, b"ln")
    assert os.listdir(fast.root) == []
    assert (outside / "secret").read_text() == "keep"
    assert stat.S_IMODE(os.stat(outside / "secret").st_mode) == 0o600
    assert os.listdir(outside) == ["secret"]


def test_namespace_changes_of_the_root_itself_are_refused(fast: Tree) -> None:
    for op in (Op.CREATE, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.SYMLINK):
        assert fast.err(op, b".", b"t", a=0o755) == errno.EINVAL
    assert stat.S_ISDIR(p.StatRec.decode(fast.ok(Op.STAT, b".")).mode)


def test_requests_for_the_server_or_another_root_are_protocol_errors(fast: Tree) -> None:
    for op in (Op.HELLO, Op.SYNCFS, Op.BEGIN_RESYNC, Op.END_RESYNC):
        with pytest.raises(ProtocolError):
            fast.do(op)
    with pytest.raises(ProtocolError):
        fast.do(Op.STAT, b"x", root=1)
    with pytest.raises(ProtocolError):
        fast.do(Op.SYMLINK, b"x", b"")


def test_values_the_system_refuses_are_einval_not_exceptions(fast: Tree) -> None:
    fast.ok(Op.CREATE, b"f", a=0o644)
    assert fast.err(Op.WRITE, b"f", data=b"x", a=-5) == errno.EINVAL
    assert fast.err(Op.SETXATTR, b"f", b"user.a\0b", b"v") == errno.EINVAL
    assert fast.err(Op.MKNOD, b"n", a=stat.S_IFCHR | 0o600, b=-2) == errno.EINVAL
