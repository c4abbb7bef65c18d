"""The dirty journal: durability of marks, crash recovery, range coalescing, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hakit.repl.tracker import HEADER, PATHS, RANGES, DirtyEntry, DirtyJournal, add_interval


def started(directory: Path, base: int | None = 7, **kw: int) -> DirtyJournal:
    journal = DirtyJournal(directory, **kw)
    journal.load()
    journal.start(base)
    return journal


def after_crash(directory: Path) -> DirtyJournal:
    """What the next process sees: a new journal on the same directory, nothing discarded."""
    journal = DirtyJournal(directory)
    journal.load()
    return journal


def entries(journal: DirtyJournal) -> dict[bytes, DirtyEntry]:
    return {e.path: e for e in journal.snapshot()}


def test_a_fresh_journal_is_inactive_and_refuses_marks(tmp_path: Path) -> None:
    journal = DirtyJournal(tmp_path / "m.dirty")
    journal.load()
    assert not journal.active
    with pytest.raises(RuntimeError):
        journal.mark(0, b"a")


def test_marked_paths_survive_a_crash_without_any_flush(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d, base=7)
    journal.mark(0, b"a/file", 0, 10)
    journal.mark(1, b".")
    journal.mark_tree(0, b"dir")
    again = after_crash(d)
    assert again.active
    assert again.base_generation == 7
    assert not again.full
    assert again.snapshot() == [
        DirtyEntry(0, b"a/file", None),  # ranges never flushed: unknown
        DirtyEntry(0, b"dir", None, tree=True),
        DirtyEntry(1, b".", None),
    ]


def test_flushed_ranges_survive_a_crash(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"f", 0, 10)
    journal.mark(0, b"f", 100, 50)
    journal.mark(0, b"meta", 0, 0)
    journal.flush_ranges()
    got = entries(after_crash(d))
    assert got[b"f"].ranges == [(0, 10), (100, 50)]
    assert got[b"meta"].ranges == []


def test_a_write_after_the_last_flush_makes_ranges_unknown_after_a_crash(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"busy", 0, 10)
    journal.mark(0, b"quiet", 0, 10)
    journal.flush_ranges()
    journal.mark(0, b"busy", 4096, 10)  # not flushed: the flushed [0, 10) is incomplete
    got = entries(after_crash(d))
    assert got[b"busy"].ranges is None
    assert got[b"quiet"].ranges == [(0, 10)]


def test_only_the_first_mark_of_a_flush_window_appends_to_the_log(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"f", 0, 1)
    size = (d / PATHS).stat().st_size
    for i in range(100):
        journal.mark(0, b"f", i * 10, 1)
    assert (d / PATHS).stat().st_size == size
    journal.flush_ranges()
    journal.mark(0, b"f", 5000, 1)
    assert (d / PATHS).stat().st_size == 2 * size


def test_flush_without_changes_does_not_rewrite_the_ranges_file(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"f", 0, 1)
    journal.flush_ranges()
    inode = (d / RANGES).stat().st_ino
    journal.flush_ranges()
    assert (d / RANGES).stat().st_ino == inode


def test_a_torn_last_record_is_ignored_and_the_log_stays_usable(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"kept")
    journal.close()
    good = (d / PATHS).read_bytes()
    with (d / PATHS).open("ab") as f:
        f.write(good[:7])  # a record cut in the middle, as by a crash during append
    again = after_crash(d)
    assert [e.path for e in again.snapshot()] == [b"kept"]
    assert not again.full
    assert (d / PATHS).read_bytes() == good  # truncated back to the last whole record
    again.mark(0, b"later")
    assert [e.path for e in after_crash(d).snapshot()] == [b"kept", b"later"]


def test_a_zero_filled_tail_counts_as_torn(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    started(d).mark(0, b"kept")
    with (d / PATHS).open("ab") as f:
        f.write(b"\0" * 40)
    again = after_crash(d)
    assert [e.path for e in again.snapshot()] == [b"kept"]
    assert not again.full


def test_a_damaged_record_followed_by_data_makes_the_journal_full(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"first")
    journal.mark(0, b"second")
    journal.close()
    raw = bytearray((d / PATHS).read_bytes())
    raw[3] ^= 0xFF  # inside the first record
    (d / PATHS).write_bytes(bytes(raw))
    again = after_crash(d)
    assert again.full
    assert after_crash(d).full  # and durably so


def test_an_unreadable_header_makes_the_journal_full(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    started(d).mark(0, b"a")
    (d / HEADER).write_text("{not json")
    again = after_crash(d)
    assert again.active
    assert again.full
    assert [e.path for e in again.snapshot()] == [b"a"]


def test_a_damaged_ranges_file_leaves_ranges_unknown(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"f", 0, 10)
    journal.flush_ranges()
    (d / RANGES).write_bytes((d / RANGES).read_bytes()[:-1] + b"X")
    assert entries(after_crash(d))[b"f"].ranges is None


def test_starting_again_keeps_entries_and_a_different_base_makes_it_full(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    started(d, base=3).mark(0, b"a")
    same = after_crash(d)
    same.start(3)
    assert not same.full
    assert [e.path for e in same.snapshot()] == [b"a"]
    other = after_crash(d)
    other.start(4)
    assert other.full
    assert [e.path for e in other.snapshot()] == [b"a"]
    assert after_crash(d).full


def test_unknown_base_and_force_full_are_full_and_durable(tmp_path: Path) -> None:
    assert started(tmp_path / "a", base=None).full
    assert after_crash(tmp_path / "a").full
    journal = started(tmp_path / "b", base=1)
    assert not journal.full
    journal.force_full()
    assert journal.full
    assert after_crash(tmp_path / "b").full


def test_ranges_are_merged_and_coalesced(tmp_path: Path) -> None:
    journal = started(tmp_path / "m.dirty")
    for offset, length in [(100, 10), (0, 10), (10, 5), (50, 10), (55, 20), (200, 0)]:
        journal.mark(0, b"f", offset, length)
    assert journal.snapshot()[0].ranges == [(0, 15), (50, 25), (100, 10)]
    journal.mark(0, b"f")  # whole object
    journal.mark(0, b"f", 0, 1)
    assert journal.snapshot()[0].ranges is None


def test_too_many_intervals_make_the_file_whole(tmp_path: Path) -> None:
    journal = started(tmp_path / "m.dirty", max_intervals=4)
    for i in range(4):
        journal.mark(0, b"f", i * 100, 1)
    assert journal.snapshot()[0].ranges is not None
    journal.mark(0, b"f", 1000, 1)
    assert journal.snapshot()[0].ranges is None


def test_bad_ranges_are_refused(tmp_path: Path) -> None:
    journal = started(tmp_path / "m.dirty")
    with pytest.raises(ValueError):
        journal.mark(0, b"f", 0)
    with pytest.raises(ValueError):
        journal.mark(0, b"f", -1, 5)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=40))
def test_coalesced_intervals_cover_exactly_the_marked_bytes(
    marks: list[tuple[int, int]],
) -> None:
    bounds: list[int] | None = []
    for offset, length in marks:
        assert bounds is not None
        bounds = add_interval(bounds, offset, offset + length, cap=1000)
    assert bounds is not None
    covered = {b for offset, length in marks for b in range(offset, offset + length)}
    got = {b for i in range(0, len(bounds), 2) for b in range(bounds[i], bounds[i + 1])}
    assert got == covered
    # sorted, non-empty, neither overlapping nor touching
    assert all(bounds[i] < bounds[i + 1] for i in range(len(bounds) - 1))


def test_mark_tree_covers_descendants_only(tmp_path: Path) -> None:
    journal = started(tmp_path / "m.dirty")
    journal.mark_tree(0, b"a/b")
    assert journal.contains(0, b"a/b")
    assert journal.contains(0, b"a/b/c/d")
    assert not journal.contains(0, b"a")
    assert not journal.contains(0, b"a/bc")
    assert not journal.contains(1, b"a/b/c")
    journal.mark_tree(2, b".")
    assert journal.contains(2, b"x/y")
    assert journal.take(0, b"a/b") == DirtyEntry(0, b"a/b", None, tree=True)
    assert not journal.contains(0, b"a/b/c")


def test_a_plain_key_that_becomes_a_tree_is_a_tree_after_a_crash(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"d", 0, 4)
    journal.mark_tree(0, b"d")
    assert after_crash(d).snapshot() == [DirtyEntry(0, b"d", None, tree=True)]


def test_taken_keys_stay_on_disk_until_discard(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"f", 0, 10)
    journal.flush_ranges()
    assert journal.take(0, b"f") == DirtyEntry(0, b"f", [(0, 10)])
    assert journal.take(0, b"f") is None
    assert not journal.contains(0, b"f")
    journal.mark(0, b"g", 0, 1)
    journal.flush_ranges()  # the resync may crash before the secondary has f durably
    assert entries(after_crash(d))[b"f"].ranges == [(0, 10)]


def test_a_key_marked_again_after_take_is_back_and_durable(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"f", 0, 10)
    journal.flush_ranges()
    journal.take(0, b"f")
    journal.mark(0, b"f", 20, 5)
    assert journal.snapshot() == [DirtyEntry(0, b"f", [(20, 5)])]
    assert after_crash(d).snapshot() == [DirtyEntry(0, b"f", None)]  # not flushed since
    journal.flush_ranges()
    assert after_crash(d).snapshot() == [DirtyEntry(0, b"f", [(0, 10), (20, 5)])]


def test_requeue_puts_taken_keys_back_after_an_interrupted_resync(tmp_path: Path) -> None:
    journal = started(tmp_path / "m.dirty")
    journal.mark(0, b"f", 0, 10)
    journal.mark_tree(0, b"d")
    journal.take(0, b"f")
    journal.take(0, b"d")
    journal.mark(0, b"f", 50, 10)
    journal.requeue_taken()
    assert journal.snapshot() == [
        DirtyEntry(0, b"d", None, tree=True),
        DirtyEntry(0, b"f", [(0, 10), (50, 10)]),
    ]
    assert journal.contains(0, b"d/x")


def test_non_durable_marks_do_no_io(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    size = (d / PATHS).stat().st_size
    journal.mark_tree(0, b"d/sub", durable=False)
    journal.mark(0, b"d/file", durable=False)
    assert (d / PATHS).stat().st_size == size
    assert [e.path for e in journal.snapshot()] == [b"d/file", b"d/sub"]
    journal.mark(0, b"d/file", 0, 1)  # a real change now: logged
    assert (d / PATHS).stat().st_size > size


def test_discard_removes_the_journal_durably(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    journal.mark(0, b"a", 0, 1)
    journal.flush_ranges()
    journal.discard()
    assert not d.exists()
    assert not journal.active
    assert journal.snapshot() == []
    assert not after_crash(d).active
    journal.start(9)  # tracking again later: a fresh journal
    assert journal.snapshot() == []
    assert not journal.full


def test_eight_threads_marking_at_once(tmp_path: Path) -> None:
    d = tmp_path / "m.dirty"
    journal = started(d)
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(300):
            key = f"f{i % 40}".encode()
            journal.mark(0, key, (n * 300 + i) * 2, 1)
            journal.contains(0, key)
            if i % 50 == 0:
                journal.flush_ranges()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = entries(journal)
    assert set(got) == {f"f{i}".encode() for i in range(40)}
    for i in range(40):
        expected = sorted(((n * 300 + j) * 2, 1) for n in range(8) for j in range(i, 300, 40))
        assert got[f"f{i}".encode()].ranges == expected
    journal.flush_ranges()
    assert entries(after_crash(d)) == got
