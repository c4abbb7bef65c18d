#!/usr/bin/env python3
"""Farm load balancing (issue 4): the filter's cost, the power-off gap, streams on join/leave.

A three-node lab (``hakit lab``) runs the ``farm-demo`` module: the demo HTTP application on
every node, VIP 192.0.2.100:8080 received by all of them, ``client-ip`` affinity. The client
namespace sends from the 30 extra addresses 192.0.2.200-229 (``Lab.client_sources``).

(1) **throughput**: a closed-loop load generator in the client namespace (this file with
    ``--load``: asyncio, ``--concurrency`` requests in flight, each an HTTP/1.0 ``GET /`` on a
    NEW connection, the sources in turn; only complete 200 answers count). With N = 1, 2, 3
    nodes UP (the module is stopped with ``hakit stop`` on the others), two variants share
    each run: ``vip`` (everything to 192.0.2.100:8080, through the farm filter) and ``direct``
    (each request to the boot address of the node that answers that source through the VIP,
    learnt from a short VIP load: the same per-node split, but no filter match and no
    flooding). The variants alternate in ``--slot`` slices (A B B A …, after a ``--warmup``),
    requests counted by the slice they were sent in, so both see the same machine at the
    same moment; overhead = 1 - vip/direct of each run. For N < 3 a second run has the
    stopped nodes' bridge ports set to ``flood off``: the frames for the virtual MAC then
    reach only the UP nodes, which separates the cost of the filter from that of the flooded
    copies on this one machine. N goes 3,2,1 / 1,2,3 and the variant order flips per cycle.
    Busy CPU per request (all cores, /proc/stat), the client's own CPU, requests slower than
    1 s (a SYN dropped and retransmitted) and the nodes' ListenOverflows are recorded.
(2) **power-off gap**: per run, the prober (``python -m hakit.lab.probe``, one new-connection
    request every ``--probe-period`` s from the 30 sources in turn) runs while one node (n3,
    n2, n1 in turn) is powered off 1.5 s + U(0, interval) after it started. Gap of a source =
    send time of its first success after the power-off - send time of its last success before
    it, for every source the powered-off node answered; per run the max over those sources.
    Failed requests of the other sources are counted (target 0). Profiles "fast" (100 ms /
    500 ms) and "default" (500 ms / 3 s), one lab each; the node is powered on again and the
    farm waited for (3 nodes UP, 256 buckets) between runs.
(3) **streams**: 50 long-lived connections (``python -m hakit.lab.streams``, 6 s each) while
    a node joins (``hakit start``) or leaves cleanly (``hakit stop``, which drains), 1.5 s
    after they opened; broken and mixed streams are counted (target 0).

Targets: overhead ≤ 5 %; fast power-off gap median ≤ 1 s; 0 streams broken on join and leave.

    .venv/bin/python bench/farm.py [--reps 5] [--runs 5] [--stream-runs 3] [--quick]

Prints median [min–max] per figure, the table and the exact command; writes every sample to
bench/results/farm-<date>[-quick].json. Root only; the lab (fixed namespaces hksw, hkc,
hkn1-3) is built under --root and always torn down at exit. Only 192.0.2.0/24 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hakit.config import parse_duration
from hakit.lab import agents, netns
from hakit.lab.lab import CLIENT, Lab
from hakit.lab.probe import Record, check_target
from hakit.system.run import run

HERE = Path(__file__).resolve().parent
MODULE = "farm-demo"
VIP = "192.0.2.100"
PORT = 8080
NODES = ["n1", "n2", "n3"]
SOURCES = 30
PROFILES = {"fast": ("100ms", "500ms"), "default": ("500ms", "3s")}
BUG_PHRASES = ("please report it", "Traceback (most recent call last)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spread(values: Sequence[float | None], fmt: str = ".0f") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    return f"{statistics.median(vals):{fmt}} [{min(vals):{fmt}}–{max(vals):{fmt}}]"


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# --- (1) the load generator: runs in the client namespace -------------------------------------

ABBA = (0, 1, 1, 0)  # slot pattern of two variants: first-order drift cancels out


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat is not per network namespace);
    busy excludes idle, iowait and steal."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # guest time is already inside user
    return total - fields[3] - fields[4] - fields[7], total


async def _get(host: str, port: int, source: str, timeout: float) -> tuple[str | None, str]:
    """One HTTP/1.0 GET / on a new connection from ``source``: (node, "") or (None, error)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            writer.write(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            data = await reader.read(-1)
    except TimeoutError:
        return None, "timeout"
    except OSError as exc:
        return None, type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        return None, f"HTTP {status[1].decode('latin-1')}" if len(status) > 1 else "bad answer"
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-node":
            return value.strip().decode("latin-1"), ""
    first = body.decode("utf-8", "replace").split()
    return (first[0], "") if first else (None, "no node in answer")


class _Tally:
    """What one variant got: requests counted by the slot they were SENT in."""

    def __init__(self) -> None:
        self.slots = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.per_node: dict[str, int] = {}
        self.by_source: dict[str, dict[str, int]] = {}
        self.latencies: list[float] = []
        self.busy = 0  # jiffies, every CPU
        self.total = 0
        self.client = 0.0  # CPU seconds of this process

    def result(self, slot: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        seconds = self.slots * slot
        hz = os.sysconf("SC_CLK_TCK")

        def pct(q: float) -> float | None:
            return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

        return {
            "seconds": seconds,
            "ok": self.ok,
            "rps": self.ok / seconds if seconds else None,
            "errors": self.errors,
            "per_node": self.per_node,
            "by_source": self.by_source,
            "latency_ms": {
                "p50": pct(0.5),
                "p99": pct(0.99),
                "max": pct(1.0),
                "over_1s": sum(1 for x in lat if x >= 1.0),  # a SYN retransmitted (1 s RTO)
            },
            # busy CPU of the whole machine (client, nodes, softirq) during this variant's slots
            "cpu_busy_cores": self.busy / self.total * (os.cpu_count() or 1) if self.total else 0,
            "cpu_ms_per_request": self.busy / hz * 1000 / self.ok if self.ok else None,
            "client_cpu_cores": self.client / seconds if seconds else None,
        }


async def load(
    variants: dict[str, dict[str, tuple[str, int]]],
    concurrency: int,
    seconds: float,
    warmup: float,
    *,
    slot: float,
    timeout: float,
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers, each sends its next request when its previous one
    ended; request k goes from source k mod S to its route in the variant of the current slot.

    Time is cut into ``slot``-second slots after ``warmup``; with two variants the slots go
    A B B A A B B A … Requests are counted for the slot they were sent in (those sent during
    the warm-up not at all), so a variant's rate = its successes / the time of its slots."""
    names = list(variants)
    pattern = ABBA if len(names) == 2 else (0,) * len(ABBA)
    sources = list(variants[names[0]])
    slots = max(1, round(seconds / slot))
    counter = itertools.count()
    tallies = {n: _Tally() for n in names}
    start = time.monotonic()
    w0 = start + warmup
    w1 = w0 + slots * slot

    def slot_of(t: float) -> int:
        return math.floor((t - w0) / slot)  # negative during the warm-up

    def variant_of(i: int) -> str:
        return names[pattern[i % len(pattern)]]

    async def marks() -> None:
        samples = []
        for i in range(slots + 1):
            await asyncio.sleep(max(0.0, w0 + i * slot - time.monotonic()))
            samples.append((_cpu_jiffies(), time.process_time()))
        for i, (((b0, a0), p0), ((b1, a1), p1)) in enumerate(itertools.pairwise(samples)):
            t = tallies[variant_of(i)]
            t.slots += 1
            t.busy += b1 - b0
            t.total += a1 - a0
            t.client += p1 - p0

    async def worker() -> None:
        while (sent := time.monotonic()) < w1:
            i = slot_of(sent)
            name = variant_of(i)
            src = sources[next(counter) % len(sources)]
            node, err = await _get(*variants[name][src], src, timeout)
            t = tallies[name]
            if node is not None:
                t.by_source.setdefault(src, {})
                t.by_source[src][node] = t.by_source[src].get(node, 0) + 1
            if i < 0:
                continue
            if node is None:
                t.errors[err] = t.errors.get(err, 0) + 1
                continue
            t.ok += 1
            t.per_node[node] = t.per_node.get(node, 0) + 1
            t.latencies.append(time.monotonic() - sent)

    await asyncio.gather(marks(), *(worker() for _ in range(concurrency)))
    return {n: t.result(slot) for n, t in tallies.items()}


def load_main(argv: Sequence[str]) -> int:
    """``farm.py --load --variant NAME=SRC@HOST:PORT,… [--variant …] [--concurrency 32 …]``:
    prints the result of :func:`load` as JSON."""
    ap = argparse.ArgumentParser(prog="farm.py --load")
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--variant", action="append", required=True, help="NAME=SRC@HOST:PORT,…")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--slot", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    variants: dict[str, dict[str, tuple[str, int]]] = {}
    for spec in args.variant:
        name, _, items = spec.partition("=")
        routes = variants[name] = {}
        for item in items.split(","):
            src, _, target = item.partition("@")
            check_target(f"{src}:1")  # only the lab's test networks, both ends
            routes[src] = check_target(target)
    if not 0 < args.seconds <= 60 or not 0 < args.concurrency <= 256 or len(variants) > 2:
        print("seconds in (0, 60], concurrency 1..256, at most 2 variants", file=sys.stderr)
        return 2
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(
        load(
            variants,
            args.concurrency,
            args.seconds,
            args.warmup,
            slot=args.slot,
            timeout=args.timeout,
        )
    )
    print(json.dumps(result))
    return 0


# --- the lab driving (root namespace) ---------------------------------------------------------


def run_load(
    lab: Lab, variants: dict[str, dict[str, str]], args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    """The load generator in the client namespace; ``variants``: name -> source -> target."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--load"]
    for name, routes in variants.items():
        argv += ["--variant", f"{name}=" + ",".join(f"{s}@{t}" for s, t in routes.items())]
    argv += ["--concurrency", str(args.concurrency), "--seconds", str(seconds)]
    argv += ["--warmup", str(args.warmup), "--slot", str(args.slot)]
    done = lab.run_in(CLIENT, argv, timeout=seconds + args.warmup + 60, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def listen_overflows(lab: Lab) -> dict[str, int]:
    """TcpExt ListenOverflows of every powered node (accept queue full: the SYN is dropped)."""
    out = {}
    for node in NODES:
        text = lab.run_in(node, ["cat", "/proc/net/netstat"], timeout=10, check=True).stdout
        rows = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
        out[node] = int(dict(zip(rows[0], rows[1], strict=True))["ListenOverflows"])
    return out


def set_flood(lab: Lab, nodes: Sequence[str], on: bool) -> None:
    """Unknown-unicast flooding of these nodes' bridge ports (the virtual MAC is never learnt,
    so this decides whether they receive the VIP's frames at all)."""
    for node in nodes:
        port = netns.bridge_port(lab.state().nodes[node].namespace, 0)
        argv = ["bridge", "link", "set", "dev", port, "flood", "on" if on else "off"]
        run(netns.in_namespace(netns.SWITCH_NS, argv), timeout=10)


def set_up_nodes(lab: Lab, want: list[str]) -> None:
    """Make exactly ``want`` UP (``hakit stop``/``start`` on the others), wait for the farm."""
    states = agents.module_states(lab, MODULE)
    stop = [n for n in NODES if n not in want and states.get(n) != "STOP"]
    start = [n for n in want if states.get(n) != "UP"]
    if stop:
        agents.command_all(lab, MODULE, "stop", stop)
    if start:
        agents.command_all(lab, MODULE, "start", start)
    agents.wait_farm(lab, MODULE, want, timeout=60)
    if stop:
        agents.wait_states(lab, MODULE, dict.fromkeys(stop, "STOP"), timeout=60)


def phase_throughput(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    state = lab.state()
    boot = {n: s.boot_addresses(1)[0].partition("/")[0] for n, s in state.nodes.items()}
    sources = lab.client_sources(SOURCES)
    vip_routes = dict.fromkeys(sources, f"{VIP}:{PORT}")
    owners: dict[int, dict[str, str]] = {}  # N -> source -> node that answered it via the VIP
    rows: list[dict[str, Any]] = []
    try:
        for cycle in range(args.reps):
            for n in [3, 2, 1] if cycle % 2 == 0 else [1, 2, 3]:
                up = NODES[:n]
                set_up_nodes(lab, up)
                if n not in owners:
                    seen = run_load(lab, {"vip": vip_routes}, args, 1.0)["vip"]
                    owners[n] = learn_owners(seen)
                direct = {s: f"{boot[owners[n][s]]}:{PORT}" for s in sources}
                # vip first in even cycles, direct first in odd ones (ABBA inside each run too)
                pair = {"vip": vip_routes, "direct": direct}
                if cycle % 2:
                    pair = {"direct": direct, "vip": vip_routes}
                kinds = ["flooded"] if n == 3 else ["flooded", "unflooded"]
                for kind in kinds if cycle % 2 == 0 else kinds[::-1]:
                    stopped = NODES[n:]
                    set_flood(lab, stopped, kind == "flooded")
                    try:
                        before = listen_overflows(lab)
                        res = run_load(lab, pair, args, args.seconds)
                        after = listen_overflows(lab)
                    finally:
                        set_flood(lab, stopped, True)
                    seen = learn_owners(res["vip"])
                    if seen != owners[n]:
                        log(f"  N={n}: the source -> node mapping changed: {seen}")
                        owners[n] = seen
                    for r in res.values():
                        del r["by_source"]
                    row = {
                        "cycle": cycle + 1,
                        "nodes": n,
                        "stopped_ports": kind,
                        "order": list(pair),
                        "vip": res["vip"],
                        "direct": res["direct"],
                        "ratio": res["vip"]["rps"] / res["direct"]["rps"],
                        "listen_overflows": {k: after[k] - before[k] for k in after},
                    }
                    rows.append(row)
                    log(_row_line(row))
    finally:
        set_up_nodes(lab, NODES)
    return {"rows": rows, "owners": {str(k): v for k, v in owners.items()}}


def _row_line(row: dict[str, Any]) -> str:
    v, d = row["vip"], row["direct"]
    tag = "" if row["nodes"] == 3 else f" stopped nodes {row['stopped_ports']:9}"
    return (
        f"  N={row['nodes']}{tag}: vip {v['rps']:5.0f} direct {d['rps']:5.0f} req/s "
        f"= {row['ratio']:.3f}; CPU ms/req {v['cpu_ms_per_request']:.3f} / "
        f"{d['cpu_ms_per_request']:.3f}; client cores {v['client_cpu_cores']:.2f} / "
        f"{d['client_cpu_cores']:.2f}; >1 s {v['latency_ms']['over_1s']} / "
        f"{d['latency_ms']['over_1s']}; errors {sum(v['errors'].values())} / "
        f"{sum(d['errors'].values())}; listen overflows {sum(row['listen_overflows'].values())}; "
        f"vip split {v['per_node']}"
    )


def learn_owners(res: dict[str, Any]) -> dict[str, str]:
    """source -> the node that answered most of its requests (client-ip: the only one)."""
    by_source: dict[str, dict[str, int]] = res["by_source"]
    return {s: max(nodes, key=lambda k: nodes[k]) for s, nodes in by_source.items() if nodes}


def streams_during(
    lab: Lab, action: Callable[[], None], seconds: float, delay: float
) -> tuple[dict[str, Any], float]:
    """50 long-lived streams from the sources; ``action()`` ``delay`` s after they opened."""
    sources = ",".join(lab.client_sources(SOURCES))
    argv = [sys.executable, "-m", "hakit.lab.streams", "--target", f"{VIP}:{PORT}"]
    argv += ["--count", "50", "--seconds", str(seconds), "--sources", sources]
    out: dict[str, Any] = {}
    failure: list[BaseException] = []

    def streams() -> None:
        try:
            out.update(
                json.loads(lab.run_in(CLIENT, argv, timeout=seconds + 60, check=True).stdout)
            )
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=streams)
    thread.start()
    time.sleep(delay)
    t = time.monotonic()
    try:
        action()
    finally:
        took = time.monotonic() - t
        thread.join()
    if failure:
        raise failure[0]
    return out, took


def phase_streams(lab: Lab, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for i in range(args.stream_runs):
        node = NODES[2 - i % 3]
        rest = [n for n in NODES if n != node]
        for kind in ("leave", "join"):

            def act(kind: str = kind, node: str = node, rest: list[str] = rest) -> None:
                verb = "stop" if kind == "leave" else "start"
                agents.command_all(lab, MODULE, verb, [node])
                agents.wait_farm(lab, MODULE, rest if kind == "leave" else NODES, timeout=60)

            got, took = streams_during(lab, act, args.stream_seconds, delay=1.5)
            if kind == "leave":
                agents.wait_states(lab, MODULE, {node: "STOP"}, timeout=60)
            row = {"run": i + 1, "kind": kind, "node": node, "rebalance_s": took, **got}
            rows.append(row)
            log(
                f"  {kind:5} of {node}: {got['count']} streams, broken {got['broken']}, mixed "
                f"{got['mixed']}, per node {got['per_node']}, rebalance {took:.2f} s"
                + (f", errors {got['errors']}" if got["errors"] else "")
            )
    return rows


def probe_records(lab: Lab, seconds: float, period: float) -> list[Record]:
    """The prober from the 30 sources; every record (monotonic times, like ours)."""
    sources = ",".join(lab.client_sources(SOURCES))
    fd, name = tempfile.mkstemp(prefix="probe-", suffix=".jsonl", dir=lab.root / CLIENT)
    os.close(fd)
    path = Path(name)
    argv = [sys.executable, "-m", "hakit.lab.probe", "--target", f"{VIP}:{PORT}"]
    argv += ["--seconds", str(seconds), "--period", str(period), "--timeout", "1.0"]
    argv += ["--records", str(path), "--json", "--sources", sources]
    try:
        lab.run_in(CLIENT, argv, timeout=seconds + 60, check=True)
        lines = path.read_text(encoding="utf-8").splitlines()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return [Record.from_dict(json.loads(line)) for line in lines if line.strip()]


def power_off_gap(records: list[Record], node: str, fault: float) -> dict[str, Any]:
    """Per source that ``node`` answered before ``fault``: its gap across the fault."""
    by_source: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: r.sent):
        by_source.setdefault(r.source or "", []).append(r)
    gaps: dict[str, float | None] = {}
    others_failed, others_total, affected_failed = 0, 0, 0
    for src, rows in by_source.items():
        before = [r for r in rows if r.ok and r.sent < fault]
        if before and before[-1].node == node:
            last = before[-1]
            after = [r for r in rows if r.ok and r.sent > fault]
            gaps[src] = after[0].sent - last.sent if after else None
            affected_failed += sum(1 for r in rows if not r.ok)
        else:
            others_total += len(rows)
            others_failed += sum(1 for r in rows if not r.ok)
    known = [g for g in gaps.values() if g is not None]
    return {
        "affected_sources": len(gaps),
        "never_recovered": sum(1 for g in gaps.values() if g is None),
        "gap_max_ms": 1000 * max(known) if known and len(known) == len(gaps) else None,
        "gap_median_ms": 1000 * statistics.median(known) if known else None,
        "gaps_ms": {s: None if g is None else round(1000 * g, 1) for s, g in gaps.items()},
        "affected_failed": affected_failed,
        "others_failed": others_failed,
        "others_total": others_total,
        "requests": len(records),
    }


def phase_poweroff(lab: Lab, profile: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    interval, timeout = (parse_duration(x) for x in PROFILES[profile])
    rows = []
    for i in range(args.runs):
        node = NODES[2 - i % 3]
        fault: dict[str, float] = {}

        def poweroff(node: str = node, fault: dict[str, float] = fault) -> None:
            fault["t"] = time.monotonic()
            lab.poweroff(node)

        seconds = 1.5 + timeout + 2.5
        out: dict[str, list[Record]] = {}

        def probe(out: dict[str, list[Record]] = out, seconds: float = seconds) -> None:
            out["r"] = probe_records(lab, seconds, args.probe_period)

        thread = threading.Thread(target=probe)
        thread.start()
        time.sleep(1.5 + random.uniform(0, interval))
        try:
            poweroff()
        finally:
            thread.join()
        if "r" not in out:
            raise RuntimeError("the prober failed (see above)")
        res = power_off_gap(out["r"], node, fault["t"])
        row = {"profile": profile, "run": i + 1, "powered_off": node, **res}
        rows.append(row)
        log(
            f"  {profile} run {i + 1}: {node} off: gap max {_ms(res['gap_max_ms'])} ms "
            f"(median {_ms(res['gap_median_ms'])}) over {res['affected_sources']} sources, "
            f"never recovered {res['never_recovered']}, other sources failed "
            f"{res['others_failed']}/{res['others_total']}"
        )
        lab.poweron(node)
        agents.wait_agents(lab)
        agents.wait_farm(lab, MODULE, NODES, timeout=60)
    return rows


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def lab_up(lab: Lab, profile: str) -> None:
    interval, timeout = PROFILES[profile]
    lab.up(nodes=3, modules=[MODULE], interval=interval, timeout=timeout)
    agents.wait_agents(lab)
    agents.command_all(lab, MODULE, "start")
    agents.wait_farm(lab, MODULE, NODES, timeout=60)
    lab.client_sources(SOURCES)


def agent_bugs(lab: Lab) -> list[str]:
    """Lines of the agents' logs that report a bug (read before the lab goes down)."""
    bugs = []
    for node in NODES:
        path = lab.root / node / "agent.log"
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if any(p in line for p in BUG_PHRASES):
                    bugs.append(f"{node}: {line}")
    return bugs


# --- report -----------------------------------------------------------------------------------


THROUGHPUT_ROWS = [
    (1, "flooded"),
    (1, "unflooded"),
    (2, "flooded"),
    (2, "unflooded"),
    (3, "flooded"),
]


def throughput_rows(res: dict[str, Any], n: int, kind: str) -> list[dict[str, Any]]:
    rows = res.get("throughput", {}).get("rows", [])
    return [r for r in rows if r["nodes"] == n and r["stopped_ports"] == kind]


def report(res: dict[str, Any]) -> list[str]:
    lines = []
    tp = res.get("throughput")
    if tp:
        lines += [
            "| nodes UP | vip req/s | direct req/s | vip/direct per run | overhead | "
            "CPU ms/req vip / direct | client cores vip / direct | errors | requests > 1 s "
            "vip / direct |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, kind in THROUGHPUT_ROWS:
            rows = throughput_rows(res, n, kind)
            if not rows:
                continue
            v, d = [r["vip"] for r in rows], [r["direct"] for r in rows]
            ratio = median([r["ratio"] for r in rows]) or 0.0
            errors = sum(sum(x["errors"].values()) for x in v + d)
            label = f"{n}" if kind == "flooded" else f"{n}, stopped nodes' ports unflooded"
            lines.append(
                f"| {label} | {spread([x['rps'] for x in v])} | {spread([x['rps'] for x in d])} | "
                f"{spread([r['ratio'] for r in rows], '.3f')} | {100 * (1 - ratio):.1f} % | "
                f"{spread([x['cpu_ms_per_request'] for x in v], '.3f')} / "
                f"{spread([x['cpu_ms_per_request'] for x in d], '.3f')} | "
                f"{spread([x['client_cpu_cores'] for x in v], '.2f')} / "
                f"{spread([x['client_cpu_cores'] for x in d], '.2f')} | {errors} | "
                f"{spread([x['latency_ms']['over_1s'] for x in v])} / "
                f"{spread([x['latency_ms']['over_1s'] for x in d])} |"
            )
        lines.append("")
    po = res.get("poweroff")
    if po:
        lines += [
            "| profile | gap max per run, ms | median source gap, ms | sources affected | "
            "never recovered | other sources failed |",
            "|---|---|---|---|---|---|",
        ]
        for profile, rows in po.items():
            lines.append(
                f"| {profile} ({'/'.join(PROFILES[profile])}) | "
                f"{spread([r['gap_max_ms'] for r in rows])} | "
                f"{spread([r['gap_median_ms'] for r in rows])} | "
                f"{spread([r['affected_sources'] for r in rows])} | "
                f"{sum(r['never_recovered'] for r in rows)} | "
                f"{sum(r['others_failed'] for r in rows)}/{sum(r['others_total'] for r in rows)} |"
            )
        lines.append("")
    st = res.get("streams")
    if st:
        lines += [
            "| change | runs | streams | broken | mixed | rebalance s |",
            "|---|---|---|---|---|---|",
        ]
        for kind in ("join", "leave"):
            rows = [r for r in st if r["kind"] == kind]
            lines.append(
                f"| {kind} | {len(rows)} | {sum(r['count'] for r in rows)} | "
                f"{sum(r['broken'] for r in rows)} | {sum(r['mixed'] for r in rows)} | "
                f"{spread([r['rebalance_s'] for r in rows], '.2f')} |"
            )
        lines.append("")
    return lines


def targets(res: dict[str, Any]) -> list[str]:
    lines = ["| criterion | measured | target | met |", "|---|---|---|---|"]
    for n in (1, 2, 3):
        ratio = median([r["ratio"] for r in throughput_rows(res, n, "flooded")])
        if ratio is not None:
            over = 100 * (1 - ratio)
            lines.append(
                f"| filter overhead (1 - vip/direct, median of runs), {n} node"
                f"{'s' if n > 1 else ''} UP | {over:.1f} % | ≤ 5 % | "
                f"{'yes' if over <= 5 else '**no**'} |"
            )
    po = res.get("poweroff", {}).get("fast")
    if po:
        m = median([r["gap_max_ms"] for r in po])
        met = m is not None and m <= 1000 and all(r["gap_max_ms"] is not None for r in po)
        lines.append(
            f"| power-off gap, fast profile (median of per-run max) | {_ms(m)} ms | ≤ 1000 ms | "
            f"{'yes' if met else '**no**'} |"
        )
    st = res.get("streams")
    if st:
        for kind in ("join", "leave"):
            rows = [r for r in st if r["kind"] == kind]
            broken = sum(r["broken"] + r["mixed"] for r in rows)
            lines.append(
                f"| streams broken or mixed on {kind} | {broken} | 0 | "
                f"{'yes' if broken == 0 else '**no**'} |"
            )
    return lines


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="throughput cycles (each N, each variant)")
    ap.add_argument("--runs", type=int, default=5, help="power-off runs per profile")
    ap.add_argument("--stream-runs", type=int, default=3, help="join + leave runs")
    ap.add_argument(
        "--seconds", type=float, default=8.0, help="throughput: seconds of slots per run"
    )
    ap.add_argument("--slot", type=float, default=0.5, help="throughput: vip/direct slot, s")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--stream-seconds", type=float, default=6.0)
    ap.add_argument("--probe-period", type=float, default=0.003, help="prober period, s")
    ap.add_argument("--profiles", default="fast,default", help="power-off profiles")
    ap.add_argument(
        "--phases", default="throughput,streams,poweroff", help="which measurements to run"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 reps/runs, 2 s loads")
    ap.add_argument("--root", default="/var/lib/hakit-lab-bench")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.runs, args.stream_runs = 2, 2, 1
        args.seconds, args.warmup, args.stream_seconds = 2.0, 0.3, 4.0
    return args


def main() -> int:
    if "--load" in sys.argv[1:]:
        return load_main(sys.argv[1:])
    args = parse_args()
    if os.geteuid() != 0:
        print("root is needed (network namespaces)", file=sys.stderr)
        return 2
    command = " ".join([".venv/bin/python", "bench/farm.py", *sys.argv[1:]])
    phases = args.phases.split(",")
    profiles = args.profiles.split(",")
    started = datetime.datetime.now()
    t_start = time.monotonic()
    res: dict[str, Any] = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "uptime_at_start": _uptime(),
        "settings": {k: v for k, v in vars(args).items() if k != "root"},
        "direct_routing": "each source to the boot address of the node that answers it via the VIP",
        "load": "closed loop, new connection per request, vip/direct alternating A B B A slots",
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
    }
    lab = Lab(args.root)
    bugs: list[str] = []
    try:
        # the fast-profile lab serves the throughput, the streams and the fast power-off runs
        order = sorted(profiles, key=lambda p: p != "fast") if "poweroff" in phases else ["fast"]
        for k, profile in enumerate(order):
            log(f"lab up: 3 nodes, {MODULE}, heartbeat {'/'.join(PROFILES[profile])}")
            lab_up(lab, profile)
            if k == 0 and "throughput" in phases:
                log(
                    f"throughput: {args.reps} cycles × N=3,2,1 (+ unflooded for N<3), "
                    f"vip/direct in {args.slot:g} s slots, {args.seconds:g} s after "
                    f"{args.warmup:g} s, concurrency {args.concurrency}"
                )
                res["throughput"] = phase_throughput(lab, args)
            if k == 0 and "streams" in phases:
                log(f"streams: {args.stream_runs} × (leave, join), 50 streams each")
                res["streams"] = phase_streams(lab, args)
            if "poweroff" in phases and profile in profiles:
                log(f"power-off: profile {profile}, {args.runs} runs")
                res.setdefault("poweroff", {})[profile] = phase_poweroff(lab, profile, args)
            bugs += agent_bugs(lab)
    finally:
        lab.down()
    res["agent_bugs"] = bugs
    res["uptime_at_end"] = _uptime()
    res["run_time_s"] = time.monotonic() - t_start
    suffix = "-quick" if args.quick else ""
    out = HERE / "results" / f"farm-{started:%Y-%m-%d}{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print()
    print(f"farm-demo, 3-node lab; median [min–max]; {started:%Y-%m-%d %H:%M}")
    for line in [*report(res), *targets(res)]:
        print(line)
    if bugs:
        print(f"\nthe agents reported {len(bugs)} bug line(s):")
        for line in bugs[:20]:
            print(f"  {line}")
    print(f"\nload: start {res['uptime_at_start']}\n      end   {res['uptime_at_end']}")
    print(f"run time: {res['run_time_s'] / 60:.1f} min")
    print(f"command: {command}")
    print(f"results: {out}")
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
