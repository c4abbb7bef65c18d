"""The recovery folder: what a node changed while it ran alone, kept when its copy is discarded.

When both nodes ran alone (a split brain without arbitration) and this node yields to a peer
whose copy is kept, the next resync overwrites this node's copy with the peer's. Before that,
:func:`save_changes` copies every path the dirty journal lists (the changes this node made
while alone) into::

    <state_dir>/recovery/<module>/<UTC time>-g<generation>/
        files/<replicated directory>/<path>     the objects as they are on this node
        report.json                            every path: kind, size, mtime, saved or why not
        README.txt                             the same, for a person

and logs where it is. Nothing is silently discarded: a path deleted while alone is listed as
deleted; files beyond ``limit`` bytes in total (or half the free space of the state
directory's file system, if less) are listed as not saved with the reason, so that the folder
never fills the disk the change journal lives on.

Caveats: the journal holds paths, not contents: what is saved is each object as it is now,
which is the state this node's application last left it in. A journal marked ``full`` (its
start is unknown) may miss paths; the report says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from hakit.repl.tracker import DirtyJournal

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 1 << 30  # bytes saved at most per yield


def save_changes(
    journal_dir: Path,
    roots: list[str],
    dest: Path,
    *,
    generation: int,
    limit: int = DEFAULT_LIMIT,
) -> Path | None:
    """Copy what the journal at ``journal_dir`` lists under ``dest/<time>-g<generation>``;
    return that folder, or None when the journal lists nothing. Each path is saved or listed
    with the reason it was not; only the folder and its two reports failing to be written
    raises (OSError). The journal is left as it is: :func:`discard_journal` once the record
    says ``outdated``."""
    journal = DirtyJournal(journal_dir)
    journal.load()
    entries = journal.snapshot() if journal.active else []
    if not entries and not (journal.active and journal.full):
        return None
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = dest / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-g{generation}"
    folder.mkdir(exist_ok=True, mode=0o700)
    fs = os.statvfs(folder)
    # never more than half the free space: the state directory also holds the change journal
    budget = min(limit, fs.f_bavail * fs.f_frsize // 2)
    rows: list[dict[str, Any]] = []
    for entry in sorted(entries, key=lambda e: (e.root, e.path)):
        if not 0 <= entry.root < len(roots):
            rows.append({"path": repr(entry.path), "kind": "?", "saved": False,
                         "note": "its replicated directory is no longer configured"})  # fmt: skip
            continue
        root = roots[entry.root]
        rel = os.fsdecode(entry.path)
        src = Path(root) if rel == "." else Path(root) / rel
        target = folder / "files" / root.lstrip("/") / ("" if rel == "." else rel)
        try:
            row, budget = _save(Path(root), src, target, entry.tree, budget)
        except OSError as exc:  # e.g. the state directory's disk is full
            row = {"kind": "?", "saved": False, "note": f"not saved: {exc}"}
        rows.append({"path": str(src), **row})
    report = {
        "generation": generation,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "journal_full": journal.full,
        "entries": rows,
    }
    _write(folder / "report.json", json.dumps(report, indent=2) + "\n")
    _write(folder / "README.txt", _readme(report))
    saved = sum(1 for r in rows if r["saved"])
    log.warning(
        "changes made while alone (%d path(s), %d saved) kept in %s before this copy is "
        "resynchronised from the peer",
        len(rows),
        saved,
        folder,
    )
    return folder


def discard_journal(journal_dir: Path) -> None:
    """Forget the changes made alone (after they were saved and the copy marked outdated)."""
    journal = DirtyJournal(journal_dir)
    journal.load()
    if journal.active:
        journal.discard()


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)


def _save(
    root: Path, src: Path, target: Path, tree: bool, budget: int
) -> tuple[dict[str, Any], int]:
    try:
        st = src.lstat()
    except FileNotFoundError:
        return {"kind": "deleted", "saved": False, "note": "deleted while alone"}, budget
    if src != root and not os.path.realpath(src.parent).startswith(os.path.realpath(root)):
        return {"kind": "?", "saved": False, "note": "a parent is now a symbolic link"}, budget
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        return {"kind": "special", "saved": False, "note": "device, FIFO or socket"}, budget
    size = _size(src, budget) if kind == "directory" and tree else st.st_size
    row: dict[str, Any] = {"kind": kind, "size": size, "mtime": st.st_mtime, "tree": tree}
    if size > budget:
        return {**row, "saved": False, "note": "over the size limit of the recovery folder"}, budget
    _mkdirs(target.parent)
    if kind == "directory":
        if tree:
            shutil.copytree(
                src, target, symlinks=True, dirs_exist_ok=True, ignore=_specials,
                copy_function=_copy_file,
            )  # fmt: skip
        else:
            target.mkdir(exist_ok=True, mode=0o700)
    elif kind == "symlink":
        shutil.copy2(src, target, follow_symlinks=False)
    else:
        _copy_file(src, target)
    return {**row, "saved": True}, budget - size


def _mkdirs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _copy_file(src: str | Path, dst: str | Path) -> None:
    """Content and times; never set-user/group-ID bits (the copy belongs to root)."""
    shutil.copy2(src, dst, follow_symlinks=False)
    out = Path(dst)
    if not out.is_symlink():
        out.chmod(stat.S_IMODE(out.lstat().st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def _specials(directory: str, names: list[str]) -> set[str]:
    """Names in ``directory`` that are neither files, directories nor symlinks: not copied."""
    out = set()
    for name in names:
        try:
            mode = (Path(directory) / name).lstat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            out.add(name)
    return out


def _size(top: Path, stop_above: int) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue
            if total > stop_above:
                return total
    return total


def _readme(report: dict[str, Any]) -> str:
    lines = [
        "hakit recovery folder",
        "",
        "This node ran alone (its peer was unreachable) and then yielded to the peer, whose",
        "copy was kept. Below: what this node changed while alone, saved before its copy was",
        "resynchronised from the peer. Merge by hand what should be kept (set-user/group-ID",
        "bits are not kept; the copies belong to root).",
        f"Generation {report['generation']}, saved {report['saved_at']}.",
    ]
    if report["journal_full"]:
        lines.append("The change journal was incomplete: other files may have changed too.")
    lines.append("")
    for row in report["entries"]:
        state = "saved" if row["saved"] else f"NOT saved ({row.get('note', '')})"
        lines.append(f"{row['kind']:9} {state:40} {row['path']}")
    return "\n".join(lines) + "\n"
