"""The fault-injection suite: random faults against a 2-node mirror with a witness, while a
client writes uniquely numbered records through the VIP; then a checker (``hakit lab chaos``,
``tests/faults/``, ``bench/chaos.py``).

**Workload.** The client host runs :data:`WORKLOAD`: ``writers`` threads, each sending records
``rec-N`` (N unique) in turn to ``POST /append`` (a line appended and fsynced) and ``POST
/sqlite`` (one committed SQLite transaction) of the demo application, through the VIP. It
prints one JSON line per request: id, kind, acknowledged or not, the answering node and its
``X-Acked-At`` time.

**Faults** (:data:`KINDS`), drawn from a seeded :class:`random.Random` (same seed, same
schedule), each on the primary or the secondary: ``poweroff`` (then poweron), ``cut`` (a node
unplugged from everything, then healed), ``partition`` (the nodes cut from each other, both
still reach the witness and the client), ``pause`` (the agent SIGSTOPped, then resumed),
``replkill`` (the replication process SIGKILLed; the agent restarts it), ``diskfull`` (the
node's data file system filled, then freed), ``clockjump`` (the node's wall clock stepped by
one of :data:`JUMPS`, then back) and ``swap`` (during load). Each is held for a random
1–3 s, undone, and the pair must be PRIM + SECOND again within ``recover`` seconds.

**Checker** (:func:`analyze`), once everything healed and the writer stopped:

- *lost*: acknowledged records missing on the final primary (append file or database) — 0;
- *unexpected*: records there that the client never sent, or twice — 0;
- *dual primary*: from the client (its own clock), acknowledgements by one node, then the
  other, then the first again within :data:`FLIP_WINDOW` seconds; from the agent logs (their
  time stamps corrected for the clock jumps), overlapping periods in
  which both nodes were PRIM or ALONE (a paused agent's period ends when it was paused: it
  cannot act, its replicator holds every change, and its first act once resumed is to fence) —
  0;
- *copies identical*: ``hakit verify`` (block checksums) finds no difference — true;
- *outage* per fault: the longest time without an acknowledgement from the fault until the
  pair is back.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hakit.errors import LabError
from hakit.lab import agents, faults, netns
from hakit.lab.lab import Lab

KINDS = ("poweroff", "cut", "partition", "pause", "replkill", "diskfull", "clockjump", "swap")
JUMPS = (3600.0, -7200.0, 86400.0, -600.0)  # wall-clock steps of clockjump, in turn
MODULE = "mirror-demo"
VIP = "192.0.2.100"
APP_PORT = 8080
FLIP_WINDOW = 1.0  # s: back to the first node this fast after a switch = both were serving

WORKLOAD = r"""
import json, sys, threading, time, urllib.request as u
vip, port, writers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lock, stop = threading.Lock(), threading.Event()
def writer(w):
    i = 0
    while not stop.is_set():
        rid, kind = w + i * writers, ("append", "sqlite")[i % 2]
        t0, ok, node, acked = time.time(), False, "", 0.0
        try:
            req = u.Request(f"http://{vip}:{port}/{kind}", data=b"rec-%d\n" % rid)
            with u.urlopen(req, timeout=2) as r:
                ok, node = r.status == 200, r.read().decode().strip()
                acked = float(r.headers.get("X-Acked-At") or 0)
        except Exception as exc:
            node = type(exc).__name__
        out = {"id": rid, "kind": kind, "ok": ok, "node": node, "t0": t0,
               "t1": time.time(), "acked_at": acked}
        with lock:
            print(json.dumps(out), flush=True)
        i += 1
        if not ok:
            time.sleep(0.05)
threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
for t in threads: t.start()
sys.stdin.read()
stop.set()
for t in threads: t.join()
"""


@dataclass
class Fault:
    index: int
    kind: str
    role: str  # "primary" or "secondary" when it happened
    node: str
    start: float  # wall clock (time.time())
    undone: float = 0.0
    recovered: float = 0.0  # the pair was PRIM + SECOND again (0: it was not)
    outage: float = 0.0  # longest time without an acknowledgement, from start to recovered
    note: str = ""


@dataclass
class Report:
    seed: int
    faults: list[Fault]
    sent: int = 0
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dual_client: list[str] = field(default_factory=list)
    dual_logs: list[str] = field(default_factory=list)
    differences: int = -1  # hakit verify on the final pair (-1: could not run)
    not_recovered: int = 0
    duration: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)  # every request, for diagnosis

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.unexpected
            or self.dual_client
            or self.dual_logs
            or self.differences != 0
            or self.not_recovered
        )

    def by_kind(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            outages = [f.outage for f in self.faults if f.kind == kind]
            if outages:
                out[kind] = {
                    "count": len(outages),
                    "outage_median": statistics.median(outages),
                    "outage_min": min(outages),
                    "outage_max": max(outages),
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["requests"]  # large: written apart when asked (bench/chaos.py on a failure)
        d["ok"] = self.ok
        d["by_kind"] = self.by_kind()
        return d


def schedule(seed: int, count: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, float]]:
    """The faults of a run: (kind, "primary"|"secondary", hold seconds). Pure, seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        role = "primary" if kind == "swap" else rng.choice(("primary", "secondary"))
        out.append((kind, role, round(rng.uniform(1.0, 3.0), 2)))
    rng.shuffle(out)
    return out


