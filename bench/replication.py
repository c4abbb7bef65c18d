#!/usr/bin/env python3
"""Synchronous replication benchmark (issue 3): hakit vs. local disk, GlusterFS and rsync.

Everything is measured in ONE invocation on this machine, so the ratios compare figures taken
under the same load. Each hakit figure comes from two real replicator processes
(``python -m hakit.repl.process``, driven with JSON lines on stdin like the agent does): the
primary in network namespace hkb1 (192.0.2.11), the secondary in hkb2 (192.0.2.12), joined by
a bridge in namespace hkbsw (no uplink, no default route, an nftables guard dropping anything
not to 192.0.2.0/24). The processes enter only the network namespace (``nsenter --net``), so
the primary's FUSE mount lands in the root mount namespace, where fio runs. TLS is on unless
``--plaintext`` adds plaintext runs next to the TLS ones (the cost of TLS). Replication
settings are the defaults (ack ``receipt``, 2 resync streams). Data under --root (on disk).

(a) seqwrite   fio, 1 MiB sequential writes, 1 GiB, psync, end_fsync=1       -> MB/s
(b) dsync4k    fio, 4 KiB O_DSYNC overwrites, QD1, --dsync-runtime s      -> ops/s, mean µs
(c) small      10,000 files of 4 KiB created (O_CREAT|O_EXCL, write, close) + sync()
               -> files/s
    (a)-(c) are fs_suite.py's own functions (../shared/bench-anchors), run on a plain local
    directory and on hakit's mount, reps interleaved; GlusterFS replica 2 is measured by the
    anchor script bench_gluster.sh (same fs_suite.py, client in its own namespace).
(d) reintegration: a 100,000 × 4 KiB tree (100 dirs × 1,000) is built identically on both
    nodes before the first sync (full compare, nothing sent); then per rep the secondary
    replicator is SIGKILLed, 1 % of the files (random, new content, same size) are rewritten
    through the primary's mount, the secondary replicator is restarted, and the time runs
    from the ``secondary`` role command until the primary reports ``in_sync``. This includes
    the primary's reconnection attempt interval (0.25 s); the resync proper (the primary's
    "resync done … in X s" log line) is reported too. Anchor: bench_rsync.sh, same tree and
    change, rsync daemon over veth and local-to-local, warm cache.
(e) initial sync: 1 GiB (16 files × 64 MiB, random content) written on the primary's disk
    while no secondary exists; per rep a blank secondary is started and timed from its role
    command until the primary reports ``in_sync`` (the secondary flushes before it answers the
    end of the resync). Source warm (just written, in the page cache); caches never dropped.
    Reported as MB/s and as a ratio of the local directory's (a) from the same run.

Targets: (a), (b), (c) ≥ 2× GlusterFS; (d) ≤ 0.5× rsync (daemon over veth); (e) ≥ 0.8× local
(a). MB = 10^6 B. Prints median [min–max] over --reps runs, the final table and the exact
command; writes every sample to bench/results/replication-<date>[-quick].json.

    .venv/bin/python bench/replication.py [--reps 3] [--quick] [--skip-gluster] [--plaintext]

Root only. Safety: namespaces named hkb* are this benchmark's own — those left by a crashed
run are removed at start (processes in them killed by PID), and everything is removed at exit.
Only 192.0.2.0/24 is used; without usable network namespaces it falls back to loopback
(127.0.0.1 / 127.0.0.2) and says so.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import filecmp
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = REPO / ".venv" / "bin" / "python"
ANCHORS = REPO.parent / "shared" / "bench-anchors"
MODULE = "m"
KEY = "bench-replication-key-0123456789"
NS_PREFIX = "hkb"
SWITCH, BRIDGE = "hkbsw", "hkb-br0"
NET_ADDRESSES = {"a": ("hkb1", "192.0.2.11"), "b": ("hkb2", "192.0.2.12")}
LOOPBACK_ADDRESSES = {"a": "127.0.0.1", "b": "127.0.0.2"}
RESYNC_DONE = re.compile(r"resync done: (\d+) paths, ([\d.]+) MB in ([\d.]+) s")
TREE_PER_DIR = 1000


def _load_fs_suite() -> Any:
    spec = importlib.util.spec_from_file_location("fs_suite", ANCHORS / "fs_suite.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {ANCHORS / 'fs_suite.py'}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fs_suite = _load_fs_suite()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def sh(command: str, check: bool = True) -> str:
    """:func:`run` for a command whose arguments contain no spaces."""
    return run(*command.split(), check=check)


def spread(values: list[float], fmt: str = ".0f") -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:{fmt}}"
    return f"{med:{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------- network


class Net:
    """The isolated test network (hkbsw + hkb1/hkb2), or loopback if namespaces are unusable."""

    def __init__(self) -> None:
        self.namespaces = False
        self.why_loopback = ""

    @staticmethod
    def ours() -> list[str]:
        out = run("ip", "netns", "list", check=False)
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(NS_PREFIX)]

    def down(self) -> None:
        """Kill (by PID) what still runs in the hkb* namespaces, then delete them."""
        for ns in self.ours():
            for pid in run("ip", "netns", "pids", ns, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        if self.ours():
            time.sleep(0.2)
        for ns in self.ours():
            run("ip", "netns", "del", ns, check=False)

    def up(self) -> None:
        self.down()
        try:
            self._add_switch()
            for ns, addr in NET_ADDRESSES.values():
                self._add_host(ns, addr)
            a, b = NET_ADDRESSES["a"], NET_ADDRESSES["b"]
            sh(f"ip netns exec {a[0]} ping -c 1 -W 2 {b[1]}")
            self.namespaces = True
        except (RuntimeError, OSError) as exc:
            self.down()
            self.why_loopback = str(exc)
            log(f"network namespaces unusable ({exc}): FALLING BACK TO LOOPBACK 127.0.0.1/.2")

    @staticmethod
    def _no_ipv6(ns: str) -> None:
        sh(f"ip netns exec {ns} sysctl -q -w net.ipv6.conf.all.disable_ipv6=1")
        sh(f"ip netns exec {ns} sysctl -q -w net.ipv6.conf.default.disable_ipv6=1")

    def _add_switch(self) -> None:
        sh(f"ip netns add {SWITCH}")
        sh(f"ip -n {SWITCH} link set lo up")
        self._no_ipv6(SWITCH)
        sh(f"ip -n {SWITCH} link add {BRIDGE} type bridge stp_state 0 forward_delay 0")
        sh(f"ip -n {SWITCH} link set {BRIDGE} up")

    def _add_host(self, ns: str, addr: str) -> None:
        sh(f"ip netns add {ns}")
        sh(f"ip -n {ns} link set lo up")
        self._no_ipv6(ns)
        sh(f"ip link add {ns}-e netns {ns} type veth peer name {ns}-p netns {SWITCH}")
        sh(f"ip -n {ns} addr add {addr}/24 dev {ns}-e")
        sh(f"ip -n {ns} link set {ns}-e up")
        sh(f"ip -n {SWITCH} link set {ns}-p master {BRIDGE} up")
        guard = (
            "table inet hkbguard {\n chain out {\n"
            "  type filter hook output priority 0; policy accept;\n"
            '  oifname "lo" accept\n  meta nfproto ipv6 drop\n'
            "  ip daddr != 192.0.2.0/24 counter drop\n }\n}\n"
        )
        run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=guard)

    def address(self, node: str) -> str:
        return NET_ADDRESSES[node][1] if self.namespaces else LOOPBACK_ADDRESSES[node]

    def prefix(self, node: str) -> list[str]:
        if not self.namespaces:
            return []
        return ["nsenter", f"--net=/run/netns/{NET_ADDRESSES[node][0]}"]

    def describe(self) -> str:
        if self.namespaces:
            return "network namespaces hkb1 192.0.2.11 / hkb2 192.0.2.12 (veth + bridge)"
        return f"LOOPBACK 127.0.0.1 / 127.0.0.2 (namespaces unusable: {self.why_loopback})"


# ---------------------------------------------------------------------- replicators


class Replicator:
    """One ``hakit.repl.process``: roles sent on stdin, events read from stdout (timestamped)."""

    def __init__(self, pair: Pair, node: str) -> None:
        self.node = node
        self.log_path = pair.root / f"{node}.log"
        self._log = self.log_path.open("ab")
        env = dict(os.environ, HAKIT_BIND_REGISTRY=str(pair.node_dir(node) / "run" / "binds"))
        argv = [
            *pair.net.prefix(node),
            str(PYTHON),
            "-m",
            "hakit.repl.process",
            "-c",
            str(pair.cluster_file(node)),
            "-m",
            MODULE,
            "--node",
            node,
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._ids = 0
        self._stdin = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        LIVE.add(self)

    def _read(self) -> None:
        """Events in; each generation a primary reports is permitted at once, as by an agent
        whose peer's agent is up (only the peer's replicator is killed here) and learns it
        from the next heartbeat: without it, changes made alone wait for a permit, then EIO."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            ev["_t"] = time.monotonic()
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
            if ev.get("ev") == "record" and ev.get("generation"):
                with contextlib.suppress(OSError, ValueError):
                    self.send({"cmd": "permit", "generation": int(ev["generation"])})

    def send(self, cmd: dict[str, Any]) -> int:
        with self._stdin:  # the reader thread sends permits
            self._ids += 1
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps({**cmd, "id": self._ids}) + "\n").encode())
            self.proc.stdin.flush()
            return self._ids

    def ready(self, timeout: float = 60.0) -> None:
        """Return once the process answers a ping (Python started, modules imported)."""
        i = self.send({"cmd": "ping"})
        self.wait_for(lambda e: e.get("ev") == "pong" and e.get("id") == i, timeout)

    def role(self, role: str, timeout: float = 60.0) -> None:
        i = self.send({"cmd": "role", "role": role, "force_full": False})
        done = self.wait_for(lambda e: e.get("ev") == "done" and e.get("id") == i, timeout)
        if not done["ok"]:
            raise RuntimeError(f"{self.node}: role {role} failed: {done['error']}")

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, since: int = 0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = since
            while True:
                for e in self.events[seen:]:
                    if pred(e):
                        return e
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(
                        f"{self.node}: no matching event in {timeout:g} s; last: "
                        f"{self.events[-3:]} (log: {self.log_path})"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_record(self, pred: Callable[[dict[str, Any]], bool], timeout: float, since: int = 0):
        return self.wait_for(lambda e: e.get("ev") == "record" and pred(e), timeout, since)

    def kill(self) -> None:
        """SIGKILL, by PID (the process execs through nsenter: the PID is the replicator's)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._done()

    def close(self, timeout: float = 60.0) -> None:
        """Close stdin: the replicator releases its mounts/listener and exits."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.node}: no clean exit in {timeout:g} s: SIGKILL")
                self.kill()
        self._done()

    def _done(self) -> None:
        LIVE.discard(self)
        self._log.close()


