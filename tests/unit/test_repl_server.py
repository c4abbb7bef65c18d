"""The secondary's listener over 127.0.0.1: pipelining, SYNCFS, HELLO, take-over, stop, garbage."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hakit.repl import protocol as p
from hakit.repl.applier import Applier
from hakit.repl.link import HANDOFF_SIZE, Link, ReplicaLost, connect
from hakit.repl.protocol import Op, Reply, Request
from hakit.repl.server import BUFFER_SIZE, STREAM_SIZE, ReplicaServer
from tests.pagecache import dirty_pages, resident_bytes

TIMEOUT = 10.0  # seconds any single wait in these tests may take


class Recorder:
    """Handlers that record what the server asked, and refuse a HELLO saying ``refuse``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.events: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def hello(self, peer: dict[str, Any]) -> dict[str, Any]:
        if peer.get("refuse"):
            raise ValueError("not my cluster")
        self.calls.append(("hello", peer))
        return {"node": "n2", "generation": 3}

    def begin_resync(self, generation: int, full: bool) -> None:
        self.calls.append(("begin", generation, full))

    def end_resync(self, generation: int) -> None:
        self.calls.append(("end", generation))

    def event(self, kind: str, detail: str) -> None:
        with self._cond:
            self.events.append((kind, detail))
            self._cond.notify_all()

    def wait_event(self, kind: str, count: int = 1) -> list[str]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(k == kind for k, _ in self.events) >= count, TIMEOUT
            )
            assert ok, f"no {kind!r} event in {self.events}"
            return [d for k, d in self.events if k == kind]


class Client:
    """A minimal primary: frames from ``Request.encode``, replies read with ``protocol.REP``."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname="hakit-replication") if ctx else raw
        except OSError:
            raw.close()
            raise
        self.seq = 0

    def send(self, req: Request) -> int:
        self.seq += 1
        self.sock.sendall(b"".join(bytes(part) for part in req.encode(self.seq)))
        return self.seq

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "connection closed"
            buf += chunk
        return bytes(buf)

    def reply(self) -> Reply:
        seq, err, n = p.decode_reply_head(self._exact(p.REP.size))
        return Reply(seq, err, self._exact(n))

    def call(self, req: Request) -> Reply:
        seq = self.send(req)
        reply = self.reply()
        assert reply.seq == seq
        return reply

    def hello(self, **extra: Any) -> Reply:
        return self.call(Request(Op.HELLO, data=p.encode_json({"node": "n1", **extra})))

    def closed(self) -> bool:
        """True once the server has closed (after any replies still on the way)."""
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass
        return True

    def wait_acknowledged(self) -> None:
        """Until the server's kernel has acknowledged every byte sent: it has "received" them."""
        deadline = time.monotonic() + TIMEOUT
        while struct.unpack("i", fcntl.ioctl(self.sock, termios.TIOCOUTQ, b"\0" * 4))[0]:
            assert time.monotonic() < deadline, "the server does not read"
            time.sleep(0.001)


class Secondary:
    def __init__(
        self, base: Path, ctx: ssl.SSLContext | None = None, *, direct: bool = True
    ) -> None:
        self.root = base / "root"
        self.root.mkdir()
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.applier = Applier([self.fd])
        self.handlers = Recorder()
        self.server = ReplicaServer(
            ["127.0.0.1"], 0, ctx, self.applier, self.handlers, direct=direct
        )
        self.server.start()
        self.clients: list[Client] = []

    def client(self, ctx: ssl.SSLContext | None = None) -> Client:
        self.clients.append(Client(self.server.port, ctx))
        return self.clients[-1]

    def close(self) -> None:
        for c in self.clients:
            c.sock.close()
        self.server.stop()
        self.applier.close()
        os.close(self.fd)


@pytest.fixture
def sec(tmp_path: Path) -> Iterator[Secondary]:
    s = Secondary(tmp_path)
    try:
        yield s
    finally:
        s.close()


def write(path: bytes, data: bytes, offset: int) -> Request:
    return Request(Op.WRITE, path, data=data, a=offset)


# --- the data path ------------------------------------------------------------------------


def test_thousand_pipelined_writes_are_answered_in_order(sec: Secondary) -> None:
    c = sec.client()
    hello = c.hello()
    assert (hello.err, p.decode_json(hello.data)) == (0, {"node": "n2", "generation": 3})
    assert sec.handlers.wait_event("connected")[0].startswith("127.0.0.1:")
    assert c.call(Request(Op.CREATE, b"f", a=0o644)).err == 0
    seqs = [c.send(write(b"f", b"%07d\n" % i, 8 * i)) for i in range(1000)]
    replies = [c.reply() for _ in seqs]
    assert [r.seq for r in replies] == seqs
    assert all(r.err == 0 for r in replies)
    assert (sec.root / "f").read_bytes() == b"".join(b"%07d\n" % i for i in range(1000))
    assert sec.server.peer is not None


