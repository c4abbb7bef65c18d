"""Configuration: the cluster file and one folder per module, validated.

Layout (paths are defaults)::

    /etc/hakit/cluster.toml          the cluster: name, key, nodes and their addresses, timing
    /etc/hakit/modules/<name>/       one folder per module: module.toml + executable scripts

Every problem found is reported at once, each as ``file: field.path: message — fix``, by
:class:`hakit.errors.ConfigError`. Durations are strings with a unit (``"500ms"``, ``"3s"``,
``"2m"``) or plain numbers of seconds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from hakit.errors import ConfigError

DEFAULT_CLUSTER_FILE = Path("/etc/hakit/cluster.toml")
MAX_MODULES = 32
SCRIPT_NAMES = (
    "prestart",
    "start_prim",
    "stop_prim",
    "start_second",
    "stop_second",
    "start_both",
    "stop_both",
    "poststop",
)
MIRROR_SCRIPTS = ("start_prim", "stop_prim", "start_second", "stop_second")
FARM_SCRIPTS = ("start_both", "stop_both")
MAX_FARM_NODES = 32

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(value: Any) -> float:
    """``"500ms"`` → 0.5; ``3`` → 3.0 (seconds). Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 3s or 2m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration: write it like 500ms, 3s or 2m")
    if seconds <= 0:
        raise ValueError("a duration must be greater than 0")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _ip(value: Any) -> str:
    return str(ipaddress.ip_address(value))


def _cidr(value: Any) -> str:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{value!r}: write the VIP with its prefix length, e.g. 192.0.2.100/24")
    iface = ipaddress.ip_interface(value)
    return f"{iface.ip}/{iface.network.prefixlen}"


IpAddress = Annotated[str, BeforeValidator(_ip)]
Cidr = Annotated[str, BeforeValidator(_cidr)]
Name = Annotated[str, Field(pattern=r"^[a-zA-Z][a-zA-Z0-9_.-]{0,31}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeartbeatConfig(_Strict):
    interval: Duration = 0.5  # seconds between heartbeats on each network
    timeout: Duration = 3.0  # seconds without heartbeat on every network: the peer is lost
    port: int = Field(default=7410, ge=1, le=65535)  # UDP port, the same on every node

    @model_validator(mode="after")
    def _timeout_covers_intervals(self) -> HeartbeatConfig:
        if self.timeout <= 2 * self.interval:
            raise ValueError(
                f"timeout ({self.timeout:g} s) must be more than 2 × interval "
                f"({self.interval:g} s): raise timeout or lower interval"
            )
        return self


class ArbitrationConfig(_Strict):
    """Arbiters of the mirror modules (docs/split-brain.md). None configured: a cut between
    the nodes makes both primary until it heals (the loser's changes go to a recovery folder)."""

    witnesses: list[str] = []  # "ADDRESS:PORT" of `hakit witness` services; use 1 or 3
    etcd: list[str] = []  # etcd client URLs, e.g. "http://192.0.2.9:2379" (one cluster)
    lease: Duration = 3.0  # lease duration asked of the arbiters
    margin: Duration = 0.5  # a node treats its lease as gone this long before it ends
    renew: Duration = 1.0  # the primary renews its lease this often
    timeout: Duration = 0.5  # an arbiter that has not answered within this is counted out

    @model_validator(mode="after")
    def _check(self) -> ArbitrationConfig:
        for w in self.witnesses:
            host, sep, port = w.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"witnesses: {w!r} is not ADDRESS:PORT (e.g. 192.0.2.9:7430)")
            _ip(host)
        if self.witnesses and self.etcd:
            raise ValueError("set witnesses or etcd, not both: one kind of arbiter per cluster")
        for url in self.etcd:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"etcd: {url!r} must be an http:// or https:// client URL")
        if not 0.2 <= self.margin < self.lease:
            raise ValueError(
                f"margin ({self.margin:g} s) must be at least 0.2 s and less than lease"
            )
        # a renewal, its answer lost (timeout), then the retry (every min(0.25 s, renew))
        worst = self.renew + self.timeout + min(0.25, self.renew)
        if worst >= self.lease - self.margin:
            raise ValueError(
                f"renew + timeout + retry ({worst:g} s) must be less than lease - margin "
                f"({self.lease - self.margin:g} s), or one lost renewal fences a healthy "
                "primary: lower renew or timeout, or raise lease"
            )
        return self

    @property
    def arbiters(self) -> list[str]:
        return self.witnesses or (["etcd"] if self.etcd else [])