LIVE: set[Replicator] = set()


class Pair:
    """Configs and processes of primary ``a`` and secondary ``b`` of module ``m`` under root."""

    def __init__(self, root: Path, net: Net, port: int, *, plaintext: bool, ack: str) -> None:
        self.root = root
        self.net = net
        self.port = port
        self.plaintext = plaintext
        self.ack = ack
        self.a: Replicator | None = None
        self.b: Replicator | None = None
        for node in "ab":
            self.data(node).mkdir(parents=True, exist_ok=True)
        self.write_configs()

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def data(self, node: str) -> Path:
        return self.node_dir(node) / "data"

    def cluster_file(self, node: str) -> Path:
        return self.node_dir(node) / "etc" / "cluster.toml"

    def write_configs(self) -> None:
        nodes = "".join(
            f'[nodes.{n}]\naddresses = {{ lan = "{self.net.address(n)}" }}\n' for n in "ab"
        )
        plain = ["lan"] if self.plaintext else []
        for node in "ab":
            base = self.node_dir(node)
            (base / "etc" / "modules" / MODULE).mkdir(parents=True, exist_ok=True)
            self.cluster_file(node).write_text(
                f'name = "hkbench"\nkey = "{KEY}"\nstate_dir = "{base / "state"}"\n'
                f'run_dir = "{base / "run"}"\nmodules_dir = "{base / "etc" / "modules"}"\n'
                f"plaintext_networks = {plain}\n{nodes}",
                encoding="utf-8",
            )
            (base / "etc" / "modules" / MODULE / "module.toml").write_text(
                f'mode = "mirror"\n[[replicate]]\npath = "{self.data(node)}"\n'
                f'[replication]\nport = {self.port}\nack = "{self.ack}"\n',
                encoding="utf-8",
            )

    def start(self, node: str) -> Replicator:
        rep = Replicator(self, node)
        rep.ready()
        setattr(self, node, rep)
        return rep

    def start_in_sync(self, timeout: float = 600.0) -> None:
        """Secondary listening, then primary mounted; wait until the primary is in sync."""
        b = self.start("b")
        b.role("secondary")
        a = self.start("a")
        since = a.mark()
        a.role("primary")
        a.wait_record(lambda e: e.get("in_sync"), timeout, since)

    def close(self) -> None:
        """Primary first (unmounts), then the secondary."""
        for node in "ab":
            rep = getattr(self, node)
            if rep is not None:
                rep.close()
                setattr(self, node, None)

    def resync_lines(self, offset: int) -> list[tuple[int, float, float]]:
        """(paths, MB, seconds) of the primary's "resync done" log lines after byte offset."""
        text = (self.root / "a.log").read_bytes()[offset:].decode(errors="replace")
        return [(int(m[1]), float(m[2]), float(m[3])) for m in RESYNC_DONE.finditer(text)]

    def log_size(self) -> int:
        path = self.root / "a.log"
        return path.stat().st_size if path.exists() else 0


