"""The CLI's side of the control channel: HTTP over the agent's Unix socket (root only)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from hakit.errors import AgentUnreachable, HakitError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


class CommandRefusedByAgent(HakitError):
    """The agent refused a command (the message says why)."""


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(
        self, method: str, url: str, body: dict[str, Any] | None = None
    ) -> tuple[int, bytes]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, url, body=payload, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except FileNotFoundError as exc:
            raise AgentUnreachable(
                f"no agent socket at {self.socket_path}: is the agent running "
                "(`hakit agent`, or the hakit service)?"
            ) from exc
        except PermissionError as exc:
            raise AgentUnreachable(f"{self.socket_path}: permission denied (run as root)") from exc
        except (ConnectionError, OSError) as exc:
            raise AgentUnreachable(
                f"cannot talk to the agent at {self.socket_path}: {exc}"
            ) from exc
        finally:
            conn.close()

    def state(self) -> dict[str, Any]:
        status, data = self.request("GET", "/state")
        if status != 200:
            raise AgentUnreachable(f"agent answered {status} to GET /state")
        result: dict[str, Any] = json.loads(data)
        return result

    def command(self, module: str, verb: str, force: bool = False) -> dict[str, Any]:
        status, data = self.request("POST", f"/modules/{module}/{verb}", {"force": force})
        answer: dict[str, Any] = json.loads(data)
        if status != 200:
            raise CommandRefusedByAgent(answer.get("error", f"agent answered {status}"))
        return answer

    def compare(self, module: str, checksums: bool) -> dict[str, Any]:
        query = "?checksums=1" if checksums else ""
        status, data = self.request("GET", f"/modules/{module}/compare{query}")
        answer: dict[str, Any] = json.loads(data)
        if status != 200:
            raise CommandRefusedByAgent(answer.get("error", f"agent answered {status}"))
        return answer

    def fullsync(self, module: str) -> dict[str, Any]:
        status, data = self.request("POST", f"/modules/{module}/replication/fullsync", {})
        answer: dict[str, Any] = json.loads(data)
        if status != 200:
            raise CommandRefusedByAgent(answer.get("error", f"agent answered {status}"))
        return answer

    def log(self, module: str, lines: int) -> str:
        status, data = self.request("GET", f"/modules/{module}/log?lines={lines}")
        if status != 200:
            raise CommandRefusedByAgent(json.loads(data).get("error", f"agent answered {status}"))
        return data.decode()
