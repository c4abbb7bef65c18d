"""The primary's end of the replication connection: pipelined requests, replies matched by seq.

:class:`Link` owns one connected socket (TLS or plain). :meth:`Link.submit` queues a request
and returns at once with a :class:`Pending`; the caller waits on it later (outside any lock),
so many requests can be in flight. Requests go out in the order :meth:`submit` was called;
callers that need a global order (the file system) call it under their own order lock.

A link is *broken* at the first socket error, protocol error, or when the oldest unanswered
request is older than ``timeout`` seconds; every pending request and every later submission
then fails with :class:`ReplicaLost`, and ``on_broken(reason)`` is called once, from a thread
of its own (never from the thread that called :meth:`Link.close` or waited: those may hold
the caller's locks).

How the socket is driven (an OpenSSL connection must not be used by two threads at once, so
whoever uses it holds ``_io``; the socket is non-blocking):

- a submitter sends its frame itself when the socket is free (no thread switch); frames with
  large data are handed to a thread that holds the socket, so that the submitter can go on
  (the file system writes its local copy meanwhile);
- a thread waiting for a reply reads the socket itself (*leader*): it blocks in ``poll`` on the
  socket, reads every reply that arrived, hands each to its waiter, and returns once its own
  has come. Other waiters sleep on their own lock; when the leader leaves, the first of them
  takes over. So a reply wakes exactly the thread that waits for it;
- the ``repl-io`` thread sends what a submitter could not (the socket was full, or the data is
  large), reads replies nobody waits for yet (every 0.1 s), and enforces ``timeout``.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from hakit.repl import protocol as p


class ReplicaLost(Exception):
    """The secondary can no longer be reached through this link."""


HANDOFF_SIZE = 128 << 10  # requests with this much data are sent by a thread holding the socket
TICK = 0.1  # seconds between the I/O thread's rounds (unread replies, reply timeout)
_RECV_SIZE = 1 << 18
_SEND_SIZE = 1 << 20
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)
_IN = select.POLLIN
_OUT = select.POLLOUT


class Pending:
    """A request waiting for its reply."""

    __slots__ = ("_link", "_lock", "done", "reply", "sent_at", "seq", "waiting")

    def __init__(self, link: Link, seq: int, now: float) -> None:
        self.seq = seq
        self.sent_at = now
        self.reply: p.Reply | None = None
        self.done = False  # answered, or the link broke
        self.waiting = False  # asleep on _lock, listed in the link's waiters
        self._link = link
        self._lock = _thread.allocate_lock()
        self._lock.acquire()  # released to wake the waiter (its reply came, or it must lead)

    def wait(self, timeout: float | None = None) -> p.Reply:
        """The reply; raises :class:`ReplicaLost` if the link broke first."""
        if not self.done:
            self._link._wait_for(self, timeout)
            if not self.done:
                raise ReplicaLost("no reply in time")
        if self.reply is None:
            raise ReplicaLost(self._link.broken or "link broken")
        return self.reply


def connect(
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    connect_timeout: float,
    server_name: str,
) -> socket.socket:
    """A connected (and TLS-wrapped) socket to a secondary; raises OSError."""
    raw = socket.create_connection((host, port), timeout=connect_timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock = context.wrap_socket(raw, server_hostname=server_name) if context is not None else raw
    except (OSError, ssl.SSLError):
        raw.close()
        raise
    sock.settimeout(None)
    return sock


class Link:
    """Pipelined request/reply over one connected socket (see module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        timeout: float,
        on_broken: Callable[[str], None],
    ) -> None:
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._timeout = timeout
        self._on_broken = on_broken
        self._lock = threading.Lock()  # guards the queue, inflight, waiters, broken, _closed
        self._queue: collections.deque[tuple[p.Request, Pending]] = collections.deque()
        self._inflight: dict[int, Pending] = {}
        self._waiters: collections.deque[Pending] = collections.deque()
        self._seq = 0
        self._closed = False  # socket and eventfds closed (under _io and _lock)
        self.broken: str | None = None
        self.bytes_sent = 0
        # held by whoever uses the socket, and the state below
        self._io = threading.Lock()
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_left = False  # _out not empty (readable without _io)
        self._inbuf = bytearray()
        self._rview = memoryview(bytearray(_RECV_SIZE))
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # wakes the _io holder
        self._bg_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # wakes repl-io
        self._poll = select.poll()
        self._poll.register(sock.fileno(), _IN)
        self._poll.register(self._wake, _IN)
        self._mask = _IN
        sock.setblocking(False)
        self._thread = threading.Thread(target=self._io_loop, name="repl-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def submit(self, req: p.Request) -> Pending:
        """Queue ``req`` (its seq is assigned here); raises :class:`ReplicaLost` if broken."""
        now = time.monotonic()
        with self._lock:
            if self.broken is not None:
                raise ReplicaLost(self.broken)
            self._seq += 1
            pending = Pending(self, self._seq, now)
            self._inflight[self._seq] = pending
            self._queue.append((req, pending))
        if len(req.data) < HANDOFF_SIZE and self._io.acquire(blocking=False):
            try:
                self._pump_out()
            except (OSError, ValueError) as exc:
                self._fail(exc)
            finally:
                self._release_io()
        else:
            self._kick(big=len(req.data) >= HANDOFF_SIZE)
        return pending

    def call(self, req: p.Request) -> p.Reply:
        """Submit and wait; raises :class:`ReplicaLost`."""
        return self.submit(req).wait()

    def close(self, reason: str = "closed") -> None:
        """Break the link on purpose (pending requests fail) and release the socket."""
        self._break(reason)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def outstanding(self) -> int:
        return len(self._inflight)

    # ------------------------------------------------------------------ waiting
    def _wait_for(self, pending: Pending, timeout: float | None) -> None:
        """Until ``pending`` is done (or ``timeout``): lead the reading, or sleep until woken."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not pending.done:
            if not self._io.acquire(blocking=False):
                with self._lock:
                    if pending.done:
                        break
                    pending.waiting = True
                    self._waiters.append(pending)
                if not self._io.acquire(blocking=False):  # the holder will wake us
                    left = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                    woken = pending._lock.acquire(timeout=left)
                    if not woken and not self._unlist(pending):
                        pending._lock.acquire()  # woken after all: take the release
                    if not woken and not pending.done:
                        return  # timed out
                    continue
                if not self._unlist(pending):
                    pending._lock.acquire()
            try:
                self._lead(pending, deadline)
            except (OSError, ValueError, p.ProtocolError, EOFError) as exc:
                self._fail(exc)
            finally:
                self._release_io()
            if deadline is not None and time.monotonic() >= deadline:
                return
        if self._waiters and self._io.acquire(blocking=False):
            self._release_io()  # a waiter woken to lead may have found its reply: pass it on

    def _unlist(self, pending: Pending) -> bool:
        """Take ``pending`` off the waiters; False if someone already woke it."""
        with self._lock:
            if not pending.waiting:
                return False
            pending.waiting = False
            self._waiters.remove(pending)
            return True

    def _lead(self, pending: Pending, deadline: float | None) -> None:
        """Drive the socket (caller holds ``_io``) until ``pending`` is done or ``deadline``."""
        sock = self._sock
        readable = self._tls and sock.pending() > 0  # type: ignore[attr-defined]
        while not pending.done and self.broken is None:
            left = self._pump_out()
            if not readable:
                if deadline is None:
                    ms = -1
                else:
                    ms = int((deadline - time.monotonic()) * 1000)
                    if ms < 0:
                        return
                readable = self._poll_once(left, ms)
                continue
            self._read()
            readable = False

    def _poll_once(self, left: bool, ms: int) -> bool:
        """Wait (holding ``_io``) for the socket or the wake-up eventfd; True: readable."""
        mask = _IN | _OUT if left else _IN
        if mask != self._mask:
            self._poll.modify(self._sock.fileno(), mask)
            self._mask = mask
        readable = False
        for fd, ev in self._poll.poll(ms):
            if fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
            elif ev & ~_OUT:
                readable = True  # POLLIN, or POLLHUP/POLLERR: the read says what it is
        return readable

    def _release_io(self) -> None:
        """Release the socket, then wake a waiter to lead, or send what is still queued."""
        self._io.release()
        while True:
            with self._lock:
                nxt = None
                if self._waiters:
                    nxt = self._waiters.popleft()
                    nxt.waiting = False
                work = self.broken is None and (bool(self._queue) or self._out_left)
            if nxt is not None:
                nxt._lock.release()
                return
            if not work or not self._io.acquire(blocking=False):
                return  # nothing to do, or the new holder does it
            try:
                left = self._pump_out()
            except (OSError, ValueError) as exc:
                left = False
                self._fail(exc)
            self._io.release()
            if left:
                self._kick(big=True)  # the I/O thread waits until the socket takes it
                return

    def _kick(self, *, big: bool) -> None:
        """Wake the ``_io`` holder (it may be asleep in poll); ``big``: and the I/O thread."""
        with self._lock:
            if self._closed:
                return
            os.eventfd_write(self._wake, 1)
            if big:
                os.eventfd_write(self._bg_wake, 1)

    # ------------------------------------------------------------------ socket (holding _io)
    def _pump_out(self) -> bool:
        """Send queued frames until the socket is full; True if some are left."""
        out, sock = self._out, self._sock
        while True:
            if not out:
                if not self._queue:
                    self._out_left = False
                    return False
                self._take_queue(out)
                continue
            head = out[0]
            try:
                n = sock.send(head[:_SEND_SIZE])
            except _WANT:
                self._out_left = True
                return True
            if n == len(head):
                out.popleft()
            else:
                out[0] = head[n:]

    def _take_queue(self, out: collections.deque[memoryview]) -> None:
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
        small = bytearray()
        for req, pending in batch:
            parts = req.encode(pending.seq)
            if len(parts) == 1 or len(parts[1]) < 65536:
                for part in parts:
                    small += part
                continue
            if small:
                out.append(memoryview(small))
                small = bytearray()
            out.append(memoryview(parts[0]))
            out.append(memoryview(parts[1]))
            self.bytes_sent += len(parts[1])
        if small:
            out.append(memoryview(small))

    def _read(self) -> None:
        """Read what the socket has (without blocking) and hand out the replies."""
        sock, view, inbuf = self._sock, self._rview, self._inbuf
        while True:
            try:
                n = sock.recv_into(view)
            except _WANT:
                break
            if not n:
                raise EOFError("connection closed by the secondary")
            inbuf += view[:n]
            if self._tls:
                if not sock.pending():  # type: ignore[attr-defined]
                    break  # more records may be on the way: poll says
            elif n < len(view):
                break
        self._replies(inbuf)

    def _replies(self, inbuf: bytearray) -> None:
        pos, size, end = 0, p.REP.size, len(inbuf)
        done: list[tuple[int, int, bytes]] = []
        while end - pos >= size:
            seq, err, dlen = p.REP.unpack_from(inbuf, pos)
            if dlen > p.MAX_DATA or err < 0:
                raise p.ProtocolError(f"bad reply header (err {err}, data {dlen})")
            stop = pos + size + dlen
            if stop > end:
                break
            done.append((seq, err, bytes(inbuf[pos + size : stop]) if dlen else b""))
            pos = stop
        if pos:
            del inbuf[:pos]
        if not done:
            return
        wake: list[Pending] = []
        with self._lock:
            for seq, err, data in done:
                pending = self._inflight.pop(seq, None)
                if pending is None:
                    raise p.ProtocolError(f"reply for unknown request {seq}")
                pending.reply = p.Reply(seq, err, data)
                pending.done = True
                if pending.waiting:
                    pending.waiting = False
                    self._waiters.remove(pending)
                    wake.append(pending)
        for pending in wake:
            pending._lock.release()

    # ------------------------------------------------------------------ the I/O thread
    def _io_loop(self) -> None:
        sel = select.poll()
        sel.register(self._bg_wake, _IN)
        try:
            while self.broken is None:
                if sel.poll(TICK * 1000):
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._bg_wake)
                if self._io.acquire(blocking=False):
                    try:
                        self._service()
                    except (OSError, ValueError, p.ProtocolError, EOFError) as exc:
                        self._fail(exc)
                    finally:
                        self._release_io()
                with self._lock:
                    oldest = next(iter(self._inflight.values()), None)
                if oldest is not None and time.monotonic() - oldest.sent_at > self._timeout:
                    self._break(f"no reply for {self._timeout:g} s")
        finally:
            with self._io, self._lock:
                self._closed = True
                with contextlib.suppress(OSError):
                    self._sock.close()
                os.close(self._wake)
                os.close(self._bg_wake)

    def _service(self) -> None:
        """Read what arrived; send what is queued, waiting for room if need be (holding _io)."""
        readable = True
        while self.broken is None:
            if readable:
                self._read()
            left = self._pump_out()
            if not left:
                return
            readable = self._poll_once(left, int(TICK * 1000))

    # ------------------------------------------------------------------ failure
    def _fail(self, exc: BaseException) -> None:
        self._break(f"connection failed: {exc or type(exc).__name__}")

    def _break(self, reason: str) -> None:
        with self._lock:
            if self.broken is not None:
                return
            self.broken = reason
            failed = list(self._inflight.values())
            self._inflight.clear()
            self._queue.clear()
            asleep = list(self._waiters)
            self._waiters.clear()
            for pending in failed:
                pending.done = True
            for pending in asleep:
                pending.waiting = False
            if not self._closed:  # the socket's holder and the I/O thread see ``broken``
                os.eventfd_write(self._wake, 1)
                os.eventfd_write(self._bg_wake, 1)
        for pending in asleep:
            pending._lock.release()
        threading.Thread(
            target=self._on_broken, args=(reason,), name="repl-broken", daemon=True
        ).start()
