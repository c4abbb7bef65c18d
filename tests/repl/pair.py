"""Two real replicator processes on this machine, without agents: the data path under test.

Node ``a`` (127.0.0.1) and node ``b`` (127.0.0.2) each get a cluster config under ``root``, a
module ``m`` replicating ``<root>/<node>/data/one`` and ``.../two``, and their own state dir.
The test drives the roles as the agent would (JSON lines on stdin) and reads the records the
processes report. Like an agent without arbiters whose peer knows every generation at once,
it permits each generation a primary reports (``auto_permit``; off: the test permits with
:meth:`permit`). Loopback only; every process is ended by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

KEY = "pair-test-key-0123456789abcdef"
ADDRESSES = {"a": "127.0.0.1", "b": "127.0.0.2"}
DIRS = ("one", "two")


def write_config(
    root: Path, node: str, port: int, extra: str = "", *, plaintext: bool = False
) -> Path:
    base = root / node
    (base / "etc" / "modules" / "m").mkdir(parents=True, exist_ok=True)
    cluster = base / "etc" / "cluster.toml"
    nodes = "".join(
        f'[nodes.{n}]\naddresses = {{ lo = "{addr}" }}\n' for n, addr in ADDRESSES.items()
    )
    cluster.write_text(
        f'name = "pair"\nkey = "{KEY}"\nstate_dir = "{base / "state"}"\n'
        f'run_dir = "{base / "run"}"\nmodules_dir = "{base / "etc" / "modules"}"\n'
        f"plaintext_networks = {['lo'] if plaintext else []}\n{nodes}",
        encoding="utf-8",
    )
    exclude = os.environ.get("HK_PAIR_EXCLUDE", "")  # e.g. 'exclude = ["cache/"]'
    replicate = "".join(f'[[replicate]]\npath = "{base / "data" / d}"\n{exclude}\n' for d in DIRS)
    (base / "etc" / "modules" / "m" / "module.toml").write_text(
        f'mode = "mirror"\n{replicate}[replication]\nport = {port}\ntimeout = "2s"\n{extra}',
        encoding="utf-8",
    )
    for d in DIRS:
        with contextlib.suppress(FileExistsError):  # also a dead mount left by a killed process
            (base / "data" / d).mkdir(parents=True)
    return cluster


class Replicator:
    """One ``hakit.repl.process`` under test."""

    def __init__(
        self,
        root: Path,
        node: str,
        port: int,
        extra: str = "",
        *,
        plaintext: bool = False,
        auto_permit: bool = True,
    ) -> None:
        self.node = node
        self.auto_permit = auto_permit
        self._stdin = threading.Lock()
        self.root = root
        self.config = write_config(root, node, port, extra, plaintext=plaintext)
        self.log = (root / f"{node}.log").open("ab")
        env = dict(os.environ, HAKIT_BIND_REGISTRY=str(root / node / "run" / "binds"))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hakit.repl.process",
                "-c",
                str(self.config),
                "-m",
                "m",
                "--node",
                node,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._ids = 0
        threading.Thread(target=self._read, daemon=True).start()

    def data(self, d: str = "one") -> Path:
        return self.root / self.node / "data" / d

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
            if self.auto_permit and event.get("ev") == "record" and event.get("generation"):
                with contextlib.suppress(OSError, ValueError):
                    self.permit(int(event["generation"]))

    def permit(self, generation: int) -> None:
        """The agent's PermitAlone for ``generation``."""
        self._send({"cmd": "permit", "generation": generation})

    def _send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with self._stdin:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()

    def role(
        self,
        role: str,
        *,
        force_full: bool = False,
        outdated: bool = False,
        terms: dict[str, int] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._ids += 1
        cmd = {
            "cmd": "role",
            "id": self._ids,
            "role": role,
            "force_full": force_full,
            "outdated": outdated,
            "terms": terms or {},
        }
        self._send(cmd)
        done = self.wait_for(lambda e: e.get("ev") == "done" and e.get("id") == self._ids, timeout)
        if not done["ok"]:
            raise RuntimeError(f"{self.node}: role {role} failed: {done['error']}")

    def mark(self) -> int:
        """Position in the event stream: ``wait_for(..., since=mark)`` ignores older events."""
        with self._cond:
            return len(self.events)

    def wait_for(self, pred: Any, timeout: float = 30.0, since: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = since
            while True:
                for e in self.events[seen:]:
                    if pred(e):
                        return e
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"{self.node}: no matching event; last: {self.events[-3:]}")
                self._cond.wait(min(left, 0.5))

    def last_record(self) -> dict[str, Any]:
        with self._cond:
            recs = [e for e in self.events if e.get("ev") == "record"]
        return recs[-1] if recs else {}

    def wait_in_sync(self, timeout: float = 60.0, since: int = 0) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("ev") == "record" and e.get("in_sync"), timeout, since)

    def wait_alone(self, timeout: float = 30.0, since: int = 0) -> dict[str, Any]:
        return self.wait_for(
            lambda e: e.get("ev") == "record" and e.get("mode") == "alone", timeout, since
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
