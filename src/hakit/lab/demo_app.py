"""The lab's demo application: a tiny HTTP service that says which node answered.

``python -m hakit.lab.demo_app --node n1 --port 8080 --data /var/lib/hakit-lab/n1/data/app``

* ``GET /`` answers 200 with body ``"<node>\\n"`` and header ``X-Node: <node>``.
* ``POST /append`` with one line as body appends that line to ``DATA/records.log``, fsyncs the
  file, then answers 200 with the node name (header ``X-Acked-At``: when it was durable): when
  the client has its answer, the record is on disk (the replication tests rely on this order).
* ``POST /sqlite`` with one line as body inserts it as a row of table ``records`` of the SQLite
  database ``DATA/records.db`` in one committed transaction (rollback journal, synchronous
  FULL), then answers 200 with the node name; a row already there is a 409.
* ``GET /stream?seconds=S`` keeps the connection open for S seconds (at most 600): a line with
  the node name every 100 ms, then ``end``. The lab's stream client
  (:mod:`hakit.lab.streams`) uses it to see whether long-lived connections survive a change.
* SIGTERM (and SIGINT) stop it cleanly: the listening socket closes, exit status 0.

It binds ``--bind`` (default 0.0.0.0) with SO_REUSEADDR, so a restart right after a stop works.
GET requests are not logged (the prober sends 100 per second); other requests are logged to
stderr, which the lab's start script appends to ``DATA/app.log``.

Caveats: one writer lock per process; two instances on the same data directory would
interleave records (the HA layer guarantees only one primary runs it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

log = logging.getLogger("hakit.lab.demo_app")

MAX_RECORD = 64 * 1024  # bytes accepted in one POST /append
MAX_STREAM_SECONDS = 600.0
STREAM_PERIOD = 0.1


class DemoServer(ThreadingHTTPServer):
    """Threading HTTP server carrying the node name and the records file."""

    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: SYNs beyond it are dropped (1 s retry)
    daemon_threads = True

    def __init__(self, address: tuple[str, int], node: str, data_dir: Path) -> None:
        super().__init__(address, DemoHandler)
        self.node = node
        self.records = data_dir / "records.log"
        self.database = data_dir / "records.db"
        self.write_lock = threading.Lock()

    def append(self, line: bytes) -> None:
        """Append ``line`` + newline to the records file and fsync it before returning. A
        write may be short (a full disk): the rest is written, or the file is cut back to
        where it was and the error raised, so that no torn record is ever acknowledged."""
        data = line + b"\n"
        with self.write_lock:
            fd = os.open(self.records, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)  # no half record left behind
                    raise
            finally:
                os.close(fd)

    def insert(self, line: bytes) -> bool:
        """Insert ``line`` into the database, committed (durable) before returning; False if
        the row exists."""
        with self.write_lock:
            db = sqlite3.connect(self.database, timeout=10, isolation_level=None)
            try:
                db.execute("PRAGMA synchronous=FULL")
                db.execute("CREATE TABLE IF NOT EXISTS records (rec TEXT PRIMARY KEY)")
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("INSERT INTO records VALUES (?)", (line.decode(),))
                except sqlite3.IntegrityError:
                    db.execute("ROLLBACK")
                    return False
                db.execute("COMMIT")
                return True
            finally:
                db.close()


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.0"
    server_version = "hakit-demo/1"

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/stream":
            self._stream(query)
            return
        if path != "/":
            self._answer(404, b"not found\n")
            return
        self._answer(200, f"{self.server.node}\n".encode())

    def _stream(self, query: str) -> None:
        try:
            seconds = float(query.removeprefix("seconds="))
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= MAX_STREAM_SECONDS:
            self._answer(400, b"seconds=S with 0 < S <= 600\n")
            return
        self.send_response(200)
        self.send_header("X-Node", self.server.node)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        line = f"{self.server.node}\n".encode()
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                self.wfile.write(line)
                self.wfile.flush()
                time.sleep(STREAM_PERIOD)
            self.wfile.write(b"end\n")
        except OSError:
            return  # the client went away

    def do_POST(self) -> None:
        if self.path not in ("/append", "/sqlite"):
            self._answer(404, b"not found\n")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, b"Content-Length required\n")
            return
        if not 0 < length <= MAX_RECORD:
            self._answer(413, b"record must be 1 byte to 64 KiB\n")
            return
        line = self.rfile.read(length).rstrip(b"\r\n")
        if not line or b"\n" in line:
            self._answer(400, b"body must be exactly one line\n")
            return
        try:
            if self.path == "/append":
                self.server.append(line)
            elif not self.server.insert(line):
                self._answer(409, b"row exists\n")
                return
        except (OSError, sqlite3.Error, UnicodeDecodeError) as exc:
            log.error("%s failed: %s", self.path, exc)
            self._answer(500, f"{self.path} failed: {exc}\n".encode())
            return
        # when the record became durable, on this host's wall clock (the chaos checker
        # orders the acknowledgements of both nodes by it: one machine, one clock)
        self._answer(200, f"{self.server.node}\n".encode(), acked_at=time.time())

    def _answer(self, code: int, body: bytes, acked_at: float | None = None) -> None:
        self.send_response(code)
        if acked_at is not None:
            self.send_header("X-Acked-At", f"{acked_at:.6f}")
        self.send_header("X-Node", self.server.node)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.command != "GET":
            super().log_request(code, size)

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)


def serve(node: str, port: int, data_dir: Path, bind: str = "0.0.0.0") -> None:
    """Serve until SIGTERM/SIGINT; the socket is bound (and listening) on return of the ctor."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = DemoServer((bind, port), node, data_dir)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        # shutdown() waits for serve_forever() to return: call it off the serving thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("node %s serving on %s:%d, records in %s", node, bind, port, server.records)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hakit.lab.demo_app")
    parser.add_argument("--node", required=True, help="name answered to every request")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--data", type=Path, required=True, help="directory of records.log")
    parser.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo_app %(levelname)s %(message)s")
    try:
        serve(args.node, args.port, args.data, args.bind)
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", args.bind, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
