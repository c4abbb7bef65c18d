"""The primary's end of the replication connection: pipelined requests, replies matched by seq.

:class:`Link` owns one connected socket (TLS or plain), a sender thread and a receiver thread.
:meth:`Link.submit` queues a request and returns at once with a :class:`Pending`; the caller
waits on it later (outside any lock), so many requests can be in flight. Requests go out in
the order :meth:`submit` was called; callers that need a global order (the file system) call
it under their own order lock.

A link is *broken* at the first socket error, protocol error, or when the oldest unanswered
request is older than ``timeout`` seconds; every pending request and every later submission
then fails with :class:`ReplicaLost`, and ``on_broken(reason)`` is called once (from the
link's own threads).
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

from hakit.repl import protocol as p


class ReplicaLost(Exception):
    """The secondary can no longer be reached through this link."""


class Pending:
    """A request waiting for its reply."""

    __slots__ = ("_event", "reply", "sent_at", "seq")

    def __init__(self, seq: int, now: float) -> None:
        self.seq = seq
        self.sent_at = now
        self.reply: p.Reply | None = None
        self._event = threading.Event()

    def wait(self, timeout: float | None = None) -> p.Reply:
        """The reply; raises :class:`ReplicaLost` if the link broke first."""
        if not self._event.wait(timeout):
            raise ReplicaLost("no reply in time")
        if self.reply is None:
            raise ReplicaLost("link broken")
        return self.reply

    def _resolve(self, reply: p.Reply | None) -> None:
        self.reply = reply
        self._event.set()


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
    """Pipelined request/reply over one connected socket (see module docstring).

    One I/O thread does every read and write on the socket (an OpenSSL connection must not be
    used by two threads at once), with the socket non-blocking; submitters wake it through an
    eventfd. A watchdog thread only measures reply delays.
    """

    def __init__(
        self,
        sock: socket.socket,
        timeout: float,
        on_broken: Callable[[str], None],
    ) -> None:
        self._sock = sock
        self._timeout = timeout
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[p.Request, Pending]] = collections.deque()
        self._inflight: dict[int, Pending] = {}
        self._seq = 0
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake_closed = False
        self._io = threading.Lock()  # held by whoever reads or writes the socket
        self._out: collections.deque[memoryview] = collections.deque()
        self._io_error: str | None = None
        self.broken: str | None = None
        self.bytes_sent = 0
        sock.setblocking(False)
        self._threads = [
            threading.Thread(target=self._io_loop, name="repl-io", daemon=True),
            threading.Thread(target=self._watch_loop, name="repl-watch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ API
    def submit(self, req: p.Request) -> Pending:
        """Queue ``req`` (its seq is assigned here); raises :class:`ReplicaLost` if broken."""
        now = time.monotonic()
        with self._lock:
            if self.broken is not None:
                raise ReplicaLost(self.broken)
            self._seq += 1
            pending = Pending(self._seq, now)
            self._inflight[self._seq] = pending
            self._queue.append((req, pending))
        # send from this thread if the socket is free (saves a thread switch per request);
        # whatever the socket does not take now, the I/O thread sends
        if self._io.acquire(blocking=False):
            try:
                left = self._pump_out()
            except (OSError, ValueError) as exc:
                left = True
                self._io_error = f"connection failed: {exc}"
            finally:
                self._io.release()
            if not left:
                return pending
        with self._lock:
            if not self._wake_closed:
                os.eventfd_write(self._wake, 1)
        return pending

    def call(self, req: p.Request) -> p.Reply:
        """Submit and wait; raises :class:`ReplicaLost`."""
        return self.submit(req).wait()

    def close(self, reason: str = "closed") -> None:
        """Break the link on purpose (pending requests fail) and release the socket."""
        self._break(reason)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    @property
    def outstanding(self) -> int:
        return len(self._inflight)

    # ------------------------------------------------------------------ threads
    def _pump_out(self) -> bool:
        """Send queued frames until the socket is full (caller holds ``_io``); True if some
        are left."""
        out = self._out
        self._take_queue(out)
        while out:
            try:
                n = self._sock.send(out[0][: 1 << 20])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return True
            if n == len(out[0]):
                out.popleft()
            else:
                out[0] = out[0][n:]
        return False

    def _io_loop(self) -> None:
        sock = self._sock
        inbuf = bytearray()
        sel = selectors.DefaultSelector()
        sel.register(self._wake, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        writing = False
        try:
            while self.broken is None:
                if self._io_error is not None:
                    raise OSError(self._io_error)
                with self._io:
                    left = self._pump_out()
                    if left != writing:
                        writing = left
                        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if left else 0)
                        sel.modify(sock, events)
                    # read everything available, TLS-buffered bytes included
                    while True:
                        try:
                            chunk = sock.recv(1 << 18)
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                            break
                        if not chunk:
                            raise EOFError("connection closed by the secondary")
                        inbuf += chunk
                self._replies(inbuf)
                for key, _ in sel.select(timeout=0.5):
                    if key.fileobj == self._wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
        except (OSError, ValueError, p.ProtocolError, EOFError) as exc:
            self._break(f"connection failed: {exc or type(exc).__name__}")
        finally:
            sel.close()
            with self._io, contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                os.close(self._wake)
                self._wake_closed = True

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
                out.append(memoryview(bytes(small)))
                small = bytearray()
            out.append(memoryview(parts[0]))
            out.append(memoryview(parts[1]))
            self.bytes_sent += len(parts[1])
        if small:
            out.append(memoryview(bytes(small)))

    def _replies(self, inbuf: bytearray) -> None:
        pos = 0
        size = p.REP.size
        done: list[tuple[Pending, p.Reply]] = []
        while len(inbuf) - pos >= size:
            seq, err, dlen = p.decode_reply_head(bytes(inbuf[pos : pos + size]))
            if len(inbuf) - pos - size < dlen:
                break
            data = bytes(inbuf[pos + size : pos + size + dlen])
            pos += size + dlen
            with self._lock:
                pending = self._inflight.pop(seq, None)
            if pending is None:
                raise p.ProtocolError(f"reply for unknown request {seq}")
            done.append((pending, p.Reply(seq, err, data)))
        del inbuf[:pos]
        for pending, reply in done:
            pending._resolve(reply)

    def _watch_loop(self) -> None:
        while self.broken is None:
            time.sleep(min(0.1, self._timeout / 4))
            with self._lock:
                oldest = min((x.sent_at for x in self._inflight.values()), default=None)
            if oldest is not None and time.monotonic() - oldest > self._timeout:
                self._break(f"no reply for {self._timeout:g} s")

    def _break(self, reason: str) -> None:
        with self._lock:
            if self.broken is not None:
                return
            self.broken = reason
            failed = list(self._inflight.values())
            self._inflight.clear()
            self._queue.clear()
            if not self._wake_closed:
                os.eventfd_write(self._wake, 1)  # the I/O thread sees ``broken`` and closes
        for pending in failed:
            pending._resolve(None)
        self._on_broken(reason)
