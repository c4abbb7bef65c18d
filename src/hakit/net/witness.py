"""The witness service: module leases over authenticated UDP.

Building block of arbitration (issue 5): the agents do not ask a witness yet. Run with
``python -m hakit.net.witness -c CLUSTER_FILE --listen ADDRESS:PORT`` on a third host that
both nodes reach; it keeps the leases of :class:`hakit.core.lease.LeaseTable`.

Messages are :mod:`hakit.net.wire` envelopes signed with the cluster key. A request comes from
a node of the cluster, from one of that node's configured addresses, and is newer than the
last one accepted from it (:class:`~hakit.net.wire.ReplayGuard`); anything else is dropped
without an answer. Request payload: ``{"op": "acquire"|"release", "module", "term" (the term
the node believes it holds, 0: none), "req" (the node's request number)}``. Answer payload:
``{"req", "granted", "holder", "term", "remaining", "reason"}`` from sender ``"witness"``.

Ordering: when an answer carries a term higher than any issued before, the new high-water mark
is written to the state file (atomically, fsynced) BEFORE the answer is sent, so that a
restarted witness never issues a term twice. The state file also holds the witness's
incarnation (bumped at every start), so that nodes can tell its answers apart across restarts.

Caveats: one witness is one vote; several witnesses need a majority
(:func:`hakit.core.lease.majority`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hakit.core.lease import Answer, LeaseTable
from hakit.model import NodeId
from hakit.net.wire import Envelope, ReplayGuard, WireError, decode, encode
from hakit.system.durable import write_atomic

log = logging.getLogger(__name__)

WITNESS = "witness"  # the sender name of the witness's answers


class WitnessServer(asyncio.DatagramProtocol):
    """The leases of one witness, served on one UDP socket."""

    def __init__(
        self,
        key: bytes,
        cluster: str,
        nodes: Mapping[str, set[str]],  # node -> the addresses it may ask from
        state_file: Path,
        *,
        duration: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key, self.cluster, self.nodes = key, cluster, nodes
        self.state_file = state_file
        self.clock = clock
        state = _load(state_file)
        self.incarnation = int(state.get("incarnation", 0)) + 1
        self.table = LeaseTable(duration, clock(), int(state.get("high_term", 0)))
        self._save()
        self.guard = ReplayGuard()
        self.seq = 0
        self.dropped = 0
        self.transport: asyncio.DatagramTransport | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self.transport = transport
        addr: tuple[str, int] = transport.get_extra_info("sockname")[:2]
        log.info("witness listening on %s:%d (incarnation %d)", *addr, self.incarnation)
        return addr

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _save(self) -> None:
        state = {"incarnation": self.incarnation, "high_term": self.table.high_term}
        write_atomic(self.state_file, json.dumps(state) + "\n")

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            env = decode(self.key, data, cluster=self.cluster)
        except WireError:
            self.dropped += 1
            return
        if addr[0] not in self.nodes.get(env.sender, set()) or self.guard.check(env) != "new":
            self.dropped += 1
            return
        request = env.payload
        op, module = request.get("op"), request.get("module")
        term, req = request.get("term", 0), request.get("req")
        if op not in ("acquire", "release") or not isinstance(module, str) or not module:
            self.dropped += 1
            return
        if not (isinstance(term, int) and isinstance(req, int)) or isinstance(term, bool):
            self.dropped += 1
            return
        node, now, before = NodeId(env.sender), self.clock(), self.table.high_term
        if op == "acquire":
            answer = self.table.acquire(now, module, node, term)
        else:
            released = self.table.release(now, module, node)
            holder = self.table.holder(now, module)
            answer = Answer(False, holder, 0, 0.0, "released" if released else "not held")
        if self.table.high_term != before:
            self._save()  # persist the new term BEFORE anyone can learn it
        log.info("%s %s %s from %s: %s", module, op, term, node, answer.reason)
        self.seq += 1
        reply = {
            "req": req,
            "granted": answer.granted,
            "holder": answer.holder,
            "term": answer.term,
            "remaining": answer.remaining,
            "reason": answer.reason,
        }
        out = encode(self.key, Envelope(self.cluster, WITNESS, self.incarnation, self.seq, reply))
        if self.transport is not None:
            self.transport.sendto(out, addr)


async def ask(
    key: bytes,
    cluster: str,
    sender: str,
    witness: tuple[str, int],
    request: dict[str, Any],
    *,
    incarnation: int,
    seq: int,
    local: tuple[str, int] | None = None,
    timeout: float = 1.0,
) -> tuple[float, Answer] | None:
    """Send one request (``op``, ``module``, ``term``, ``req``) and wait for its answer;
    ``(send time on the monotonic clock, answer)``, or None without a valid answer in time."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[Answer] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            with contextlib.suppress(WireError):
                env = decode(key, data, cluster=cluster)
                p = env.payload
                if env.sender == WITNESS and p.get("req") == request["req"] and not got.done():
                    holder = p.get("holder")
                    got.set_result(
                        Answer(
                            bool(p.get("granted")),
                            NodeId(holder) if isinstance(holder, str) else None,
                            int(p.get("term", 0)),
                            float(p.get("remaining", 0.0)),
                            str(p.get("reason", "")),
                        )
                    )

    transport, _ = await loop.create_datagram_endpoint(
        _Client, local_addr=local, remote_addr=witness
    )
    try:
        sent_at = time.monotonic()
        transport.sendto(encode(key, Envelope(cluster, sender, incarnation, seq, request)))
        try:
            return sent_at, await asyncio.wait_for(got, timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise SystemExit(f"{path}: unreadable witness state ({exc}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    from hakit import config as cfg  # noqa: PLC0415 — only for the command line

    ap = argparse.ArgumentParser(prog="python -m hakit.net.witness", description=__doc__)
    ap.add_argument("-c", "--config", required=True, type=Path, help="the cluster file")
    ap.add_argument("--listen", required=True, help="ADDRESS:PORT to listen on")
    ap.add_argument("--duration", type=float, default=3.0, help="lease duration, seconds")
    ap.add_argument("--state", type=Path, default=None, help="state file (default: state_dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s witness %(message)s")
    conf = cfg.load(args.config)
    host, _, port = args.listen.rpartition(":")
    nodes = {n: set(c.addresses.values()) for n, c in conf.cluster.nodes.items()}
    state = args.state or conf.cluster.state_dir / "witness.json"
    server = WitnessServer(conf.key(), conf.cluster.name, nodes, state, duration=args.duration)

    async def serve() -> None:
        await server.start(host, int(port))
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