class Workload:
    """The client's writers (see the module docstring); :meth:`stop` returns every request."""

    def __init__(self, lab: Lab, writers: int = 2) -> None:
        argv = netns.in_namespace(
            netns.CLIENT_NS,
            [lab.python, "-c", WORKLOAD, VIP, str(APP_PORT), str(writers)],
        )
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.requests: list[dict[str, Any]] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.requests.append(json.loads(line))

    def acked_times(self) -> list[float]:
        return sorted(r["t1"] for r in list(self.requests) if r["ok"])

    def stop(self) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._t.join(timeout=10)
        return self.requests


def replicator_pid(lab: Lab, node: str) -> int | None:
    """PID of the node's replication process (in its namespace, by command line)."""
    ns = lab.state().nodes[node].namespace
    for pid in netns.namespace_pids(ns):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"hakit.repl.process" in cmdline:
            return pid
    return None


def inject(lab: Lab, kind: str, node: str, peer: str, jump: float = 0.0) -> Callable[[], None]:
    """Apply one fault to ``node``; return what undoes it (``jump``: seconds of a
    clockjump)."""
    if kind == "poweroff":
        lab.poweroff(node)
        return lambda: (lab.poweron(node), None)[1]
    if kind == "cut":
        lab.cut(node)
        return lab.heal
    if kind == "partition":
        faults.partition(lab, node, peer)
        return lab.heal
    if kind == "pause":
        faults.pause(lab, node)
        return lambda: (faults.resume(lab, node), None)[1]
    if kind == "replkill":
        pid = replicator_pid(lab, node)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        return lambda: None
    if kind == "diskfull":
        faults.diskfull(lab, node)
        return lambda: (faults.diskfree(lab, node), None)[1]
    if kind == "clockjump":
        faults.clockjump(lab, node, jump)
        return lambda: (faults.clockjump(lab, node, -jump), None)[1]
    if kind == "swap":
        agents.client(lab, node).command(MODULE, "swap")
        return lambda: None
    raise ValueError(f"unknown fault {kind!r} (known: {', '.join(KINDS)})")


def run_chaos(  # noqa: PLR0917
    lab: Lab,
    seed: int,
    count: int,
    kinds: tuple[str, ...] = KINDS,
    recover: float = 60.0,
    progress: Callable[[str], None] = lambda _: None,
) -> Report:
    """Run ``count`` faults on the lab (2 nodes, witness, data on tmpfs, modules PRIM +
    SECOND) with the workload going, then heal everything and check (module docstring)."""
    started = time.time()
    report = Report(seed, [])
    marks = {n: _log_size(lab, n) for n in lab.state().nodes}
    paused: list[tuple[str, float, float]] = []  # (node, paused at, resumed at)
    powered_off: list[tuple[str, float]] = []
    shifts: list[tuple[str, float, float, float]] = []  # (node, from, to, seconds)
    work = Workload(lab)
    time.sleep(1.0)
    for i, (kind, role, hold) in enumerate(schedule(seed, count, kinds)):
        pair = _pair(lab, recover)
        if pair is None:  # counted with the fault before: put right, try again
            _put_right(lab)
            pair = _pair(lab, recover)
            if pair is None:
                report.not_recovered += 1
                progress("the pair does not come back: run stopped")
                break
        prim, second = pair
        node, peer = (prim, second) if role == "primary" else (second, prim)
        f = Fault(i + 1, kind, role, node, time.time())
        jump = JUMPS[sum(1 for x in report.faults if x.kind == "clockjump") % len(JUMPS)]
        undo = inject(lab, kind, node, peer, jump)
        time.sleep(hold)
        f.undone = time.time()
        undo()
        if kind == "pause":
            paused.append((node, f.start, f.undone))
        if kind == "poweroff":
            powered_off.append((node, f.start))
        if kind == "clockjump":
            shifts.append((node, f.start, f.undone, jump))
            f.note = f"wall clock {jump:+g} s"
        if _pair(lab, recover) is not None:
            f.recovered = time.time()
        else:
            f.note = f"not recovered in {recover:g} s: {agents.module_states(lab, MODULE)}"
            report.not_recovered += 1
        time.sleep(0.3)
        f.outage = _outage(work.acked_times(), f.start, f.recovered or time.time())
        report.faults.append(f)
        progress(
            f"fault {f.index}/{count}: {kind} {role} {node} held {hold:g} s, outage "
            f"{f.outage:.2f} s{'; ' + f.note if f.note else ''}"
        )
    time.sleep(1.0)
    requests = report.requests = work.stop()
    final = _pair(lab, recover)
    if final is None:
        _put_right(lab)
        final = _pair(lab, recover)
    if final is None:
        report.not_recovered += 1
        report.sent = len(requests)
    else:
        time.sleep(0.5)
        _check(lab, final[0], requests, report)
    logs = {n: _log_since(lab, n, marks[n]) for n in lab.state().nodes}
    report.dual_logs = dual_from_logs(logs, paused, powered_off, shifts)
    report.duration = time.time() - started
    return report