def test_large_writes_pass_through_the_big_buffer(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    c.call(Request(Op.CREATE, b"big", a=0o600))
    chunks = [os.urandom(n) for n in (BUFFER_SIZE + 1, 10, p.MAX_DATA, 3 << 20)]

    def send_all() -> None:  # while the test reads replies: the frames exceed socket buffers
        offset = 0
        for chunk in chunks:
            c.send(write(b"big", chunk, offset))
            offset += len(chunk)

    done = threading.Thread(target=send_all)
    done.start()
    replies = [c.reply() for _ in chunks]
    done.join()
    assert [r.err for r in replies] == [0, 0, 0, 0]
    assert (sec.root / "big").read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("flags", [p.FLAG_BULK, 0], ids=["resync", "live"])
def test_large_writes_go_past_the_page_cache_and_keep_every_byte(
    sec: Secondary, flags: int
) -> None:
    c = sec.client()
    c.hello()
    c.call(Request(Op.CREATE, b"f", a=0o644))
    c.call(Request(Op.CREATE, b"g", a=0o644))
    head = os.urandom(4096)
    assert c.call(write(b"f", head, 8192)).err == 0  # a dirty page the direct write covers
    parts = [  # (offset, data): aligned with an unaligned tail; unaligned start; overwrite
        (0, os.urandom((3 << 20) + 5)),
        ((3 << 20) + 5, os.urandom(STREAM_SIZE * 2 + 1)),
        (4096, os.urandom(STREAM_SIZE)),
    ]
    for offset, data in parts:
        req = Request(Op.WRITE, b"f", data=data, a=offset, flags=flags)
        assert c.call(req).err == 0
    want = bytearray()
    for offset, data in parts:
        want[offset : offset + len(data)] = data
    assert (sec.root / "f").read_bytes() == bytes(want)
    # the same bytes in small writes (through the page cache), then in one large write
    data = os.urandom(4 << 20)
    small = STREAM_SIZE // 2
    for off in range(0, len(data), small):
        assert c.call(write(b"g", data[off : off + small], off)).err == 0
    assert resident_bytes(sec.root / "g") == len(data), "small writes go through the page cache"
    assert c.call(Request(Op.WRITE, b"g", data=data, a=0, flags=flags)).err == 0
    assert resident_bytes(sec.root / "g") == 0, "large writes are written with O_DIRECT"
    assert (sec.root / "g").read_bytes() == data


def test_large_writes_cached_keeps_the_applications_in_the_page_cache(tmp_path: Path) -> None:
    sec = Secondary(tmp_path, direct=False)  # large_writes = "cached"
    try:
        c = sec.client()
        c.hello()
        c.call(Request(Op.CREATE, b"g", a=0o644))
        data = os.urandom(4 << 20)
        assert c.call(write(b"g", data, 0)).err == 0
        assert resident_bytes(sec.root / "g") == len(data), "the application's: page cache"
        assert c.call(Request(Op.WRITE, b"g", data=data, a=0, flags=p.FLAG_BULK)).err == 0
        assert resident_bytes(sec.root / "g") == 0, "the resync's: O_DIRECT all the same"
        assert (sec.root / "g").read_bytes() == data
    finally:
        sec.close()


@pytest.mark.parametrize("size", [4096, STREAM_SIZE * 2], ids=["small", "streamed"])
def test_sync_flagged_writes_are_on_disk_when_answered(sec: Secondary, size: int) -> None:
    c = sec.client()
    c.hello()
    c.call(Request(Op.CREATE, b"f", a=0o644))
    data = os.urandom(size)
    assert c.call(write(b"f", data, 1)).err == 0  # unaligned: through the page cache
    assert dirty_pages(sec.root / "f") > 0
    for flag in (p.FLAG_DSYNC, p.FLAG_SYNC):
        os.sync()  # nothing dirty to start with
        assert c.call(write(b"f", data, 1)).err == 0
        assert dirty_pages(sec.root / "f") > 0
        assert c.call(Request(Op.WRITE, b"f", data=data, a=1, flags=flag)).err == 0
        assert dirty_pages(sec.root / "f") == 0, flag
    assert (sec.root / "f").read_bytes() == b"\0" + data


def test_large_write_errors_are_answered_and_the_stream_stays_in_step(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    (sec.root / "d").mkdir()
    big = os.urandom(STREAM_SIZE * 3 + 5)
    sent = [c.send(write(b"missing", big, 0)), c.send(write(b"d", big, 0))]
    sent.append(c.send(Request(Op.CREATE, b"f", a=0o644)))
    sent.append(c.send(write(b"f", big, 7)))
    replies = [c.reply() for _ in sent]
    assert [r.seq for r in replies] == sent
    assert [r.err for r in replies] == [errno.ENOENT, errno.EISDIR, 0, 0]
    assert (sec.root / "f").read_bytes() == b"\0" * 7 + big


def test_large_write_cut_short_keeps_what_arrived_and_answers_nothing(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    c.call(Request(Op.CREATE, b"f", a=0o644))
    data = os.urandom(STREAM_SIZE * 12)  # written in 1 MiB pieces (O_DIRECT): 2 arrive whole
    frame = b"".join(bytes(x) for x in write(b"f", data, 0).encode(99))
    c.sock.sendall(frame[: -STREAM_SIZE - 1])
    c.sock.shutdown(socket.SHUT_WR)
    assert c.closed()
    assert "truncated" in sec.handlers.wait_event("disconnected")[0]
    kept = (sec.root / "f").read_bytes()
    assert len(kept) >= STREAM_SIZE * 2
    assert data.startswith(kept)


def test_errors_are_answered_and_the_connection_goes_on(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    reply = c.call(Request(Op.UNLINK, b"missing"))
    assert reply.err == errno.ENOENT
    assert "missing" in reply.message
    assert c.call(Request(Op.MKDIR, b"d", a=0o755)).err == 0


def test_syncfs_is_answered_after_every_earlier_reply(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    c.call(Request(Op.CREATE, b"f", a=0o644))
    before = [c.send(write(b"f", b"x", i)) for i in range(50)]
    syncs = [c.send(Request(Op.SYNCFS)) for _ in range(3)]
    after = [c.send(write(b"f", b"y", 50 + i)) for i in range(50)]
    replies = [c.reply() for _ in range(103)]
    order = [r.seq for r in replies]
    assert sorted(order) == sorted(before + syncs + after)
    assert all(r.err == 0 for r in replies)
    assert order[:50] == before  # a SYNCFS reply never overtakes an earlier request
    assert [s for s in order if s not in syncs] == before + after


def test_resync_marks_call_the_handlers_before_replying(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    begin = {"generation": 4, "full": True}
    assert c.call(Request(Op.BEGIN_RESYNC, data=p.encode_json(begin))).err == 0
    assert sec.handlers.calls[-1:] == [("begin", 4, True)]
    assert c.call(Request(Op.END_RESYNC, data=p.encode_json({"generation": 4}))).err == 0
    assert sec.handlers.calls[-1:] == [("end", 4)]
    c.send(Request(Op.END_RESYNC, data=p.encode_json({"generation": "4"})))
    assert c.closed()
    assert "bad generation" in sec.handlers.wait_event("error")[0]


def test_tls_connection_with_the_cluster_identity(tmp_path: Path) -> None:
    from hakit.repl import tls

    server_ctx, client_ctx = tls.contexts(b"k" * 32, tmp_path / "run")
    s = Secondary(tmp_path, server_ctx)
    try:
        c = s.client(client_ctx)
        assert c.hello().err == 0
        c.call(Request(Op.CREATE, b"f", a=0o644))
        seqs = [c.send(write(b"f", b"z" * 1000, 1000 * i)) for i in range(300)]
        seqs.append(c.send(Request(Op.SYNCFS)))
        assert sorted(c.reply().seq for _ in seqs) == seqs
        assert (s.root / "f").read_bytes() == b"z" * 300_000
        _, wrong_ctx = tls.contexts(b"w" * 32, tmp_path / "run2")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            s.client(wrong_ctx).hello()
        assert c.call(Request(Op.STAT, b"f")).err == 0  # the intruder changed nothing
    finally:
        s.close()


# --- connections --------------------------------------------------------------------------


def test_refused_hello_is_answered_eperm_then_closed(sec: Secondary) -> None:
    c = sec.client()
    reply = c.hello(refuse=True)
    assert reply.err == errno.EPERM
    assert reply.message == "not my cluster"
    assert c.closed()
    assert "HELLO refused" in sec.handlers.wait_event("error")[0]
    assert sec.server.peer is None


def test_new_connection_replaces_the_old_one(sec: Secondary) -> None:
    old = sec.client()
    old.hello()
    old.call(Request(Op.CREATE, b"f", a=0o644))
    seqs = [old.send(write(b"f", b"o", i)) for i in range(100)]
    old.wait_acknowledged()
    new = sec.client()
    assert new.hello().err == 0
    assert [old.reply().seq for _ in seqs] == seqs  # the old one's requests were all applied
    assert old.closed()
    assert new.call(write(b"f", b"N", 0)).err == 0
    assert (sec.root / "f").read_bytes() == b"N" + b"o" * 99
    assert sec.handlers.wait_event("connected", 2)
    assert len(sec.handlers.wait_event("disconnected")) == 1


def test_stop_applies_every_request_already_received(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    c.call(Request(Op.CREATE, b"f", a=0o644))
    seqs = [c.send(write(b"f", b"%04d" % i, 4 * i)) for i in range(500)]
    c.wait_acknowledged()
    sec.server.stop()
    assert (sec.root / "f").read_bytes() == b"".join(b"%04d" % i for i in range(500))
    assert [c.reply().seq for _ in seqs] == seqs
    assert c.closed()
    assert "stopped" in sec.handlers.wait_event("disconnected")[0]
    sec.server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        sec.client()


def test_garbage_frame_closes_the_connection(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    c.sock.sendall(struct.pack("!QBBHHHIqqqq", 9, 250, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert c.closed()
    assert "unknown operation 250" in sec.handlers.wait_event("error")[0]


def test_bad_path_or_first_frame_closes_only_that_connection(sec: Secondary) -> None:
    good = sec.client()
    good.hello()
    bad = sec.client()
    bad.send(Request(Op.MKDIR, b"x", a=0o755))  # not HELLO first: never applied
    assert bad.closed()
    assert "not HELLO" in sec.handlers.wait_event("error")[0]
    assert good.call(Request(Op.STAT, b".")).err == 0
    good.send(Request(Op.CREATE, b"../escape", a=0o644))
    assert good.closed()
    assert "refused path" in sec.handlers.wait_event("error", 2)[1]
    assert os.listdir(sec.root) == []
    assert not (sec.root.parent / "escape").exists()


def test_peer_that_closes_mid_frame_drops_only_that_frame(sec: Secondary) -> None:
    c = sec.client()
    c.hello()
    c.call(Request(Op.CREATE, b"f", a=0o644))
    frame = b"".join(bytes(x) for x in write(b"f", b"never", 0).encode(99))
    c.sock.sendall(frame[:-2])
    c.sock.shutdown(socket.SHUT_WR)
    assert c.closed()
    assert "truncated" in sec.handlers.wait_event("disconnected")[0]
    assert (sec.root / "f").read_bytes() == b""


def test_every_bind_address_listens_on_the_same_chosen_port(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    applier = Applier([fd])
    server = ReplicaServer(["127.0.0.1", "::1"], 0, None, applier, Recorder())
    try:
        try:
            server.start()
        except OSError as exc:
            pytest.skip(f"cannot bind ::1 here: {exc}")
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, server.port), timeout=TIMEOUT) as s:
                s.sendall(b"".join(Request(Op.HELLO, data=b"{}").encode(1)))
                assert len(s.recv(p.REP.size)) == p.REP.size
    finally:
        server.stop()
        applier.close()
        os.close(fd)


# --- the primary's end (Link) against this server ----------------------------------------


def _link(sec: Secondary) -> tuple[Link, list[tuple[str, str]]]:
    broken: list[tuple[str, str]] = []
    sock = connect("127.0.0.1", sec.server.port, None, TIMEOUT, "hakit-replication")
    link = Link(sock, TIMEOUT, lambda why: broken.append((why, threading.current_thread().name)))
    hello = link.call(Request(Op.HELLO, data=p.encode_json({"node": "n1"})))
    assert hello.err == 0
    return link, broken


def test_link_waiters_in_many_threads_each_get_their_own_reply(sec: Secondary) -> None:
    link, broken = _link(sec)
    assert link.call(Request(Op.CREATE, b"f", a=0o644)).err == 0
    block = 4096
    big = os.urandom(HANDOFF_SIZE + 3)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(150):
                off = (n * 150 + i) * block
                pend = link.submit(write(b"f", bytes([n]) * block, off))
                if i % 3 == 0:  # a few wait later, after more submissions
                    later = link.submit(Request(Op.STAT, b"f"))
                    assert later.wait().err == 0
                reply = pend.wait()
                assert (reply.seq, reply.err) == (pend.seq, 0)
            assert link.call(write(b"big%d" % n, big, 0)).err == errno.ENOENT
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not errors, errors
    data = (sec.root / "f").read_bytes()
    assert data == b"".join(bytes([n]) * block * 150 for n in range(8))
    assert link.outstanding == 0
    link.close()
    deadline = time.monotonic() + TIMEOUT
    while not broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broken == [("closed", "repl-broken")]  # once, from a thread of its own


def test_link_breaks_for_every_waiter_when_the_secondary_stops(sec: Secondary) -> None:
    link, broken = _link(sec)
    assert link.call(Request(Op.CREATE, b"f", a=0o644)).err == 0
    sec.server.stop()
    with pytest.raises(ReplicaLost):
        for i in range(1000):  # the stop is seen at the latest by the next request
            link.call(write(b"f", b"x", i))
            time.sleep(0.01)
    with pytest.raises(ReplicaLost):
        link.submit(write(b"f", b"y", 0))
    link.close()
    deadline = time.monotonic() + TIMEOUT
    while not broken and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(broken) == 1
