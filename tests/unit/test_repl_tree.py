"""Local tree and checksum primitives: block sums, differing blocks, walks, comparisons."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hakit.repl.protocol import DIGEST_SIZE, StatRec
from hakit.repl.tree import (
    Exclusions,
    block_sums,
    compare_listings,
    differing_blocks,
    open_beneath,
    scan_dir,
    walk,
)

BLOCK = 4096


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def sums_of(path: Path, block: int, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return block_sums(fd, block, offset, length)
    finally:
        os.close(fd)


# -- block_sums --------------------------------------------------------------------------------


def test_block_sums_of_an_odd_sized_file_end_with_a_partial_block(tmp_path: Path) -> None:
    data = os.urandom(3 * BLOCK + 123)
    f = tmp_path / "f"
    f.write_bytes(data)
    expected = b"".join(digest(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK))
    assert sums_of(f, BLOCK, 0, len(data)) == expected
    assert sums_of(f, BLOCK, 0, 10 * BLOCK) == expected  # nothing past the end of the file
    assert sums_of(f, BLOCK, BLOCK, 100) == digest(data[BLOCK : BLOCK + 100])
    assert sums_of(f, BLOCK, 4 * BLOCK, BLOCK) == b""
    assert sums_of(f, BLOCK, 0, 0) == b""


def test_block_sums_across_chunk_boundaries(tmp_path: Path) -> None:
    block = 3 << 20  # larger than one read chunk
    data = os.urandom(block + 5)
    f = tmp_path / "f"
    f.write_bytes(data)
    assert sums_of(f, block, 0, len(data)) == digest(data[:block]) + digest(data[block:])


def test_block_sums_refuse_an_unaligned_offset(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(ValueError):
        sums_of(f, BLOCK, 10, 100)


def test_block_sums_of_a_sparse_file_beyond_4_gib(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    base = (5 << 30) + 7 * BLOCK  # a block-aligned offset above 4 GiB
    with f.open("wb") as out:
        out.truncate((6 << 30) + 17)
        out.seek(base + 10)
        out.write(b"payload")
    sums = sums_of(f, BLOCK, base, 3 * BLOCK)
    block0 = bytearray(BLOCK)
    block0[10:17] = b"payload"
    zero = digest(bytes(BLOCK))
    assert sums == digest(bytes(block0)) + zero + zero
    tail = ((6 << 30) + 17) // BLOCK * BLOCK
    assert sums_of(f, BLOCK, tail, 10 * BLOCK) == digest(bytes(17))


# -- differing_blocks --------------------------------------------------------------------------


def sums(*blocks: bytes) -> bytes:
    return b"".join(digest(b) for b in blocks)


def test_identical_sums_need_nothing() -> None:
    s = sums(b"a", b"b", b"c")
    assert differing_blocks(s, s, 10, 30) == []


def test_adjacent_differing_blocks_are_merged_and_clipped_to_the_size() -> None:
    local = sums(b"a", b"B", b"C", b"d", b"E")
    remote = sums(b"a", b"b", b"c", b"d", b"e")
    assert differing_blocks(local, remote, 10, 45) == [(10, 20), (40, 5)]


def test_blocks_missing_on_the_remote_side_are_sent() -> None:
    local = sums(b"a", b"b", b"c", b"d")
    remote = sums(b"a", b"b")
    assert differing_blocks(local, remote, 10, 37) == [(20, 17)]
    assert differing_blocks(local, b"", 10, 37) == [(0, 37)]


def test_remote_blocks_past_the_local_size_are_not_listed() -> None:
    local = sums(b"a")
    remote = sums(b"a", b"b", b"c")
    assert differing_blocks(local, remote, 10, 10) == []
    assert differing_blocks(b"", remote, 10, 0) == []


def test_a_file_that_grew_after_its_sums_sends_the_new_blocks() -> None:
    s = sums(b"a", b"b")
    assert differing_blocks(s, s, 10, 35) == [(20, 15)]


def test_differing_blocks_of_a_range_starting_at_an_offset() -> None:
    local = sums(b"a", b"X")
    remote = sums(b"a", b"b")
    assert differing_blocks(local, remote, 10, 1000, offset=500, length=20) == [(510, 10)]
    assert differing_blocks(local, remote, 10, 515, offset=500, length=20) == [(510, 5)]
    assert differing_blocks(local, remote, 10, 1000, offset=500) == [(510, 490)]


def test_many_blocks_with_scattered_differences() -> None:
    count = 5000
    remote = bytearray(sums(*(str(i).encode() for i in range(count))))
    local = bytearray(remote)
    for k in (0, 1023, 1024, 1025, 4999):
        local[k * DIGEST_SIZE] ^= 1
    got = differing_blocks(bytes(local), bytes(remote), 10, count * 10)
    assert got == [(0, 10), (10230, 30), (49990, 10)]


# -- listings and walks ------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "b").mkdir()
    (root / "a").mkdir()
    (root / "a" / "z").write_bytes(b"zz")
    (root / "a" / "y").mkdir()
    (root / "a" / "y" / "deep").write_bytes(b"")
    (root / "c").symlink_to("a")  # to a directory: listed, never followed
    (root / "a.tmp").write_bytes(b"t")
    os.mkfifo(root / "fifo")


def test_walk_lists_parents_first_in_byte_order_without_following_links(
    tmp_path: Path, dir_fd: int
) -> None:
    make_tree(tmp_path)
    got = list(walk(dir_fd))
    assert [path for path, _ in got] == [
        b".",
        b"a",
        b"a/y",
        b"a/y/deep",
        b"a/z",
        b"a.tmp",
        b"b",
        b"c",
        b"fifo",
    ]
    recs = dict(got)
    assert stat.S_ISLNK(recs[b"c"].mode)
    assert stat.S_ISFIFO(recs[b"fifo"].mode)
    assert recs[b"a/z"].size == 2
    assert recs[b"a"].size == 0  # directories: no size


def test_walk_skips_excluded_paths_and_their_subtrees(tmp_path: Path, dir_fd: int) -> None:
    make_tree(tmp_path)
    skip = Exclusions(["a/y/", "*.tmp"])
    assert [p for p, _ in walk(dir_fd, skip)] == [b".", b"a", b"a/z", b"b", b"c", b"fifo"]


def test_walk_handles_names_that_are_not_utf8(tmp_path: Path, dir_fd: int) -> None:
    (tmp_path / os.fsdecode(b"d\xff")).mkdir()
    (tmp_path / os.fsdecode(b"d\xff/f\xfe")).write_bytes(b"x")
    assert [p for p, _ in walk(dir_fd)] == [b".", b"d\xff", b"d\xff/f\xfe"]


def test_a_walk_abandoned_early_closes_its_descriptors(tmp_path: Path, dir_fd: int) -> None:
    make_tree(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    it = walk(dir_fd)
    for _ in range(3):
        next(it)
    it.close()
    assert len(os.listdir("/proc/self/fd")) == before
    it = walk(dir_fd)
    next(it)
    it.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_scan_dir_lists_one_directory(tmp_path: Path, dir_fd: int) -> None:
    make_tree(tmp_path)
    assert sorted(scan_dir(dir_fd, b"a")) == [b"y", b"z"]
    assert sorted(scan_dir(dir_fd, b".")) == [b"a", b"a.tmp", b"b", b"c", b"fifo"]


def test_scan_dir_never_goes_through_a_symlink(tmp_path: Path, dir_fd: int) -> None:
    make_tree(tmp_path)
    (tmp_path / "b" / "inner").symlink_to(tmp_path / "a")
    for path in (b"c", b"c/y", b"b/inner/y"):
        with pytest.raises(OSError):
            scan_dir(dir_fd, path)


def test_open_beneath_refuses_paths_that_leave_the_directory(dir_fd: int) -> None:
    for path in (b"..", b"a/../b", b"/etc", b"a//b", b""):
        with pytest.raises(ValueError):
            open_beneath(dir_fd, path)


# -- compare_listings --------------------------------------------------------------------------

REG, DIR, LNK = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777


def rec(mode: int = REG, size: int = 10, mtime: int = 1000, uid: int = 0, rdev: int = 0) -> StatRec:
    return StatRec(mode, uid, 0, size, mtime, 1, rdev)


def test_compare_listings_classifies_every_case() -> None:
    chr_dev = stat.S_IFCHR | 0o600
    local = {
        b"only_local": rec(),
        b"same": rec(),
        b"bigger": rec(size=11),
        b"touched": rec(mtime=2000),
        b"chmod": rec(mode=stat.S_IFREG | 0o600),
        b"chown": rec(uid=5),
        b"was_dir": rec(),
        b"dir": rec(DIR, size=0),
        b"dir_meta": rec(DIR, size=0, mtime=5),
        b"link": rec(LNK, size=4),
        b"dev": rec(chr_dev, size=0, rdev=0x0103),
    }
    remote = {
        b"only_remote": rec(),
        b"same": rec(),
        b"bigger": rec(),
        b"touched": rec(),
        b"chmod": rec(),
        b"chown": rec(),
        b"was_dir": rec(DIR, size=0),
        b"dir": rec(DIR, size=0),
        b"dir_meta": rec(DIR, size=0),
        b"link": rec(LNK, size=5),
        b"dev": rec(chr_dev, size=0, rdev=0x0105),
    }
    c = compare_listings(local, remote)
    assert c.remove == [b"only_remote", b"was_dir"]
    assert c.create == [b"only_local", b"was_dir"]
    assert c.changed == [b"bigger", b"dev", b"link", b"touched"]
    assert c.meta == [b"chmod", b"chown", b"dir_meta"]
    assert c.same == [b"same"]
    assert c.dirs == [b"dir", b"dir_meta"]


# -- exclusions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (b".", False),
        (b"cache", True),
        (b"cache/x/y", True),
        (b"srv/cache", True),
        (b"cached", False),
        (b"a.tmp", True),
        (b"x/y/a.tmp", True),
        (b"x.tmp/inside", True),
        (b"a.tmpx", False),
        (b"logs/a.log", True),
        (b"logs/a.log/below", True),
        (b"logs/sub/a.log", False),
        (b"x/logs/a.log", False),
        (b"logs/a.txt", False),
        (b"top", True),
        (b"x/top", False),
        (b"data/run/1", True),
        (b"data/ok", False),
    ],
)
def test_exclusion_rules(path: bytes, excluded: bool) -> None:
    rules = Exclusions(["cache/", "*.tmp", "logs/*.log", "/top", "data/r?n"])
    assert rules.excluded(path) is excluded
    assert rules(path) is excluded


def test_no_exclusions_exclude_nothing() -> None:
    rules = Exclusions([])
    assert not rules
    assert not rules.excluded(b"anything/at/all")


@pytest.mark.parametrize("bad", ["", "/", "a//b", "../x", "a/./b"])
def test_malformed_exclusion_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Exclusions([bad])
