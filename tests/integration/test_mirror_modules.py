"""Several modules on one pair of nodes, and a module whose start script hangs.

Each test here builds its own lab (fast heartbeat profile, 100 ms / 500 ms): the shape of the
lab is what the test is about.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hakit.lab import agents, netns
from hakit.lab.lab import TEMPLATES, Lab

from .labkit import (
    MODULE,
    LabHolder,
    ensure_primary,
    first_line,
    log_marks,
    log_since,
    probe_while,
    view,
)

pytestmark = pytest.mark.integration

APPS = {"app1": ("192.0.2.100", 8080), "app2": ("192.0.2.101", 8081)}  # VIP, port (lab plan)


@pytest.mark.lab(modules=["mirror-demo:app1", "mirror-demo:app2"], fresh=True, start=False)
def test_two_modules_with_opposite_primaries_both_move_to_the_survivor(lab: Lab) -> None:
    # module k prefers node n(k+1): started on both nodes at once, an active/active cluster
    marks = log_marks(lab)
    for name in APPS:
        agents.command_all(lab, name, "start")
    for name, preferred in (("app1", "n1"), ("app2", "n2")):
        prim, _ = agents.wait_pair(lab, name)
        if prim != preferred:
            # Only allowed if the preferred node's start came late: the other one saw the
            # module STOP there (not starting), and a stopped peer never blocks a start. The
            # two commands are sent from two threads, so on a loaded machine they can be
            # tens of ms apart.
            took = first_line(log_since(lab, marks)[prim], f"module {name}: WAIT -> STARTING_PRIM")
            assert f"({preferred} is STOP)" in took, took
            ensure_primary(lab, name, preferred)
    vip2, port2 = APPS["app2"]

    # app2 runs on n2: it must not notice that n1 powers off
    seen = probe_while(lab, 3.0, lambda: lab.poweroff("n1"), target=f"{vip2}:{port2}")

    agents.wait_states(lab, "app1", {"n2": "ALONE"})
    agents.wait_states(lab, "app2", {"n2": "ALONE"})
    assert seen.switches == ["n2"], seen.switches
    assert seen.outage is not None and seen.outage.seconds < 1.0, seen.outage
    for name, (vip, port) in APPS.items():
        assert agents.vip_holders(lab, vip) == ["n2"], name
        answered = lab.probe(0.5, target=f"{vip}:{port}")
        assert (list(answered.per_node), answered.failed) == (["n2"], 0), (name, answered)


HUNG_START = """\
#!/bin/sh
# start_prim of the hung-script test: never returns on n1 (until the agent's timeout kills it),
# starts the demo application everywhere else.
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
. "$here/app.env"
if [ "$NODE" = n1 ]; then
    echo "start_prim: hanging on purpose"
    exec sleep 86399
fi
exec "$here/start_prim.real" "$@"
"""


def hung_templates(base: Path) -> Path:
    """A template folder whose mirror-demo start_prim hangs on n1, with a 1.5 s timeout."""
    folder = base / "templates" / MODULE
    shutil.copytree(TEMPLATES / MODULE, folder)
    (folder / "start_prim").rename(folder / "start_prim.real")
    (folder / "start_prim").write_text(HUNG_START)
    (folder / "start_prim").chmod(0o755)
    toml = folder / "module.toml.in"
    text = toml.read_text()
    assert 'timeout = "20s"\n' in text
    toml.write_text(
        text.replace('timeout = "20s"\n', 'timeout = "20s"\ntimeouts = { start_prim = "1500ms" }\n')
    )
    return base / "templates"


def hung_sleeps(node: str) -> list[int]:
    """PIDs of the hung script's ``sleep`` still running in ``node``'s namespace."""
    found = []
    for pid in netns.namespace_pids(f"hk{node}"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline == b"sleep\x0086399\x00":
            found.append(pid)
    return found


def test_hung_start_script_is_killed_at_its_timeout_and_the_peer_takes_over(
    lab_holder: LabHolder, tmp_path: Path
) -> None:
    lab = lab_holder.get(templates=hung_templates(tmp_path), start=False)
    agents.command_all(lab, MODULE, "start")

    # n1 (preferred) becomes primary and hangs in start_prim for longer than the heartbeat
    # timeout; its agent keeps answering and heartbeating meanwhile: n2 stays SECOND
    agents.wait_states(lab, MODULE, {"n1": "STARTING_PRIM", "n2": "SECOND"}, timeout=10)
    assert hung_sleeps("n1"), "the hung script is not running"
    # n2 may take over only with data in sync with n1's (the replicated demo directory)
    agents.wait_for(
        "n2's copy to be in sync",
        lambda: view(lab, "n2")["modules"][MODULE]["replication"]["data"] == "up to date",
        timeout=10,
    )
    during: set[tuple[str, str]] = set()

    def hang_over() -> bool:
        states = agents.module_states(lab, MODULE)  # "DOWN" if an agent does not answer
        if states["n1"] != "STARTING_PRIM":
            return True
        during.add((states["n1"], states["n2"]))
        return False

    agents.wait_for("n1 to give up its hung start_prim", hang_over, timeout=15)
    assert during == {("STARTING_PRIM", "SECOND")}, during

    # at the timeout the script is killed, n1 stops the module (saying why), n2 takes over
    agents.wait_states(lab, MODULE, {"n1": "STOP", "n2": "ALONE"}, timeout=15)
    reason = view(lab, "n1")["modules"][MODULE]["reason"]
    assert reason.startswith("start_prim failed (timed out after "), reason
    assert not hung_sleeps("n1"), "the hung script survived its timeout"
    first_line(agents.client(lab, "n1").log(MODULE, 100).splitlines(), "hanging on purpose")
    assert agents.vip_holders(lab, "192.0.2.100") == ["n2"]
    answered = lab.probe(0.5)
    assert (list(answered.per_node), answered.failed) == (["n2"], 0), answered
    assert not lab_holder.bugs()