class ApiConfig(_Strict):
    port: int = Field(default=9453, ge=1, le=65535)  # TCP port of health URLs on every node address


class NodeConfig(_Strict):
    addresses: dict[Name, IpAddress]  # heartbeat network name -> this node's address on it


class ClusterConfig(_Strict):
    name: Name
    key: str | None = Field(None, min_length=16)  # shared secret; prefer key_file
    key_file: Path | None = None  # file holding the shared secret (mode 0600)
    state_dir: Path = Path("/var/lib/hakit")  # durable state (module records, incarnation)
    log_dir: Path | None = None  # module logs; default: <state_dir>/log
    run_dir: Path = Path("/run/hakit")  # agent socket, pid files
    modules_dir: Path | None = None  # default: "modules" next to the cluster file
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    api: ApiConfig = ApiConfig()
    arbitration: ArbitrationConfig = ArbitrationConfig()
    nodes: dict[Name, NodeConfig]
    # networks on which replication runs without TLS: only for trusted, dedicated links
    plaintext_networks: list[Name] = []

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if (self.key is None) == (self.key_file is None):
            raise ValueError("set exactly one of key (a secret of 16+ characters) or key_file")
        if len(self.nodes) < 2:
            raise ValueError("nodes: a cluster needs at least two nodes ([nodes.NAME] tables)")
        networks = {frozenset(n.addresses) for n in self.nodes.values()}
        if len(networks) != 1:
            raise ValueError(
                "nodes: every node needs an address on every heartbeat network "
                f"(networks seen: {sorted(set().union(*networks))})"
            )
        return self

    @property
    def networks(self) -> list[str]:
        return sorted(next(iter(self.nodes.values())).addresses)


class VipConfig(_Strict):
    address: Cidr  # e.g. "192.0.2.100/24"
    interface: str = Field(min_length=1, max_length=15)
    garp_count: int = Field(default=3, ge=1, le=20)  # gratuitous ARP announcements after adding it
    garp_interval: Duration = 0.2


class ScriptsConfig(_Strict):
    timeout: Duration = 60.0  # default timeout of every script
    timeouts: dict[Literal[SCRIPT_NAMES], Duration] = {}  # type: ignore[valid-type]  # per script


class ProcessChecker(_Strict):
    type: Literal["process"]
    name: str | None = None  # process name (comm) to look for
    pidfile: Path | None = None  # or a pid file written by start_prim
    period: Duration = 1.0
    grace: Duration = 2.0  # after start_prim, before the first check
    action: Literal["restart", "failover", "stop"] = "restart"

    @model_validator(mode="after")
    def _one_target(self) -> ProcessChecker:
        if (self.name is None) == (self.pidfile is None):
            raise ValueError("a process checker needs exactly one of name or pidfile")
        return self


class TcpChecker(_Strict):
    type: Literal["tcp"]
    host: IpAddress = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    period: Duration = 2.0
    timeout: Duration = 1.0
    failures: int = Field(default=3, ge=1)  # consecutive failed probes before the action
    grace: Duration = 2.0
    action: Literal["restart", "failover", "stop"] = "restart"


Checker = Annotated[ProcessChecker | TcpChecker, Field(discriminator="type")]


class LoopGuardConfig(_Strict):
    max_restarts: int = Field(default=2, ge=0)  # local restarts by checkers before failing over
    max_actions: int = Field(default=4, ge=1)  # automatic restarts + failovers allowed per period
    period: Duration = 3600.0


