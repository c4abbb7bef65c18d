"""Replicated data across real failures in the lab: acknowledged writes survive, and a node
never becomes primary on data it cannot prove up to date.

The demo application appends each record it is sent to ``records.log`` in the module's
replicated directory and fsyncs it before answering 200: a record the client saw acknowledged
must be on whichever node is primary afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from hakit.lab import agents
from hakit.lab.lab import Lab

from .labkit import MODULE, VIP

pytestmark = pytest.mark.integration

APPEND = (
    "import sys, urllib.request as u\n"
    "ok = []\n"
    "for i in range(int(sys.argv[1]), int(sys.argv[2])):\n"
    "    try:\n"
    "        r = u.urlopen(u.Request('http://{vip}:8080/append', data=b'rec-%d\\n' % i),"
    " timeout=0.5)\n"
    "        if r.status == 200: print(i, flush=True)\n"
    "    except Exception: pass\n"
)


def records(lab: Lab, node: str) -> list[str]:
    path = lab.data_dir(node, MODULE) / "replicated" / "records.log"
    return path.read_text().split() if path.exists() else []


class Writer:
    """The client appends records rec-0, rec-1, … through the VIP; keeps the acknowledged."""

    def __init__(self, lab: Lab, start: int = 0, count: int = 100_000) -> None:
        argv = [
            "ip",
            "netns",
            "exec",
            "hkc",
            sys.executable,
            "-c",
            APPEND.format(vip=VIP),
            str(start),
            str(start + count),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.acked: list[int] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.acked.append(int(line))

    def stop(self) -> list[int]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._t.join(timeout=10)
        return self.acked


@pytest.mark.lab(profile="fast")
def test_acknowledged_writes_survive_primary_power_off(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    writer = Writer(lab)
    time.sleep(2.0)
    lab.poweroff(prim)
    agents.wait_states(lab, MODULE, {second: "ALONE", prim: "DOWN"})
    time.sleep(1.0)
    acked = writer.stop()
    assert len(acked) > 50, "the client could not write"
    present = set(records(lab, second))
    lost = [i for i in acked if f"rec-{i}" not in present]
    assert not lost, f"{len(lost)} acknowledged records lost, e.g. {lost[:5]}"
    # the old primary comes back as secondary and is brought up to date
    lab.poweron(prim)
    agents.wait_states(lab, MODULE, {second: "PRIM", prim: "SECOND"}, timeout=60)
    assert records(lab, prim) == records(lab, second)


@pytest.mark.lab(profile="fast")
def test_double_failure_old_primary_waits_until_forced(lab: Lab) -> None:
    prim, second = agents.wait_pair(lab, MODULE)
    lab.poweroff(prim)
    agents.wait_states(lab, MODULE, {second: "ALONE", prim: "DOWN"})
    writer = Writer(lab, start=1_000_000, count=20)
    time.sleep(1.0)
    acked = writer.stop()
    assert acked, "nothing written while the secondary ran alone"
    lab.poweroff(second)
    lab.poweron(prim)
    # the old primary cannot know what the other node did alone: it must wait
    agents.wait_states(lab, MODULE, {prim: "WAIT", second: "DOWN"}, timeout=30)
    time.sleep(2.0)  # well past the start-up wait: still WAIT
    module = agents.view(lab, prim)["modules"][MODULE]  # type: ignore[index]
    assert module["state"] == "WAIT", module
    assert "outdated" in module["reason"] or "may have run" in module["reason"], module
    # the operator accepts the loss: the node becomes primary on its own data
    done = lab.run_in(
        prim,
        [sys.executable, "-m", "hakit", "prim", "--force", "--yes", "-m", MODULE],
        timeout=20,
    )
    assert done.ok, done.stderr
    agents.wait_states(lab, MODULE, {prim: "ALONE", second: "DOWN"}, timeout=30)
    # the other node comes back: it is resynchronised from the forced primary
    lab.poweron(second)
    agents.wait_states(lab, MODULE, {prim: "PRIM", second: "SECOND"}, timeout=60)
    assert records(lab, second) == records(lab, prim)
    assert all(f"rec-{i}" not in records(lab, prim) for i in acked), "forced: those are lost"