def _pair(lab: Lab, timeout: float) -> tuple[str, str] | None:
    try:
        return agents.wait_pair(lab, MODULE, timeout=timeout)
    except LabError:
        return None


def _check(lab: Lab, prim: str, requests: list[dict[str, Any]], report: Report) -> None:
    data = lab.data_dir(prim, MODULE) / "replicated"
    appended = (data / "records.log").read_text().split() if (data / "records.log").exists() else []
    rows = _rows(data / "records.db")
    report.sent = len(requests)
    report.acknowledged = sum(1 for r in requests if r["ok"])
    lost, unexpected, dual = analyze(requests, appended, rows)
    report.lost, report.unexpected, report.dual_client = lost, unexpected, dual
    try:
        answer = agents.client(lab, prim, timeout=600).compare(MODULE, checksums=True)
        report.differences = int(answer.get("report", answer).get("differences", -1))
    except Exception as exc:
        report.differences = -1
        report.unexpected.append(f"verify failed: {exc}")


def analyze(
    requests: list[dict[str, Any]], appended: list[str], rows: list[str]
) -> tuple[list[str], list[str], list[str]]:
    """(lost, unexpected, dual primary seen by the client). Pure."""
    sent = {("append" if r["kind"] == "append" else "sqlite", f"rec-{r['id']}") for r in requests}
    acked = [r for r in requests if r["ok"]]
    present = {"append": appended, "sqlite": rows}
    found = {kind: set(recs) for kind, recs in present.items()}
    lost = [
        f"{r['kind']} rec-{r['id']} (acknowledged by {r['node']})"
        for r in acked
        if f"rec-{r['id']}" not in found[r["kind"]]
    ]
    unexpected = []
    for kind, recs in present.items():
        seen: set[str] = set()
        for rec in recs:
            if (kind, rec) not in sent:
                unexpected.append(f"{kind} {rec}: never sent")
            elif rec in seen:
                unexpected.append(f"{kind} {rec}: twice")
            seen.add(rec)
    return lost, unexpected, flips(acked)


def flips(acked: list[dict[str, Any]]) -> list[str]:
    """Acknowledgements by A, then B, then A again within FLIP_WINDOW seconds. Pure."""
    order = sorted((r["t1"], r["node"]) for r in acked)  # the client's clock never jumps
    out = []
    runs: list[tuple[str, float, float]] = []  # (node, first ack, last ack)
    for t, node in order:
        if runs and runs[-1][0] == node:
            runs[-1] = (node, runs[-1][1], t)
        else:
            runs.append((node, t, t))
    for first, middle, last in zip(runs, runs[1:], runs[2:], strict=False):
        (a, _, a_last), (b, b_first, _), (c, c_first, _) = first, middle, last
        if a == c and a != b and c_first - a_last < FLIP_WINDOW:
            out.append(f"{a} acked at {a_last:.3f}, {b} at {b_first:.3f}, again at {c_first:.3f}")
    return out


