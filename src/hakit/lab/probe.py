"""Client prober: what a user of the service sees during a failover.

``python -m hakit.lab.probe --target 192.0.2.100:8080 --seconds 10 [--period 0.01] [--json]``

Every ``period`` seconds the prober starts one HTTP/1.0 ``GET /`` on a NEW TCP connection
(1 s timeout each, many in flight) and records its send time, its receive time (or None), the
node that answered (``X-Node`` header, else the body's first line) and the error if any.
:func:`analyze` turns those records into figures; it is pure and unit-tested.

Contracts:

* The prober only ever talks to its target, and refuses any target outside 192.0.2.0/24 and
  198.51.100.0/24 (:func:`check_target`). It is bounded in time (``seconds`` ≤ 3600) and rate
  (``period`` ≥ 1 ms).
* Times are ``time.monotonic()``. CLOCK_MONOTONIC is shared by every network namespace, so a
  caller in the root namespace can compare them with its own clock (e.g. a fault injection).
* Outage = send time of the first success after a gap - send time of the last success before
  it, so with a 10 ms period a 10 ms outage means no request was lost.

Caveats: on a loaded 2-core machine the sender can fall behind its schedule; it then skips the
missed slots instead of bursting, so a stall of the prober itself shows up as a gap with no
lost requests (``Gap.lost == 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import math
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hakit.errors import LabError
from hakit.lab.netns import in_test_networks

MAX_SECONDS = 3600.0
MIN_PERIOD = 0.001


@dataclass(frozen=True)
class Record:
    """One request: when it was sent and answered (monotonic seconds), by whom, or why not."""

    sent: float
    received: float | None = None  # None: no valid answer
    node: str | None = None  # node that answered, None on failure
    error: str | None = None  # e.g. "timeout", "ConnectionRefusedError", "HTTP 503"
    source: str | None = None  # client address the request was sent from (--sources)

    @property
    def ok(self) -> bool:
        return self.received is not None and self.node is not None

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Record:
        def opt_float(v: object) -> float | None:
            return None if v is None else float(str(v))

        return cls(
            sent=float(str(data["sent"])),
            received=opt_float(data.get("received")),
            node=None if data.get("node") is None else str(data["node"]),
            error=None if data.get("error") is None else str(data["error"]),
            source=None if data.get("source") is None else str(data["source"]),
        )


@dataclass(frozen=True)
class Gap:
    """Time between two consecutive successful requests (by send time)."""

    start: float  # send time of the last success before the gap
    end: float  # send time of the first success after it
    before: str | None  # node that answered at ``start``
    after: str | None  # node that answered at ``end``
    lost: int  # requests sent strictly between start and end (all failed)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Analysis:
    """What the client saw. Times are monotonic seconds, like the records'."""

    period: float  # seconds between two requests, as asked
    total: int
    ok: int
    failed: int
    per_node: dict[str, int]  # successes per answering node
    errors: dict[str, int]  # failures per error text
    first_sent: float | None
    last_sent: float | None
    outage: Gap | None  # the longest gap between two successes; None with < 2 successes
    gaps: list[Gap] = field(default_factory=list)  # every gap > 2 x period, in time order
    switches: list[str] = field(default_factory=list)  # answering nodes, repeats compressed
    interleaved: bool = False  # two nodes' answers overlap in time (both served at once)
    leading_failed: int = 0  # failures before the first success (service not up yet)
    trailing_failed: int = 0  # failures after the last success (service never came back)
    sources: int = 0  # distinct client addresses (--sources; 0: the default address only)
    # client addresses answered by more than one node (a farm with client-ip affinity: 0)
    split_sources: list[str] = field(default_factory=list)

    @property
    def switch_count(self) -> int:
        """Number of changes of answering node (``n1, n2`` is one switch)."""
        return max(0, len(self.switches) - 1)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["switch_count"] = self.switch_count
        data["outage_seconds"] = self.outage.seconds if self.outage else None
        return data


