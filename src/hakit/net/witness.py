"""The witness service: module leases over authenticated UDP.

Run with ``python -m hakit.net.witness -c CLUSTER_FILE --listen ADDRESS:PORT`` on a third
host that both nodes reach (``hakit witness`` is the same); it keeps the leases and ran-alone
records of :class:`hakit.core.lease.LeaseTable`. Agents ask it through :class:`WitnessClient`.

Messages are :mod:`hakit.net.wire` envelopes, signed with keys derived from the cluster key
for this purpose only (one for requests, one for answers: a heartbeat, a request and an answer
can never pass for one another). A request comes from a node of the cluster, from one of that
node's configured addresses, is well formed, and is newer than the last one accepted from it
(:class:`~hakit.net.wire.ReplayGuard`, one sequence per node and module); anything else is
dropped without an answer. Request payload: ``{"op": "acquire"|"release", "module", "term"
(the term the node believes it holds, 0: none), "alone" (the generation it runs alone with,
0: none), "synced" (the generation its in-sync secondary has, 0: none), "nonce" (32 random
hex digits)}``. The answer
echoes the request's fields with ``granted``, ``holder``, ``term_now``, ``remaining``,
``reason`` and ``records`` (the module's ran-alone records, ``[[node, generation], …]``), so the
client takes no answer for another (or an older) request.

Ordering: the lease state (term high-water mark, last holder and term per module) is written
to the state file (atomically, fsynced) BEFORE an answer that reveals a change is sent, so a
restarted witness never issues a term twice and renews only the last holder. A witness that
cannot write it stops answering (fail-stop). It refuses to start without its state file unless
told it is new (``--new``): a lost file would let it issue old terms again. The file also holds
the incarnation (bumped at every start).

Caveats: one witness is one vote; several witnesses need a majority
(:func:`hakit.core.lease.majority`). The replay guard lives in memory: after a restart, one
replayed old request of the recorded holder could renew its lease for one duration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hakit.core.lease import Answer, LeaseTable
from hakit.model import NodeId
from hakit.net.wire import Envelope, ReplayGuard, WireError, decode, encode
from hakit.system import clock as boottime
from hakit.system.durable import write_atomic

log = logging.getLogger(__name__)

WITNESS = "witness"  # the sender name of the witness's answers
NONCE_HEX = 32  # hex digits of a request's nonce (16 random bytes)


def keys(cluster_key: bytes) -> tuple[bytes, bytes]:
    """(request key, answer key), derived from the cluster key for the witness only."""
    return (
        hmac.new(cluster_key, b"hakit witness request", hashlib.sha256).digest(),
        hmac.new(cluster_key, b"hakit witness answer", hashlib.sha256).digest(),
    )


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
        new: bool = False,
        clock: Callable[[], float] = boottime.now,
    ) -> None:
        self.request_key, self.answer_key = keys(key)
        self.cluster, self.nodes = cluster, nodes
        self.state_file = state_file
        self.clock = clock
        state = _load(state_file, new)
        self.incarnation = int(state.get("incarnation", 0)) + 1
        # who issues these terms: made once, kept in the state (a witness started --new
        # again is another issuer: its terms are not compared with the old one's)
        self.id = str(state.get("id") or os.urandom(8).hex())
        last = {
            str(m): (NodeId(v[0]), int(v[1])) if v else None
            for m, v in dict(state.get("last", {})).items()
        }
        alone = {
            str(m): {NodeId(str(n)): int(g) for n, g in dict(r).items()}
            for m, r in dict(state.get("alone", {})).items()
        }
        self.table = LeaseTable(duration, clock(), int(state.get("high_term", 0)), last, alone)
        self.broken = False  # the state could not be written: answer nothing any more
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
        state = {"id": self.id, "incarnation": self.incarnation, **self.table.state()}
        write_atomic(self.state_file, json.dumps(state) + "\n")

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.broken:
            return
        try:
            env = decode(self.request_key, data, cluster=self.cluster)
        except WireError:
            self.dropped += 1
            return
        request = env.payload
        op, module = request.get("op"), request.get("module")
        term, nonce = request.get("term", 0), request.get("nonce")
        alone, synced = request.get("alone", 0), request.get("synced", False)
        well_formed = (
            op in ("acquire", "release")
            and isinstance(module, str)
            and bool(module)
            and _count(term)
            and _count(alone)
            and _count(synced)
            and isinstance(nonce, str)
            and len(nonce) == NONCE_HEX
        )
        if not well_formed or addr[0] not in self.nodes.get(env.sender, set()):
            self.dropped += 1
            return
        # one sequence per node and module: a node's modules ask independently
        per_module = dataclasses.replace(env, sender=f"{env.sender}/{module}")
        if self.guard.check(per_module) != "new":  # only well-formed requests advance it
            self.dropped += 1
            return
        assert isinstance(module, str) and isinstance(term, int) and isinstance(alone, int)
        assert isinstance(synced, int)
        node, now, before = NodeId(env.sender), self.clock(), self.table.state()
        if op == "acquire":
            answer = self.table.acquire(now, module, node, term, alone, synced)
        else:
            released = self.table.release(now, module, node)
            holder = self.table.holder(now, module)
            why = "released" if released else "not held"
            answer = Answer(False, holder, 0, 0.0, why, self.table.records(module))
        if self.table.state() != before:
            try:
                self._save()  # persist the change BEFORE anyone can learn it
            except OSError as exc:
                self.broken = True
                log.critical("witness state not written (%s): answering nothing any more", exc)
                return
            log.info("%s %s from %s: %s", module, op, node, answer.reason)
        else:
            log.debug("%s %s from %s: %s", module, op, node, answer.reason)
        self.seq += 1
        reply = {
            **{k: request[k] for k in _ECHOED if k in request},
            "granted": answer.granted,
            "holder": answer.holder,
            "term_now": answer.term,
            "remaining": answer.remaining,
            "reason": answer.reason,
            "records": [list(r) for r in answer.alone],
            "witness": self.id,
        }
        env_out = Envelope(self.cluster, WITNESS, self.incarnation, self.seq, reply)
        out = encode(self.answer_key, env_out)
        if self.transport is not None:
            self.transport.sendto(out, addr)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_ECHOED = ("op", "module", "term", "alone", "synced", "nonce")


async def ask(
    key: bytes,
    cluster: str,
    sender: str,
    witness: tuple[str, int],
    *,
    op: str,
    module: str,
    term: int,
    incarnation: int,
    seq: int,
    alone: int = 0,
    synced: int = 0,
    local: tuple[str, int] | None = None,
    timeout: float = 1.0,
    clock: Callable[[], float] = boottime.now,
) -> tuple[float, Answer] | None:
    """Send one request and wait for its answer: ``(send time on ``clock``, answer)``, or None
    without a valid answer to THIS request in time. ``seq`` grows with every request of this
    ``incarnation`` of the node (persisted, bumped at each start) for this module."""
    request_key, answer_key = keys(key)
    nonce = os.urandom(NONCE_HEX // 2).hex()
    request = {
        "op": op,
        "module": module,
        "term": term,
        "alone": alone,
        "synced": synced,
        "nonce": nonce,
    }
    loop = asyncio.get_running_loop()
    got: asyncio.Future[Answer] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            with contextlib.suppress(WireError, ValueError, TypeError):
                env = decode(answer_key, data, cluster=cluster)
                p = env.payload
                echoed = all(p.get(k) == v for k, v in request.items())
                if env.sender == WITNESS and echoed and not got.done():
                    holder = p.get("holder")
                    records = tuple(
                        (NodeId(str(n)), int(g)) for n, g in list(p.get("records") or [])
                    )
                    got.set_result(
                        Answer(
                            p.get("granted") is True,
                            NodeId(holder) if isinstance(holder, str) else None,
                            int(p.get("term_now", 0)),
                            float(p.get("remaining", 0.0)),
                            str(p.get("reason", "")),
                            records,
                            f"witness:{p.get('witness', '')}",
                        )
                    )

    transport, _ = await loop.create_datagram_endpoint(
        _Client, local_addr=local, remote_addr=witness
    )
    try:
        sent_at = clock()
        transport.sendto(encode(request_key, Envelope(cluster, sender, incarnation, seq, request)))
        try:
            return sent_at, await asyncio.wait_for(got, timeout)
        except TimeoutError:
            return None
    finally:
        transport.close()


class WitnessClient:
    """An agent's requests to one witness, for one module (its own sequence numbers)."""

    def __init__(  # noqa: PLR0917
        self,
        key: bytes,
        cluster: str,
        node: str,
        address: tuple[str, int],
        module: str,
        incarnation: int,
        *,
        local_host: str | None = None,
        timeout: float = 1.0,
    ) -> None:
        self.key, self.cluster, self.node = key, cluster, node
        self.address, self.module, self.incarnation = address, module, incarnation
        self.local = (local_host, 0) if local_host else None
        self.timeout = timeout
        self.seq = 0
        self.name = f"{address[0]}:{address[1]}"

    async def request(
        self, op: str, term: int, alone: int = 0, synced: int = 0
    ) -> tuple[float, Answer] | None:
        """One request (``acquire`` or ``release``); None without an answer in time."""
        self.seq += 1
        try:
            return await ask(
                self.key,
                self.cluster,
                self.node,
                self.address,
                op=op,
                module=self.module,
                term=term,
                incarnation=self.incarnation,
                seq=self.seq,
                alone=alone,
                synced=synced,
                local=self.local,
                timeout=self.timeout,
            )
        except OSError as exc:  # unreachable network, no route: no answer
            log.debug("witness %s: %s", self.name, exc)
            return None


