"""The witness service on loopback: leases granted, renewed, refused and released over
authenticated UDP; forged and misaddressed requests get no answer; terms keep growing across
a restart, and the holder keeps its lease through it."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from hakit.net.wire import Envelope, encode
from hakit.net.witness import WitnessServer, ask

KEY = b"witness-test-key-0123456789abcdef"
CLUSTER = "c1"
NODES = {"n1": {"127.0.0.1"}, "n2": {"127.0.0.2"}}
D = 0.6


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, name: str, witness: tuple[str, int], key: bytes = KEY) -> None:
        self.name, self.witness, self.key = name, witness, key
        self.seq = 0

    async def __call__(self, op: str, term: int = 0, module: str = "db") -> object:
        self.seq += 1
        local = (next(iter(NODES.get(self.name, {"127.0.0.3"}))), 0)
        got = await ask(
            self.key,
            CLUSTER,
            self.name,
            self.witness,
            op=op,
            module=module,
            term=term,
            incarnation=1,
            seq=self.seq,
            local=local,
            timeout=0.3,
        )
        return None if got is None else got[1]


def test_leases_over_udp_and_across_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        state = tmp_path / "witness.json"
        port = free_port()
        with pytest.raises(ValueError, match="--new"):
            WitnessServer(KEY, CLUSTER, NODES, state, duration=D)  # no state: refused
        server = WitnessServer(KEY, CLUSTER, NODES, state, duration=D, new=True)
        await server.start("127.0.0.1", port)
        n1, n2 = Node("n1", ("127.0.0.1", port)), Node("n2", ("127.0.0.1", port))
        try:
            first = await n1("acquire")
            assert first is not None and not first.granted  # just started: quiet
            await asyncio.sleep(D)
            a = await n1("acquire")
            assert a is not None and (a.granted, a.term) == (True, 1)
            b = await n2("acquire")
            assert b is not None and (b.granted, b.holder) == (False, "n1")
            assert (await n1("release")) is not None
            c = await n2("acquire")
            assert c is not None and (c.granted, c.term) == (True, 2)
            # no answer to a forged request, nor to a node asking from another's address
            assert await Node("n1", ("127.0.0.1", port), key=b"x" * 32)("acquire") is None
            assert await Node("n9", ("127.0.0.1", port))("acquire") is None
            assert server.dropped == 2
            # a heartbeat signed with the cluster key itself is no witness request
            hb = encode(KEY, Envelope(CLUSTER, "n1", 1, 99, {"op": "acquire"}))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                s.sendto(hb, ("127.0.0.1", port))
            await asyncio.sleep(0.1)
            assert server.dropped == 3
        finally:
            server.close()
            await asyncio.sleep(0.05)  # the socket closes on the next loop turn

        # a restart: n2 keeps its lease by presenting its term; new terms stay above 2
        server = WitnessServer(KEY, CLUSTER, NODES, state, duration=D)
        await server.start("127.0.0.1", port)
        try:
            assert server.incarnation == 2
            kept = await n2("acquire", term=2)
            assert kept is not None and (kept.granted, kept.term) == (True, 2)
            refused = await n1("acquire")
            assert refused is not None and not refused.granted
            assert (await n2("release")) is not None
            await asyncio.sleep(D)
            d = await n1("acquire")
            assert d is not None and (d.granted, d.term) == (True, 3)
        finally:
            server.close()

    asyncio.run(scenario())
