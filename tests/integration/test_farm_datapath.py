"""The farm data path in real namespaces: three nodes behind one VIP, one client.

Network (all names ``hkf*``, removed before and after the module; no uplink, no default
route, every namespace has the ``hkguard`` output filter of :mod:`hakit.lab.netns`)::

    hkfsw: bridge br0 ── hkf1 eth0 192.0.2.201   each node: VIP 192.0.2.200/32 on lo,
                     ├── hkf2 eth0 192.0.2.202   hakit.net.farm filter, an HTTP server on
                     ├── hkf3 eth0 192.0.2.203   VIP:80 answering its name (hkf3 answers ARP)
                     └── hkfc eth0 192.0.2.209 + 40 client addresses 192.0.2.210-249

The farm code acts on the namespace of its caller, so each node runs a small helper process
inside its namespace (``ip netns exec``) that executes hakit.net.farm calls sent as JSON
lines; the client runs another one that opens connections. Every process is started here
and killed by PID. The owners are computed in the test: bucket ``b`` belongs to node
``b % 3`` unless a test moves it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hakit.lab import netns
from hakit.net.arp import mac_to_str
from hakit.net.farm import client_bucket, virtual_mac
from hakit.system.run import run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the farm data path needs root (namespaces)"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("nft") is None,
        reason="the farm data path needs iproute2 `ip` and `nft`",
    ),
]

SWITCH, CLIENT = "hkfsw", "hkfc"
NODES = ("hkf1", "hkf2", "hkf3")
ARP_NODE = "hkf3"  # the one node answering ARP for the VIP
NODE_ADDRESS = {"hkf1": "192.0.2.201", "hkf2": "192.0.2.202", "hkf3": "192.0.2.203"}
CLIENT_ADDRESS = "192.0.2.209"
SOURCES = [f"192.0.2.{i}" for i in range(210, 250)]  # 40 client addresses
VIP, PORT, MODULE = "192.0.2.200", 80, "web"
SEED = 0x5EED
VMAC = mac_to_str(virtual_mac(VIP))
SRC = str(Path(__file__).resolve().parents[2] / "src")
ALL_NS = (SWITCH, *NODES, CLIENT)

RULE = {"proto": "tcp", "ports": [PORT], "by": "client-ip"}
SPEC = {"module": MODULE, "vip": VIP, "interface": "eth0", "rules": [RULE], "seed": SEED}

# --- the processes run inside the namespaces ----------------------------------------------

NODE_HELPER = r"""
import json, sys, time, traceback
from pathlib import Path
from hakit.net import farm

state_dir, spec, arp = Path(sys.argv[1]), None, None
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        result = None
        if op == "setup":
            fields = dict(cmd["spec"])
            fields["rules"] = tuple(
                farm.FarmRule(r["proto"], tuple(r["ports"]), r["by"]) for r in fields["rules"]
            )
            spec = farm.FarmSpec(**fields)
            farm.setup(spec, state_dir)
        elif op == "setup_failing_at_vip":  # a failure after the first changes
            def refuse(*args):
                raise farm.FarmError("injected failure")
            fields = dict(cmd["spec"])
            fields["rules"] = tuple(
                farm.FarmRule(r["proto"], tuple(r["ports"]), r["by"]) for r in fields["rules"]
            )
            real, farm.add_vip = farm.add_vip, refuse
            try:
                farm.setup(farm.FarmSpec(**fields), state_dir)
            except farm.FarmError as exc:
                result = str(exc)
            finally:
                farm.add_vip = real
        elif op == "leftover":
            result = farm.leftover_modules(state_dir)
        elif op == "apply":
            farm.apply(spec, cmd["owned"], cmd["loose"], keep=cmd.get("keep"))
        elif op == "teardown":
            result = farm.teardown(cmd["module"], state_dir)
        elif op == "counters":
            result = farm.counters(cmd["module"])
        elif op == "established":
            result = [
                farm.established_count(cmd["vip"], cmd["ports"]),
                farm._established_netlink(cmd["vip"], set(cmd["ports"])),
            ]
        elif op == "arp_start":
            if arp is None or not arp.running:
                arp = farm.ArpResponder()
                arp.start(cmd["interface"], cmd["vip"])
        elif op == "arp_stop":
            start = time.monotonic()
            arp.stop()
            result = {"replies": arp.replies, "seconds": time.monotonic() - start,
                      "running": arp.running}
        reply = {"ok": True, "result": result}
    except Exception as exc:
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                 "trace": traceback.format_exc()}
    print(json.dumps(reply), flush=True)
