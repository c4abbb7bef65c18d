"""The one-machine lab's network: namespaces, reachability, faults, the demo app, cleanup.

Needs root and working ``ip netns``; skipped otherwise. The agent is faked by ``sleep 1000``.
Pings go only to 192.0.2.x, from inside lab namespaces.

Caveat: the lab's namespace names are fixed (hksw, hkn1, hkn2, hkc), so running this module
tears down any lab already up on the machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hakit.errors import LabError
from hakit.lab import netns
from hakit.lab.lab import CLIENT, Lab
from hakit.system.run import run

from .conftest import why_no_lab

pytestmark = [pytest.mark.integration]
if (_reason := why_no_lab()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_reason))


def fake_agent(node: str, config: Path) -> list[str]:
    return ["sleep", "1000"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("lab") / "root", agent_argv=fake_agent)
    lab.up(nodes=2, modules=["mirror-demo", "mirror-demo:second"], networks=2)
    try:
        yield lab
    finally:
        lab.down()


def ping(lab: Lab, host: str, address: str, tries: int = 1) -> bool:
    """One ping (1 s timeout) from ``host``'s namespace; only lab addresses."""
    assert address.startswith("192.0.2."), "ping only 192.0.2.x in the lab"
    for _ in range(tries):
        if lab.run_in(host, ["ping", "-n", "-q", "-c", "1", "-W", "1", address]).ok:
            return True
    return False


def addresses(lab: Lab, host: str, interface: str = "eth0") -> list[str]:
    [status] = [h for h in lab.status().hosts if h.name == host]
    [link] = [li for li in status.links if li.interface == interface]
    return link.addresses


def test_up_creates_namespaces_addresses_and_config(lab: Lab) -> None:
    assert netns.list_namespaces() == ["hkc", "hkn1", "hkn2", "hksw"]
    status = lab.status()
    assert status.up
    by_name = {h.name: h for h in status.hosts}
    assert [li.addresses for li in by_name["n1"].links] == [
        ["192.0.2.11/24"],
        ["198.51.100.11/24"],
    ]
    assert [li.addresses for li in by_name[CLIENT].links] == [
        ["192.0.2.50/24"],
        ["198.51.100.50/24"],
    ]
    assert all(li.carrier and li.bridge_port_up for h in status.hosts for li in h.links)
    assert by_name["n1"].agent_alive and by_name["n2"].agent_alive

    cluster = tomllib.loads(lab.config_path("n2").read_text())
    assert cluster["nodes"]["n1"]["addresses"] == {"lan": "192.0.2.11", "backup": "198.51.100.11"}
    assert cluster["heartbeat"] == {"interval": "500ms", "timeout": "3s", "port": 7410}
    assert cluster["run_dir"] == str(lab.root / "n2" / "run")
    key = Path(cluster["key_file"])
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(key.read_text())) == 32
    assert key.read_text() == (lab.root / "n1" / "etc" / "cluster.key").read_text()

    first = tomllib.loads((lab.module_dir("n2", "mirror-demo") / "module.toml").read_text())
    second = tomllib.loads((lab.module_dir("n2", "second") / "module.toml").read_text())
    assert (first["preferred"], second["preferred"]) == ("n1", "n2")
    assert first["vips"] == [{"address": "192.0.2.100/24", "interface": "eth0"}]
    assert second["vips"][0]["address"] == "192.0.2.101/24"
    assert second["checkers"][0]["pidfile"] == str(lab.root / "n2" / "run" / "second.pid")
    assert os.access(lab.module_dir("n2", "second") / "start_prim", os.X_OK)
    assert lab.data_dir("n2", "second").is_dir()


