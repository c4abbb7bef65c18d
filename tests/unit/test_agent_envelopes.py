"""A heartbeat whose statuses cannot be read does not count as hearing the peer: otherwise a
peer that sends only unreadable heartbeats would never be declared lost (no failover)."""

from __future__ import annotations

from pathlib import Path

from hakit.agent.driver import Agent
from hakit.config import load
from hakit.net.wire import Envelope

from .test_config import CLUSTER, KEY


def agent(tmp_path: Path) -> Agent:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(CLUSTER.format(key_file=key_file, state_dir=tmp_path / "state"))
    return Agent(load(cluster), "n1")


def test_an_unreadable_payload_does_not_make_the_peer_alive(tmp_path: Path) -> None:
    a = agent(tmp_path)

    a._on_envelope("lan", Envelope("c1", "n2", 1, 1, {"modules": "not an object"}))
    assert not a.tracker.peers["n2"].alive

    a._on_envelope("lan", Envelope("c1", "n2", 1, 2, {"modules": {}}))
    assert a.tracker.peers["n2"].alive
