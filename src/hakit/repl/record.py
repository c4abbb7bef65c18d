"""The data record of a replicated module on this node: ``<state_dir>/<module>.data.json``.

Written only by the module's replicator process (atomically: temp file, fsync, rename, fsync of
the directory), read by the agent when it starts. See docs/replication.md, "Who has the latest
data". A missing file means ``unknown`` (never synchronised).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hakit.core.freshness import DataRecord, DataState
from hakit.system.durable import write_atomic


def record_path(state_dir: Path, module: str) -> Path:
    return state_dir / f"{module}.data.json"


def load(path: Path) -> DataRecord:
    """The record, or the default (unknown, generation 0) if there is none.

    Raises ValueError naming the file if it exists but cannot be understood: guessing here
    could let an outdated node become primary.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DataRecord()
    try:
        obj = json.loads(raw)
        return DataRecord(
            data=DataState(obj["data"]),
            generation=int(obj["generation"]),
            ran_alone=bool(obj["ran_alone"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: unreadable data record ({exc}); move it away and start this node with "
            "`hakit second` so that it is fully resynchronised"
        ) from None


def save(path: Path, record: DataRecord) -> None:
    """Persist ``record`` durably; when this returns, a crash keeps it."""
    text = json.dumps(
        {"data": str(record.data), "generation": record.generation, "ran_alone": record.ran_alone},
        sort_keys=True,
    )
    write_atomic(path, text)


def event(
    rec: DataRecord, *, in_sync: bool, mode: str, detail: str, progress: dict[str, Any]
) -> dict[str, Any]:
    """The ``record`` event a replicator sends its agent (see hakit.repl.process)."""
    return {
        "ev": "record",
        "data": str(rec.data),
        "generation": rec.generation,
        "ran_alone": rec.ran_alone,
        "in_sync": in_sync,
        "mode": mode,
        "detail": detail,
        "progress": progress,
    }