# ---------------------------------------------------------------------- cleanup


def release_mounts(root: Path) -> None:
    """Detach whatever is still mounted under root (a killed replicator's FUSE mount or bind)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        entries = [
            (line.split()[4], line.split()[2], line.split(" - ")[1].split()[0]) for line in f
        ]
    mine = [e for e in entries if e[0] == str(root) or e[0].startswith(f"{root}/")]
    for point, device, fstype in sorted(mine, key=lambda e: len(e[0]), reverse=True):
        if fstype.startswith("fuse"):
            abort = Path("/sys/fs/fuse/connections") / device.partition(":")[2] / "abort"
            with contextlib.suppress(OSError):
                abort.write_text("1")
        run("umount", "-l", point, check=False)


class Cleanup:
    def __init__(self, root: Path, net: Net, keep: bool) -> None:
        self.root, self.net, self.keep = root, net, keep
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        for rep in list(LIVE):
            with contextlib.suppress(Exception):
                rep.close(timeout=20)
        release_mounts(self.root)
        self.net.down()
        if not self.keep:
            for sub in ("fs-tls", "fs-plain", "init", "tree", "local"):
                shutil.rmtree(self.root / sub / "a" / "data", ignore_errors=True)
                shutil.rmtree(self.root / sub / "b" / "data", ignore_errors=True)
            shutil.rmtree(self.root / "local", ignore_errors=True)


def _signal_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------- fs_suite on a target


def seqwrite(d: str, i: int, size_mib: int) -> dict[str, Any]:
    if size_mib == 1024:
        r: dict[str, Any] = fs_suite.seqwrite(d, i)
        return r
    # --quick only: fs_suite.seqwrite's fio job with a smaller --size
    f = os.path.join(d, f"anc-seq-{i}.dat")
    t0 = time.perf_counter()
    job = f"--name=seqwrite --rw=write --bs=1M --size={size_mib}M --ioengine=psync --end_fsync=1"
    j = fs_suite.fio([*job.split(), "--filename=" + f])
    wall = time.perf_counter() - t0
    w = j["write"]
    os.unlink(f)
    mbs = w["io_bytes"] / (w["runtime"] / 1000.0) / 1e6
    return {"MB_s": round(mbs, 1), "fio_runtime_s": w["runtime"] / 1000.0, "wall_s": round(wall, 2)}


def fs_round(label: str, d: Path, i: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    os.sync()
    out["seqwrite"] = seqwrite(str(d), i, args.seq_mib)
    os.sync()
    out["dsync4k"] = fs_suite.dsync4k(str(d), i, args.dsync_runtime)
    os.sync()
    out["small"] = fs_suite.small(str(d), i, args.small_files, False)
    log(
        f"  {label:16} #{i + 1}: seqwrite {out['seqwrite']['MB_s']} MB/s, dsync4k "
        f"{out['dsync4k']['iops']} ops/s ({out['dsync4k']['clat_mean_us']} µs), small "
        f"{out['small']['files_s']} files/s"
    )
    return out


def check_replicated(pair: Pair, name: str) -> None:
    """A file written through the primary's mount is on the secondary, byte for byte."""
    body = os.urandom(65536)
    (pair.data("a") / name).write_bytes(body)
    if (pair.data("b") / name).read_bytes() != body:
        raise RuntimeError(f"{name}: not replicated to the secondary")
    (pair.data("a") / name).unlink()
    if (pair.data("b") / name).exists():
        raise RuntimeError(f"{name}: removal not replicated")


