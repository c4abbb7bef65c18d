"""Heartbeat transport over real UDP sockets on loopback addresses (127.0.0.0/8 only).

Two transports, n1 and n2, on two heartbeat networks: hb1 (127.0.0.11 <-> 127.0.0.12) and
hb2 (127.0.0.21 <-> 127.0.0.22). Attacks come from plain UDP sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from hakit.net import NetError
from hakit.net.heartbeat import HeartbeatTransport
from hakit.net.wire import Envelope, encode

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="heartbeat integration tests run as root"),
]

KEY = b"cluster-key-for-tests-0123456789"
N1 = {"hb1": "127.0.0.11", "hb2": "127.0.0.21"}
N2 = {"hb1": "127.0.0.12", "hb2": "127.0.0.22"}


def free_port() -> int:
    """A UDP port free on every address used here (checked by binding them all)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.11", 0))
            port = int(probe.getsockname()[1])
        try:
            for address in (*N1.values(), *N2.values(), "127.0.0.13"):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free UDP port")


@dataclass
class Node:
    name: str
    transport: HeartbeatTransport
    received: list[tuple[str, Envelope]] = field(default_factory=list)
    seq: int = 0

    def beat(self, **payload: object) -> Envelope:
        self.seq += 1
        env = Envelope("c1", self.name, 5, self.seq, dict(payload))
        self.transport.send(env)
        return env


def make_node(
    name: str,
    networks: dict[str, str],
    peers: dict[str, dict[str, str]],
    port: int,
) -> Node:
    received: list[tuple[str, Envelope]] = []
    transport = HeartbeatTransport(
        KEY,
        "c1",
        name,
        networks=networks,
        peers=peers,
        port=port,
        on_envelope=lambda network, env: received.append((network, env)),
    )
    return Node(name, transport, received)


