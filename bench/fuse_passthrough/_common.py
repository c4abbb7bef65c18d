"""Shared helpers for the FUSE passthrough prototypes (bench only, not hakit code).

* open_root(dir)      : open the directory BEFORE mounting over it (O_RDONLY|O_DIRECTORY)
* rel(path)           : FUSE path "/a/b" -> "a/b" ("/" -> ".") for os.*(..., dir_fd=root)
* Stats               : counts FUSE WRITE requests and their largest size; dumped as JSON
                        to $HK_FUSE_STATS at unmount (proves 1 MiB writes reach the daemon)
* ThreadRepl/TrioRepl : simulated synchronous replication. Each mutating op sends
                        header(+path)(+data) over ONE loopback TCP connection (127.0.0.1)
                        and waits for the peer's 8-byte ack before returning. Sends are
                        serialised (global order kept); acks are matched by sequence
                        number, so several requests can be in flight at once
                        (pipelining) if the binding runs handlers concurrently.
* ack_server(port)    : the "peer": reads each message fully, discards it, acks it.

Env: HK_REPL=127.0.0.1:PORT enables replication; HK_FUSE_STATS=/path.json.
"""

import json
import os
import socket
import struct
import sys
import threading

HDR = struct.Struct("!QBHQI")  # seq, op, path_len, offset, data_len
ACK = struct.Struct("!Q")
OPS = {
    n: i
    for i, n in enumerate(
        [
            "write",
            "create",
            "mkdir",
            "unlink",
            "rmdir",
            "rename",
            "truncate",
            "chmod",
            "chown",
            "utimens",
            "fsync",
            "symlink",
            "link",
            "mknod",
            "release",
        ]
    )
}


def open_root(d):
    return os.open(d, os.O_RDONLY | os.O_DIRECTORY)


def rel(path):
    p = path.lstrip("/")
    return p if p else "."


class Stats:
    def __init__(self):
        self.writes = 0
        self.max_write = 0
        self.bytes = 0

    def write(self, n):  # racy under threads; only approximate counts, max is what matters
        self.writes += 1
        self.bytes += n
        if n > self.max_write:
            self.max_write = n
            self.dump()  # rare (only when the max grows): robust even if the daemon dies

    def dump(self):
        f = os.environ.get("HK_FUSE_STATS")
        if f:
            with open(f, "w") as fp:
                json.dump(
                    {"writes": self.writes, "max_write": self.max_write, "bytes": self.bytes}, fp
                )


def _addr():
    a = os.environ.get("HK_REPL")
    if not a:
        return None
    host, port = a.rsplit(":", 1)
    assert host == "127.0.0.1", "loopback only"
    return host, int(port)


class ThreadRepl:
    """Blocking client for threaded bindings (mfusepy, fuse-python)."""

    def __init__(self):
        self.addr = _addr()
        self.enabled = self.addr is not None
        if not self.enabled:
            return
        self.sock = socket.create_connection(self.addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_lock = threading.Lock()
        self.seq = 0
        self.waiters = {}
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        f = self.sock.makefile("rb", buffering=65536)
        while True:
            b = f.read(ACK.size)
            if len(b) < ACK.size:
                os._exit(3)  # peer lost: a real replicator would go ALONE; the bench just dies
            ev = self.waiters.pop(ACK.unpack(b)[0])
            ev.set()

    def call(self, op, path, data=b"", offset=0):
        if not self.enabled:
            return
        pb = path.encode("utf-8", "surrogateescape")
        ev = threading.Event()
        with self.send_lock:
            self.seq += 1
            seq = self.seq
            self.waiters[seq] = ev
            hdr = HDR.pack(seq, OPS[op], len(pb), offset, len(data))
            if len(data) < 65536:
                self.sock.sendall(hdr + pb + bytes(data))
            else:
                self.sock.sendall(hdr + pb)
                self.sock.sendall(data)
        ev.wait()


class TrioRepl:
    """Async client for pyfuse3 (trio). Run reader() in a nursery."""

    def __init__(self):
        self.addr = _addr()
        self.enabled = self.addr is not None

    async def connect(self):
        import trio

        self.trio = trio
        self.stream = await trio.open_tcp_stream(*self.addr)
        self.stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_lock = trio.Lock()
        self.seq = 0
        self.waiters = {}

    async def reader(self):
        buf = bytearray()
        while True:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                os._exit(3)
            buf += chunk
            n = len(buf) // ACK.size * ACK.size
            for off in range(0, n, ACK.size):
                self.waiters.pop(ACK.unpack_from(buf, off)[0]).set()
            del buf[:n]

    async def call(self, op, path, data=b"", offset=0):
        if not self.enabled:
            return
        pb = path.encode("utf-8", "surrogateescape")
        ev = self.trio.Event()
        self.seq += 1  # single-threaded event loop: no lock needed for seq
        seq = self.seq
        self.waiters[seq] = ev
        hdr = HDR.pack(seq, OPS[op], len(pb), offset, len(data))
        async with self.send_lock:  # keeps message order == seq order
            if len(data) < 65536:
                await self.stream.send_all(hdr + pb + bytes(data))
            else:
                await self.stream.send_all(hdr + pb)
                await self.stream.send_all(data)
        await ev.wait()


def _serve(conn, delay):
    """Ack each message once fully read; with delay > 0 (HK_ACK_DELAY_US), each ack is sent
    `delay` s after its message arrived, without serialising: a stand-in for network RTT
    (netem is absent on these machines)."""
    import collections
    import time

    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = conn.makefile("rb", buffering=1 << 20)
    q = collections.deque()
    cv = threading.Condition()

    def sender():
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, seq = q.popleft()
            if seq is None:
                return
            dt = due - time.monotonic()
            if dt > 0:
                time.sleep(dt)
            conn.sendall(ACK.pack(seq))

    if delay:
        threading.Thread(target=sender, daemon=True).start()
    try:
        while True:
            h = f.read(HDR.size)
            if len(h) < HDR.size:
                return
            seq, op, plen, off, dlen = HDR.unpack(h)
            f.read(plen + dlen)
            if delay:
                with cv:
                    q.append((time.monotonic() + delay, seq))
                    cv.notify()
            else:
                conn.sendall(ACK.pack(seq))
    finally:
        if delay:
            with cv:
                q.append((0, None))
                cv.notify()
        conn.close()


def ack_server(port_file):
    """Peer simulator: 127.0.0.1, ephemeral port written to port_file."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    with open(port_file + ".tmp", "w") as fp:
        fp.write(str(s.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    while True:
        c, _ = s.accept()
        threading.Thread(
            target=_serve, args=(c, int(os.environ.get("HK_ACK_DELAY_US", "0")) / 1e6), daemon=True
        ).start()


if __name__ == "__main__":
    ack_server(sys.argv[1])