"""

SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: long-lived connections exchange requests
    def do_GET(self):
        body = sys.argv[1].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 256
server = ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), Hello)
print("ready", flush=True)
server.serve_forever()
"""

CLIENT_HELPER = r"""
import json, socket, struct, sys, time, traceback
from concurrent.futures import ThreadPoolExecutor
from hakit.net.arp import ETH_HEADER, ARP_BODY, ETH_P_ARP, ETH_P_IP, parse_arp, mac_to_str

VIP, PORT = sys.argv[1], int(sys.argv[2])
held = []  # long-lived connections: (socket, source address)

def response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed by the server after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = [int(h.split(b":")[1]) for h in head.split(b"\r\n")
              if h.lower().startswith(b"content-length:")][0]
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server in the body")
        body += chunk
    return body.decode()

def once(src):
    sock = socket.socket()
    sock.settimeout(5)
    try:
        sock.bind((src, 0))
        sock.connect((VIP, PORT))
        sport = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return {"src": src, "sport": sport, "answers": data.count(b"HTTP/1.1 "),
                "node": data.partition(b"\r\n\r\n")[2].decode()}
    except OSError as exc:
        return {"src": src, "error": repr(exc)}
    finally:
        sock.close()

def ask(sock, timeout):
    sock.settimeout(timeout)
    start = time.monotonic()
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        return {"node": response(sock), "seconds": time.monotonic() - start}
    except OSError as exc:
        return {"error": type(exc).__name__, "seconds": time.monotonic() - start}

def arp_probe(dst_mac, src_ip, timeout):
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind(("eth0", ETH_P_ARP))
        sock.settimeout(0.2)
        mine = sock.getsockname()[4]
        frame = ETH_HEADER.pack(bytes.fromhex(dst_mac.replace(":", "")), mine, ETH_P_ARP)
        frame += ARP_BODY.pack(1, ETH_P_IP, 6, 4, 1, mine, socket.inet_aton(src_ip),
                               b"\0" * 6, socket.inet_aton(VIP))
        sock.send(frame.ljust(60, b"\0"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                packet = parse_arp(sock.recv(2048))
            except TimeoutError:
                continue
            if packet and packet.op == 2 and packet.sender_ip == VIP:
                return {"sender_mac": mac_to_str(packet.sender_mac),
                        "eth_src": mac_to_str(packet.eth_src)}
    return None

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        if op == "burst":
            with ThreadPoolExecutor(cmd.get("parallel", 16)) as pool:
                result = list(pool.map(once, cmd["sources"]))
        elif op == "open":
            result = []
            for src in cmd["sources"]:
                sock = socket.socket()
                sock.settimeout(5)
                sock.bind((src, 0))
                sock.connect((VIP, PORT))
                held.append((sock, src))
                result.append({"src": src, **ask(sock, 5)})
        elif op == "ask":
            result = [{"src": src, **ask(sock, cmd["timeout"])} for sock, src in held]
        elif op == "close":
            for sock, _ in held:
                sock.close()
            held.clear()
            result = None
        elif op == "arp_probe":
            result = arp_probe(cmd["dst_mac"], cmd["src_ip"], cmd.get("timeout", 2.0))
        reply = {"ok": True, "result": result}
    except Exception as exc:
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                 "trace": traceback.format_exc()}
    print(json.dumps(reply), flush=True)
"""


