"""The etcd arbiter against a real etcd on loopback: grants, renewals, refusals, expiry,
release, ran-alone records, adoption of the lease after an agent restart, and no answer (None,
in time) when etcd is gone or hangs.

Needs root and the ``etcd`` binary (Debian ``etcd-server``, installed by the Makefile in CI);
skipped otherwise, with the reason. Each test uses its own module name in the shared etcd.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hakit.core.lease import Answer
from hakit.net.etcd_arbiter import EtcdArbiter
from hakit.system import clock as boottime

CLUSTER = "c1"
D = 2.0  # lease duration: etcd's minimum TTL with its default timing
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def why_no_etcd() -> str | None:
    if os.geteuid() != 0:
        return "the etcd tests run as root (as the other integration tests)"
    if shutil.which("etcd") is None:
        return "no `etcd` binary: apt-get install etcd-server"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url + path, json.dumps(body).encode())
    with _NO_PROXY.open(request, timeout=2) as response:
        reply: dict[str, Any] = json.loads(response.read())
    return reply


@dataclass
class Etcd:
    url: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its PID
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_etcd(data: Path) -> Etcd:
    url, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    argv = ["etcd", "--name", "hk-test", "--data-dir", str(data / "data")]
    argv += ["--listen-client-urls", url, "--advertise-client-urls", url]
    argv += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
    argv += ["--initial-cluster", f"hk-test={peer}", "--initial-cluster-state", "new"]
    with (data / "etcd.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    etcd = Etcd(url, proc)
    until = time.monotonic() + 20
    while time.monotonic() < until and proc.poll() is None:
        try:
            post(url, "/v3/kv/range", {"key": "AA=="})
            return etcd
        except OSError:
            time.sleep(0.1)
    etcd.stop()
    log = (data / "etcd.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"etcd did not start: {log}")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    reason = why_no_etcd()
    if reason is not None:
        pytest.skip(reason)
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


def arbiter(url: str | list[str], node: str, module: str, **kw: Any) -> EtcdArbiter:
    endpoints = [url] if isinstance(url, str) else url
    return EtcdArbiter(endpoints, CLUSTER, node, module, duration=kw.pop("duration", D), **kw)


async def ask(a: EtcdArbiter, op: str = "acquire", term: int = 0, **kw: Any) -> Answer:
    got = await a.request(op, term, **kw)
    assert got is not None, f"no answer from {a.name}"
    sent_at, answer = got
    assert sent_at <= boottime.now()
    return answer


def granted_ttl(url: str, a: EtcdArbiter) -> int:
    """The TTL etcd granted to the lease of the module's holder key."""
    kvs = post(url, "/v3/kv/range", {"key": _b64(a.holder_key)})["kvs"]
    reply = post(url, "/v3/lease/timetolive", {"ID": kvs[0]["lease"]})
    return int(reply["grantedTTL"])


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_grant_renewal_and_refusal(etcd: Etcd) -> None:
    async def scenario() -> None:
        n1, n2 = arbiter(etcd.url, "n1", "grant"), arbiter(etcd.url, "n2", "grant")
        first = await ask(n1)
        assert (first.granted, first.holder, first.reason) == (
            True,
            "n1",
            f"granted (term {first.term})",
        )
        assert first.term > 0 and first.remaining == D
        assert first.remaining <= granted_ttl(etcd.url, n1)
        for _ in range(3):
            again = await ask(n1, term=first.term)
            assert (again.granted, again.term, again.remaining) == (True, first.term, D)
            assert again.reason.startswith("renewed")
        refused = await ask(n2)
        assert (refused.granted, refused.holder, refused.term) == (False, "n1", first.term)
        assert 0 < refused.remaining <= D and refused.reason.startswith("held by n1 for")
        assert (await ask(n1, term=first.term)).granted  # the refusal changed nothing
        # a short duration: etcd's minimum TTL is longer, the answer says the duration
        short = await ask(arbiter(etcd.url, "n1", "short", duration=0.6))
        assert short.granted and short.remaining == 0.6

    asyncio.run(scenario())


