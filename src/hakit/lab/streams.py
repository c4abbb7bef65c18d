"""Long-lived connections through the VIP: do they survive a change of the farm?

``python -m hakit.lab.streams --target 192.0.2.100:8080 --count 50 --seconds 10
[--sources 192.0.2.200,...]``

Opens ``count`` TCP connections at once (from the ``sources`` in turn), each a
``GET /stream?seconds=S`` of the demo application, which sends its node name every 100 ms and
then ``end``. A stream is *intact* when it got ``end`` and every line came from one node; it
is *broken* when it ended early (reset, EOF, timeout) and *mixed* if two nodes' lines arrived
on it (that would be two nodes answering one connection). Prints a JSON summary.

The client only talks to its target, inside the lab's test networks (as the prober does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from hakit.errors import LabError
from hakit.lab.probe import check_target


@dataclass
class Stream:
    source: str | None
    nodes: set[str] = field(default_factory=set)
    lines: int = 0
    ended: bool = False
    error: str | None = None


@dataclass
class Summary:
    count: int
    intact: int
    broken: int
    mixed: int
    per_node: dict[str, int]
    errors: dict[str, int]


async def _one(host: str, port: int, seconds: float, source: str | None) -> Stream:
    s = Stream(source)
    try:
        async with asyncio.timeout(seconds + 10):
            local = None if source is None else (source, 0)
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            writer.write(f"GET /stream?seconds={seconds:g} HTTP/1.0\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.0 200"):
                s.error = head.split(b"\r\n", 1)[0].decode("latin-1")
            while s.error is None and (line := await reader.readline()):
                text = line.decode("utf-8", "replace").strip()
                if text == "end":
                    s.ended = True
                    break
                s.nodes.add(text)
                s.lines += 1
            writer.close()
    except TimeoutError:
        s.error = "timeout"
    except (OSError, asyncio.IncompleteReadError) as exc:
        s.error = type(exc).__name__
    return s


async def run(
    host: str, port: int, count: int, seconds: float, sources: Sequence[str] = ()
) -> list[Stream]:
    check_target(f"{host}:{port}")
    tasks = [
        _one(host, port, seconds, sources[k % len(sources)] if sources else None)
        for k in range(count)
    ]
    return list(await asyncio.gather(*tasks))


def summarize(streams: Sequence[Stream]) -> Summary:
    per_node: dict[str, int] = {}
    errors: dict[str, int] = {}
    for s in streams:
        for n in s.nodes:
            per_node[n] = per_node.get(n, 0) + 1
        if not s.ended:
            key = s.error or "ended early"
            errors[key] = errors.get(key, 0) + 1
    return Summary(
        count=len(streams),
        intact=sum(1 for s in streams if s.ended and len(s.nodes) == 1),
        broken=sum(1 for s in streams if not s.ended),
        mixed=sum(1 for s in streams if len(s.nodes) > 1),
        per_node=per_node,
        errors=errors,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hakit.lab.streams", description=__doc__)
    ap.add_argument("--target", required=True, help="ADDRESS:PORT in the lab's networks")
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sources", default="", help="comma-separated client addresses")
    args = ap.parse_args(argv)
    try:
        host, port = check_target(args.target)
        sources = [a for a in args.sources.split(",") if a]
        for src in sources:
            check_target(f"{src}:1")
        if not 0 < args.count <= 1000 or not 0 < args.seconds <= 600:
            raise LabError("count must be 1..1000 and seconds 0..600")
        streams = asyncio.run(run(host, port, args.count, args.seconds, sources))
    except LabError as exc:
        print(f"streams: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(summarize(streams))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