class ReplicateConfig(_Strict):
    """One replicated directory of a mirror module (``[[replicate]]``)."""

    path: Path  # absolute; the same path on both nodes unless the node's config says otherwise
    exclude: list[str] = []  # relative paths or glob patterns left out: "cache/", "*.tmp"

    @model_validator(mode="after")
    def _absolute(self) -> ReplicateConfig:
        if not self.path.is_absolute():
            raise ValueError(f"path {str(self.path)!r} must be absolute, e.g. /var/lib/app")
        if self.path == Path("/"):
            raise ValueError("path: / cannot be replicated; name the application's directory")
        return self


class ReplicationConfig(_Strict):
    """How a mirror module's directories are replicated (``[replication]``)."""

    port: int = Field(default=7420, ge=1, le=65535)  # TCP port the secondary listens on
    network: Name | None = None  # heartbeat network carrying the data; default: first by name
    ack: Literal["receipt", "durable"] = "receipt"  # when the secondary acknowledges a change
    # application writes of 256 KiB or more: "direct" = past the page cache on both nodes
    # (O_DIRECT where aligned; no second cached copy), "cached" = through it
    large_writes: Literal["direct", "cached"] = "direct"
    timeout: Duration = 5.0  # no reply for this long: the secondary is lost, primary goes ALONE
    bandwidth: float | None = Field(None, gt=0)  # resync cap in MB/s (10^6 B); None: no cap
    streams: int = Field(default=2, ge=1, le=16)  # parallel connections of a full resync
    block_size: int = Field(default=128 * 1024, ge=4096, le=16 << 20)  # resync checksum block


class FarmRuleConfig(_Strict):
    """Which packets to the VIP are load balanced, and by what (``[[farm.rules]]``)."""

    proto: Literal["tcp", "udp"] = "tcp"
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(min_length=1, max_length=64)
    # client-ip: a client address always lands on the same node (affinity);
    # client-ip-port: each connection (source address and port) is placed on its own
    by: Literal["client-ip", "client-ip-port"] = "client-ip"


class FarmConfig(_Strict):
    """Load balancing of a farm module (``[farm]``)."""

    rules: list[FarmRuleConfig] = Field(min_length=1)
    # hash seed, equal on every node; default: derived from the cluster and module names
    seed: int | None = Field(None, ge=0, lt=1 << 32)
    weights: dict[Name, Annotated[int, Field(ge=1, le=100)]] = {}  # node -> share weight (1)
    drain_timeout: Duration = 30.0  # a clean stop waits this long for open connections to end


class ModuleConfig(_Strict):
    mode: Literal["mirror", "farm"]
    # default: the cluster's nodes (a mirror module runs on exactly two, a farm on 2 to 32)
    nodes: list[Name] | None = None
    preferred: Name | None = None  # preferred primary when both start
    failover: bool = True  # the secondary takes over when the primary is lost
    failback: bool = False  # the preferred node takes the primary role back when it rejoins
    vips: list[VipConfig] = []
    scripts: ScriptsConfig = ScriptsConfig()
    checkers: list[Checker] = []
    loop_guard: LoopGuardConfig = LoopGuardConfig()
    replicate: list[ReplicateConfig] = []  # directories kept identical on both nodes
    replication: ReplicationConfig = ReplicationConfig()
    farm: FarmConfig | None = None  # farm modules only

    @model_validator(mode="after")
    def _mode_fields(self) -> ModuleConfig:
        if self.mode == "mirror":
            if self.farm is not None:
                raise ValueError('farm: only for mode = "farm"; remove the [farm] section')
            return self
        if self.farm is None:
            raise ValueError(
                "farm: a farm module needs a [farm] section with at least one rule, e.g. "
                '[[farm.rules]] proto = "tcp", ports = [80]'
            )
        if self.replicate:
            raise ValueError("replicate: a farm module replicates no data; use a mirror module")
        if self.preferred is not None or self.failback:
            raise ValueError("preferred/failback: mirror settings; remove them from a farm module")
        if len(self.vips) != 1 or ":" in self.vips[0].address:
            raise ValueError(
                "vips: a farm module has exactly one IPv4 VIP ([[vips]] address, interface)"
            )
        return self

    @model_validator(mode="after")
    def _distinct_dirs(self) -> ModuleConfig:
        paths = [r.path for r in self.replicate]
        for i, a in enumerate(paths):
            for b in paths[i + 1 :]:
                if a == b or a in b.parents or b in a.parents:
                    raise ValueError(
                        f"replicate: {a} and {b} overlap; list each directory once, "
                        "and use exclude for parts of it"
                    )
        return self