def phase_fs(args: argparse.Namespace, net: Net, variants: list[str], res: dict[str, Any]) -> None:
    local = args.root / "local"
    local.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for k, v in enumerate(variants):
        pair = Pair(args.root / f"fs-{v}", net, args.port + k, plaintext=v == "plain", ack=args.ack)
        pair.start_in_sync(timeout=120)
        check_replicated(pair, "hkb-probe")
        pairs[v] = pair
    targets = [("local", local)] + [(f"hakit-{v}", pairs[v].data("a")) for v in variants]
    for label, _ in targets:
        res["fs"].setdefault(label, {"seqwrite": [], "dsync4k": [], "small": []})
    for i in range(args.reps):
        for label, d in targets:
            r = fs_round(label, d, i, args)
            for test, sample in r.items():
                res["fs"][label][test].append(sample)
    for v, pair in pairs.items():
        left_a = sorted(os.listdir(pair.data("a")))
        left_b = sorted(os.listdir(pair.data("b")))
        if left_a != left_b:
            raise RuntimeError(f"hakit-{v}: primary {left_a} != secondary {left_b}")
        in_sync = pair.a.events[-1] if pair.a else {}
        res["fs_checks"][v] = {"both_sides_empty_after": left_a == [], "last_record": in_sync}
        pair.close()


# ---------------------------------------------------------------------- (e) initial sync


