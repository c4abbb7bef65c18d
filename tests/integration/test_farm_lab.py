"""A farm module on three real agents in the lab: load balancing, failover, join and leave.

Three nodes run ``farm-demo`` (VIP 192.0.2.100, the demo HTTP application on port 8080 on
every node, fast heartbeat profile: 100 ms / 500 ms). The client sends from 30 addresses
(192.0.2.200 …) so that the ``client-ip`` hash spreads it over the nodes. Every test starts
with the three nodes UP and all 256 buckets placed, and the agents' logs must not report a bug.

Durations are only sanity bounds: speed figures live in ``bench/farm.py``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hakit.lab import agents
from hakit.lab.lab import CLIENT, Lab

from .conftest import LAB_ROOT, why_no_lab
from .labkit import BUG_PHRASES, health, log_marks, log_since

pytestmark = pytest.mark.integration

MODULE = "farm-demo"
TARGET = "192.0.2.100:8080"
NODES = ["n1", "n2", "n3"]
SOURCES = 30


@pytest.fixture(scope="module")
def farm_lab() -> Iterator[Lab]:
    reason = why_no_lab()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(LAB_ROOT)
    try:
        lab.up(nodes=3, modules=[MODULE], interval="100ms", timeout="500ms")
        agents.wait_agents(lab)
        agents.command_all(lab, MODULE, "start")
        agents.wait_farm(lab, MODULE, NODES, timeout=30)
        lab.client_sources(SOURCES)
        yield lab
    finally:
        lab.down()


@pytest.fixture
def lab(farm_lab: Lab) -> Iterator[Lab]:
    """The farm with every node on and UP; after the test, no bug in the agents' logs."""
    booted = [node for node, n in farm_lab.state().nodes.items() if not n.powered]
    for node in booted:
        farm_lab.poweron(node)  # its agent starts the module again (it was wanted)
    agents.wait_agents(farm_lab)
    states = agents.module_states(farm_lab, MODULE)
    stopped = [n for n, s in states.items() if s == "STOP" and n not in booted]
    if stopped:
        agents.command_all(farm_lab, MODULE, "start", stopped)
    agents.wait_farm(farm_lab, MODULE, NODES, timeout=30)
    marks = log_marks(farm_lab)
    yield farm_lab
    bugs = [
        f"{node}: {line}"
        for node, lines in log_since(farm_lab, marks).items()
        for line in lines
        if any(p in line for p in BUG_PHRASES)
    ]
    if bugs:
        pytest.fail("the agents reported bugs:\n" + "\n".join(bugs), pytrace=False)


def streams(lab: Lab, count: int, seconds: float) -> dict[str, Any]:
    """``count`` long-lived connections from the client's addresses (blocks ``seconds``)."""
    sources = ",".join(lab.client_sources(SOURCES))
    argv = [sys.executable, "-m", "hakit.lab.streams", "--target", TARGET]
    argv += ["--count", str(count), "--seconds", str(seconds), "--sources", sources]
    done = lab.run_in(CLIENT, argv, timeout=seconds + 60, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def streams_during(lab: Lab, seconds: float, action: Any, delay: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(streams(lab, 50, seconds)))
    thread.start()
    time.sleep(delay)
    try:
        action()
    finally:
        thread.join()
    return out


def test_connections_spread_over_every_node_with_client_affinity(lab: Lab) -> None:
    seen = lab.probe(3.2, sources=SOURCES)

    assert seen.total >= 300 and seen.failed == 0, (seen.total, seen.errors)
    assert seen.sources == SOURCES
    for node in NODES:
        share = seen.per_node.get(node, 0) / seen.ok
        assert 0.20 <= share <= 0.47, seen.per_node
    assert seen.split_sources == [], "client-ip: one client address always lands on one node"
    for node in NODES:
        assert health(lab, node, MODULE) == 200


def test_power_off_moves_the_share_to_the_others(lab: Lab) -> None:
    lab.poweroff("n3")

    agents.wait_farm(lab, MODULE, ["n1", "n2"], timeout=15)
    seen = lab.probe(2.0, sources=SOURCES)
    assert seen.failed == 0, seen.errors
    assert sorted(seen.per_node) == ["n1", "n2"]
    assert seen.split_sources == []


def test_a_joining_node_breaks_no_open_connection(lab: Lab) -> None:
    agents.command_all(lab, MODULE, "stop", ["n3"])
    agents.wait_farm(lab, MODULE, ["n1", "n2"], timeout=30)
    agents.wait_states(lab, MODULE, {"n3": "STOP"}, timeout=30)

    def join() -> None:
        agents.command_all(lab, MODULE, "start", ["n3"])
        agents.wait_farm(lab, MODULE, NODES, timeout=30)

    got = streams_during(lab, 6.0, join, delay=1.5)

    assert got["count"] == 50
    assert got["broken"] == 0 and got["mixed"] == 0, got
    assert "n3" not in got["per_node"], "streams opened before the join stay where they are"
    seen = lab.probe(2.0, sources=SOURCES)
    assert seen.failed == 0 and seen.per_node.get("n3", 0) > 0, seen.per_node


def test_a_clean_leave_drains_open_connections(lab: Lab) -> None:
    def leave() -> None:
        agents.command_all(lab, MODULE, "stop", ["n3"])
        agents.wait_farm(lab, MODULE, ["n1", "n2"], timeout=30)

    got = streams_during(lab, 6.0, leave, delay=1.5)

    assert got["count"] == 50
    assert got["per_node"].get("n3", 0) > 0, got  # n3 had its share of the streams …
    assert got["broken"] == 0 and got["mixed"] == 0, got  # … and served them to the end
    agents.wait_states(lab, MODULE, {"n3": "STOP"}, timeout=30)
    seen = lab.probe(1.0, sources=SOURCES)
    assert seen.failed == 0 and "n3" not in seen.per_node, seen.per_node


def test_a_failing_checker_takes_the_node_out_until_it_recovers(lab: Lab) -> None:
    pidfile = lab.root / "n3" / "run" / f"{MODULE}.pid"
    pid = int(pidfile.read_text())
    lab.run_in("n3", ["kill", "-KILL", str(pid)], check=True)  # the demo application of n3

    agents.wait_farm(lab, MODULE, ["n1", "n2"], timeout=15)
    assert agents.module_states(lab, MODULE)["n3"] == "WAIT"
    seen = lab.probe(1.0, sources=SOURCES)
    assert seen.failed == 0 and "n3" not in seen.per_node, seen.per_node

    start_both = lab.module_dir("n3", MODULE) / "start_both"
    lab.run_in("n3", [str(start_both), "WAIT", "UP"], check=True)  # the operator repairs it

    agents.wait_farm(lab, MODULE, NODES, timeout=15)
    seen = lab.probe(1.0, sources=SOURCES)
    assert seen.failed == 0 and seen.per_node.get("n3", 0) > 0, seen.per_node