async def wait_until(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@contextmanager
def udp_from(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((address, 0))
        yield sock
    finally:
        sock.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_two_nodes_exchange_envelopes_once_each_over_two_networks() -> None:
    port = free_port()

    async def scenario() -> None:
        n1 = make_node("n1", N1, {"n2": N2}, port)
        n2 = make_node("n2", N2, {"n1": N1}, port)
        async with n1.transport, n2.transport:
            sent = [n1.beat(app="PRIM"), n1.beat(app="PRIM"), n1.beat(app="PRIM")]
            reply = n2.beat(app="SECOND")
            await wait_until(lambda: n2.transport.counters.duplicate == 3)
            await wait_until(lambda: n1.transport.counters.received == 2)

            assert [env for _, env in n2.received] == sent
            assert n1.received[0][1] == reply
            counters = n2.transport.counters
            assert (counters.received, counters.accepted, counters.duplicate) == (6, 3, 3)
            assert n1.transport.counters.sent == 6
            assert n1.transport.counters.send_errors == 0
            assert n2.transport.last_heard("n1", "hb1") is not None
            assert n2.transport.last_heard("n1", "hb2") is not None

    run(scenario)


def test_forged_replayed_garbage_and_foreign_datagrams_are_dropped_and_counted() -> None:
    port = free_port()

    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spy:
            spy.bind(("127.0.0.13", port))
            spy.settimeout(2)
            # the spy is a declared peer of n1 on hb1, so it receives n1's real datagrams
            n1 = make_node("n1", N1, {"n2": N2, "spy": {"hb1": "127.0.0.13"}}, port)
            n2 = make_node("n2", N2, {"n1": N1}, port)
            async with n1.transport, n2.transport:
                n1.beat(app="PRIM")
                captured = await asyncio.to_thread(spy.recv, 65536)
                n1.beat(app="PRIM")
                await wait_until(lambda: n2.transport.counters.accepted == 2)
                counters = n2.transport.counters

                # the attacker sits on n1's address (another port): only the MAC protects
                with udp_from("127.0.0.11") as attacker:
                    attacker.sendto(captured, ("127.0.0.12", port))
                    await wait_until(lambda: counters.dropped_replay == 1)

                    forged = Envelope("c1", "n1", 6, 1, {"app": "PRIM"})  # newer incarnation
                    attacker.sendto(encode(b"wrong-key-" * 4, forged), ("127.0.0.12", port))
                    await wait_until(lambda: counters.dropped_bad_mac == 1)

                    attacker.sendto(os.urandom(200), ("127.0.0.12", port))
                    await wait_until(lambda: counters.dropped_garbage == 1)
                    attacker.sendto(b"HKHB\x01" + os.urandom(100), ("127.0.0.12", port))
                    await wait_until(lambda: counters.dropped_bad_mac == 2)

                    attacker.sendto(b"x" * 9000, ("127.0.0.12", port))
                    await wait_until(lambda: counters.dropped_too_big == 1)

                    other = Envelope("c2", "n1", 9, 1, {})
                    attacker.sendto(encode(KEY, other), ("127.0.0.12", port))
                    await wait_until(lambda: counters.dropped_wrong_cluster == 1)

                    impostor = Envelope("c1", "n3", 1, 1, {})  # right key, not n1's name
                    attacker.sendto(encode(KEY, impostor), ("127.0.0.12", port))
                    await wait_until(lambda: counters.dropped_unknown_source == 1)

                with udp_from("127.0.0.14") as stranger:
                    stranger.sendto(encode(KEY, Envelope("c1", "n1", 9, 9, {})), (N2["hb1"], port))
                    await wait_until(lambda: counters.dropped_unknown_source == 2)

                assert counters.accepted == 2
                assert n2.transport.last_heard("n1", "hb1") is not None
                n1.beat(app="PRIM")  # the transport still works
                await wait_until(lambda: counters.accepted == 3)
                assert [env.seq for _, env in n2.received] == [1, 2, 3]
                assert all(env.incarnation == 5 for _, env in n2.received)

    run(scenario)


def test_drop_warnings_are_rate_limited_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()

    async def scenario() -> None:
        n2 = make_node("n2", N2, {"n1": N1}, port)
        async with n2.transport:
            with udp_from("127.0.0.11") as attacker:
                for _ in range(20):
                    attacker.sendto(b"garbage", ("127.0.0.12", port))
                forged = encode(b"wrong-key-" * 4, Envelope("c1", "n1", 1, 1, {}))
                attacker.sendto(forged, ("127.0.0.12", port))
                await wait_until(lambda: n2.transport.counters.received == 21)
        assert n2.transport.counters.dropped_garbage == 20

    with caplog.at_level(logging.WARNING, logger="hakit.net.heartbeat"):
        run(scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "dropped garbage" in w]) == 1
    assert len([w for w in warnings if "dropped bad_mac" in w]) == 1


def test_send_errors_are_counted_not_raised() -> None:
    port = free_port()

    async def scenario() -> None:
        # the kernel refuses a broadcast destination without SO_BROADCAST (EACCES):
        # a send error without any packet leaving the host
        peers = {"n2": {"hb1": "127.0.0.12"}, "bcast": {"hb1": "255.255.255.255"}}
        n1 = make_node("n1", {"hb1": "127.0.0.11"}, peers, port)
        async with n1.transport:
            assert n1.transport.send(Envelope("c1", "n1", 1, 1, {})) == 1
        assert n1.transport.counters.send_errors == 1
        assert n1.transport.counters.sent == 1

    run(scenario)


def test_a_crashing_callback_is_reported_as_a_bug_and_the_transport_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    calls: list[int] = []

    def explode(network: str, env: Envelope) -> None:
        calls.append(env.seq)
        if env.seq == 1:
            raise KeyError("boom")

    async def scenario() -> None:
        n1 = make_node("n1", {"hb1": "127.0.0.11"}, {"n2": {"hb1": "127.0.0.12"}}, port)
        n2 = HeartbeatTransport(
            KEY,
            "c1",
            "n2",
            networks={"hb1": "127.0.0.12"},
            peers={"n1": {"hb1": "127.0.0.11"}},
            port=port,
            on_envelope=explode,
        )
        async with n1.transport, n2:
            n1.beat()
            n1.beat()
            await wait_until(lambda: calls == [1, 2])

    with caplog.at_level(logging.ERROR, logger="hakit.net.heartbeat"):
        run(scenario)
    assert any("please report it as a BUG" in r.getMessage() for r in caplog.records)


def test_start_fails_naming_the_network_when_an_address_is_not_local() -> None:
    port = free_port()

    async def scenario() -> None:
        # 192.0.2.250 is configured nowhere on this host: bind fails, nothing is sent
        networks = {"hb1": "127.0.0.11", "hb2": "192.0.2.250"}
        node = make_node("n1", networks, {}, port)
        with pytest.raises(NetError, match=r"'hb2'.*192\.0\.2\.250"):
            await node.transport.start()
        assert not node.transport.started
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.11", port))  # hb1's socket was closed

    run(scenario)


def test_inconsistent_peer_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown heartbeat network"):
        make_node("n1", {"hb1": "127.0.0.11"}, {"n2": {"hb9": "127.0.0.12"}}, 4800)
    with pytest.raises(ValueError, match="given to both"):
        make_node(
            "n1",
            {"hb1": "127.0.0.11"},
            {"n2": {"hb1": "127.0.0.12"}, "n3": {"hb1": "127.0.0.12"}},
            4800,
        )
    with pytest.raises(ValueError, match="local node"):
        make_node("n1", {"hb1": "127.0.0.11"}, {"n1": {"hb1": "127.0.0.12"}}, 4800)