def dual_from_logs(
    logs: dict[str, list[str]],
    paused: list[tuple[str, float, float]],
    powered_off: list[tuple[str, float]],
    shifts: Sequence[tuple[str, float, float, float]] = (),
) -> list[str]:
    """Overlapping PRIM/ALONE periods of the two nodes in their agent logs. A line stamped
    while its node's wall clock was stepped by S seconds (``shifts``: node, from, to, S) is
    put back at its real time. Pure."""
    periods: dict[str, list[tuple[float, float]]] = {}
    for node, lines in logs.items():
        cuts = sorted(
            [t for n, t in powered_off if n == node] + [t for n, t, _ in paused if n == node]
        )
        spans, begin, prev = [], None, float("-inf")
        windows = [(t0 + s - 0.5, t1 + s + 0.5, s) for n, t0, t1, s in shifts if n == node]
        for line in lines:
            stamp = _stamp(line)
            if stamp is None:
                continue
            # its real time: the stamp, or the stamp less a jump whose window holds it. A log
            # is written in order: the earliest candidate not before the line before (jumps
            # are minutes to days, far more than the time between two lines)
            candidates = [stamp] + [stamp - s for lo, hi, s in windows if lo <= stamp <= hi]
            t = min((c for c in candidates if c >= prev - 0.5), default=stamp)
            prev = t
            if " -> " not in line:
                continue
            while cuts and cuts[0] < t:  # powered off or paused: an open period ends there
                cut = cuts.pop(0)
                if begin is not None and cut >= begin:
                    spans.append((begin, cut))
                    begin = None
            target = line.split(" -> ", 1)[1].split(" ", 1)[0]
            if target in ("PRIM", "ALONE") and begin is None:
                begin = t
            elif target not in ("PRIM", "ALONE") and begin is not None:
                spans.append((begin, t))
                begin = None
        if begin is not None:
            spans.append((begin, cuts[0] if cuts else float("inf")))
        periods[node] = spans
    nodes = sorted(periods)
    out = []
    for a0, a1 in periods.get(nodes[0], []) if nodes else []:
        for b0, b1 in periods.get(nodes[-1], []):
            if max(a0, b0) < min(a1, b1):
                out.append(f"{nodes[0]} {a0:.3f}-{a1:.3f} and {nodes[-1]} {b0:.3f}-{b1:.3f}")
    return out


def _outage(acked: list[float], start: float, end: float) -> float:
    times = [start, *[t for t in acked if start < t < end], end]
    return max(b - a for a, b in itertools.pairwise(times))


def _rows(db: Path) -> list[str]:
    """The rows of records.db (copied first, with its journal: reading never changes it)."""
    if not db.exists():
        return []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "records.db"
        copy.write_bytes(db.read_bytes())
        journal = db.with_name("records.db-journal")
        if journal.exists():
            copy.with_name("records.db-journal").write_bytes(journal.read_bytes())
        con = sqlite3.connect(copy)
        try:
            return [r[0] for r in con.execute("SELECT rec FROM records")]
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()


def _put_right(lab: Lab) -> None:
    for node in faults.paused_nodes(lab):
        faults.resume(lab, node)
    lab.heal()
    for node in lab.state().nodes:
        lab.poweron(node)
        faults.diskfree(lab, node)


def _log_size(lab: Lab, node: str) -> int:
    path = lab.root / node / "agent.log"
    return path.stat().st_size if path.exists() else 0


def _log_since(lab: Lab, node: str, mark: int) -> list[str]:
    with (lab.root / node / "agent.log").open("rb") as f:
        f.seek(mark)
        return f.read().decode("utf-8", "replace").splitlines()


def _stamp(line: str) -> float | None:
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def print_report(report: Report, out: Any = sys.stdout) -> None:
    """The readable table (the JSON is :meth:`Report.to_dict`)."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console(file=out, highlight=False)
    table = Table(title=f"chaos run, seed {report.seed}: {len(report.faults)} faults")
    for col in ("kind", "faults", "outage median \\[min–max] s"):
        table.add_column(col)
    for kind, k in report.by_kind().items():
        table.add_row(
            kind,
            str(k["count"]),
            f"{k['outage_median']:.2f} [{k['outage_min']:.2f}–{k['outage_max']:.2f}]",
        )
    console.print(table)
    verdict = "[green]PASS[/green]" if report.ok else "[red]FAIL[/red]"
    console.print(
        f"{verdict}: {report.sent} records sent, {report.acknowledged} acknowledged; "
        f"lost {len(report.lost)}, unexpected {len(report.unexpected)}, dual primary "
        f"{len(report.dual_client)} (client) + {len(report.dual_logs)} (agent logs), "
        f"copies differ in {report.differences} paths, not recovered {report.not_recovered}; "
        f"{report.duration:.0f} s"
    )
    for what, items in (
        ("lost", report.lost),
        ("unexpected", report.unexpected),
        ("dual primary (client)", report.dual_client),
        ("dual primary (logs)", report.dual_logs),
    ):
        for item in items[:10]:
            console.print(f"  {what}: {item}", markup=False)
