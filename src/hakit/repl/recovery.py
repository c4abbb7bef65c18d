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
deleted; files beyond ``limit`` bytes in total are listed as not saved (with the reason), so
that the folder never fills the disk.

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
    return that folder, or None when the journal lists nothing. Then discard the journal."""
    journal = DirtyJournal(journal_dir)
    journal.load()
    entries = journal.snapshot() if journal.active else []
    if not entries:
        return None
    folder = dest / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-g{generation}"
    folder.mkdir(parents=True, exist_ok=True)
    budget = limit
    rows: list[dict[str, Any]] = []
    for entry in sorted(entries, key=lambda e: (e.root, e.path)):
        root = roots[entry.root]
        rel = os.fsdecode(entry.path)
        src = Path(root) if rel == "." else Path(root) / rel
        target = folder / "files" / root.lstrip("/") / ("" if rel == "." else rel)
        row, budget = _save(src, target, entry.tree, budget)
        rows.append({"path": str(src), **row})
    report = {
        "generation": generation,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "journal_full": journal.full,
        "entries": rows,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "README.txt").write_text(_readme(report), encoding="utf-8")
    journal.discard()
    saved = sum(1 for r in rows if r["saved"])
    log.warning(
        "changes made while alone (%d path(s), %d saved) kept in %s before this copy is "
        "resynchronised from the peer",
        len(rows),
        saved,
        folder,
    )
    return folder


def _save(src: Path, target: Path, tree: bool, budget: int) -> tuple[dict[str, Any], int]:
    try:
        st = src.lstat()
    except FileNotFoundError:
        return {"kind": "deleted", "saved": False, "note": "deleted while alone"}, budget
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    size = _size(src) if kind == "directory" and tree else st.st_size
    row: dict[str, Any] = {"kind": kind, "size": size, "mtime": st.st_mtime, "tree": tree}
    if size > budget:
        return {**row, "saved": False, "note": "over the size limit of the recovery folder"}, budget
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "directory":
            if tree:
                shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
            else:
                target.mkdir(exist_ok=True)
        else:
            shutil.copy2(src, target, follow_symlinks=False)
    except OSError as exc:
        return {**row, "saved": False, "note": f"copy failed: {exc}"}, budget
    return {**row, "saved": True}, budget - size


def _size(top: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue
    return total


def _readme(report: dict[str, Any]) -> str:
    lines = [
        "hakit recovery folder",
        "",
        "This node ran alone (its peer was unreachable) and then yielded to the peer, whose",
        "copy was kept. Below: what this node changed while alone, saved before its copy was",
        "resynchronised from the peer. Merge by hand what should be kept.",
        f"Generation {report['generation']}, saved {report['saved_at']}.",
    ]
    if report["journal_full"]:
        lines.append("The change journal was incomplete: other files may have changed too.")
    lines.append("")
    for row in report["entries"]:
        state = "saved" if row["saved"] else f"NOT saved ({row.get('note', '')})"
        lines.append(f"{row['kind']:9} {state:40} {row['path']}")
    return "\n".join(lines) + "\n"
