"""The configuration loader: a valid configuration loads; every problem is reported as
``file: field.path: what is wrong — how to fix it``; durations parse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from hakit.config import load, parse_duration
from hakit.errors import ConfigError

KEY = "0123456789abcdef0123456789abcdef"

CLUSTER = """\
name = "c1"
key_file = "{key_file}"
state_dir = "{state_dir}"

[heartbeat]
interval = "500ms"
timeout = "3s"

[nodes.n1]
addresses = {{ lan = "192.0.2.11" }}

[nodes.n2]
addresses = {{ lan = "192.0.2.12" }}
"""

MODULE = """\
mode = "mirror"
preferred = "n1"

[[vips]]
address = "192.0.2.100/24"
interface = "eth0"

[scripts]
timeout = "20s"
timeouts = { stop_prim = "2m" }

[[checkers]]
type = "process"
pidfile = "/run/hakit/web.pid"
period = "1s"
"""


@dataclass
class Site:
    """A cluster file, its key file and one module folder ``web`` with a start_prim script."""

    cluster: Path
    module: Path
    script: Path

    def edit(self, file: Path, old: str, new: str) -> None:
        text = file.read_text()
        assert old in text, f"{old!r} not in {file}"
        file.write_text(text.replace(old, new, 1))

    def problems(self) -> list[str]:
        with pytest.raises(ConfigError) as caught:
            load(self.cluster)
        return caught.value.problems


@pytest.fixture
def site(tmp_path: Path) -> Site:
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(CLUSTER.format(key_file=key_file, state_dir=tmp_path / "state"))
    folder = tmp_path / "modules" / "web"
    folder.mkdir(parents=True)
    module = folder / "module.toml"
    module.write_text(MODULE)
    script = folder / "start_prim"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    return Site(cluster, module, script)


def test_valid_configuration_loads(site: Site) -> None:
    cfg = load(site.cluster)

    assert cfg.cluster.name == "c1"
    assert (cfg.cluster.heartbeat.interval, cfg.cluster.heartbeat.timeout) == (0.5, 3.0)
    assert cfg.cluster.networks == ["lan"]
    assert cfg.key() == KEY.encode()
    assert cfg.modules_dir == site.cluster.parent / "modules"
    web = cfg.modules["web"]
    assert web.nodes == ["n1", "n2"]
    assert web.config.preferred == "n1"
    assert [(v.address, v.interface) for v in web.config.vips] == [("192.0.2.100/24", "eth0")]
    assert web.script("start_prim") == site.script
    assert web.script("stop_prim") is None
    assert (web.script_timeout("start_prim"), web.script_timeout("stop_prim")) == (20.0, 120.0)
    assert web.config.loop_guard.max_restarts == 2
    assert cfg.node_for_local_addresses({"127.0.0.1", "192.0.2.12"}) == "n2"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("3s", 3.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 3s ", 3.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_durations_parse_with_a_unit_or_as_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["fast", "3", "3 sec", "-1s", "1d", "", None, True])
def test_a_malformed_duration_says_how_to_write_one(text: object) -> None:
    with pytest.raises(ValueError, match="500ms, 3s or 2m"):
        parse_duration(text)


@pytest.mark.parametrize("value", [0, 0.0, "0s", "0ms"])
def test_a_duration_must_be_positive(value: object) -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        parse_duration(value)


# (file to edit, old text, new text, "field.path: message" expected after "<file>: ", fix)
CASES = {
    "unknown field": (
        "cluster",
        'name = "c1"\n',
        'name = "c1"\ncolour = "red"\n',
        "colour: unknown field",
        "remove it or check its spelling",
    ),
    "unknown nested field": (
        "module",
        'timeout = "20s"\n',
        'timeout = "20s"\ntimout = "5s"\n',
        "scripts.timout: unknown field",
        "remove it or check its spelling",
    ),
    "bad duration": (
        "cluster",
        'interval = "500ms"',
        'interval = "fast"',
        "heartbeat.interval: 'fast' is not a duration",
        "write it like 500ms, 3s or 2m",
    ),
    "bad duration in a checker": (
        "module",
        'period = "1s"',
        'period = "often"',
        "checkers.0.period: 'often' is not a duration",
        "write it like 500ms, 3s or 2m",
    ),
    "VIP without prefix length": (
        "module",
        'address = "192.0.2.100/24"',
        'address = "192.0.2.100"',
        "vips.0.address: '192.0.2.100'",
        "write the VIP with its prefix length, e.g. 192.0.2.100/24",
    ),
    "timeout equal to 2 x interval": (
        "cluster",
        'timeout = "3s"',
        'timeout = "1s"',
        "heartbeat: timeout (1 s) must be more than 2 × interval (0.5 s)",
        "raise timeout or lower interval",
    ),
    "wrong checker type": (
        "module",
        'type = "process"',
        'type = "http"',
        "checkers.0: unknown type",
        "use one of: process, tcp",
    ),
    "unknown preferred node": (
        "module",
        'preferred = "n1"',
        'preferred = "n9"',
        "nodes/preferred: unknown node(s) ['n9']",
        "use names from [nodes] in {cluster}",
    ),
    "too few nodes": (
        "cluster",
        '[nodes.n2]\naddresses = { lan = "192.0.2.12" }\n',
        "",
        "(top level): nodes: a cluster needs at least two nodes",
        "[nodes.NAME] tables",
    ),
    "renewal too slow for the lease": (
        "cluster",
        "[nodes.n1]",
        '[arbitration]\nwitnesses = ["192.0.2.9:7430"]\nlease = "2s"\nrenew = "1.5s"\n\n[nodes.n1]',
        "arbitration: renew + timeout + retry (2.25 s) must be less than lease - margin (1.5 s)",
        "lower renew or timeout, or raise lease",
    ),
    "witness without a port": (
        "cluster",
        "[nodes.n1]",
        '[arbitration]\nwitnesses = ["192.0.2.9"]\n\n[nodes.n1]',
        "arbitration: witnesses: '192.0.2.9' is not ADDRESS:PORT",
        "(e.g. 192.0.2.9:7430)",
    ),
    "two kinds of arbiter": (
        "cluster",
        "[nodes.n1]",
        '[arbitration]\nwitnesses = ["192.0.2.9:7430"]\netcd = ["http://192.0.2.9:2379"]\n\n'
        "[nodes.n1]",
        "arbitration: set witnesses or etcd, not both",
        "one kind of arbiter per cluster",
    ),
    "both key and key_file": (
        "cluster",
        'name = "c1"\n',
        f'name = "c1"\nkey = "{KEY}"\n',
        "(top level): set exactly one of key",
        "or key_file",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_config_problem_names_file_field_and_fix(
    site: Site, case: tuple[str, str, str, str, str]
) -> None:
    file, old, new, what, fix = case
    path = site.cluster if file == "cluster" else site.module
    site.edit(path, old, new)

    [problem] = site.problems()

    assert problem.startswith(f"{path}: {what}"), problem
    assert fix.format(cluster=site.cluster) in problem, problem


def test_a_script_that_is_not_executable_is_named_with_the_command_to_fix_it(site: Site) -> None:
    site.script.chmod(0o644)

    assert site.problems() == [f"{site.script}: script is not executable — chmod +x {site.script}"]


def test_every_problem_of_a_file_is_reported_at_once(site: Site) -> None:
    site.edit(site.module, 'preferred = "n1"', 'preferred = "n1"\ncolour = "red"')
    site.edit(site.module, 'address = "192.0.2.100/24"', 'address = "192.0.2.100"')
    site.edit(site.module, 'period = "1s"', 'period = "often"')

    problems = site.problems()

    assert sorted(p.split(": ")[1] for p in problems) == [
        "checkers.0.period",
        "colour",
        "vips.0.address",
    ]
    assert all(p.startswith(f"{site.module}: ") for p in problems)


def test_a_toml_syntax_error_names_the_file(site: Site) -> None:
    site.edit(site.cluster, 'name = "c1"', "name = c1")

    [problem] = site.problems()

    assert problem.startswith(f"{site.cluster}: not valid TOML: "), problem


def test_a_missing_cluster_file_says_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "nowhere.toml")

    assert caught.value.problems == [
        f"{tmp_path / 'nowhere.toml'}: file not found — create it (see docs/configuration.md)"
    ]


def test_arbiters_are_named_as_the_machine_and_the_runner_expect(site: Site) -> None:
    site.edit(
        site.cluster, "[nodes.n1]", '[arbitration]\nwitnesses = ["192.0.2.9:7430"]\n\n[nodes.n1]'
    )
    assert load(site.cluster).cluster.arbitration.arbiters == ["192.0.2.9:7430"]
    site.edit(site.cluster, 'witnesses = ["192.0.2.9:7430"]', 'etcd = ["http://192.0.2.9:2379"]')
    arb = load(site.cluster).cluster.arbitration
    assert arb.arbiters == ["etcd"] and arb.lease == 3.0