def phase_initial(args: argparse.Namespace, net: Net, variant: str, res: dict[str, Any]) -> None:
    pair = Pair(args.root / "init", net, args.port + 5, plaintext=variant == "plain", ack=args.ack)
    src = pair.data("a")
    if not any(src.iterdir()):
        log(f"  writing {args.init_files} × {args.init_mib} MiB on the primary's disk")
        chunk = 1 << 20
        for k in range(args.init_files):
            with (src / f"big{k:02d}.dat").open("wb") as f:
                for _ in range(args.init_mib):
                    f.write(os.urandom(chunk))
        os.sync()  # the source is on disk and still in the page cache (warm)
    total = sum(p.stat().st_size for p in src.iterdir())
    a = pair.start("a")
    a.role("primary")
    a.wait_record(lambda e: e.get("mode") == "alone", 30)
    samples = res["initial"].setdefault(variant, [])
    for i in range(args.reps):
        _blank_secondary(pair)
        b = pair.start("b")
        off = pair.log_size()
        since = a.mark()
        t0 = time.monotonic()
        b.role("secondary")
        listening = time.monotonic() - t0
        ev = a.wait_record(lambda e: e.get("in_sync"), 1800, since)
        took = ev["_t"] - t0
        lines = pair.resync_lines(off)
        same = all(filecmp.cmp(p, pair.data("b") / p.name, shallow=False) for p in src.iterdir())
        if not same:
            raise RuntimeError("initial sync: the secondary's copy differs")
        s = {
            "bytes": total,
            "seconds": round(took, 3),
            "MB_s": round(total / took / 1e6, 1),
            "resync_log": lines[-1] if lines else None,
            "secondary_listening_s": round(listening, 3),
            "identical": same,
        }
        samples.append(s)
        log(
            f"  hakit-{variant} initial sync #{i + 1}: {s['seconds']} s = {s['MB_s']} MB/s "
            f"(resync proper: {lines[-1][2] if lines else '?'} s)"
        )
        since = a.mark()
        b.close()
        pair.b = None
        a.wait_record(lambda e: e.get("mode") == "alone", 60, since)
    pair.close()


def _blank_secondary(pair: Pair) -> None:
    """The secondary has never synchronised: empty directory, no data record, no journal."""
    shutil.rmtree(pair.data("b"), ignore_errors=True)
    pair.data("b").mkdir(parents=True)
    shutil.rmtree(pair.node_dir("b") / "state", ignore_errors=True)


# ---------------------------------------------------------------------- (d) reintegration


def tree_path(root: Path, k: int) -> Path:
    return root / f"d{k // TREE_PER_DIR:03d}" / f"f{k:06d}"


