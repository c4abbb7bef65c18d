"""Durable state of the agent on disk: module records and the agent's incarnation counter.

Every write is atomic and durable: write a temporary file, fsync it, rename it over the old
one, fsync the directory. A reader never sees a half-written record; after a crash the record
is either the old or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hakit.core.mirror import Durable
from hakit.model import State

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably (temp file, fsync, rename, fsync directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Store:
    """The agent's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def next_incarnation(self) -> int:
        """Bump and persist the incarnation counter (one per agent start); return it."""
        path = self.dir / "incarnation"
        try:
            current = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            current = 0
        write_atomic(path, f"{current + 1}\n")
        return current + 1

    def _module_path(self, module: str) -> Path:
        return self.dir / "modules" / f"{module}.json"

    def load_module(self, module: str) -> Durable:
        """The module's last record, or a fresh one (STOP, not wanted) if there is none."""
        path = self._module_path(module)
        try:
            raw = json.loads(path.read_text())
            return Durable(
                wanted=bool(raw["wanted"]),
                state=State(raw["state"]),
                epoch=int(raw["epoch"]),
                primary_epoch=int(raw["primary_epoch"]),
                peer_generation_seen=int(raw.get("peer_generation_seen", 0)),
            )
        except FileNotFoundError:
            return Durable()
        except (ValueError, KeyError, TypeError) as exc:
            log.error("module %s: unreadable record %s (%s): starting from STOP", module, path, exc)
            return Durable()

    def save_module(self, module: str, record: Durable) -> None:
        data = {
            "wanted": record.wanted,
            "state": record.state.value,
            "epoch": record.epoch,
            "primary_epoch": record.primary_epoch,
            "peer_generation_seen": record.peer_generation_seen,
        }
        write_atomic(self._module_path(module), json.dumps(data, sort_keys=True) + "\n")