def test_expiry_gives_a_greater_term_never_before_the_deadline(etcd: Etcd) -> None:
    async def scenario() -> None:
        n1, n2 = arbiter(etcd.url, "n1", "expiry"), arbiter(etcd.url, "n2", "expiry")
        got = await n1.request("acquire", 0)
        assert got is not None and got[1].granted
        sent_at, first = got
        while not (answer := await ask(n2)).granted:  # n1 stopped renewing
            assert time.monotonic() < sent_at + D + 3, "the lease did not expire"
            await asyncio.sleep(0.1)
        assert time.monotonic() >= sent_at + first.remaining  # not before n1's deadline
        assert answer.holder == "n2" and answer.term > first.term
        lost = await ask(n1, term=first.term)  # n1 comes back: refused, its term is gone
        assert (lost.granted, lost.holder, lost.term) == (False, "n2", answer.term)

    asyncio.run(scenario())


def test_release_lets_the_other_node_acquire_at_once(etcd: Etcd) -> None:
    async def scenario() -> None:
        n1, n2 = arbiter(etcd.url, "n1", "release"), arbiter(etcd.url, "n2", "release")
        first = await ask(n1)
        nothing = await ask(n2, "release")  # n2 holds nothing: changes nothing
        assert (nothing.granted, nothing.holder, nothing.reason) == (False, "n1", "not held")
        done = await ask(n1, "release", first.term)
        assert (done.granted, done.holder, done.term, done.reason) == (False, None, 0, "released")
        second = await ask(n2)
        assert second.granted and second.term > first.term
        again = await ask(n1, "release", first.term)  # n1 no longer holds it
        assert (again.reason, again.holder) == ("not held", "n2")
        assert (await ask(n2, term=second.term)).granted

    asyncio.run(scenario())


def test_ran_alone_records(etcd: Etcd) -> None:
    async def scenario() -> None:
        n1, n2 = arbiter(etcd.url, "n1", "alone"), arbiter(etcd.url, "n2", "alone")
        held = await ask(n2)
        refused = await ask(n1, alone=5)  # not granted: not recorded
        assert not refused.granted and refused.alone == ()
        await ask(n2, "release", held.term)
        first = await ask(n1, alone=5)
        assert first.granted and first.alone == (("n1", 5),)
        seen = await ask(n2, alone=7, synced=9)  # refused: neither records nor clears
        assert not seen.granted and seen.alone == (("n1", 5),)
        bare = await ask(n1, term=first.term)  # a bare acquire never clears
        assert bare.granted and bare.alone == (("n1", 5),)
        lower = await ask(n1, term=first.term, alone=3)  # only a newer generation counts
        assert lower.alone == (("n1", 5),)
        newer = await ask(n1, term=first.term, alone=6)
        assert newer.alone == (("n1", 6),)
        released = await ask(n1, "release", first.term)  # a release keeps the record
        assert released.alone == (("n1", 6),)
        grant = await ask(n2, synced=9)  # n2's synced does not clear n1's record
        assert grant.granted and grant.alone == (("n1", 6),)
        both = await ask(n2, term=grant.term, alone=2)
        assert both.alone == (("n1", 6), ("n2", 2))
        await ask(n2, "release", grant.term)
        late = await ask(n1, synced=5)  # a late request from before generation 6: kept
        assert late.granted and late.alone == (("n1", 6), ("n2", 2))
        back = await ask(n1, term=late.term, synced=6)  # n1 in sync at 6: its record goes
        assert back.granted and back.alone == (("n2", 2),)

    asyncio.run(scenario())


def test_a_node_that_lost_the_lock_cannot_write_its_record(etcd: Etcd) -> None:
    async def scenario() -> None:
        n1, n2 = arbiter(etcd.url, "n1", "lost"), arbiter(etcd.url, "n2", "lost")
        first = await ask(n1)
        old_lease = n1._lease
        post(etcd.url, "/v3/lease/revoke", {"ID": str(old_lease)})  # as if it expired
        second = await ask(n2)
        assert second.granted and second.term > first.term
        late = await ask(n1, term=first.term, alone=9)
        assert not late.granted and late.holder == "n2" and late.alone == ()
        # the write itself, as a renewal would send it after its keepalive: refused by etcd
        deadline = time.monotonic() + 1
        ops = n1._record_ops((), 9, False)
        done, kvs = n1._txn(n1._held(old_lease), ops, deadline)
        assert not done and n1._parse(kvs)[1] == ()
        assert (await ask(n2, term=second.term)).alone == ()

    asyncio.run(scenario())