def build_tree(pair: Pair, n: int) -> float:
    """n × 4 KiB random files on the primary's disk, copied with cp -a (same mtimes) to b."""
    t0 = time.monotonic()
    a, b = pair.data("a"), pair.data("b")
    for d in range((n + TREE_PER_DIR - 1) // TREE_PER_DIR):
        (a / f"d{d:03d}").mkdir()
    for k in range(n):
        tree_path(a, k).write_bytes(os.urandom(4096))
    shutil.rmtree(b)
    run("cp", "-a", str(a), str(b))
    os.sync()
    return time.monotonic() - t0


def phase_reintegration(
    args: argparse.Namespace, net: Net, variant: str, res: dict[str, Any]
) -> None:
    pair = Pair(args.root / "tree", net, args.port + 6, plaintext=variant == "plain", ack=args.ack)
    info = res["reintegration_setup"].setdefault(variant, {})
    if not (pair.data("a") / "d000").exists():
        log(f"  building {args.tree_files} × 4 KiB files on both nodes (identical, cp -a)")
        info["build_s"] = round(build_tree(pair, args.tree_files), 1)
    off = pair.log_size()
    t0 = time.monotonic()
    pair.start_in_sync(timeout=1800)
    info["first_sync_s"] = round(time.monotonic() - t0, 2)
    info["first_sync_log"] = pair.resync_lines(off)
    log(
        f"  hakit-{variant}: first sync of the identical trees took {info['first_sync_s']} s "
        f"({info['first_sync_log']})"
    )
    a = pair.a
    assert a is not None
    n = args.tree_files
    change = n * args.change_pct // 100
    samples = res["reintegration"].setdefault(variant, [])
    rng = random.Random()
    for i in range(args.reps):
        b = pair.b
        assert b is not None
        since = a.mark()
        b.kill()  # SIGKILL: its read-only bind stays, the next replicator removes it
        pair.b = None
        a.wait_record(lambda e: e.get("mode") == "alone", 60, since)
        picked = rng.sample(range(n), change)
        t0 = time.monotonic()
        for k in picked:
            with tree_path(pair.data("a"), k).open("r+b") as f:
                f.write(os.urandom(4096))
        write_s = time.monotonic() - t0
        b = pair.start("b")
        off = pair.log_size()
        since = a.mark()
        t0 = time.monotonic()
        b.role("secondary")
        listening = time.monotonic() - t0
        ev = a.wait_record(lambda e: e.get("in_sync"), 600, since)
        took = ev["_t"] - t0
        lines = pair.resync_lines(off)
        bad = [
            k
            for k in picked
            if tree_path(pair.data("a"), k).read_bytes()
            != tree_path(pair.data("b"), k).read_bytes()
        ]
        if bad:
            raise RuntimeError(f"reintegration: {len(bad)} changed files differ on the secondary")
        s = {
            "changed": change,
            "seconds": round(took, 3),
            "resync_log": lines[-1] if lines else None,
            "secondary_listening_s": round(listening, 3),
            "rewrite_through_mount_s": round(write_s, 2),
            "changed_files_identical": True,
        }
        samples.append(s)
        log(
            f"  hakit-{variant} reintegration #{i + 1}: {s['seconds']} s from the role command "
            f"(resync proper: {lines[-1][2] if lines else '?'} s; {change} files rewritten "
            f"in {write_s:.2f} s)"
        )
    pair.close()  # unmounted: diff reads both copies straight from the disk
    t0 = time.monotonic()
    same = subprocess.run(["diff", "-rq", pair.data("a"), pair.data("b")], check=False)
    info["trees_identical_at_end"] = same.returncode == 0
    log(
        f"  diff -rq of the two trees after the last rep: "
        f"{'identical' if same.returncode == 0 else 'DIFFERENT'} ({time.monotonic() - t0:.1f} s)"
    )
    if same.returncode != 0:
        raise RuntimeError("reintegration: the trees differ after the last rep")


# ---------------------------------------------------------------------- anchors


def run_anchor(script: str, env: dict[str, str], logfile: Path) -> tuple[int, str]:
    argv = ["bash", str(ANCHORS / script)]
    log(f"running {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}")
    with logfile.open("w") as err:
        proc = subprocess.run(
            argv,
            env=dict(os.environ, **env),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            check=False,
            timeout=3600,
        )
    result = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), "")
    if result:
        log(f"  {result}")
    if proc.returncode != 0:
        log(f"  {script} failed ({proc.returncode}): see {logfile}")
    return proc.returncode, result


def phase_gluster(args: argparse.Namespace, res: dict[str, Any]) -> None:
    out = args.root / "anchors" / "gluster.json"
    env = {
        "REPS": str(args.reps),
        "DSYNC_RUNTIME": str(args.dsync_runtime),
        "SMALL_FILES": str(args.small_files),
        "OUT": str(out),
    }
    rc, line = run_anchor("bench_gluster.sh", env, args.root / "anchors" / "gluster.log")
    res["gluster"] = {"rc": rc, "result_line": line, "env": env}
    if rc == 0 and out.exists():
        res["gluster"]["samples"] = json.loads(out.read_text())


def phase_rsync(args: argparse.Namespace, res: dict[str, Any]) -> None:
    out = args.root / "anchors" / "rsync.json"
    env = {
        "REPS": str(args.reps),
        "NFILES": str(args.tree_files),
        "CHANGE_PCT": str(args.change_pct),
        "COLD": "0",
        "OUT": str(out),
    }
    rc, line = run_anchor("bench_rsync.sh", env, args.root / "anchors" / "rsync.log")
    res["rsync"] = {"rc": rc, "result_line": line, "env": env}
    if rc == 0 and out.exists():
        res["rsync"]["samples"] = json.loads(out.read_text())


# ---------------------------------------------------------------------- report


FS_KEYS = {"seqwrite": "MB_s", "dsync4k": "iops", "latency": "clat_mean_us", "small": "files_s"}
# criterion, hakit's metric, reference (who, metric), comparison, factor
TARGETS = [
    ("(a) seqwrite MB/s", "seqwrite", ("gluster", "seqwrite"), "≥", 2.0),
    ("(b) dsync4k ops/s", "dsync4k", ("gluster", "dsync4k"), "≥", 2.0),
    ("(c) small files/s", "small", ("gluster", "small"), "≥", 2.0),
    ("(d) reintegration s", "reintegration", ("rsync", "net.change"), "≤", 0.5),
    ("(e) initial sync MB/s", "initial", ("local", "seqwrite"), "≥", 0.8),
]