def _load(path: Path, new: bool) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if new:
            return {}
        raise ValueError(
            f"{path}: no witness state: a witness that lost it could issue old terms again; "
            "start it with --new only if it never ran before"
        ) from None
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable witness state ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: unreadable witness state (not an object)")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    from hakit import config as cfg  # noqa: PLC0415 — only for the command line

    ap = argparse.ArgumentParser(prog="python -m hakit.net.witness", description=__doc__)
    ap.add_argument("-c", "--config", required=True, type=Path, help="the cluster file")
    ap.add_argument("--listen", required=True, help="ADDRESS:PORT to listen on")
    ap.add_argument(
        "--duration", type=float, default=None, help="lease duration (default: [arbitration] lease)"
    )
    ap.add_argument("--state", type=Path, default=None, help="state file (default: state_dir)")
    ap.add_argument("--new", action="store_true", help="first start: create the state file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s witness %(message)s")
    conf = cfg.load(args.config)
    host, _, port = args.listen.rpartition(":")
    nodes = {n: set(c.addresses.values()) for n, c in conf.cluster.nodes.items()}
    state = args.state or conf.cluster.state_dir / "witness.json"
    try:
        server = WitnessServer(
            conf.key(),
            conf.cluster.name,
            nodes,
            state,
            duration=args.duration or conf.cluster.arbitration.lease,
            new=args.new,
        )
    except ValueError as exc:
        print(f"witness: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        await server.start(host, int(port))
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