def test_a_grant_that_lost_the_race_takes_nothing(etcd: Etcd) -> None:
    async def scenario() -> None:
        n1, n2 = arbiter(etcd.url, "n1", "race"), arbiter(etcd.url, "n2", "race")
        first = await ask(n1)
        # n2's grant step, as after a read that found the key absent: its transaction fails
        late = n2._grant((), 3, False, time.monotonic() + 1)
        assert (late.granted, late.holder, late.term) == (False, "n1", first.term)
        assert late.alone == () and n2._lease == 0
        again = await ask(n1, term=first.term)
        assert again.granted and again.term == first.term and again.alone == ()

    asyncio.run(scenario())


def test_adoption_after_an_agent_restart(etcd: Etcd) -> None:
    async def scenario() -> None:
        n1 = arbiter(etcd.url, "n1", "adopt")
        first = await ask(n1, alone=4)
        restarted = arbiter(etcd.url, "n1", "adopt")  # a new process: no lease in memory
        unknown = await ask(restarted)  # without its term: not its lease
        assert (unknown.granted, unknown.holder, unknown.term) == (False, "n1", first.term)
        wrong = await ask(restarted, term=first.term + 1)
        assert not wrong.granted
        adopted = await ask(restarted, term=first.term)
        assert (adopted.granted, adopted.term, adopted.remaining) == (True, first.term, D)
        assert adopted.reason.startswith("renewed after an agent restart")
        assert adopted.alone == (("n1", 4),)
        n2 = arbiter(etcd.url, "n2", "adopt")
        until = time.monotonic() + D + 1.5  # kept alive past its first TTL by the new object
        while time.monotonic() < until:
            assert (await ask(restarted, term=first.term)).term == first.term
            assert not (await ask(n2)).granted
            await asyncio.sleep(0.4)
        synced = await ask(restarted, term=first.term, synced=4)
        assert synced.alone == ()
        assert (await ask(restarted, "release", first.term)).reason == "released"
        assert (await ask(n2)).granted

    asyncio.run(scenario())


def test_no_answer_in_time_when_etcd_is_gone_or_hangs(tmp_path: Path) -> None:
    reason = why_no_etcd()
    if reason is not None:
        pytest.skip(reason)
    own = start_etcd(tmp_path)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def timed(a: EtcdArbiter, *args: Any) -> tuple[float, object]:
        start = time.monotonic()
        got = await a.request(*args)
        return time.monotonic() - start, got

    async def scenario() -> None:
        # the first endpoint refuses connections: the next one answers
        n1 = arbiter([closed, own.url], "n1", "gone", timeout=0.5)
        first = await ask(n1)
        assert first.granted and (await ask(n1, term=first.term)).granted
        with socket.socket() as silent:  # accepts connections, never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            hangs = arbiter(
                f"http://127.0.0.1:{silent.getsockname()[1]}", "n1", "gone", timeout=0.5
            )
            elapsed, got = await timed(hangs, "acquire", first.term)
            assert got is None and elapsed < 0.8
            # a first endpoint that hangs gets only its share of the time: the next answers
            url = f"http://127.0.0.1:{silent.getsockname()[1]}"
            mixed = arbiter([url, own.url], "n3", "hang-first", timeout=1.0)
            elapsed, got = await timed(mixed, "acquire", 0)
            assert got is not None and elapsed < 1.0
        own.stop()
        for op in ("acquire", "release"):
            elapsed, got = await timed(n1, op, first.term)
            assert got is None and elapsed < 0.8

    try:
        asyncio.run(scenario())
    finally:
        own.stop()