class Helper:
    """A Python process inside a namespace that executes JSON-line commands."""

    def __init__(self, ns: str, code: str, args: list[str], log_dir: Path) -> None:
        self.ns = ns
        self.log = log_dir / f"{ns}-helper.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "PYTHONPATH": SRC},
            )

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"{self.ns} helper gave no answer to {op}: {self.stderr()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"{self.ns} {op} failed: {reply['error']}\n{reply['trace']}")
        return reply["result"]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL by PID (``ip netns exec`` execs python: the PID is the helper's)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)


class Server:
    """The HTTP server of one node, bound to VIP:80, answering the node's name."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, ns, VIP, str(PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else ""
        assert line.strip() == "ready", f"HTTP server in {ns} did not start: {line!r}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)


# --- the network --------------------------------------------------------------------------


def remove_namespaces() -> None:
    """Kill what runs in our hkf* namespaces (by PID) and delete them, if they exist."""
    listed = run(["ip", "netns", "list"], timeout=10).stdout.split()
    for ns in ALL_NS:
        if ns in listed:
            netns.kill_namespace(ns)
            run(["ip", "netns", "del", ns], timeout=10)


def build_network() -> None:
    netns.add_namespace(SWITCH)
    run(["ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge",
         "stp_state", "0", "forward_delay", "0"], timeout=10)  # fmt: skip
    run(["ip", "-n", SWITCH, "link", "set", "br0", "up"], timeout=10)
    for ns, address in [*NODE_ADDRESS.items(), (CLIENT, CLIENT_ADDRESS)]:
        netns.add_namespace(ns)
        port = f"{ns}-p"
        run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth",
             "peer", "name", port, "netns", SWITCH], timeout=10)  # fmt: skip
        run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"], timeout=10)
        run(["ip", "-n", ns, "link", "set", "eth0", "up"], timeout=10)
        run(["ip", "-n", SWITCH, "link", "set", port, "master", "br0", "up"], timeout=10)
    batch = "".join(f"addr add {a}/24 dev eth0\n" for a in SOURCES)
    run(["ip", "-n", CLIENT, "-batch", "-"], timeout=10, input_text=batch)


def settings(ns: str) -> dict[str, Any]:
    """What the farm changes on a node: sysctls, promiscuous flag, lo addresses, nft tables."""
    sysctls = {
        name: run(
            ["ip", "netns", "exec", ns, "cat", f"/proc/sys/net/ipv4/conf/eth0/{name}"]
        ).stdout.strip()
        for name in ("arp_ignore", "arp_announce")
    }
    link = json.loads(run(["ip", "-n", ns, "-j", "link", "show", "eth0"]).stdout)[0]
    lo = json.loads(run(["ip", "-n", ns, "-j", "addr", "show", "lo"]).stdout)[0]
    tables = run(["ip", "netns", "exec", ns, "nft", "list", "tables"]).stdout.split("\n")
    return {
        **sysctls,
        "promisc": "PROMISC" in link["flags"],
        "lo": sorted(f"{a['local']}/{a['prefixlen']}" for a in lo["addr_info"]),
        "tables": sorted(t.strip() for t in tables if t.strip()),
    }


class Farm:
    """The whole test network and its processes."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.helpers: dict[str, Helper] = {}
        self.servers: dict[str, Server] = {}
        self.client = Helper(CLIENT, CLIENT_HELPER, [VIP, str(PORT)], work)
        for node in NODES:
            self.start_helper(node)
        self.before = {node: settings(node) for node in NODES}

    def start_helper(self, node: str) -> None:
        (self.work / node).mkdir(exist_ok=True)
        self.helpers[node] = Helper(node, NODE_HELPER, [str(self.work / node)], self.work)

    def up(self, spec: dict[str, Any], owners: dict[str, set[int]]) -> None:
        """Every node set up (from scratch) with its buckets, its server and link up."""
        for node in NODES:
            netns.set_link(node, "eth0", True)
            self.helpers[node].call("setup", spec=spec)
            self.helpers[node].call("apply", owned=sorted(owners[node]), loose=[])
            if node not in self.servers or not self.servers[node].alive:
                self.servers[node] = Server(node)
        self.helpers[ARP_NODE].call("arp_start", interface="eth0", vip=VIP)
        run(["ip", "-n", CLIENT, "neigh", "flush", "dev", "eth0"])  # ARP for the VIP again

    def apply(
        self,
        node: str,
        owned: set[int],
        loose: set[int] | None = None,
        keep: set[int] | None = None,
    ) -> None:
        self.helpers[node].call(
            "apply", owned=sorted(owned), loose=sorted(loose or ()), keep=sorted(keep or ())
        )

    def counters(self) -> dict[str, dict[str, int]]:
        return {node: self.helpers[node].call("counters", module=MODULE) for node in NODES}

    def close(self) -> None:
        processes: list[Helper | Server] = [self.client, *self.helpers.values()]
        for proc in [*processes, *self.servers.values()]:
            proc.kill()


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    remove_namespaces()  # left by a crashed run
    cluster: Farm | None = None
    try:
        build_network()
        # hkf3 starts with values of its own, which teardown must restore exactly
        run(["ip", "netns", "exec", "hkf3", "sysctl", "-qw", "net.ipv4.conf.eth0.arp_announce=1"])
        run(["ip", "-n", "hkf3", "link", "set", "eth0", "promisc", "on"])
        cluster = Farm(tmp_path_factory.mktemp("farm"))
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        remove_namespaces()


@pytest.fixture
def client(farm: Farm) -> Iterator[Helper]:
    yield farm.client
    farm.client.call("close")


def split() -> dict[str, set[int]]:
    """Bucket b belongs to node b % 3."""
    return {node: {b for b in range(256) if b % 3 == i} for i, node in enumerate(NODES)}


def owner_of(owners: dict[str, set[int]], src: str, sport: int | None = None) -> str:
    bucket = client_bucket(src, SEED, sport=sport)
    return next(node for node, owned in owners.items() if bucket in owned)


def fdb(ns: str) -> str:
    return run(["ip", "netns", "exec", ns, "bridge", "fdb", "show"]).stdout.lower()


# --- the tests ----------------------------------------------------------------------------


def test_every_connection_is_answered_once_by_the_owner_of_the_clients_bucket(
    farm: Farm, client: Helper
) -> None:
    owners = split()
    farm.up(SPEC, owners)
    sources = [SOURCES[i % len(SOURCES)] for i in range(300)]

    results = client.call("burst", sources=sources)

    failed = [r for r in results if "error" in r or r["answers"] != 1]
    assert not failed, failed[:5]
    served = Counter(r["node"] for r in results)
    assert set(served) == set(NODES)
    assert all(0.20 <= count / 300 <= 0.47 for count in served.values()), served
    by_source: dict[str, set[str]] = {}
    for r in results:
        by_source.setdefault(r["src"], set()).add(r["node"])
    assert all(len(nodes) == 1 for nodes in by_source.values()), by_source  # affinity
    assert {src: nodes.pop() for src, nodes in by_source.items()} == {
        src: owner_of(owners, src) for src in SOURCES
    }  # the kernel's bucket is the one hakit computes
    counters = farm.counters()
    assert sum(c["new"] for c in counters.values()) == 300  # one node accepted each SYN
    assert all(c["flooded"] > 0 for c in counters.values())  # the switch flooded every node
    assert all(c["early"] > 0 for c in counters.values())  # ... each left the others' at ingress

    neighbour = json.loads(run(["ip", "-n", CLIENT, "-j", "neigh", "show", VIP]).stdout)
    assert neighbour[0]["lladdr"] == VMAC
    assert VMAC not in fdb(SWITCH)  # never a source: the bridge never learned it
    # a unicast ARP probe to the virtual MAC (a client re-checking its cache) is answered too
    arp_node_mac = json.loads(run(["ip", "-n", ARP_NODE, "-j", "link", "show", "eth0"]).stdout)
    reply = client.call("arp_probe", dst_mac=VMAC, src_ip=CLIENT_ADDRESS)
    assert reply == {"sender_mac": VMAC, "eth_src": arp_node_mac[0]["address"]}
    assert VMAC not in fdb(SWITCH)
    # a ping of the VIP is answered by exactly one node (the owner of the sender's bucket)
    ping = run(["ip", "netns", "exec", CLIENT, "ping", "-c", "3", "-i", "0.2", "-W", "1",
                "-I", SOURCES[0], VIP], check=False)  # fmt: skip
    assert " 3 received" in ping.stdout, ping.stdout
    assert "DUP!" not in ping.stdout


def test_arp_responder_answers_again_after_its_link_flaps(farm: Farm, client: Helper) -> None:
    farm.up(SPEC, split())
    netns.set_link(ARP_NODE, "eth0", False)
    time.sleep(0.2)
    netns.set_link(ARP_NODE, "eth0", True)
    start = time.monotonic()
    reply = None
    while reply is None and time.monotonic() < start + 5:  # the responder reopens after 1 s
        reply = client.call(
            "arp_probe", dst_mac="ff:ff:ff:ff:ff:ff", src_ip=CLIENT_ADDRESS, timeout=0.3
        )
    assert reply is not None
    assert time.monotonic() - start < 2.5
    assert reply["sender_mac"] == VMAC


def test_two_modules_on_one_interface_restore_it_only_when_the_last_one_leaves(
    farm: Farm,
) -> None:
    node = farm.helpers["hkf1"]
    farm.up(SPEC, split())
    other = {**SPEC, "module": "dns", "vip": "192.0.2.208"}  # on lo only: no traffic to it
    node.call("setup", spec=other)
    with pytest.raises(AssertionError, match=r"both use VIP 192\.0\.2\.200"):
        node.call("setup", spec={**SPEC, "module": "web2"})

    first = node.call("teardown", module=MODULE)
    assert any("farm module dns still uses it" in s for s in first), first
    still = settings("hkf1")
    assert (still["arp_ignore"], still["arp_announce"], still["promisc"]) == ("1", "2", True)
    last = node.call("teardown", module="dns")
    assert "turned promiscuous mode off on eth0" in last
    assert settings("hkf1") == farm.before["hkf1"]


def test_client_ip_port_places_each_connection_by_its_source_port(
    farm: Farm, client: Helper
) -> None:
    owners = split()
    farm.up({**SPEC, "rules": [{**RULE, "by": "client-ip-port"}]}, owners)

    results = client.call("burst", sources=[SOURCES[0]] * 60)

    assert all("error" not in r and r["answers"] == 1 for r in results), results[:3]
    assert len({r["node"] for r in results}) == 3  # one client, spread over every node
    assert [r["node"] for r in results] == [owner_of(owners, r["src"], r["sport"]) for r in results]


def test_established_connections_survive_a_rebalance_and_new_ones_follow_the_new_owner(
    farm: Farm, client: Helper
) -> None:
    owners = split()
    farm.up(SPEC, owners)
    held = client.call("open", sources=SOURCES[:20])
    first = {r["src"]: r["node"] for r in held}
    assert first == {src: owner_of(owners, src) for src in SOURCES[:20]}
    moved = {b for b in owners["hkf1"] if b % 2 == 0}  # half of hkf1's buckets go to hkf2
    movers = [s for s in SOURCES[:20] if client_bucket(s, SEED) in moved]
    assert movers, "the seed gives no held connection in a moved bucket: pick another seed"
    established = farm.helpers["hkf1"].call("established", vip=VIP, ports=[PORT])
    assert established == [list(first.values()).count("hkf1")] * 2  # /proc and netlink agree

    # the agent's order: the old owner releases (still keeping the released buckets past its
    # ingress chain, as the agent does while it tracks connections in them), then the new
    # owner acquires
    owners["hkf1"] -= moved
    farm.apply("hkf1", owners["hkf1"], keep=moved)
    owners["hkf2"] |= moved
    farm.apply("hkf2", owners["hkf2"])

    again = client.call("ask", timeout=3)
    assert {r["src"]: r.get("node", r.get("error")) for r in again} == first  # none broken
    fresh = client.call("burst", sources=SOURCES)
    assert {r["src"]: r["node"] for r in fresh} == {src: owner_of(owners, src) for src in SOURCES}
    assert {r["node"] for r in fresh if r["src"] in movers} == {"hkf2"}
    assert farm.helpers["hkf1"].call("counters", module=MODULE)["established"] > 0


def test_clients_of_a_dead_node_get_a_reset_at_once_from_the_loose_owner(
    farm: Farm, client: Helper
) -> None:
    owners = split()
    farm.up(SPEC, owners)
    held = client.call("open", sources=SOURCES[:20])
    on_dead = {r["src"] for r in held if r["node"] == "hkf1"}
    assert on_dead

    # hkf1 loses power: its link goes down first, so killing its server sends nothing
    netns.set_link("hkf1", "eth0", False)
    farm.servers.pop("hkf1").kill()
    for i, node in enumerate(("hkf2", "hkf3")):  # its buckets are shared out, all loose
        taken = {b for b in owners["hkf1"] if b % 2 == i}
        owners[node] |= taken
        farm.apply(node, owners[node], loose=taken)
    del owners["hkf1"]

    answers = {r["src"]: r for r in client.call("ask", timeout=5)}
    for src, answer in answers.items():
        if src in on_dead:
            assert answer.get("error") == "ConnectionResetError", answer
            assert answer["seconds"] < 1.0, answer
        else:
            assert answer.get("node") == owner_of(owners, src), answer
    fresh = client.call("burst", sources=SOURCES)
    assert {r["src"]: r.get("node") for r in fresh} == {s: owner_of(owners, s) for s in SOURCES}
    loose = sum(farm.helpers[n].call("counters", module=MODULE)["loose"] for n in ("hkf2", "hkf3"))
    assert loose >= len(on_dead)


def test_teardown_restores_each_node_exactly_also_after_a_crash(farm: Farm, client: Helper) -> None:
    farm.up(SPEC, split())
    assert all("error" not in r for r in client.call("burst", sources=SOURCES[:3]))
    during = settings("hkf1")
    assert during["arp_ignore"] == "1"
    assert during["arp_announce"] == "2"
    assert during["promisc"]
    assert f"{VIP}/32" in during["lo"]
    assert during["tables"] == sorted(
        [*farm.before["hkf1"]["tables"], "table inet hakit_farm_web", "table netdev hakit_farm_web"]
    )
    stopped = farm.helpers[ARP_NODE].call("arp_stop")
    assert stopped["replies"] >= 1
    assert not stopped["running"]
    assert stopped["seconds"] < 0.5

    farm.helpers["hkf2"].kill()  # the agent of hkf2 crashes; a new one starts
    farm.start_helper("hkf2")
    assert farm.helpers["hkf2"].call("leftover") == [MODULE]

    for node in NODES:
        undone = farm.helpers[node].call("teardown", module=MODULE)
        assert any("removed VIP" in s for s in undone), undone
        assert settings(node) == farm.before[node], node
        assert farm.helpers[node].call("teardown", module=MODULE) == []  # idempotent
    assert farm.before["hkf3"]["arp_announce"] == "1"
    assert farm.before["hkf3"]["promisc"]
    assert farm.helpers["hkf2"].call("leftover") == []


def test_a_set_up_failing_half_way_leaves_the_node_as_it_was(farm: Farm) -> None:
    for node in NODES:
        farm.helpers[node].call("teardown", module=MODULE)
    node = farm.helpers["hkf1"]

    assert node.call("setup_failing_at_vip", spec=SPEC) == "injected failure"

    assert settings("hkf1") == farm.before["hkf1"]
    assert node.call("leftover") == []
