"""Durable state of the agent on disk: module records and the agent's incarnation counter.

Every write is atomic and durable: write a temporary file, fsync it, rename it over the old
one, fsync the directory. A reader never sees a half-written record; after a crash the record
is either the old or the new one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hakit.core.farm import FarmDurable
from hakit.core.mirror import Durable
from hakit.model import State
from hakit.system.durable import write_atomic

log = logging.getLogger(__name__)

__all__ = ["Store", "write_atomic"]


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
                lease=tuple(sorted((str(k), int(t)) for k, t in raw.get("lease", {}).items())),
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
            "lease": dict(record.lease),
        }
        write_atomic(self._module_path(module), json.dumps(data, sort_keys=True) + "\n")

    def load_farm(self, module: str) -> FarmDurable:
        """A farm module's last record (wanted, state), or STOP and not wanted."""
        path = self._module_path(module)
        try:
            raw = json.loads(path.read_text())
            return FarmDurable(wanted=bool(raw["wanted"]), state=State(raw["state"]))
        except FileNotFoundError:
            return FarmDurable(wanted=False, state=State.STOP)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("module %s: unreadable record %s (%s): starting from STOP", module, path, exc)
            return FarmDurable(wanted=False, state=State.STOP)

    def save_farm(self, module: str, record: FarmDurable) -> None:
        data = {"mode": "farm", "wanted": record.wanted, "state": record.state.value}
        write_atomic(self._module_path(module), json.dumps(data, sort_keys=True) + "\n")