def analyze(records: Iterable[Record], period: float) -> Analysis:
    """Figures over ``records`` (any order; sorted by send time here). Pure."""
    rows = sorted(records, key=lambda r: r.sent)
    successes = [(i, r) for i, r in enumerate(rows) if r.ok]
    per_node: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in rows:
        if r.ok:
            assert r.node is not None
            per_node[r.node] = per_node.get(r.node, 0) + 1
        else:
            key = r.error or "no answer"
            errors[key] = errors.get(key, 0) + 1

    all_gaps = [
        Gap(a.sent, b.sent, a.node, b.node, lost=j - i - 1)
        for (i, a), (j, b) in itertools.pairwise(successes)
    ]
    outage = max(all_gaps, key=lambda g: g.seconds, default=None)

    switches: list[str] = []
    spans: dict[str, tuple[float, float]] = {}
    for _, r in successes:
        assert r.node is not None
        if not switches or switches[-1] != r.node:
            switches.append(r.node)
        first, _last = spans.get(r.node, (r.sent, r.sent))
        spans[r.node] = (first, r.sent)

    return Analysis(
        period=period,
        total=len(rows),
        ok=len(successes),
        failed=len(rows) - len(successes),
        per_node=per_node,
        errors=errors,
        first_sent=rows[0].sent if rows else None,
        last_sent=rows[-1].sent if rows else None,
        outage=outage,
        gaps=[g for g in all_gaps if g.seconds > 2 * period + 1e-9],  # float noise
        switches=switches,
        interleaved=_overlap(list(spans.values())),
        leading_failed=successes[0][0] if successes else len(rows),
        trailing_failed=len(rows) - 1 - successes[-1][0] if successes else 0,
        sources=len({r.source for r in rows if r.source is not None}),
        split_sources=_split_sources(r for _, r in successes),
    )


def _split_sources(successes: Iterable[Record]) -> list[str]:
    """Client addresses whose requests were answered by more than one node."""
    nodes: dict[str, set[str]] = {}
    for r in successes:
        if r.source is not None and r.node is not None:
            nodes.setdefault(r.source, set()).add(r.node)
    return sorted(src for src, seen in nodes.items() if len(seen) > 1)


def _overlap(spans: list[tuple[float, float]]) -> bool:
    """True if two [first, last] send-time spans intersect (answers interleaved in time)."""
    ordered = sorted(spans)
    return any(b[0] <= a[1] for a, b in itertools.pairwise(ordered))


def format_summary(a: Analysis) -> str:
    """A few readable lines; times relative to the first request."""
    t0 = a.first_sent or 0.0
    nodes = ", ".join(f"{n}={c}" for n, c in sorted(a.per_node.items())) or "none"
    lines = [
        f"requests {a.total}: ok {a.ok}, failed {a.failed} (answered by {nodes})",
    ]
    if a.outage is not None:
        o = a.outage
        lines.append(
            f"longest outage {o.seconds * 1000:.0f} ms at +{o.start - t0:.3f} s "
            f"({o.before} -> {o.after}, {o.lost} lost)"
        )
    for g in a.gaps:
        lines.append(
            f"  gap {g.seconds * 1000:.0f} ms at +{g.start - t0:.3f} s "
            f"({g.before} -> {g.after}, {g.lost} lost)"
        )
    if a.sources:
        total = sum(a.per_node.values()) or 1
        shares = ", ".join(f"{n} {c / total:.0%}" for n, c in sorted(a.per_node.items()))
        lines.append(f"{a.sources} client addresses; share per node: {shares}")
        if a.split_sources:
            lines.append(f"answered by several nodes: {', '.join(a.split_sources)}")
    elif a.switches:
        flag = " INTERLEAVED (two nodes answered at the same time)" if a.interleaved else ""
        lines.append(f"answering nodes: {' -> '.join(a.switches)}{flag}")
    if a.leading_failed:
        lines.append(f"{a.leading_failed} failures before the first success")
    if a.trailing_failed:
        lines.append(f"{a.trailing_failed} failures after the last success (not recovered)")
    for err, count in sorted(a.errors.items(), key=lambda kv: -kv[1]):
        lines.append(f"  error {err}: {count}")
    return "\n".join(lines)


# --- the prober (I/O) ---------------------------------------------------------------------


