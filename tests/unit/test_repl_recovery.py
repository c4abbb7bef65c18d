"""The recovery folder keeps what the journal lists, within a size limit, and says what it
did not keep and why."""

from __future__ import annotations

import json
from pathlib import Path

from hakit.repl.recovery import discard_journal, save_changes
from hakit.repl.tracker import DirtyJournal


def journal_with(tmp_path: Path, keys: list[tuple[int, bytes, bool]]) -> Path:
    jdir = tmp_path / "m.dirty"
    journal = DirtyJournal(jdir)
    journal.load()
    journal.start(3)
    for root, path, tree in keys:
        if tree:
            journal.mark_tree(root, path)
        else:
            journal.mark(root, path)
    journal.flush_ranges()
    return jdir


def test_files_beyond_the_limit_are_listed_not_saved_and_the_journal_is_discarded(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    (data / "dir").mkdir(parents=True)
    (data / "small").write_bytes(b"s" * 100)
    (data / "big").write_bytes(b"b" * 5000)
    (data / "dir" / "x").write_bytes(b"x" * 10)
    jdir = journal_with(
        tmp_path, [(0, b"small", False), (0, b"big", False), (0, b"dir", True), (0, b"gone", False)]
    )

    folder = save_changes(jdir, [str(data)], tmp_path / "rec", generation=7, limit=1000)

    assert folder is not None and folder.name.endswith("-g7")
    rows = {
        Path(r["path"]).name: r for r in json.loads((folder / "report.json").read_text())["entries"]
    }
    assert rows["small"]["saved"] and rows["dir"]["saved"] and rows["dir"]["tree"]
    assert not rows["big"]["saved"] and "size limit" in rows["big"]["note"]
    assert rows["gone"]["kind"] == "deleted"
    files = folder / "files" / str(data).lstrip("/")
    assert (files / "small").read_bytes() == b"s" * 100 and (files / "dir" / "x").exists()
    assert not (files / "big").exists()
    assert "NOT saved" in (folder / "README.txt").read_text()
    again = DirtyJournal(jdir)
    again.load()
    assert again.active  # kept until the caller has marked the copy outdated
    discard_journal(jdir)
    again.load()
    assert not again.active
    assert oct(folder.stat().st_mode & 0o777) == "0o700"


def test_an_empty_or_missing_journal_makes_no_folder(tmp_path: Path) -> None:
    assert save_changes(tmp_path / "none", ["/x"], tmp_path / "rec", generation=1) is None
    assert not (tmp_path / "rec").exists()