def values(res: dict[str, Any], who: str, metric: str) -> list[float]:
    """Samples of one metric: who is local, hakit-tls, hakit-plain, gluster or rsync."""
    if metric in FS_KEYS:
        test = "dsync4k" if metric == "latency" else metric
        if who == "gluster":
            samples = res.get("gluster", {}).get("samples", {}).get(test, [])
        else:
            samples = res["fs"].get(who, {}).get(test, [])
        return [float(s[FS_KEYS[metric]]) for s in samples]
    if who == "rsync":
        rsync = res.get("rsync", {}).get("samples", {}).get("seconds", {})
        return [float(x) for x in rsync.get(metric, [])]
    variant = who.removeprefix("hakit-")
    if metric == "reintegration":
        return [s["seconds"] for s in res["reintegration"].get(variant, [])]
    if metric == "resync_proper":
        return [
            s["resync_log"][2] for s in res["reintegration"].get(variant, []) if s["resync_log"]
        ]
    if metric == "initial":
        return [s["MB_s"] for s in res["initial"].get(variant, [])]
    if metric == "initial_s":
        return [s["seconds"] for s in res["initial"].get(variant, [])]
    raise KeyError(metric)


def report(args: argparse.Namespace, res: dict[str, Any], variants: list[str]) -> list[str]:
    out = [f"Figures (n={args.reps} unless said; median [min–max]; MB = 10^6 B)", ""]
    out += [
        "| target | seqwrite MB/s | dsync4k ops/s | dsync4k mean lat µs | small files/s |",
        "|---|---|---|---|---|",
    ]
    rows = [("local directory", "local")]
    rows += [(f"hakit ({_name(v)})", f"hakit-{v}") for v in variants]
    if "samples" in res.get("gluster", {}):
        rows.append(("GlusterFS 10.3 replica 2", "gluster"))
    for name, who in rows:
        cells = [spread(values(res, who, m)) for m in ("seqwrite", "dsync4k", "latency", "small")]
        out.append(f"| {name} | {' | '.join(cells)} |")
    out += [
        "",
        f"(d) {args.change_pct} % of {args.tree_files:,} × 4 KiB files changed, (e) initial sync "
        f"of {args.init_files} × {args.init_mib} MiB:",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for v in variants:
        n = _name(v)
        out += [
            f"| (d) hakit ({n}) reintegration, role command → in_sync, s | "
            f"{spread(values(res, f'hakit-{v}', 'reintegration'), '.2f')} |",
            f"| (d) hakit ({n}) resync proper (primary's log line), s | "
            f"{spread(values(res, f'hakit-{v}', 'resync_proper'), '.2f')} |",
        ]
    for key, name in (
        ("net.change", "rsync daemon over veth, 1 % changed"),
        ("local.change", "rsync local-to-local, 1 % changed"),
        ("net.nochange", "rsync daemon over veth, nothing changed (scan only)"),
    ):
        out.append(f"| (d) {name}, s | {spread(values(res, 'rsync', key), '.2f')} |")
    for v in variants:
        n = _name(v)
        out += [
            f"| (e) hakit ({n}) initial sync, s | "
            f"{spread(values(res, f'hakit-{v}', 'initial_s'), '.2f')} |",
            f"| (e) hakit ({n}) initial sync, MB/s | "
            f"{spread(values(res, f'hakit-{v}', 'initial'))} |",
        ]
    out += [
        "",
        "Targets (ratios of medians, hakit with TLS):",
        "",
        "| criterion | hakit | reference | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, metric, (who, ref_metric), op, goal in TARGETS:
        mine = median(values(res, "hakit-tls", metric))
        ref = median(values(res, who, ref_metric))
        refname = {"gluster": "GlusterFS", "rsync": "rsync (daemon)", "local": "local (a)"}[who]
        if mine is None or not ref:
            out.append(f"| {name} | {_f(mine)} | {refname} {_f(ref)} | n/a | {op} {goal:g}× | – |")
            continue
        ratio = mine / ref
        met = ratio >= goal if op == "≥" else ratio <= goal
        out.append(
            f"| {name} | {_f(mine)} | {refname} {_f(ref)} | {ratio:.2f}× | {op} {goal:g}× | "
            f"{'yes' if met else 'NO'} |"
        )
    if "plain" in variants:
        out += ["", "Cost of TLS (medians):", ""]
        for metric, name in (
            ("seqwrite", "seqwrite MB/s"),
            ("dsync4k", "dsync4k ops/s"),
            ("latency", "dsync4k mean lat µs"),
            ("small", "small files/s"),
            ("reintegration", "reintegration s"),
            ("initial", "initial sync MB/s"),
        ):
            tls = median(values(res, "hakit-tls", metric))
            plain = median(values(res, "hakit-plain", metric))
            ratio = f"{tls / plain:.2f}" if tls is not None and plain else "n/a"
            out.append(
                f"  {name:20} TLS {_f(tls):>7}   plaintext {_f(plain):>7}   TLS/plaintext {ratio}"
            )
    return out


def _name(variant: str) -> str:
    return "TLS" if variant == "tls" else "plaintext"


def _f(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


# ---------------------------------------------------------------------- main


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every measurement")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="validation sizes: seqwrite 64 MiB, 1,000 small files, dsync4k 3 s, "
        "10,000-file tree, initial sync 4 × 16 MiB (GlusterFS still writes 1 GiB)",
    )
    ap.add_argument("--skip-gluster", action="store_true", help="do not run bench_gluster.sh")
    ap.add_argument("--skip-rsync", action="store_true", help="do not run bench_rsync.sh")
    ap.add_argument(
        "--plaintext",
        action="store_true",
        help="also measure hakit with replication in plaintext (plaintext_networks), "
        "to report the cost of TLS",
    )
    ap.add_argument(
        "--ack",
        choices=("receipt", "durable"),
        default="receipt",
        help="replication.ack of the module (durable: the secondary fdatasyncs each change)",
    )
    ap.add_argument(
        "--phases",
        default="fs,gluster,initial,reintegration,rsync",
        help="what to run, in this order: fs = (a)-(c) on local and hakit, gluster = the "
        "GlusterFS anchor, initial = (e), reintegration = (d), rsync = the rsync anchor",
    )
    ap.add_argument(
        "--root",
        type=Path,
        default=Path("/var/tmp/hk-bench-repl"),
        help="work directory (on disk; wiped at start, data removed at exit)",
    )
    ap.add_argument("--port", type=int, default=7421, help="first replication port")
    ap.add_argument("--keep", action="store_true", help="keep the data trees at exit")
    ap.add_argument(
        "--change-pct", type=int, default=1, help="(d): percentage of the tree rewritten"
    )
    args = ap.parse_args()
    args.seq_mib = 64 if args.quick else 1024
    args.small_files = 1000 if args.quick else 10000
    args.dsync_runtime = 3 if args.quick else 10
    args.tree_files = 10000 if args.quick else 100000
    args.init_files, args.init_mib = (4, 16) if args.quick else (16, 64)
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("root is needed (namespaces, mounts)", file=sys.stderr)
        return 2
    command = " ".join([".venv/bin/python", "bench/replication.py", *sys.argv[1:]])
    phases = args.phases.split(",")
    if args.skip_gluster and "gluster" in phases:
        phases.remove("gluster")
    if args.skip_rsync and "rsync" in phases:
        phases.remove("rsync")
    for tool in ("fio", "nsenter", "cp") + (("rsync",) if "rsync" in phases else ()):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (apt-get install fio rsync util-linux)", file=sys.stderr)
            return 2
    if "gluster" in phases and shutil.which("glusterd") is None:
        print(
            "glusterd missing: apt-get install glusterfs-server glusterfs-client, "
            "or --skip-gluster",
            file=sys.stderr,
        )
        return 2
    variants = ["tls", "plain"] if args.plaintext else ["tls"]
    net = Net()
    cleanup = Cleanup(args.root, net, args.keep)
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _signal_exit)
    signal.signal(signal.SIGHUP, _signal_exit)
    # a previous run may have crashed: its mounts, namespaces and data go first
    release_mounts(args.root)
    net.down()
    shutil.rmtree(args.root, ignore_errors=True)
    (args.root / "anchors").mkdir(parents=True)
    net.up()
    started = datetime.datetime.now()
    res: dict[str, Any] = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "network": net.describe(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fs": {},
        "fs_checks": {},
        "initial": {},
        "reintegration": {},
        "reintegration_setup": {},
        "source_warm": True,
        "load_at_start": os.getloadavg(),
    }
    log(f"hakit replication benchmark: {net.describe()}; data under {args.root}")
    try:
        if "fs" in phases:
            log("(a)-(c) fs_suite on the local directory and hakit's mount")
            phase_fs(args, net, variants, res)
        if "gluster" in phases:
            log("(a)-(c) GlusterFS replica 2 (anchor)")
            phase_gluster(args, res)
        if "initial" in phases:
            for v in variants:
                log(f"(e) initial sync, {v}")
                phase_initial(args, net, v, res)
        if "reintegration" in phases:
            for v in variants:
                log(f"(d) reintegration, {v}")
                phase_reintegration(args, net, v, res)
        if "rsync" in phases:
            log("(d) rsync (anchor)")
            phase_rsync(args, res)
    finally:
        res["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        res["load_at_end"] = os.getloadavg()
        suffix = "-quick" if args.quick else ""
        out = HERE / "results" / f"replication-{started:%Y-%m-%d}{suffix}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=str))
    print()
    for line in report(args, res, variants):
        print(line)
    print(f"\nnetwork: {net.describe()}")
    print("source of (e) warm (written just before, in the page cache); caches never dropped")
    print(f"command: {command}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
