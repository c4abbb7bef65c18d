"""Losing the secondary, running alone, and reintegration, on real mounts and processes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .conftest import Pair, assert_same_tree
from .pair import DIRS


def _record(rep: object) -> dict[str, object]:
    return rep.last_record()  # type: ignore[attr-defined, no-any-return]


def _fill(top: Path, files: int, size: int = 4096) -> None:
    for i in range(files):
        sub = top / f"d{i % 10}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:05d}").write_bytes(os.urandom(size))


def _same(pair: Pair) -> None:
    for d in DIRS:
        assert_same_tree(pair.a.data(d), pair.b.data(d))


def test_secondary_killed_then_incremental_resync(pair: Pair) -> None:
    pair.start()
    _fill(pair.a.data(), 300)
    os.setxattr(pair.a.data() / "d2" / "f00002", "user.keep", b"kept")
    os.setxattr(pair.a.data() / "d3" / "f00003", "user.gone", b"removed while alone")
    gen_before = _record(pair.a)["generation"]
    mark = pair.a.mark()
    pair.b.kill()
    # the next change notices the loss (connection reset) and returns without the secondary
    t0 = time.monotonic()
    (pair.a.data() / "while alone.txt").write_text("written while the secondary was down")
    assert time.monotonic() - t0 < 5
    rec = pair.a.wait_alone(since=mark)
    assert rec["ran_alone"] and rec["generation"] == gen_before + 1
    for i in range(0, 300, 30):  # change 10 files, delete 5, add a tree
        f = pair.a.data() / f"d{i % 10}" / f"f{i:05d}"
        with f.open("r+b") as fh:
            fh.seek(1000)
            fh.write(b"changed")
    for i in range(1, 300, 60):
        (pair.a.data() / f"d{i % 10}" / f"f{i:05d}").unlink()
    (pair.a.data() / "new" / "deeper").mkdir(parents=True)
    (pair.a.data() / "new" / "deeper" / "x").write_bytes(b"x" * 10000)
    (pair.a.data("two") / "other").write_text("second directory")
    # extended attributes changed while alone travel with the resync
    os.setxattr(pair.a.data() / "d4" / "f00004", "user.new", b"\x00binary\xff")
    os.removexattr(pair.a.data() / "d3" / "f00003", "user.gone")
    os.setxattr(pair.a.data() / "d5", "user.dir", b"on a directory")
    # hard links made while alone stay hard links, also when written through the new name
    os.link(pair.a.data() / "d6" / "f00006", pair.a.data() / "d6" / "hard")
    os.link(pair.a.data() / "d7" / "f00007", pair.a.data() / "new" / "hard2")
    with (pair.a.data() / "new" / "hard2").open("r+b") as fh:
        fh.write(b"through the second name")
    mark = pair.a.mark()
    b = pair.restart("b")
    b.role("secondary")
    done = pair.a.wait_in_sync(since=mark)
    assert not done["ran_alone"]
    log = (pair.root / "a.log").read_text()
    assert "incremental resync" in log, log[-2000:]
    _same(pair)
    assert b.last_record()["data"] == "up to date"
    for one, two in (("d6/f00006", "d6/hard"), ("d7/f00007", "new/hard2")):
        assert (b.data() / one).stat().st_ino == (b.data() / two).stat().st_ino, (one, two)


def test_reintegration_while_the_application_writes(pair: Pair) -> None:
    pair.start()
    _fill(pair.a.data(), 200, size=64 << 10)
    mark = pair.a.mark()
    pair.b.kill()
    (pair.a.data() / "mark").write_text("alone")  # notice the loss
    pair.a.wait_alone(since=mark)
    for i in range(200):
        f = pair.a.data() / f"d{i % 10}" / f"f{i:05d}"
        with f.open("r+b") as fh:
            fh.write(os.urandom(32 << 10))
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            k = (n * 7) % 200
            f = pair.a.data() / f"d{k % 10}" / f"f{k:05d}"
            with f.open("r+b") as fh:
                fh.seek((n * 4096) % (60 << 10))
                fh.write(n.to_bytes(8, "big") * 512)
            with (pair.a.data() / "journal.log").open("ab") as log:
                log.write(f"{n}\n".encode())
            n += 1
        written.append(n)

    t = threading.Thread(target=writer)
    t.start()
    try:
        mark = pair.a.mark()
        b = pair.restart("b")
        b.role("secondary")
        pair.a.wait_in_sync(timeout=120, since=mark)
        time.sleep(0.5)  # keep writing once in sync
    finally:
        stop.set()
        t.join()
    assert written and written[0] > 10
    _same(pair)
    lines = (pair.b.data() / "journal.log").read_text().split()
    assert lines == [str(i) for i in range(written[0])]


def test_full_resync_sends_only_what_differs(pair: Pair) -> None:
    # both sides hold data before the first sync: 100 equal files, 5 different, 5 extra
    for rep in (pair.a, pair.b):
        (rep.data() / "same").mkdir()
        for i in range(100):
            path = rep.data() / "same" / f"{i}"
            path.write_bytes(bytes([i]) * 50_000)
            os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    for i in range(5):
        (pair.a.data() / "same" / f"{i}").write_bytes(b"primary" * 1000)
        (pair.b.data() / f"extra{i}").write_text("only on the secondary")
    big = pair.a.data() / "big"
    big.write_bytes(os.urandom(4 << 20))
    (pair.b.data() / "big").write_bytes(big.read_bytes()[: 3 << 20] + os.urandom(1 << 20))
    # three names of one file on the primary; two separate files on the secondary
    for name in ("link1", "link2"):
        os.link(pair.a.data() / "same" / "50", pair.a.data() / name)
    os.link(pair.b.data() / "same" / "50", pair.b.data() / "link1")
    (pair.b.data() / "link2").write_bytes(bytes([50]) * 50_000)
    pair.start()
    _same(pair)
    log = (pair.root / "a.log").read_text()
    assert "full resync" in log
    inodes = {(pair.b.data() / n).stat().st_ino for n in ("same/50", "link1", "link2")}
    assert len(inodes) == 1, "the secondary's names are one file, as on the primary"


def test_primary_replicator_killed_is_recovered_with_a_full_compare(pair: Pair) -> None:
    pair.start()
    _fill(pair.a.data(), 50)
    pair.a.kill()
    try:
        os.listdir(pair.a.data())
        alive = True
    except OSError:
        alive = False
    assert not alive, "the mount must not serve without its replicator"
    a = pair.restart("a")
    a.role("primary")
    a.wait_in_sync()
    assert "full compare resync" in (pair.root / "a.log").read_text()
    (a.data() / "after").write_text("written after the restart")
    _same(pair)


@contextlib.contextmanager
def _small_disk(pair: Pair, path: Path, options: str = "size=2m") -> Iterator[None]:
    """A 2 MiB tmpfs at ``path`` (a node's replicated directory) for the body; at the end the
    pair is closed (the replicators release it), then it is unmounted."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "hk-test-full", str(path)], check=True)
    try:
        yield
    finally:
        pair.close()
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_secondary_disk_full_primary_keeps_serving(pair: Pair) -> None:
    small = pair.b.data("two")
    with _small_disk(pair, small):
        pair.start()
        mark = pair.a.mark()
        payload = os.urandom(4 << 20)
        (pair.a.data("two") / "big").write_bytes(payload)  # does not fit on the secondary
        assert (pair.a.data("two") / "big").read_bytes() == payload
        rec = pair.a.wait_alone(since=mark)
        assert "No space left" in str(rec["detail"]) or "ENOSPC" in str(rec["detail"]), rec
        (pair.a.data() / "still serving").write_text("yes")
        # the operator frees space: the primary's retry succeeds and the copies converge
        mark = pair.a.mark()
        (pair.a.data("two") / "big").unlink()
        pair.a.wait_in_sync(timeout=120, since=mark)
        _same(pair)


def test_primary_out_of_inodes_a_failed_create_is_taken_back_on_the_secondary(
    pair: Pair,
) -> None:
    """The CREATE reaches the secondary before the primary creates its own file: when that
    fails, the secondary's new file is removed again and the pair stays in sync."""
    small = pair.a.data("two")
    with _small_disk(pair, small, "size=2m,nr_inodes=6"):
        pair.start()
        mark = pair.a.mark()
        made, failure = 0, None
        while failure is None and made < 50:
            try:
                (small / f"f{made}").write_bytes(b"x")
            except OSError as exc:
                failure = exc
            else:
                made += 1
        assert failure is not None and failure.errno == errno.ENOSPC, failure
        assert made > 0
        assert not (pair.b.data("two") / f"f{made}").exists()
        _same(pair)
        assert pair.a.last_record().get("in_sync"), pair.a.events[mark:]


def test_primary_disk_full_a_failed_write_leaves_both_copies_equal(pair: Pair) -> None:
    """The WRITE reaches the secondary while the primary writes its own copy: what the
    primary could not take is put back on the secondary from the primary's copy, and the
    pair stays in sync."""
    small = pair.a.data("two")
    with _small_disk(pair, small):
        pair.start()
        mark = pair.a.mark()
        path = small / "f"
        old = os.urandom(1 << 20)
        path.write_bytes(old)
        fd = os.open(path, os.O_WRONLY)
        try:  # overwrites half of the old bytes, then needs more room than is left
            done, failure = 0, None
            new = os.urandom(4 << 20)
            while done < len(new) and failure is None:
                try:
                    n = os.pwrite(fd, new[done:], (512 << 10) + done)
                except OSError as exc:
                    failure = exc
                else:
                    done += n
        finally:
            os.close(fd)
        assert failure is not None and failure.errno == errno.ENOSPC, failure
        assert 0 < done < len(new)  # a short write came first, then the error
        content = path.read_bytes()
        assert content == old[: 512 << 10] + new[:done]
        assert (pair.b.data("two") / "f").read_bytes() == content
        _same(pair)
        assert pair.a.last_record().get("in_sync"), pair.a.events[mark:]
        (pair.a.data() / "after").write_text("still replicated")
        _same(pair)


def _compare(rep: object, what: str) -> dict[str, object]:
    r = rep  # a pair.Replicator
    r._ids += 1  # type: ignore[attr-defined]
    ident = r._ids  # type: ignore[attr-defined]
    r._send({"cmd": what, "id": ident})  # type: ignore[attr-defined]
    answer = r.wait_for(lambda e: e.get("ev") == "report" and e.get("id") == ident)  # type: ignore[attr-defined]
    assert answer["ok"], answer
    return answer["report"]  # type: ignore[no-any-return]


def test_verify_finds_silent_corruption_that_diff_cannot(pair: Pair) -> None:
    pair.start()
    _fill(pair.a.data(), 20, size=300_000)
    assert _compare(pair.a, "verify")["differences"] == 0
    # corrupt one block of the secondary's copy behind hakit's back, keeping size and mtime
    victim = pair.b.data() / "d3" / "f00013"
    before = victim.stat()
    subprocess.run(["umount", str(pair.b.data())], check=True)  # the read-only bind
    try:
        with victim.open("r+b") as f:
            f.seek(200_000)
            f.write(b"bit rot")
        os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    finally:
        subprocess.run(
            ["mount", "--bind", "-o", "ro", str(pair.b.data()), str(pair.b.data())], check=True
        )
    assert _compare(pair.a, "diff")["differences"] == 0  # size and mtime look the same
    report = _compare(pair.a, "verify")
    assert report["differences"] == 1, report
    assert "d3/f00013" in str(report["examples"]), report

    # … and an extended attribute only the secondary has, its mtime kept
    subprocess.run(["umount", str(pair.b.data())], check=True)
    try:
        other = pair.b.data() / "d5" / "f00005"
        st = other.stat()
        os.setxattr(other, "user.stray", b"only on the secondary")
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        subprocess.run(
            ["mount", "--bind", "-o", "ro", str(pair.b.data()), str(pair.b.data())], check=True
        )
    time.sleep(2.5)  # past a checkpoint: nothing recent is re-sent by chance

    # the operator's fullsync repairs both: every file compared by checksums, every META sent
    since = pair.a.mark()
    assert "full compare" in str(_compare(pair.a, "fullsync")["detail"])
    pair.a.wait_alone(30, since)
    pair.a.wait_in_sync(60, since)
    assert _compare(pair.a, "verify")["differences"] == 0
    assert os.listxattr(pair.b.data() / "d5" / "f00005") == []
    _same(pair)


def test_a_node_that_yields_after_a_split_brain_keeps_its_changes_in_the_recovery_folder(
    pair: Pair,
) -> None:
    pair.start()
    _fill(pair.a.data(), 10)
    mark = pair.a.mark()
    pair.b.kill()  # the nodes lose each other; both will run alone
    (pair.a.data() / "a-alone.txt").write_text("written on a while alone")
    with (pair.a.data() / "d3" / "f00003").open("r+b") as fh:
        fh.write(b"a changed this")
    (pair.a.data() / "d4" / "f00004").unlink()
    pair.a.wait_alone(since=mark)
    b = pair.restart("b")
    b.role("primary")  # b runs alone too (it cannot reach a: a is primary, not listening)
    b.wait_alone()
    (b.data() / "b-alone.txt").write_text("written on b while alone")

    # the network heals: a yields, b's copy is kept
    mark = b.mark()
    pair.a.role("secondary", outdated=True)
    b.wait_in_sync(since=mark)
    _same(pair)
    assert not (pair.a.data() / "a-alone.txt").exists()
    [folder] = (pair.root / "a" / "state" / "recovery" / "m").iterdir()
    saved = folder / "files" / str(pair.a.data()).lstrip("/")
    assert (saved / "a-alone.txt").read_text() == "written on a while alone"
    assert (saved / "d3" / "f00003").read_bytes().startswith(b"a changed this")
    report = json.loads((folder / "report.json").read_text())
    kinds = {Path(r["path"]).name: (r["kind"], r["saved"]) for r in report["entries"]}
    assert kinds["a-alone.txt"] == ("file", True)
    assert kinds["f00004"] == ("deleted", False)
    assert "a-alone.txt" in (folder / "README.txt").read_text()
    said = pair.a.wait_for(lambda e: "kept in" in str(e.get("detail", "")), timeout=1)
    assert str(folder) in said["detail"]  # the agent logs where to look


def test_a_link_broken_while_alone_is_not_written_through_on_the_secondary(pair: Pair) -> None:
    pair.start()
    y, w = pair.a.data() / "y", pair.a.data() / "w"
    y.write_bytes(b"old content " * 1000)
    os.link(y, w)  # replicated live: one file with two names on both nodes
    assert (pair.b.data() / "y").stat().st_nlink == 2
    mark = pair.a.mark()
    pair.b.kill()
    tmp = pair.a.data() / "y.tmp"
    tmp.write_bytes(b"new content " * 1000)
    tmp.rename(y)  # an application's atomic save: y is a new file, w keeps the old one
    pair.a.wait_alone(since=mark)
    mark = pair.a.mark()
    b = pair.restart("b")
    b.role("secondary")
    pair.a.wait_in_sync(since=mark)
    _same(pair)  # w still holds the old content on the secondary
    assert (b.data() / "w").read_bytes().startswith(b"old content")
    assert (b.data() / "y").stat().st_ino != (b.data() / "w").stat().st_ino


def test_a_directory_replaced_by_a_symlink_while_alone_resyncs(pair: Pair) -> None:
    pair.start()
    (pair.a.data() / "d").mkdir()
    (pair.a.data() / "d" / "x").write_text("x")
    mark = pair.a.mark()
    pair.b.kill()
    (pair.a.data() / "d" / "x").write_text("x changed while alone")  # journals d/x
    (pair.a.data() / "d").rename(pair.a.data() / "e")
    (pair.a.data() / "d").symlink_to("e")  # d/x now resolves only through a link
    pair.a.wait_alone(since=mark)
    mark = pair.a.mark()
    b = pair.restart("b")
    b.role("secondary")
    pair.a.wait_in_sync(timeout=30, since=mark)
    _same(pair)
    assert (b.data() / "d").is_symlink() and (b.data() / "e" / "x").read_text().endswith("alone")
