"""The secondary's listener: one primary connection at a time, its requests applied in order.

Threads (no asyncio):

- the **accept thread** waits on the listening sockets; each accepted socket gets a connection
  thread, which first does the TLS handshake and reads the first frame (it must be HELLO)
  within :data:`OPEN_TIMEOUT` seconds. A connection that fails there never disturbs the
  active one.
- the new connection then **takes over**: the active connection (if any) is told to stop, ends
  as on :meth:`ReplicaServer.stop` and its thread is joined; only then is ``handlers.hello``
  called. So requests are never applied from two connections at once (and a connection whose
  HELLO is then refused has still ended the previous one: its HELLO may depend on that end).
- the **connection thread** reads requests, applies them through the :class:`Applier` (or the
  handlers for HELLO, BEGIN_RESYNC, END_RESYNC) and queues the replies, which it sends in
  order (all those queued, in one send) whenever it would otherwise wait for the next
  request. It is the only thread that touches the socket (non-blocking): an SSL object must
  not be used by two threads at once.
- a **writer thread** per connection, for WRITEs of :data:`STREAM_SIZE` bytes or more:
  it ``pwrite``s each piece of the data as soon as it has arrived, while the connection
  thread receives the next one; the reply is queued once every piece is written (then the
  mtime is set, as for any WRITE). Nothing else is applied meanwhile. These large WRITEs —
  the resync's (``FLAG_BULK``), and the application's unless ``direct`` is off
  (``large_writes = "cached"``) — are written with ``O_DIRECT`` where the file system allows
  it (aligned pieces; the unaligned tail and any refused piece through the page cache): the
  disk works while the data arrives, instead of in a later flush, no CPU goes to page copies,
  and the secondary's memory does not fill with a copy nobody reads (it is read only after a
  failover, by a resync or by ``hakit verify``). Smaller WRITEs go through the page cache.
- a **flusher thread** per connection runs ``syncfs`` on the replicated file systems for
  SYNCFS requests (several waiting requests share one flush) and hands the replies back to
  the connection thread, which goes on applying meanwhile. A SYNCFS reply is only queued
  after the replies of every request before it, and answers for all of them: they were applied
  before the flush started.

Contracts:

- BEGIN_RESYNC: ``handlers.begin_resync`` (which persists "resyncing" durably) returns before
  the reply is queued. END_RESYNC: ``syncfs`` of every root, then ``handlers.end_resync``,
  then the reply. A handler's ``OSError`` is answered as an error; any other exception ends
  the connection.
- :meth:`ReplicaServer.stop` closes the listeners first, then ends the connection: every
  request already received (buffered here or in the kernel) is applied and answered — reading
  stops once nothing more is readable, or after :data:`DRAIN_TIMEOUT` seconds if the primary
  keeps sending; a partial frame is dropped (of a large WRITE, the pieces already received
  stay written, as after a write interrupted by a crash; it is not answered, so the primary
  counts it as lost). Pending SYNCFS flushes finish. It joins every
  thread, is idempotent, and leaves the applier (owned by the caller) open.
- A protocol error (bad frame, refused path, HELLO not first) ends the connection with
  ``event("error", …)``; a refused HELLO (``ValueError`` from ``handlers.hello``) is answered
  with ``EPERM`` and the reason before closing. Nothing received is ever evaluated or
  unpickled: frames are fixed structs, payloads JSON.
- Events: ``connected`` (detail: peer address), ``disconnected`` (why), ``error`` (what). They
  are called from the server's threads.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import errno
import logging
import mmap
import os
import queue
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from hakit.repl import protocol as p
from hakit.repl.applier import DIRECT_ALIGN, Applier, open_direct, syncfs, write_direct
from hakit.repl.protocol import Op, ProtocolError, Reply, RequestHead

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 10.0  # seconds for a new connection's TLS handshake and HELLO frame
IO_TIMEOUT = 60.0  # seconds a send of replies may take before giving up
DRAIN_TIMEOUT = 2.0  # seconds at most to read what is still arriving after a stop request
BUFFER_SIZE = 1 << 20  # receive buffer; frames with more data use a MAX_DATA buffer
STREAM_SIZE = 256 << 10  # WRITEs with this much data are written while they arrive
STREAM_CHUNK = 256 << 10  # handed to the writer thread at a time (and pieces of a live O_DIRECT
# stream: the last piece's disk write is what the reply waits for after the data arrived)
DIRECT_CHUNK = 1 << 20  # pieces of a resync's O_DIRECT stream (one disk write each)
FLUSH_SIZE = 256 << 10  # bytes of queued replies sent even if more requests are buffered
MAX_OPENING = 4  # connections allowed in handshake at once; more are closed at once
KEEPALIVE = (10, 5, 3)  # TCP keepalive: idle seconds, interval seconds, probes
_KEEPALIVE_OPTIONS = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)


class Handlers(Protocol):
    """What the server asks of the replicator (called from the server's threads)."""

    def hello(self, peer: dict[str, Any]) -> dict[str, Any]:
        """Validate the primary's HELLO and return ours; raise ``ValueError`` to refuse."""

    def begin_resync(self, generation: int, full: bool) -> None:
        """Persist "resyncing" durably (called before the reply)."""

    def end_resync(self, generation: int) -> None:
        """Persist "up to date" at ``generation`` (the roots are flushed; reply follows)."""

    def event(self, kind: str, detail: str) -> None:
        """``connected``, ``disconnected`` or ``error``, for the log and status."""


def _abort(sock: socket.socket) -> None:
    """Shut the descriptor down under any thread using it (bypasses ``SSLSocket.shutdown``)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Reader:
    """Frames through one reusable buffer, filled by ``recv_into`` (0: stop reading).

    A frame's ``data`` is a view valid until the next call of :meth:`frame`.
    """

    def __init__(self, recv_into: Callable[[memoryview], int]) -> None:
        self._recv_into = recv_into
        self._view = memoryview(bytearray(BUFFER_SIZE))
        self._big: memoryview | None = None  # page-aligned (mmap): O_DIRECT writes from it
        self._streaming = 0  # data bytes of the frame returned for stream()
        self._lo = self._hi = 0
        self.partial = False  # the stream ended inside a frame

    def _fill(self, need: int) -> bool:
        if self._lo == self._hi:
            self._lo = self._hi = 0  # the previous frame's data is no longer in use
        elif self._lo + need > len(self._view):
            n = self._hi - self._lo
            self._view[:n] = self._view[self._lo : self._hi]
            self._lo, self._hi = 0, n
        while self._hi - self._lo < need:
            got = self._recv_into(self._view[self._hi :])
            if got == 0:
                return False
            self._hi += got
        return True

    def _big_buffer(self, n: int) -> memoryview:
        if self._big is None:
            self._big = memoryview(mmap.mmap(-1, p.MAX_DATA))
        return self._big[:n]

    def _take(self, n: int) -> memoryview:
        view = self._view[self._lo : self._lo + n]
        self._lo += n
        return view

    def frame(self) -> tuple[RequestHead, bytes, bytes, memoryview | None] | None:
        """The next request, or None at the end of the stream. A large WRITE comes without
        its data (None): read it with :meth:`stream` before the next frame."""
        if not self._fill(p.REQ.size):
            self.partial = self._hi > self._lo
            return None
        self.partial = True
        head = p.decode_request_head(bytes(self._take(p.REQ.size)))
        if not self._fill(head.path_len + head.path2_len):
            return None
        path, path2 = bytes(self._take(head.path_len)), bytes(self._take(head.path2_len))
        n = head.data_len
        if n >= STREAM_SIZE and head.op == Op.WRITE:
            self._streaming = n
            return head, path, path2, None
        if n <= len(self._view):
            if not self._fill(n):
                return None
            data = self._take(n)
        else:
            data = self._big_buffer(n)
            have = min(n, self._hi - self._lo)
            data[:have] = self._take(have)
            while have < n:
                got = self._recv_into(data[have:])
                if got == 0:
                    return None
                have += got
        self.partial = False
        return head, path, path2, data

    def stream(
        self,
        consume: Callable[[memoryview, int], None],
        align: int = 1,
        piece: int = STREAM_CHUNK,
    ) -> bool:
        """The data of the frame :meth:`frame` returned without it, in pieces of at least
        ``piece`` bytes: ``consume(view, offset in the data)``, each view valid until the next
        :meth:`frame`. Every piece but the last is a multiple of ``align`` bytes long (and
        starts at such an offset of a page-aligned buffer). False if the stream ended first
        (what was consumed stays consumed)."""
        n, self._streaming = self._streaming, 0
        data = self._big_buffer(n)
        have = min(n, self._hi - self._lo)
        data[:have] = self._take(have)
        handed = 0
        while True:
            upto = have if have == n else have - (have - handed) % align
            if upto - handed >= piece or (have == n and have > handed):
                consume(data[handed:upto], handed)
                handed = upto
            if have == n:
                self.partial = False
                return True
            got = self._recv_into(data[have:])
            if got == 0:
                return False
            have += got


class _Writer(threading.Thread):
    """``pwrite``s the pieces of a streamed WRITE put in :attr:`jobs` (None ends it): each is
    ``(fd, direct_fd, view, offset)``; an aligned piece goes to ``direct_fd`` (``O_DIRECT``)
    unless it is -1, any other piece to ``fd``. A direct write the kernel refuses (EINVAL:
    alignment the file system does not take) is done through ``fd``, and so is every later
    piece of that stream."""

    def __init__(self) -> None:
        super().__init__(name="repl-write", daemon=True)
        self.jobs: queue.SimpleQueue[tuple[int, int, memoryview, int] | _thread.LockType | None] = (
            queue.SimpleQueue()
        )
        self._error: OSError | None = None
        self._refused = -1  # the direct descriptor EINVAL came from
        self.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not isinstance(job, tuple):
                job.release()
                continue
            fd, direct_fd, view, offset = job
            if self._error is not None:
                continue  # the rest of a failed write is dropped
            try:
                if direct_fd >= 0 and direct_fd != self._refused:
                    view, offset = self._direct(direct_fd, view, offset)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
            except OSError as exc:
                self._error = exc

    def _direct(self, fd: int, view: memoryview, offset: int) -> tuple[memoryview, int]:
        """Write the aligned part of the piece to ``fd``; what is left for the page cache."""
        try:
            return write_direct(fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._refused = fd
        return view, offset

    def wait(self) -> OSError | None:
        """Once every piece put so far is written: the first failure since the last wait."""
        done = _thread.allocate_lock()
        done.acquire()
        self.jobs.put(done)
        done.acquire()
        error, self._error, self._refused = self._error, None, -1
        return error

    def stop(self) -> None:
        self.jobs.put(None)
        self.join()


class _Flusher(threading.Thread):
    """Runs ``syncfs`` for the seqs put in :attr:`queue` (None ends it); replies to ``deliver``."""

    def __init__(self, fds: Sequence[int], deliver: Callable[[list[Reply]], None]) -> None:
        super().__init__(name="repl-flush", daemon=True)
        self._fds = fds
        self._deliver = deliver
        self.queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.start()

    def run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while not self.queue.empty():  # requests waiting meanwhile share the next flush
                batch.append(self.queue.get_nowait())
            seqs = [seq for seq in batch if seq is not None]
            if seqs:
                err, text = 0, b""
                try:
                    for fd in self._fds:
                        syncfs(fd)
                except OSError as exc:
                    err, text = exc.errno or errno.EIO, f"syncfs: {exc.strerror}".encode()
                self._deliver([Reply(seq, err, text) for seq in seqs])
            if None in batch:
                return


class _Connection:
    """One accepted socket: opening (handshake, HELLO frame), then active until it ends."""

    def __init__(self, server: ReplicaServer, sock: socket.socket, peer: str) -> None:
        self._server = server
        self._sock = sock
        self.peer = peer
        self._lock = threading.Lock()
        self._stopping = False
        self._active = False  # may apply (took over)
        self.connected = False  # and its HELLO was accepted
        self._deadline = 0.0
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poll = select.poll()
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._async: collections.deque[Reply] = collections.deque()
        self._reader = _Reader(self._recv_into)
        self._writer: _Writer | None = None
        self._send_timeout = IO_TIMEOUT
        self.thread = threading.Thread(target=self._run, name=f"repl-conn {peer}", daemon=True)

    # ------------------------------------------------------------------ control (any thread)
    def request_stop(self) -> None:
        """Active: apply what was received, then end. Opening: end now."""
        with self._lock:
            self._stopping = True
            if self._wake < 0:
                return  # already ended
            if self._active:
                os.eventfd_write(self._wake, 1)
            else:
                _abort(self._sock)

    def stop_and_join(self) -> None:
        self.request_stop()
        self.thread.join(DRAIN_TIMEOUT + IO_TIMEOUT / 4)
        if self.thread.is_alive():  # a primary that does not read its replies
            _abort(self._sock)
            self.thread.join()

    def _deliver(self, replies: list[Reply]) -> None:
        with self._lock:
            self._async.extend(replies)
        os.eventfd_write(self._wake, 1)

    # ------------------------------------------------------------------ connection thread
    def _run(self) -> None:
        server, flusher = self._server, None
        reason = "closed by the primary"
        try:
            first = self._open()
            if first is None or not server.take_over(self):
                return
            if not self._hello(first):
                return
            self.connected = True
            server.emit("connected", self.peer)
            flusher = _Flusher(server.sync_fds, self._deliver)
            reason = self._loop(flusher)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            server.emit("error", f"{self.peer}: {reason}")
        except OSError as exc:  # ssl.SSLError included
            reason = f"connection lost: {exc}"
            if not self._active and not self._stopping:  # e.g. a peer with another cluster key
                server.emit("error", f"{self.peer}: {reason}")
        except Exception as exc:
            log.exception("replication connection from %s: please report it as a BUG", self.peer)
            reason = f"internal error: {exc!r}"
            server.emit("error", f"{self.peer}: {reason}")
        finally:
            self._finish(flusher)
            if self.connected:
                server.emit("disconnected", f"{self.peer}: {reason}")
            server.release(self)

    def _open(self) -> tuple[RequestHead, bytes, bytes, memoryview | None] | None:
        ctx = self._server.ssl_context
        self._sock.settimeout(OPEN_TIMEOUT)
        if ctx is not None:
            with self._lock:
                if self._stopping:
                    return None
                tls = ctx.wrap_socket(self._sock, server_side=True, do_handshake_on_connect=False)
                self._sock = tls
            tls.do_handshake()
        first = self._reader.frame()
        if first is not None and first[0].op != Op.HELLO:
            raise ProtocolError(f"first request is {first[0].op.name}, not HELLO")
        return first

    def activate(self) -> bool:
        """Called by the server once this connection may apply; False if it must end."""
        with self._lock:
            if self._stopping:
                return False
            self._active = True
        self._sock.setblocking(False)
        self._poll.register(self._sock.fileno(), select.POLLIN)
        self._poll.register(self._wake, select.POLLIN)
        return True

    def _hello(self, first: tuple[RequestHead, bytes, bytes, memoryview | None]) -> bool:
        head, data = first[0], first[3]
        try:
            ours = self._server.handlers.hello(p.decode_json(bytes(data or b"")))
        except ValueError as exc:
            self._queue(Reply(head.seq, errno.EPERM, str(exc).encode()))
            self._flush()
            self._server.emit("error", f"{self.peer}: HELLO refused: {exc}")
            return False
        self._queue(Reply(head.seq, 0, p.encode_json(ours)))
        return True

    def _loop(self, flusher: _Flusher) -> str:
        handlers, applier = self._server.handlers, self._server.applier
        while (frame := self._reader.frame()) is not None:
            head, path, path2, data = frame
            if data is None:  # a large WRITE: written while its data arrives
                streamed = self._stream_write(head, path)
                if streamed is None:
                    break
                self._queue(streamed)
                continue
            if head.op == Op.SYNCFS:
                flusher.queue.put(head.seq)
                continue
            if head.op == Op.HELLO:
                raise ProtocolError("HELLO after the start")
            reply = Reply(head.seq)
            try:
                if head.op == Op.BEGIN_RESYNC:
                    obj = p.decode_json(bytes(data))
                    full = obj.get("full")
                    if not isinstance(full, bool):
                        raise ProtocolError("BEGIN_RESYNC without a boolean 'full'")
                    handlers.begin_resync(_generation(obj), full)
                elif head.op == Op.END_RESYNC:
                    generation = _generation(p.decode_json(bytes(data)))
                    for fd in self._server.sync_fds:
                        syncfs(fd)
                    handlers.end_resync(generation)
                else:
                    reply = applier.apply(head, path, path2, data)
            except OSError as exc:
                text = f"{head.op.name}: {exc.strerror or exc}".encode()
                reply = Reply(head.seq, exc.errno or errno.EIO, text)
            self._queue(reply)
        if self._reader.partial:
            return "stopped (a partial request was dropped)" if self._stopping else "truncated"
        return "stopped" if self._stopping else "closed by the primary"

    def _stream_write(self, head: RequestHead, path: bytes) -> Reply | None:
        """Apply a large WRITE while it arrives: the writer thread ``pwrite``s each piece as
        this thread receives the next. None if the stream ends inside the frame (the pieces
        already written stay: the same as a write interrupted by a crash)."""
        applier = self._server.applier
        error: OSError | None = None
        try:
            fd = applier.open_write(head, path)
        except OSError as exc:
            fd, error = -1, exc
        if self._writer is None:
            self._writer = _Writer()
        writer, base = self._writer, head.a
        direct = self._server.direct or head.flags & p.FLAG_BULK
        direct_fd = open_direct(fd) if fd >= 0 and direct else -1
        try:
            complete = self._reader.stream(
                lambda view, off: (
                    writer.jobs.put((fd, direct_fd, view, base + off)) if fd >= 0 else None
                ),
                DIRECT_ALIGN if direct_fd >= 0 else 1,
                DIRECT_CHUNK if head.flags & p.FLAG_BULK else STREAM_CHUNK,
            )
        finally:  # also when receiving failed: the writer is done with direct_fd before it
            error = error or writer.wait()  # is closed (its number could name another file)
            if direct_fd >= 0:
                os.close(direct_fd)
        if not complete:
            return None
        return applier.end_write(head, path, fd, error)

    def _recv_into(self, view: memoryview) -> int:
        """Bytes read into ``view``; 0 at the end of the stream or when reading must stop.

        Replies already queued go out before waiting for more requests (all of them in one
        send). While none are queued, what has arrived is read without waiting first.
        """
        if not self._active:  # opening: blocking reads under OPEN_TIMEOUT
            return 0 if self._stopping else self._sock.recv_into(view)
        sock = self._sock
        if not self._pending and not self._stopping:
            try:
                return sock.recv_into(view)
            except _WANT:
                pass
        while self._wait():
            try:
                return sock.recv_into(view)
            except _WANT:
                pass
        return 0

    def _wait(self) -> bool:
        """Send queued replies, then wait until the socket is readable; False: stop reading."""
        while True:
            if self._stopping and not self._deadline:
                self._deadline = time.monotonic() + DRAIN_TIMEOUT
                self._send_timeout = DRAIN_TIMEOUT  # bounds the sends below too
            self._flush()
            if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                return True
            timeout = None
            if self._stopping:
                if time.monotonic() > self._deadline:
                    return False
                timeout = 0
            ready = dict(self._poll.poll(timeout))
            if self._wake in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                self._take_async()
                continue
            if ready:
                return True
            if self._stopping:
                return False

    def _take_async(self) -> None:
        with self._lock:
            replies = list(self._async)
            self._async.clear()
        for reply in replies:
            self._queue(reply)

    def _queue(self, reply: Reply) -> None:
        raw = reply.encode()
        self._pending.append(raw)
        self._pending_size += len(raw)
        if self._pending_size >= FLUSH_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            raw = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            self._pending_size = 0
            self._send_all(raw)

    def _send_all(self, raw: bytes) -> None:
        """Send everything (the socket is non-blocking); ``OSError`` after ``_send_timeout``."""
        sock, view, deadline = self._sock, memoryview(raw), 0.0
        while view:
            try:
                view = view[sock.send(view) :]
                continue
            except _WANT:
                pass
            now = time.monotonic()
            deadline = deadline or now + self._send_timeout
            if now >= deadline:
                raise TimeoutError(f"the primary takes no data for {self._send_timeout:g} s")
            waiter = select.poll()
            waiter.register(sock.fileno(), select.POLLOUT)
            waiter.poll((deadline - now) * 1000)

    def _finish(self, flusher: _Flusher | None) -> None:
        """Pending flushes end, their replies go out if the socket still works; close."""
        if self._writer is not None:
            self._writer.stop()  # pieces of a WRITE cut short are written (they were received)
        if flusher is not None:
            flusher.queue.put(None)
            flusher.join()
            self._take_async()
            try:
                self._send_timeout = DRAIN_TIMEOUT
                self._flush()
            except OSError as exc:
                log.debug("last replies to %s not sent: %s", self.peer, exc)
        with self._lock:
            _abort(self._sock)
            self._sock.close()
            os.close(self._wake)
            self._wake = -1


def _generation(obj: dict[str, Any]) -> int:
    gen = obj.get("generation")
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 0:
        raise ProtocolError(f"bad generation {gen!r}")
    return gen


class ReplicaServer:
    """The secondary's listener (see the module docstring). :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        binds: Sequence[str],
        port: int,
        ssl_context: ssl.SSLContext | None,
        applier: Applier,
        handlers: Handlers,
        *,
        direct: bool = True,
    ) -> None:
        self.binds = list(binds)
        self.direct = direct  # the application's large WRITEs past the page cache, too
        self.ssl_context = ssl_context
        self.applier = applier
        self.handlers = handlers
        devices = {os.fstat(fd).st_dev: fd for fd in applier.roots}
        self.sync_fds = tuple(devices.values())  # one root per file system, for syncfs
        self._port = port
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()  # guards the fields below
        self._switch = threading.Lock()  # one take-over at a time
        self._conns: set[_Connection] = set()
        self._active: _Connection | None = None
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="repl-accept", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (the one chosen by the system when constructed with 0)."""
        return self._port

    @property
    def peer(self) -> str | None:
        """Address of the primary currently connected, if any."""
        with self._lock:
            conn = self._active
            return conn.peer if conn is not None and conn.connected else None

    def start(self) -> None:
        """Bind every address (raises ``OSError``, nothing left open), then accept."""
        try:
            for addr in self.binds:
                family, kind, proto, _, sockaddr = socket.getaddrinfo(
                    addr, self._port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
                )[0]
                sock = socket.socket(family, kind, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(8)
                self._port = sock.getsockname()[1]
        except BaseException:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        self._accept_thread.start()

    def __enter__(self) -> ReplicaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the listeners, end the connection (applying what was received), join."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
        if first:
            os.eventfd_write(self._wake, 1)
            if self._accept_thread.is_alive():
                self._accept_thread.join()
            os.close(self._wake)
        for sock in self._listeners:
            sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.stop_and_join()

    # ------------------------------------------------------------------ for connections
    def emit(self, kind: str, detail: str) -> None:
        """``handlers.event``, whose failure must not end a connection thread early."""
        try:
            self.handlers.event(kind, detail)
        except Exception:
            log.exception("replication event handler failed: please report it as a BUG")

    def take_over(self, conn: _Connection) -> bool:
        """Make ``conn`` the active connection once the previous one has ended."""
        with self._switch:
            with self._lock:
                old = None if self._stopping else self._active
            if old is not None:
                old.stop_and_join()
            with self._lock:
                if self._stopping or not conn.activate():
                    return False
                self._active = conn
            return True

    def release(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            if self._active is conn:
                self._active = None

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self._listeners:
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is not self._wake:
                        self._accept(key.fileobj)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except OSError as exc:  # e.g. out of descriptors: do not spin on a readable listener
            log.warning("replication accept failed: %s", exc)
            time.sleep(0.1)
            return
        peer = (
            f"[{addr[0]}]:{addr[1]}" if sock.family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in zip(_KEEPALIVE_OPTIONS, KEEPALIVE, strict=True):
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        with self._lock:
            opening = sum(1 for c in self._conns if c is not self._active)
            if self._stopping or opening >= MAX_OPENING:
                log.warning("replication connection from %s refused: too many opening", peer)
                sock.close()
                return
            conn = _Connection(self, sock, peer)
            self._conns.add(conn)
        conn.thread.start()