class Module:
    """A validated module: its name, folder and settings."""

    def __init__(self, name: str, folder: Path, config: ModuleConfig, nodes: list[str]) -> None:
        self.name = name
        self.folder = folder
        self.config = config
        self.nodes = nodes

    def script(self, name: str) -> Path | None:
        """Path of an executable script of the module, or None if absent."""
        path = self.folder / name
        return path if path.is_file() else None

    def script_timeout(self, name: str) -> float:
        return self.config.scripts.timeouts.get(name, self.config.scripts.timeout)

    @property
    def replicated(self) -> bool:
        """The module has directories to replicate (it then runs a replicator process)."""
        return bool(self.config.replicate)

    @property
    def farm(self) -> bool:
        return self.config.mode == "farm"

    def farm_seed(self, cluster_name: str) -> int:
        """The configured hash seed, else one derived from the cluster and module names (the
        same on every node, different per module)."""
        assert self.config.farm is not None
        if self.config.farm.seed is not None:
            return self.config.farm.seed
        digest = hashlib.blake2b(f"{cluster_name}/{self.name}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "big")


class Config:
    """The whole configuration as one node sees it."""

    def __init__(self, path: Path, cluster: ClusterConfig, modules: dict[str, Module]) -> None:
        self.path = path
        self.cluster = cluster
        self.modules = modules

    @property
    def modules_dir(self) -> Path:
        return self.cluster.modules_dir or self.path.parent / "modules"

    def key(self) -> bytes:
        if self.cluster.key is not None:
            return self.cluster.key.encode()
        assert self.cluster.key_file is not None
        return self.cluster.key_file.read_bytes().strip()

    def node_for_local_addresses(self, local: set[str]) -> str | None:
        for name, node in self.cluster.nodes.items():
            if local & set(node.addresses.values()):
                return name
        return None


def load(path: Path | str = DEFAULT_CLUSTER_FILE) -> Config:
    """Read and validate the cluster file and every module folder; raise ConfigError listing
    every problem found."""
    path = Path(path)
    problems: list[str] = []
    raw = _read_toml(path, problems)
    cluster: ClusterConfig | None = None
    if raw is not None:
        try:
            cluster = ClusterConfig.model_validate(raw)
        except ValidationError as exc:
            problems += _describe(path, exc)
    if cluster is not None:
        _check_key(cluster, path, problems)
    modules: dict[str, Module] = {}
    if cluster is not None:
        modules = _load_modules(cluster, path, problems)
    if problems:
        raise ConfigError(problems)
    assert cluster is not None
    return Config(path, cluster, modules)


def _load_modules(cluster: ClusterConfig, path: Path, problems: list[str]) -> dict[str, Module]:
    folder = cluster.modules_dir or path.parent / "modules"
    modules: dict[str, Module] = {}
    if not folder.is_dir():
        return modules
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        file = sub / "module.toml"
        if not file.is_file():
            continue
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,31}$", sub.name):
            problems.append(
                f"{sub}: module folder name must be a short name (letters, digits, -_.)"
            )
            continue
        raw = _read_toml(file, problems)
        if raw is None:
            continue
        try:
            cfg = ModuleConfig.model_validate(raw)
        except ValidationError as exc:
            problems += _describe(file, exc)
            continue
        nodes = cfg.nodes or sorted(cluster.nodes)
        unknown = [n for n in [*nodes, cfg.preferred] if n is not None and n not in cluster.nodes]
        if unknown:
            problems.append(
                f"{file}: nodes/preferred: unknown node(s) {unknown} — use names "
                f"from [nodes] in {path}"
            )
        if cfg.mode == "mirror" and len(nodes) != 2:
            problems.append(
                f"{file}: nodes: a mirror module runs on exactly two nodes, got "
                f"{nodes} — list two in `nodes = [...]`"
            )
        if cfg.mode == "farm":
            if not 2 <= len(nodes) <= MAX_FARM_NODES:
                problems.append(
                    f"{file}: nodes: a farm module runs on 2 to {MAX_FARM_NODES} nodes, "
                    f"got {len(nodes)}"
                )
            assert cfg.farm is not None
            stray = sorted(set(cfg.farm.weights) - set(nodes))
            if stray:
                problems.append(
                    f"{file}: farm.weights: {stray} not among the module's nodes {nodes}"
                )
        wrong = FARM_SCRIPTS if cfg.mode == "mirror" else MIRROR_SCRIPTS
        for script in wrong:
            if (sub / script).exists():
                problems.append(
                    f"{sub / script}: a {cfg.mode} module never runs this script — "
                    f"use {' / '.join(MIRROR_SCRIPTS if cfg.mode == 'mirror' else FARM_SCRIPTS)}"
                )
        for script in SCRIPT_NAMES:
            sp = sub / script
            if sp.exists() and not os.access(sp, os.X_OK):
                problems.append(f"{sp}: script is not executable — chmod +x {sp}")
        net = cfg.replication.network
        if net is not None and net not in cluster.networks:
            problems.append(
                f"{file}: replication.network: {net!r} is not a network of the nodes' "
                f"addresses ({cluster.networks}) — use one of them"
            )
        modules[sub.name] = Module(sub.name, sub, cfg, nodes)
    ports: dict[int, str] = {}
    for name, mod in modules.items():
        if not mod.config.replicate:
            continue
        port = mod.config.replication.port
        if port in ports:
            problems.append(
                f"{mod.folder / 'module.toml'}: replication.port: {port} is already used by "
                f"module {ports[port]} — give each replicated module its own port"
            )
        ports[port] = name
    for net in cluster.plaintext_networks:
        if net not in cluster.networks:
            problems.append(
                f"{path}: plaintext_networks: {net!r} is not one of the networks {cluster.networks}"
            )
    if len(modules) > MAX_MODULES:
        problems.append(f"{folder}: {len(modules)} modules; at most {MAX_MODULES} per cluster")
    return modules


def _check_key(cluster: ClusterConfig, path: Path, problems: list[str]) -> None:
    if cluster.key_file is None:
        return
    try:
        key = cluster.key_file.read_bytes().strip()
    except OSError as exc:
        problems.append(f"{path}: key_file: cannot read {cluster.key_file}: {exc.strerror}")
        return
    if len(key) < 16:
        problems.append(
            f"{path}: key_file: {cluster.key_file} holds {len(key)} bytes; use 16 or "
            "more (e.g. `head -c 32 /dev/urandom | xxd -p -c 64 > FILE`)"
        )


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        problems.append(f"{path}: file not found — create it (see docs/configuration.md)")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{path}: not valid TOML: {exc}")
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
    return None


def _describe(path: Path, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-"))]
        if len(parts) >= 3 and parts[0] == "checkers" and parts[2] in ("process", "tcp"):
            del parts[2]  # the discriminator tag pydantic adds to the path
        loc = ".".join(parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field — remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required field is missing — add it"
        elif err["type"] == "string_too_short":
            msg = f"too short: {msg.lower()}"
        elif err["type"] == "union_tag_invalid":
            msg = "unknown type — use one of: process, tcp"
        out.append(f"{path}: {loc or '(top level)'}: {msg}")
    return out