def test_every_namespace_is_guarded_and_has_no_way_out(lab: Lab) -> None:
    for ns in ("hksw", "hkn1", "hkn2", "hkc"):
        assert netns.has_guard(ns), ns
        sysctl = ["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]
        assert run(netns.in_namespace(ns, sysctl)).stdout.strip() == "1"
        assert run(["ip", "-n", ns, "route", "show", "default"]).stdout.strip() == ""
    root_links = json.loads(run(["ip", "-j", "link", "show"]).stdout)
    lab_link = re.compile(r"^hk(br[0-9]|c-p|n[0-9]+-p)")  # the lab's bridges and veth peers
    assert not [li["ifname"] for li in root_links if lab_link.match(li["ifname"])]


def test_nodes_reach_each_other_and_the_client_reaches_both(lab: Lab) -> None:
    assert ping(lab, "n1", "192.0.2.12", tries=3)
    assert ping(lab, "n2", "192.0.2.11")
    assert ping(lab, CLIENT, "192.0.2.11")
    assert ping(lab, CLIENT, "192.0.2.12")


def test_exec_runs_in_the_node_namespace_with_the_node_environment(lab: Lab) -> None:
    script = 'test "$HAKIT_NODE" = n2 && test -f "$HAKIT_CONFIG" && ip -o addr show eth0'
    done = lab.run_in("n2", ["sh", "-c", script])
    assert done.ok, done.stderr
    assert "192.0.2.12/24" in done.stdout
    assert lab.exec("n2", ["sh", "-c", script + " >/dev/null"]) == 0
    assert lab.exec("n1", ["sh", "-c", script + " >/dev/null"]) != 0
    with pytest.raises(LabError):
        lab.run_in("n9", ["true"])


def test_cut_drops_connectivity_and_heal_restores_it(lab: Lab) -> None:
    agent = lab.state().nodes["n2"].agent_pid
    lab.cut("n2")
    assert not ping(lab, "n1", "192.0.2.12")
    assert not ping(lab, CLIENT, "192.0.2.12")
    assert ping(lab, CLIENT, "192.0.2.11")
    assert agent is not None and netns.pid_alive(agent), "a cut keeps processes running"
    lab.heal()
    assert ping(lab, "n1", "192.0.2.12", tries=3)

    lab.cut("n2", "backup")  # lan stays up
    assert ping(lab, "n1", "192.0.2.12")
    [n2] = [h for h in lab.status().hosts if h.name == "n2"]
    assert [li.bridge_port_up for li in n2.links] == [True, False]
    assert n2.cut == ["backup"]
    lab.heal()
    with pytest.raises(LabError):
        lab.cut("n2", "wan")


def test_poweroff_kills_the_agent_and_drops_vips_and_poweron_restarts_it(lab: Lab) -> None:
    old = lab.state().nodes["n2"].agent_pid
    assert old is not None
    lab.run_in("n2", ["ip", "addr", "add", "192.0.2.101/24", "dev", "eth0"], check=True)

    lab.poweroff("n2")
    assert not netns.pid_alive(old)
    assert netns.namespace_pids("hkn2") == []
    [n2] = [h for h in lab.status().hosts if h.name == "n2"]
    assert not n2.powered and not n2.agent_alive
    assert not any(li.admin_up or li.bridge_port_up for li in n2.links)
    assert addresses(lab, "n2") == ["192.0.2.12/24"], "a powered-off node loses its VIPs"
    assert not ping(lab, "n1", "192.0.2.12")
    lab.poweroff("n2")  # idempotent

    new = lab.poweron("n2")
    assert new != old
    [n2] = [h for h in lab.status().hosts if h.name == "n2"]
    assert n2.powered and n2.agent_alive and n2.agent_pid == new
    assert all(li.carrier and li.bridge_port_up for li in n2.links)
    assert addresses(lab, "n2") == ["192.0.2.12/24"]
    assert ping(lab, "n1", "192.0.2.12", tries=3)
    assert lab.poweron("n2") == new  # idempotent: the running agent is kept


def test_demo_app_in_a_node_answers_the_prober_from_the_client(lab: Lab) -> None:
    module = lab.state().modules[0]
    scripts = lab.module_dir("n1", module.name)
    pidfile = lab.root / "n1" / "run" / f"{module.name}.pid"
    lab.run_in("n1", ["ip", "addr", "add", module.vip, "dev", "eth0"], check=True)
    try:
        started = time.monotonic()
        done = lab.run_in("n1", [str(scripts / "start_prim")], timeout=10)
        start_seconds = time.monotonic() - started
        assert done.ok, done.stderr
        assert start_seconds < 5
        pid = int(pidfile.read_text())
        assert lab.run_in("n1", [str(scripts / "start_prim")]).ok  # already running: no-op
        assert int(pidfile.read_text()) == pid

        analysis = lab.probe(1.0)  # default target: first module's VIP and port
        assert analysis.failed == 0, analysis.errors
        assert analysis.ok >= 50
        assert analysis.per_node == {"n1": analysis.ok}
        assert analysis.switches == ["n1"]

        post = (
            "import urllib.request as u; r = u.urlopen(u.Request("
            f"'http://{module.vip_address}:{module.port}/append', data=b'rec-1\\n'), timeout=2);"
            "print(r.read().decode().strip())"
        )
        answer = lab.run_in(CLIENT, [sys.executable, "-c", post], check=True)
        assert answer.stdout.strip() == "n1"
        records = lab.data_dir("n1", module.name) / "replicated" / "records.log"
        assert records.read_text() == "rec-1\n"
    finally:
        stopped = lab.run_in("n1", [str(scripts / "stop_prim")], timeout=10)
        lab.run_in("n1", ["ip", "addr", "del", module.vip, "dev", "eth0"])
    assert stopped.ok, stopped.stderr
    assert not pidfile.exists()
    assert not netns.pid_alive(pid)
    assert "SIGKILL" not in stopped.stderr, "the demo app stops on SIGTERM"
    assert lab.run_in("n1", [str(scripts / "stop_prim")]).ok  # not running: still 0


def test_start_prim_fails_when_another_process_holds_the_port(lab: Lab) -> None:
    module = lab.state().modules[1]  # "second", port 8081
    hold = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('0.0.0.0', {module.port})); s.listen(); print('ready', flush=True); "
        "time.sleep(30)"
    )
    holder = subprocess.Popen(
        netns.in_namespace("hkn2", [sys.executable, "-c", hold]), stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        done = lab.run_in("n2", [str(lab.module_dir("n2", module.name) / "start_prim")])
        assert done.returncode == 1
        assert "died" in done.stderr
        assert not (lab.root / "n2" / "run" / f"{module.name}.pid").exists()
    finally:
        holder.kill()
        holder.communicate()


def test_down_kills_everything_and_leaves_no_lab_namespace(lab: Lab, tmp_path: Path) -> None:
    agents = [n.agent_pid for n in lab.state().nodes.values()]
    # a stray node namespace with a process in it, as a crashed 9-node lab would leave
    netns.add_namespace("hkn9")
    stray = subprocess.Popen(netns.in_namespace("hkn9", ["sleep", "1000"]))
    try:
        for _ in range(100):
            if stray.pid in netns.namespace_pids("hkn9"):
                break
            time.sleep(0.01)
        removed = lab.down()
        assert stray.wait(timeout=5) == -9
    finally:
        if stray.poll() is None:
            stray.kill()
    assert set(removed) == {"hkc", "hkn1", "hkn2", "hksw", "hkn9"}
    assert netns.list_namespaces() == []
    assert not lab.root.exists()
    assert not any(pid is not None and netns.pid_alive(pid) for pid in agents)
    assert lab.down() == []  # idempotent

    foreign = tmp_path / "not-a-lab"
    foreign.mkdir()
    (foreign / "precious").write_text("keep me")
    with pytest.raises(LabError):
        Lab(foreign, agent_argv=fake_agent).up(nodes=1, modules=[])
    assert (foreign / "precious").read_text() == "keep me"
    assert netns.list_namespaces() == []
