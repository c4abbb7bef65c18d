"""Farm modules in the configuration: what loads, and what is refused with a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from hakit.agent.heartbeat_size import heartbeat_problems, largest_heartbeat
from hakit.config import load
from hakit.errors import ConfigError

from .test_config import CLUSTER, KEY

FARM = """\
mode = "farm"

[[vips]]
address = "192.0.2.100/24"
interface = "eth0"

[farm]
weights = {{ n2 = 3 }}
{extra}
[[farm.rules]]
proto = "tcp"
ports = [80, 443]
by = "client-ip"
"""


def write(tmp_path: Path, module: str, script: str | None = None) -> Path:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    cluster = tmp_path / "cluster.toml"
    nodes = "".join(f'\n[nodes.n{i}]\naddresses = {{ lan = "192.0.2.1{i}" }}\n' for i in (3, 4))
    cluster.write_text(CLUSTER.format(key_file=key_file, state_dir=tmp_path / "state") + nodes)
    folder = tmp_path / "modules" / "web"
    folder.mkdir(parents=True)
    (folder / "module.toml").write_text(module)
    if script is not None:
        (folder / script).write_text("#!/bin/sh\nexit 0\n")
        (folder / script).chmod(0o755)
    return cluster


def problems(cluster: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(cluster)
    return caught.value.problems


def test_a_farm_module_loads_with_its_rules_weights_and_a_stable_seed(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, FARM.format(extra=""), "start_both"))

    web = cfg.modules["web"]
    assert web.farm and not web.replicated
    assert web.nodes == ["n1", "n2", "n3", "n4"]
    assert web.config.farm is not None
    [rule] = web.config.farm.rules
    assert (rule.proto, rule.ports, rule.by) == ("tcp", [80, 443], "client-ip")
    assert web.config.farm.weights == {"n2": 3}
    assert web.config.farm.drain_timeout == 30.0
    seed = web.farm_seed("c1")
    assert seed == web.farm_seed("c1") and 0 <= seed < 1 << 32
    assert seed != web.farm_seed("c2")


def test_a_configured_seed_is_used(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, FARM.format(extra="seed = 12345\n")))

    assert cfg.modules["web"].farm_seed("c1") == 12345


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('mode = "farm"', 'mode = "farm"\nreplicate = [{ path = "/srv" }]', "replicate: a farm"),
        ('mode = "farm"', 'mode = "farm"\npreferred = "n1"', "preferred/failback"),
        ("ports = [80, 443]", "ports = []", "farm.rules.0.ports"),
        ("ports = [80, 443]", "ports = [70000]", "farm.rules.0.ports.0"),
        ('by = "client-ip"', 'by = "random"', "farm.rules.0.by"),
        ("weights = { n2 = 3 }", "weights = { n9 = 3 }", "farm.weights: ['n9']"),
        ('address = "192.0.2.100/24"', 'address = "2001:db8::1/64"', "exactly one IPv4 VIP"),
    ],
)
def test_a_bad_farm_setting_names_the_field(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    text = FARM.format(extra="").replace(old, new, 1)

    [problem] = problems(write(tmp_path, text))

    assert expected in problem, problem


def test_a_farm_without_rules_says_how_to_write_one(tmp_path: Path) -> None:
    [problem] = problems(write(tmp_path, 'mode = "farm"\n'))

    assert "[[farm.rules]]" in problem, problem


def test_a_mirror_script_in_a_farm_module_is_refused(tmp_path: Path) -> None:
    [problem] = problems(write(tmp_path, FARM.format(extra=""), "start_prim"))

    assert "a farm module never runs this script" in problem and "start_both" in problem


def test_a_heartbeat_that_cannot_fit_in_a_datagram_is_refused_with_the_fix(
    tmp_path: Path,
) -> None:
    cluster = write(tmp_path, FARM.format(extra=""))
    small = load(cluster)
    assert heartbeat_problems(small) == []
    assert 300 < largest_heartbeat(small, "n1") < 2000
    text = cluster.read_text()
    nodes = "".join(
        f'\n[nodes.node{i:02d}]\naddresses = {{ lan = "192.0.2.{100 + i}" }}\n' for i in range(28)
    )
    cluster.write_text(text + nodes)
    for k in range(7):  # 7 farm modules of 32 nodes
        folder = tmp_path / "modules" / f"farm{k}"
        folder.mkdir()
        (folder / "module.toml").write_text(FARM.format(extra="").replace("n2 = 3", "n1 = 2"))

    [problem, *_] = heartbeat_problems(load(cluster))

    assert "datagram limit" in problem and "fewer modules" in problem
