"""The lab's fault tools for split-brain work: a partition between the two nodes (both still
reach the client), a paused agent, a full disk, two heartbeat networks and a wall-clock jump.

What the agents then do is hakit's current, documented behaviour without arbitration (both
run ALONE until the network heals; the later primary term yields): the tests mark
``split_brain`` and check the tools and the return to a PRIM + SECOND pair, not arbitration.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

import pytest

from hakit.errors import LabError
from hakit.lab import agents, faults
from hakit.lab.lab import CLIENT, Lab

from .labkit import MODULE, VIP, LabSpec, address, last_line, log_marks, log_since, stamp
from .test_replication_lab import Writer, records

pytestmark = pytest.mark.integration


def reaches(lab: Lab, host: str, node: str) -> bool:
    done = lab.run_in(host, ["ping", "-c", "1", "-W", "1", address(lab, node)], timeout=10)
    return done.ok


@pytest.mark.split_brain
def test_a_partition_cuts_only_between_the_two_nodes(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    faults.partition(lab, prim, second)
    try:
        assert not reaches(lab, prim, second) and not reaches(lab, second, prim)
        assert reaches(lab, CLIENT, prim) and reaches(lab, CLIENT, second)
        # no arbitration yet: the secondary loses its peer and runs alone too
        agents.wait_states(lab, MODULE, {prim: "ALONE", second: "ALONE"}, timeout=15)
        for node in (prim, second):  # each side acknowledges a write of its own
            url = f"http://{address(lab, node)}:8080/append"
            body = f"written-on-{node}"
            argv = ["curl", "-sf", "--max-time", "5", "--data-binary", body, url]
            assert lab.run_in(CLIENT, argv, timeout=15).ok
    finally:
        lab.heal()
    assert reaches(lab, prim, second)
    new_prim, _ = agents.wait_pair(lab, MODULE, timeout=30)
    loser = second if new_prim == prim else prim
    kept = records(lab, new_prim)
    assert f"written-on-{new_prim}" in kept and f"written-on-{loser}" not in kept
    assert records(lab, loser) == kept  # resynchronised from the primary that stayed
    # … and what the other side wrote alone is not lost: it is in its recovery folder
    saved = list((lab.root / loser / "state" / "recovery" / MODULE).glob("*/files/**/records.log"))
    assert saved and f"written-on-{loser}" in saved[0].read_text()


@pytest.mark.split_brain
def test_a_paused_agent_is_lost_by_its_peer_and_answers_again_once_resumed(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    pid = faults.pause(lab, prim)
    try:
        assert faults.is_paused(pid)
        assert agents.view(lab, prim) is None  # its API does not answer either
        agents.wait_states(lab, MODULE, {second: "ALONE"}, timeout=LabSpec().timeout + 10)
    finally:
        faults.resume(lab, prim)
    assert not faults.is_paused(pid)
    agents.wait_pair(lab, MODULE, timeout=30)


@pytest.mark.lab(profile="fast", data_size="64M")
def test_diskfull_fills_one_nodes_data_file_system_and_the_primary_keeps_serving(
    lab: Lab,
) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    taken = faults.diskfull(lab, second)
    try:
        assert taken > 0
        assert os.statvfs(lab.root / second / "data").f_bavail == 0
        assert os.statvfs(lab.root / prim / "data").f_bavail > 0  # only that node's
        writer = Writer(lab)
        agents.wait_states(lab, MODULE, {prim: "ALONE"}, timeout=15)  # secondary dropped
        time.sleep(1.0)
        acked = writer.stop()
        assert acked, "the primary kept acknowledging writes"
    finally:
        assert faults.diskfree(lab, second)
    assert not faults.diskfree(lab, second)
    agents.wait_pair(lab, MODULE, timeout=60)  # resynchronised once the space is back
    on_second = records(lab, second)
    assert on_second == records(lab, prim)  # the copies are the same again
    assert {f"rec-{i}" for i in acked} <= set(on_second)


def test_diskfull_needs_a_lab_with_its_own_data_file_systems(lab: Lab) -> None:
    with pytest.raises(LabError, match="--data-size"):
        faults.diskfull(lab, "n1")


@pytest.mark.lab(networks=2)
def test_a_peer_is_lost_only_when_every_heartbeat_network_has_lost_it(lab: Lab) -> None:
    """Two heartbeat networks, lan and backup; replication runs on the first one by name,
    backup. Cutting one network of the secondary never makes it take over: the peer is still
    heard on the other one."""
    prim, second = agents.wait_pair(lab, MODULE)
    marks = log_marks(lab)
    lab.cut(second, "lan")
    time.sleep(2.0)  # well over the fast profile's 500 ms timeout
    assert agents.module_states(lab, MODULE) == {prim: "PRIM", second: "SECOND"}
    lab.heal()
    lab.cut(second, "backup")  # the replication link breaks, the heartbeats go on over lan
    try:
        agents.wait_states(lab, MODULE, {prim: "ALONE"}, timeout=20)
        time.sleep(1.0)
        states = agents.module_states(lab, MODULE)
        assert states[second] not in ("PRIM", "ALONE", "STARTING_PRIM"), states
        assert agents.vip_holders(lab, VIP) == [prim]
    finally:
        lab.heal()
    agents.wait_pair(lab, MODULE, timeout=30)
    lost = [
        line
        for lines in log_since(lab, marks).values()
        for line in lines
        if "lost: no heartbeat" in line
    ]
    assert lost == [], lost


def test_a_clock_jump_moves_one_nodes_wall_clock_and_nothing_else(lab: Lab) -> None:
    """Stepping the wall clock of both nodes (an hour ahead, two hours back) changes no state:
    every hakit deadline runs on clocks that do not jump. The agents' own log time stamps
    show the new wall clocks, so the jump really reached them."""
    prim, second = agents.wait_pair(lab, MODULE)
    marks = log_marks(lab)
    faults.clockjump(lab, prim, 3600)
    faults.clockjump(lab, second, -7200)
    try:
        end = time.monotonic() + 6 * LabSpec().timeout + 1.0
        while time.monotonic() < end:  # several heartbeat timeouts and lease renewals
            assert agents.module_states(lab, MODULE) == {prim: "PRIM", second: "SECOND"}
            time.sleep(0.1)
        agents.client(lab, second).command(MODULE, "swap")  # something to log on each node
        agents.wait_states(lab, MODULE, {prim: "SECOND", second: "PRIM"}, timeout=20)
        lines = log_since(lab, marks)
        now = datetime.now()
        ahead = stamp(last_line(lines[prim], " -> "))
        behind = stamp(last_line(lines[second], " -> "))
        assert timedelta(minutes=55) < ahead - now < timedelta(minutes=65), ahead
        assert timedelta(minutes=115) < now - behind < timedelta(minutes=125), behind
    finally:
        faults.clockjump(lab, prim, -3600)
        faults.clockjump(lab, second, 7200)
    agents.wait_pair(lab, MODULE, timeout=30)
