"""What a real agent does around the failover itself: process checker, health URL, `hakit state`
exit codes, hostile heartbeat traffic.

Two nodes, module ``mirror-demo`` (VIP 192.0.2.100, demo application on port 8080, process
checker on its pid file every 1 s after a 2 s grace, 2 local restarts before a failover), fast
heartbeat profile (100 ms / 500 ms). The lab is shared by the tests of this module and
restored to a PRIM + SECOND pair between them.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from hakit.errors import LabError
from hakit.lab import agents
from hakit.lab.lab import HEARTBEAT_PORT, Lab

from .labkit import MODULE, VIP, address, app_pid, health, kill_app, view

pytestmark = pytest.mark.integration


def test_process_checker_restarts_the_application_locally_then_fails_over(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    max_restarts = 2  # template default: [loop_guard] max_restarts is not set

    for restart in range(1, max_restarts + 1):
        killed = kill_app(lab, prim)

        def restarted(killed: int = killed) -> bool:
            pid = app_pid(lab, prim)
            states = agents.module_states(lab, MODULE)
            return pid not in (None, killed) and states == {prim: "PRIM", second: "SECOND"}

        agents.wait_for(f"restart {restart} of the application on {prim}", restarted, 15)
        log = agents.client(lab, prim).log(MODULE, 50)
        assert f"local restart {restart}/{max_restarts}" in log, log

    kill_app(lab, prim)

    agents.wait_states(lab, MODULE, {prim: "SECOND", second: "PRIM"}, timeout=15)
    assert agents.vip_holders(lab, VIP) == [second]
    assert app_pid(lab, second) is not None
    log = agents.client(lab, prim).log(MODULE, 50)
    assert f"failing over to {second}" in log, log


def test_health_url_answers_200_on_the_primary_and_404_on_the_secondary(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    assert (health(lab, prim), health(lab, second)) == (200, 404)
    assert health(lab, prim, module="no-such-module") == 404

    agents.client(lab, prim).command(MODULE, "swap")
    agents.wait_states(lab, MODULE, {prim: "SECOND", second: "PRIM"})

    assert (health(lab, prim), health(lab, second)) == (404, 200)


def state_exit_code(lab: Lab, node: str, module: str = MODULE) -> int | None:
    """Exit code of `hakit state -m MODULE` run on ``node`` (HAKIT_CONFIG set by the lab)."""
    argv = [sys.executable, "-m", "hakit", "state", "-m", module]
    return lab.run_in(node, argv, timeout=30).returncode


def test_state_command_exit_code_tells_the_state(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    assert state_exit_code(lab, prim) == 3  # PRIM
    assert state_exit_code(lab, second) == 4  # SECOND
    assert state_exit_code(lab, second, "no-such-module") == 5  # error

    agents.client(lab, second).command(MODULE, "stop")
    agents.wait_states(lab, MODULE, {second: "STOP", prim: "ALONE"})

    assert state_exit_code(lab, second) == 0  # STOP
    assert state_exit_code(lab, prim) == 2  # ALONE


# Runs in the client's namespace. Datagrams that claim to come from the peer are sent from the
# peer's address with IP_TRANSPARENT (the client may then bind an address it does not own);
# they only ever go to the target node's heartbeat port, on the lab network.
FORGER = textwrap.dedent(
    """
    import socket, sys
    from hakit.net.wire import Envelope, encode

    target, port, peer, peer_name, key_file = sys.argv[1:]
    real_key = open(key_file, "rb").read().strip()
    old = Envelope("lab", peer_name, 0, 1, {})  # incarnation 0: older than any running agent's

    def send(data, source):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            s.bind((source, 0))
            s.sendto(data, (target, int(port)))

    send(b"not a heartbeat", "192.0.2.50")  # from the client: unknown source
    send(b"HKHB\\x01 garbage", peer)  # right magic, then garbage
    send(encode(b"a wrong key of 32 bytes........", old), peer)  # bad MAC
    send(b"HKHB\\x01" + b"x" * 9000, peer)  # too big
    send(encode(real_key, Envelope("other", peer_name, 0, 1, {})), peer)  # wrong cluster
    send(encode(real_key, old), peer)  # a replayed, older envelope
    send(encode(real_key, old), "192.0.2.50")  # signed, from the wrong address
    """
)

EXPECTED_DROPS = {
    "dropped_unknown_source": 2,
    "dropped_garbage": 1,
    "dropped_bad_mac": 1,
    "dropped_too_big": 1,
    "dropped_wrong_cluster": 1,
    "dropped_old_incarnation": 1,
}


def test_forged_and_garbage_heartbeats_are_dropped_counted_and_change_nothing(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    before = {n: view(lab, n) for n in (prim, second)}
    key_file = lab.root / prim / "etc" / "cluster.key"

    for target, peer in ((prim, second), (second, prim)):
        argv = [sys.executable, "-c", FORGER, address(lab, target), str(HEARTBEAT_PORT)]
        argv += [address(lab, peer), peer, str(key_file)]
        lab.run_in("client", argv, timeout=30, check=True)

    def drops(node: str) -> dict[str, int]:
        now, then = view(lab, node)["heartbeat"], before[node]["heartbeat"]
        return {c: now[c] - then[c] for c in now if c.startswith("dropped_") and now[c] != then[c]}

    for node in (prim, second):
        try:
            agents.wait_for("the drops", lambda n=node: drops(n) == EXPECTED_DROPS, timeout=5)
        except LabError:
            pytest.fail(f"{node} counted {drops(node)}, not {EXPECTED_DROPS}")
    for node in (prim, second):
        old, new = before[node], view(lab, node)
        unchanged = ("state", "since", "epoch", "primary_epoch")
        assert [new["modules"][MODULE][k] for k in unchanged] == [
            old["modules"][MODULE][k] for k in unchanged
        ]
        assert new["incarnation"] == old["incarnation"]
        assert new["peers"][old["modules"][MODULE]["peer"]]["alive"]
        assert new["heartbeat"]["accepted"] > old["heartbeat"]["accepted"]  # the peer still heard
    assert agents.module_states(lab, MODULE) == {prim: "PRIM", second: "SECOND"}
