"""``hakit verify`` and ``hakit diff``: compare the primary's copy with the secondary's.

Runs in the primary's replicator, over its link (read-only requests: LIST, SUMS). Every
directory is listed on both sides; entries that differ in type, size, mode, owner or mtime are
reported; with ``checksums`` (verify), files that look the same are also compared block by
block, like a scrub. ``diff`` estimates what a resync would send: the journal's entries for an
incremental resync, and the bytes of the differing files for a full one.

Caveats: files the application changes during the walk may be reported as different (run it
again, or when the application is quiet); the walk reads the whole tree (and with checksums all
data) on both nodes.
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING, Any

from hakit.repl import protocol as p
from hakit.repl.tree import block_sums, differing_blocks, scan_dir

if TYPE_CHECKING:
    from hakit.repl.link import Link
    from hakit.repl.primary import PrimaryReplicator

MAX_LISTED = 50  # differences named in the report; the counts cover all


def compare(prim: PrimaryReplicator, link: Link, checksums: bool) -> dict[str, Any]:
    """Walk every replicated directory; return the report (JSON-able)."""
    started = time.monotonic()
    report: dict[str, Any] = {
        "checked_paths": 0,
        "checked_bytes": 0,
        "differences": 0,
        "bytes_to_send": 0,
        "examples": [],
        "journal_paths": len(prim.journal.snapshot()) if prim.journal.active else 0,
        "checksums": checksums,
    }

    def differ(root: int, path: bytes, why: str, size: int = 0) -> None:
        report["differences"] += 1
        report["bytes_to_send"] += size
        if len(report["examples"]) < MAX_LISTED:
            report["examples"].append(f"[{root}] {os.fsdecode(path)}: {why}")

    block = prim.s.block_size
    for root, fd in enumerate(prim.roots):
        todo = [b"."]
        while todo:
            path = todo.pop()
            mine = {
                k: v
                for k, v in scan_dir(fd, path).items()
                if not prim.excluded(root, _join(path, k))
            }
            reply = link.call(p.Request(p.Op.LIST, path, root=root))
            theirs = p.decode_listing(reply.data) if not reply.err else {}
            if reply.err:
                differ(root, path, f"secondary: {reply.message}")
            for name in sorted(set(theirs) - set(mine)):
                if not prim.excluded(root, _join(path, name)):
                    differ(root, _join(path, name), "only on the secondary")
            for name, here in sorted(mine.items()):
                child = _join(path, name)
                report["checked_paths"] += 1
                there = theirs.get(name)
                size = here.size if stat.S_ISREG(here.mode) else 0
                if there is None:
                    differ(root, child, "missing on the secondary", size)
                elif stat.S_IFMT(here.mode) != stat.S_IFMT(there.mode):
                    differ(root, child, "different type", size)
                elif (here.size, here.mode, here.uid, here.gid) != (
                    there.size,
                    there.mode,
                    there.uid,
                    there.gid,
                ):
                    differ(root, child, "different size, mode or owner", size)
                elif here.mtime_ns != there.mtime_ns:
                    differ(root, child, "different modification time", size)
                elif checksums and stat.S_ISREG(here.mode) and here.size:
                    bad = _blocks_differ(link, fd, root, child, size=here.size, block=block)
                    report["checked_bytes"] += here.size
                    if bad:
                        differ(root, child, f"{bad} bytes differ (same size and mtime)", bad)
                if stat.S_ISDIR(here.mode):
                    todo.append(child)
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def _blocks_differ(link: Link, fd: int, root: int, path: bytes, *, size: int, block: int) -> int:
    try:
        f = os.open(path, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError:
        return 0
    bad = 0
    span = (p.MAX_DATA // p.DIGEST_SIZE) * block
    try:
        for off in range(0, size, span):
            n = min(span, size - off)
            reply = link.call(p.Request(p.Op.SUMS, path, root=root, a=block, b=off, c=n))
            if reply.err:
                return n
            mine = block_sums(f, block, off, n)
            ranges = differing_blocks(mine, reply.data, block, size, offset=off, length=n)
            bad += sum(length for _, length in ranges)
    finally:
        os.close(f)
    return bad


def _join(parent: bytes, name: bytes) -> bytes:
    return name if parent == b"." else parent + b"/" + name