def check_target(target: str) -> tuple[str, int]:
    """Parse ``ADDRESS:PORT``; raise LabError unless ADDRESS is in the lab's test networks."""
    host, sep, port_text = target.rpartition(":")
    try:
        ip = ipaddress.IPv4Address(host)
        port = int(port_text)
    except ValueError:
        raise LabError(f"target {target!r} is not IPv4ADDRESS:PORT") from None
    if not sep or not 0 < port < 65536:
        raise LabError(f"target {target!r} is not IPv4ADDRESS:PORT")
    if not in_test_networks(str(ip)):
        raise LabError(
            f"refusing to probe {ip}: only 192.0.2.0/24 and 198.51.100.0/24 are lab networks"
        )
    return str(ip), port


async def _request(
    host: str, port: int, request_timeout: float, source: str | None = None
) -> Record:
    sent = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    local = None if source is None else (source, 0)
    try:
        async with asyncio.timeout(request_timeout):
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            writer.write(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            data = b""
            while len(data) < 65536 and (chunk := await reader.read(65536)):
                data += chunk
        received = time.monotonic()
    except TimeoutError:
        return Record(sent, error="timeout", source=source)
    except OSError as exc:
        return Record(sent, error=type(exc).__name__, source=source)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    node, error = _parse_answer(data)
    if node is None:
        return Record(sent, error=error, source=source)
    return Record(sent, received, node, source=source)


def _parse_answer(data: bytes) -> tuple[str | None, str]:
    """(node, "") from a 200 answer, or (None, reason)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        return None, "bad answer" if data else "empty answer"
    if parts[1] != "200":
        return None, f"HTTP {parts[1]}"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-node" and value.strip():
            return value.strip(), ""
    first = body.decode("utf-8", "replace").strip().splitlines()
    return (first[0], "") if first else (None, "no node in answer")


async def probe(
    host: str,
    port: int,
    seconds: float,
    period: float,
    request_timeout: float = 1.0,
    *,
    sources: Sequence[str] = (),
) -> list[Record]:
    """Send one request every ``period`` for ``seconds``; return every record, in send order.
    With ``sources``, request k is sent from ``sources[k % len(sources)]``.

    Waits for the requests still in flight (at most ``request_timeout`` after the last send).
    """
    check_target(f"{host}:{port}")
    if not 0 < seconds <= MAX_SECONDS or period < MIN_PERIOD:
        raise LabError(f"seconds must be in (0, {MAX_SECONDS}] and period ≥ {MIN_PERIOD}")
    tasks: list[asyncio.Task[Record]] = []
    start = time.monotonic()
    slots = math.ceil(seconds / period)
    slot = 0
    while slot < slots:
        delay = start + slot * period - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        source = sources[len(tasks) % len(sources)] if sources else None
        tasks.append(asyncio.create_task(_request(host, port, request_timeout, source)))
        # behind schedule (noisy machine): skip the missed slots instead of bursting
        slot = max(slot + 1, math.floor((time.monotonic() - start) / period))
    return list(await asyncio.gather(*tasks))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hakit.lab.probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--target", required=True, help="ADDRESS:PORT in 192.0.2.0/24 etc.")
    parser.add_argument("--seconds", type=float, required=True, help="how long to probe")
    parser.add_argument("--period", type=float, default=0.01, help="seconds between requests")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON")
    parser.add_argument("--records", type=Path, help="also write every record (JSON lines)")
    parser.add_argument(
        "--sources", default="", help="comma-separated client addresses to send from, in turn"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(ValueError, OSError):  # many requests in flight at small periods
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        host, port = check_target(args.target)
        sources = [a for a in args.sources.split(",") if a]
        for src in sources:
            check_target(f"{src}:1")
        records = asyncio.run(
            probe(host, port, args.seconds, args.period, args.timeout, sources=sources)
        )
    except LabError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    if args.records is not None:
        with args.records.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(asdict(r)) + "\n" for r in records)
    analysis = analyze(records, args.period)
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=2))
    else:
        print(format_summary(analysis))
    return 0


if __name__ == "__main__":
    sys.exit(main())
