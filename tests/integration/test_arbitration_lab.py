"""Arbitration in the lab: a witness on the client host, real agents, a client appending
records through the VIP. Every acknowledged record must be on the primary at the end, and no
node may yield after both were primary (checked in every agent log by the ``lab`` fixture:
these tests are NOT marked ``split_brain``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from hakit.lab import agents, chaos, faults, netns
from hakit.lab.lab import Lab
from hakit.net import vip_fence

from .labkit import MODULE, VIP, LabSpec, log_marks, log_since, vip_on
from .test_replication_lab import Writer, records

pytestmark = [pytest.mark.integration, pytest.mark.lab(profile="fast", witness=True)]
TIMEOUT = LabSpec().timeout  # fast profile: 0.5 s heartbeat timeout (lease 1.5 s)


def never(lab: Lab, node: str, states: set[str], seconds: float) -> None:
    """Watch ``node`` for ``seconds``: it never reports one of ``states``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        view = agents.view(lab, node)
        state = view["modules"][MODULE]["state"] if view else "DOWN"
        assert state not in states, f"{node} became {state}"
        time.sleep(0.05)


def finish(lab: Lab, writer: Writer) -> tuple[str, list[int]]:
    """Let the pair form again, stop the writer; (primary, acknowledged records)."""
    prim, _ = agents.wait_pair(lab, MODULE, timeout=40)
    time.sleep(0.5)
    acked = writer.stop()
    agents.wait_pair(lab, MODULE, timeout=20)
    on_prim = set(records(lab, prim))
    lost = [n for n in acked if f"rec-{n}" not in on_prim]
    assert not lost, f"{len(lost)} acknowledged records lost on {prim}, first {lost[:5]}"
    return prim, acked


def test_partition_between_the_nodes_keeps_the_primary_and_the_other_never_serves(
    lab: Lab,
) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    writer = Writer(lab)
    time.sleep(1.0)
    faults.partition(lab, prim, second)
    try:
        agents.wait_states(lab, MODULE, {prim: "ALONE"}, timeout=15)
        never(lab, second, {"STARTING_PRIM", "PRIM", "ALONE"}, seconds=4 * TIMEOUT + 3)
        before = len(writer.acked)
        time.sleep(1.0)
        assert len(writer.acked) > before, "the primary stopped acknowledging writes"
    finally:
        lab.heal()
    new_prim, acked = finish(lab, writer)
    assert new_prim == prim and acked


def test_an_isolated_primary_fences_and_the_secondary_takes_over(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    writer = Writer(lab)
    time.sleep(1.0)
    marks = log_marks(lab)
    lab.cut(prim)  # from the peer, the witness and the client
    try:
        agents.wait_states(lab, MODULE, {second: "ALONE"}, timeout=20)
        assert not vip_on(lab, prim), "the isolated primary still holds the VIP"
        fenced = [line for line in log_since(lab, marks)[prim] if "fencing" in line]
        assert fenced, "the isolated primary did not log its fencing"
    finally:
        lab.heal()
    new_prim, _ = finish(lab, writer)
    assert new_prim == second


def test_a_paused_primary_agent_does_not_serve_again_when_it_resumes(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    writer = Writer(lab)
    time.sleep(1.0)
    faults.pause(lab, prim)
    try:
        agents.wait_states(lab, MODULE, {second: "ALONE"}, timeout=20)
        # the paused agent could not act, but its replication process's watchdog did
        assert not vip_on(lab, prim), "the paused primary still holds the VIP"
        time.sleep(1.0)
        marks = log_marks(lab)
    finally:
        faults.resume(lab, prim)
    # its first decision once it runs again is to fence (it cannot renew: n2 holds the lease)
    end = time.monotonic() + 2.0
    while agents.view(lab, prim)["modules"][MODULE]["state"] in ("PRIM", "ALONE"):  # type: ignore[index]
        assert time.monotonic() < end, f"{prim} still primary 2 s after it resumed"
        time.sleep(0.02)
    never(lab, prim, {"STARTING_PRIM", "PRIM", "ALONE"}, seconds=2.0)
    moves = [line for line in log_since(lab, marks)[prim] if " -> " in line]
    assert moves and "fencing" in moves[0], moves[:5]
    new_prim, _ = finish(lab, writer)
    assert new_prim == second


def reaches_own_vip(lab: Lab, node: str) -> bool:
    """The demo application of ``node`` answers through the VIP, asked from ``node`` itself
    (packets that never leave its namespace: only its own kernel can stop them)."""
    url = f"http://{VIP}:8080/"
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", url]
    return lab.run_in(node, argv, timeout=10).stdout.strip() == "200"


def test_a_paused_primary_whose_replicator_died_stops_serving_at_its_lease_deadline(
    lab: Lab,
) -> None:
    """SIGSTOP of the agent, then SIGKILL of the replication process (whose watchdog would
    have removed the VIP): nothing of hakit runs on the primary any more, its application
    and its VIP address stay. The lease held in the kernel must cut the VIP off anyway."""
    prim, second = agents.wait_pair(lab, MODULE)
    assert reaches_own_vip(lab, prim), "the primary's application does not answer on the VIP"
    table = vip_fence.table_name(MODULE)
    faults.pause(lab, prim)
    try:
        pid = chaos.replicator_pid(lab, prim)
        assert pid is not None, f"no replication process on {prim}"
        os.kill(pid, signal.SIGKILL)
        agents.wait_for(f"pid {pid} to die", lambda: not netns.pid_alive(pid), timeout=5)
        agents.wait_states(lab, MODULE, {second: "ALONE"}, timeout=20)
        assert vip_on(lab, prim), "test premise: nothing could remove the paused node's VIP"
        assert not reaches_own_vip(lab, prim), f"{prim} still serves on the VIP"
        live = lab.run_in(prim, ["nft", "list", "set", "inet", table, "live4"], check=True)
        assert VIP not in live.stdout, live.stdout
        assert reaches_own_vip(lab, second), f"{second} does not serve on the VIP"
    finally:
        faults.resume(lab, prim)
    # once it runs again it fences, removes the address and the tables
    agents.wait_for(f"{prim} to drop the VIP", lambda: not vip_on(lab, prim), timeout=10)
    agents.wait_for(
        f"{prim} to remove its lease tables",
        lambda: table not in lab.run_in(prim, ["nft", "list", "tables"], check=True).stdout,
        timeout=10,
    )
    new_prim, _ = agents.wait_pair(lab, MODULE, timeout=40)
    assert new_prim == second
