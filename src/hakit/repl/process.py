"""The replicator process of one mirror module (``hakit replicator``), driven by the agent.

The agent starts it and talks to it over its stdin/stdout, one JSON object per line:

- agent → replicator: ``{"cmd": "role", "id": N, "role": "primary"|"secondary"|"idle",
  "force_full": bool, "peer_generation": int, "outdated": bool, "terms": {issuer: term}}``,
  ``{"cmd": "ping", "id": N}``,
  ``{"cmd": "permit", "generation": G}`` (primary: unreplicated changes of generations up to G
  may be acknowledged; no answer), ``{"cmd": "fence_at", "t": T}`` (primary: the watchdog —
  remove the module's VIPs once CLOCK_BOOTTIME passes T unless a later T comes; 0: never);
- replicator → agent: ``{"ev": "done", "id": N, "ok": bool, "error": str}`` when a role
  change is complete (file systems mounted, listener up, or everything released),
  ``{"ev": "pong", "id": N}``, ``{"ev": "record", …}`` (data record, mode, progress),
  ``{"ev": "fenced", "detail": …}`` (the watchdog removed the VIPs).

Logs go to stderr (the agent appends them to the module log). Role changes run one at a time
in a worker thread; pings are answered by the reader, so a slow unmount does not look like a
hang. When stdin closes (the agent died), the replicator releases everything — unmounts, so
the application loses its files rather than writing unreplicated, and stops listening — then
exits: without an agent, the node must not serve.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hakit import config as cfg
from hakit.core.freshness import DataRecord, DataState
from hakit.repl import mounts, recovery, tls
from hakit.repl import protocol as p
from hakit.repl import record as records
from hakit.repl.applier import Applier
from hakit.repl.primary import PrimaryReplicator, PrimarySettings
from hakit.repl.server import ReplicaServer
from hakit.repl.tracker import DirtyJournal
from hakit.repl.tree import Exclusions
from hakit.system import clock as boottime
from hakit.system.durable import write_atomic
from hakit.system.run import run

log = logging.getLogger("hakit.repl")

WATCHDOG_RECHECK = 0.25  # seconds between the watchdog's looks while a deadline is set


class Replicator:
    """Role changes for one module on this node (see module docstring)."""

    def __init__(self, config: cfg.Config, module: str, node: str) -> None:
        self.config = config
        self.module = config.modules[module]
        self.node = node
        self.peer = next(n for n in self.module.nodes if n != node)
        self.paths = [str(r.path) for r in self.module.config.replicate]
        self.exclusions = [Exclusions(r.exclude) for r in self.module.config.replicate]
        state_dir = config.cluster.state_dir
        self.record_file = records.record_path(state_dir, module)
        self.journal_dir = state_dir / f"{module}.dirty"
        # secondary: the highest lease term (fencing token) a primary presented, durable
        self.term_file = state_dir / f"{module}.term"
        self.recovery_dir = state_dir / "recovery" / module
        # present while this node is primary: found at start, the last primary role crashed
        self.unclean_marker = state_dir / f"{module}.primary-active"
        rc = self.module.config.replication
        net = rc.network or config.cluster.networks[0]
        self.network = net
        self.my_address = config.cluster.nodes[node].addresses[net]
        self.peer_address = config.cluster.nodes[self.peer].addresses[net]
        plaintext = net in config.cluster.plaintext_networks
        if plaintext:
            self.server_ctx = self.client_ctx = None
            log.warning("replication on network %s is NOT encrypted (plaintext_networks)", net)
        else:
            self.server_ctx, self.client_ctx = tls.contexts(config.key(), config.cluster.run_dir)
        self.role = "idle"
        self.fds: list[int] = []
        self.primary: PrimaryReplicator | None = None
        # highest generation the agent permitted: known to the peer or the arbiters, which
        # stays true, so it carries over to the next primary role of this process
        self.permitted = 0
        self.fence_deadline = 0.0  # FenceAt of the agent (0: none); set by fence_at()
        self._fence_changed = threading.Condition()  # wakes the watchdog
        self.server: ReplicaServer | None = None
        self.applier: Applier | None = None
        self.mount_threads: list[threading.Thread] = []
        self._out = threading.Lock()

    # ------------------------------------------------------------------ output
    def emit(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":"))
        with self._out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def emit_record(self, rec: DataRecord, detail: str, mode: str = "") -> None:
        self.emit(
            records.event(rec, in_sync=False, mode=mode or self.role, detail=detail, progress={})
        )

    # ------------------------------------------------------------------ roles
    def set_role(
        self,
        role: str,
        force_full: bool,
        peer_generation: int,
        outdated: bool = False,
        terms: dict[str, int] | None = None,
    ) -> None:
        if role != "primary":  # (a primary's deadline came with the step that made it one)
            self.fence_at(0.0)
        if outdated:
            # this node ran alone and yielded to a peer whose copy is kept: its own changes
            # are to be discarded by the next resync, it must never lead with them — but
            # what it changed alone is first kept in the recovery folder
            if self.role == "primary":
                self._release()
                self.role = "idle"
            old = records.load(self.record_file)
            why = "marked outdated (yielded)"
            try:  # best effort: the yield itself must complete
                kept = recovery.save_changes(
                    self.journal_dir, self.paths, self.recovery_dir, generation=old.generation
                )
                if kept is not None:
                    why += f"; what this node changed alone is kept in {kept}"
            except Exception as exc:
                log.exception("the changes made alone could not be saved")
                why += f"; the changes made alone could NOT be saved: {exc}"
            records.save(self.record_file, DataRecord(DataState.OUTDATED, old.generation, False))
            recovery.discard_journal(self.journal_dir)  # after: a crash keeps the journal
            self.emit_record(records.load(self.record_file), why)
        if role == self.role and not force_full:
            return
        self._release()
        if role == "primary":
            self._become_primary(force_full, peer_generation, terms or {})
        elif role == "secondary":
            self._become_secondary()
        self.role = role

    def fullsync(self, cmd: dict[str, Any]) -> None:
        """Start a full resync of the secondary (see PrimaryReplicator.full_resync)."""
        prim = self.primary
        if prim is None:
            self.emit({"ev": "report", "id": cmd.get("id"), "ok": False, "error": "not primary"})
            return
        detail = prim.full_resync("full resync asked by the operator")
        log.info("fullsync: %s", detail)
        self.emit({"ev": "report", "id": cmd.get("id"), "ok": True, "report": {"detail": detail}})

    def compare(self, cmd: dict[str, Any]) -> None:
        """``verify``/``diff`` (see :mod:`hakit.repl.verify`); answers ``{"ev": "report"}``."""
        from hakit.repl.verify import compare  # noqa: PLC0415

        prim = self.primary
        link = prim.link if prim is not None else None
        if prim is None or link is None:
            why = "not primary" if prim is None else "no secondary connected"
            self.emit({"ev": "report", "id": cmd.get("id"), "ok": False, "error": why})
            return
        try:
            report = compare(prim, link, checksums=cmd.get("cmd") == "verify")
        except Exception as exc:  # the link broke, a file vanished…: say so
            self.emit({"ev": "report", "id": cmd.get("id"), "ok": False, "error": str(exc)})
            return
        self.emit({"ev": "report", "id": cmd.get("id"), "ok": True, "report": report})

    def _open_roots(self) -> None:
        for path in self.paths:
            mounts.release_stale(path)
            Path(path).mkdir(parents=True, exist_ok=True)
            self.fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY))

    def fence_at(self, deadline: float) -> None:
        """The agent's FenceAt (CLOCK_BOOTTIME seconds; 0: none)."""
        with self._fence_changed:
            self.fence_deadline = deadline
            self._fence_changed.notify()

    def watchdog(self) -> None:
        """Thread: once the agent's FenceAt deadline has passed without a later one while
        this node is primary (the agent is paused or stuck), remove the module's VIPs and
        say so. The agent's machine then fences itself too (ReplicaFenced). It sleeps until
        the deadline or a new one; waits on the monotonic clock stop during a suspend, the
        deadline's CLOCK_BOOTTIME does not: so it looks again at least every
        :data:`WATCHDOG_RECHECK` seconds while a deadline is set."""
        while True:
            with self._fence_changed:
                deadline = self.fence_deadline
                if not deadline or self.primary is None:
                    self._fence_changed.wait()
                    continue
                left = deadline - boottime.now()
                if left > 0:
                    self._fence_changed.wait(min(left, WATCHDOG_RECHECK))
                    continue
                self.fence_deadline = 0.0
            late = boottime.now() - deadline
            removed = []
            for vip in self.module.config.vips:
                argv = ["ip", "addr", "del", vip.address, "dev", vip.interface]
                if run(argv, timeout=5, check=False).ok:
                    removed.append(vip.address)
            detail = (
                f"no word from the agent {late:.2f} s past its deadline: VIPs removed "
                f"({', '.join(removed) or 'none were on'})"
            )
            log.error("watchdog: %s", detail)
            self.emit({"ev": "fenced", "detail": detail})

    def highest_terms(self) -> dict[str, int]:
        """Per issuer, the highest lease term a primary presented here (the fencing tokens)."""
        try:
            return _terms(json.loads(self.term_file.read_text()), strict=True)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ValueError(
                f"{self.term_file} is damaged ({exc}): refusing every primary"
            ) from None

    def permit(self, generation: int) -> None:
        """The agent's PermitAlone (reader thread): remembered, and passed to the primary."""
        self.permitted = max(self.permitted, generation)
        prim = self.primary
        if prim is not None:
            prim.permit(self.permitted)

    def _become_primary(
        self, force_full: bool, peer_generation: int, terms: dict[str, int]
    ) -> None:
        from hakit.repl.fusefs import mount  # noqa: PLC0415  (loads libfuse only when needed)

        self._open_roots()
        rc = self.module.config.replication
        settings = PrimarySettings(
            module=self.module.name,
            node=self.node,
            peer_host=self.peer_address,
            port=rc.port,
            timeout=rc.timeout,
            context=self.client_ctx,
            record_file=self.record_file,
            streams=rc.streams,
            block_size=rc.block_size,
            bandwidth=rc.bandwidth * 1e6 if rc.bandwidth else None,
            direct_writes=rc.large_writes == "direct",
            terms=terms,
        )
        journal = DirtyJournal(self.journal_dir)
        prim = PrimaryReplicator(
            settings, self.fds, self.exclusions, journal, records.load(self.record_file), self.emit
        )
        if self.unclean_marker.exists():
            # the last primary role here ended in a crash: changes made just before it may
            # be missing from the journal, so compare everything with the secondary
            log.warning("the previous primary role on this node crashed: full compare resync")
            force_full = True
        prim.start(force_full, peer_generation)  # generation bumped durably before mounting
        write_atomic(self.unclean_marker, "")
        self.primary = prim
        self.fence_at(self.fence_deadline)  # the watchdog looks at a deadline set meanwhile
        prim.permit(self.permitted)  # a permit that came while the role was being set
        for i, path in enumerate(self.paths):
            fsname = f"hakit-{self.module.name}-{i}"
            t = threading.Thread(
                target=mount, args=(prim, i, path, fsname), name=f"fuse-{i}", daemon=True
            )
            t.start()
            self.mount_threads.append(t)
            mounts.wait_mounted(path, fsname, timeout=10.0)
        log.info(
            "primary: %d director%s mounted",
            len(self.paths),
            "y" if len(self.paths) == 1 else "ies",
        )

    def _become_secondary(self) -> None:
        self._open_roots()
        for path in self.paths:
            mounts.bind_read_only(path)
        self.applier = Applier(self.fds, durable=self.module.config.replication.ack == "durable")
        self.server = ReplicaServer(
            [self.my_address],
            self.module.config.replication.port,
            self.server_ctx,
            self.applier,
            _SecondaryHandlers(self),
            direct=self.module.config.replication.large_writes == "direct",
        )
        self.server.start()
        rec = records.load(self.record_file)
        self.emit_record(rec, "secondary: waiting for the primary", "secondary")
        log.info("secondary: listening on %s:%d", self.my_address, self.server.port)

    def _release(self) -> None:
        """Back to idle: unmount (aborting if busy), stop listening, close descriptors."""
        if self.primary is not None:
            for path in self.paths:
                mounts.unmount_fuse(path)
            for t in self.mount_threads:
                t.join(timeout=10)
            self.mount_threads = []
            self.primary.stop()
            self.primary = None
            self.unclean_marker.unlink(missing_ok=True)  # every mount is gone: a clean end
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.applier is not None:
            self.applier.close()
            self.applier = None
            for path in self.paths:
                mounts.unbind(path)
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.role = "idle"


class _SecondaryHandlers:
    """What the secondary's server asks of the replicator: hello and the data record."""

    def __init__(self, rep: Replicator) -> None:
        self.rep = rep

    def hello(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj.get("proto") != p.PROTOCOL_VERSION:
            raise ValueError(
                f"the primary speaks replication protocol {obj.get('proto')}, this node "
                f"{p.PROTOCOL_VERSION}: run the same hakit version on both nodes"
            )
        if obj.get("module") != self.rep.module.name:
            raise ValueError(f"module {obj.get('module')!r} is not {self.rep.module.name!r}")
        if obj.get("node") != self.rep.peer:
            raise ValueError(f"node {obj.get('node')!r} is not the peer {self.rep.peer!r}")
        if obj.get("roots") != len(self.rep.paths):
            raise ValueError(
                f"the primary replicates {obj.get('roots')} directories, this node "
                f"{len(self.rep.paths)}: make [[replicate]] the same on both nodes"
            )
        terms = _terms(obj.get("terms"))
        seen = self.rep.highest_terms()
        older = {k: (t, seen[k]) for k, t in terms.items() if t < seen.get(k, 0)}
        if older:
            issuer, (term, newest) = sorted(older.items())[0]
            raise ValueError(
                f"fencing: the primary's lease term {term} of {issuer} is older than term "
                f"{newest} already seen here: a newer primary exists"
            )
        merged = {**seen, **{k: t for k, t in terms.items() if t > seen.get(k, 0)}}
        if merged != seen:  # durable before we accept
            write_atomic(self.rep.term_file, json.dumps(merged, sort_keys=True) + "\n")
        rec = records.load(self.rep.record_file)
        return {
            "node": self.rep.node,
            "data": str(rec.data),
            "generation": rec.generation,
            "ran_alone": rec.ran_alone,
            "unclean": self.rep.unclean_marker.exists(),
        }

    def begin_resync(self, generation: int, full: bool) -> None:
        old = records.load(self.rep.record_file)
        rec = DataRecord(DataState.RESYNCING, old.generation, ran_alone=False)
        records.save(self.rep.record_file, rec)
        kind = "full" if full else "incremental"
        self.rep.emit_record(rec, f"{kind} resync from {self.rep.peer} started", "secondary")
        log.info("%s resync from %s to generation %d started", kind, self.rep.peer, generation)

    def end_resync(self, generation: int) -> None:
        rec = DataRecord(DataState.UPTODATE, generation, ran_alone=False)
        records.save(self.rep.record_file, rec)
        self.rep.unclean_marker.unlink(missing_ok=True)  # fully compared with the primary
        self.rep.emit_record(rec, f"up to date with {self.rep.peer}", "secondary")
        log.info("resync done: up to date at generation %d", generation)

    def event(self, kind: str, detail: str) -> None:
        log.info("replication connection: %s %s", kind, detail)
        if kind in ("disconnected", "error"):
            rec = records.load(self.rep.record_file)
            self.rep.emit_record(rec, f"primary {kind}: {detail}", "secondary")


def _terms(value: object, *, strict: bool = False) -> dict[str, int]:
    """A fencing token ``{issuer: term}`` from JSON (anything else: empty, or ValueError)."""
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(t, int) and not isinstance(t, bool) and t >= 0
        for k, t in value.items()
    ):
        return dict(value)
    if strict:
        raise ValueError(f"not a set of terms: {value!r}")
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hakit replicator", description=__doc__.split("\n")[0])
    ap.add_argument("--config", "-c", type=Path, default=cfg.DEFAULT_CLUSTER_FILE)
    ap.add_argument("--module", "-m", required=True)
    ap.add_argument("--node", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s replicator[%(process)d] %(levelname)s %(message)s",
    )
    os.umask(0)  # modes come from the application (primary) or the wire (secondary), exactly
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    rep = Replicator(cfg.load(args.config), args.module, args.node)
    work: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def worker() -> None:
        while (cmd := work.get()) is not None:
            if cmd.get("cmd") == "fullsync":
                try:
                    rep.fullsync(cmd)
                except Exception as exc:  # the journal could not be written, …: say so
                    log.exception("fullsync failed")
                    rep.emit({"ev": "report", "id": cmd.get("id"), "ok": False, "error": str(exc)})
                continue
            try:
                rep.set_role(
                    str(cmd["role"]),
                    bool(cmd.get("force_full", False)),
                    int(cmd.get("peer_generation", 0)),
                    bool(cmd.get("outdated", False)),
                    _terms(cmd.get("terms")),
                )
                rep.emit({"ev": "done", "id": cmd.get("id"), "ok": True, "error": ""})
            except Exception as exc:  # report every failure to the agent, keep serving
                log.exception("role %s failed", cmd.get("role"))
                rep.emit({"ev": "done", "id": cmd.get("id"), "ok": False, "error": str(exc)})

    t = threading.Thread(target=worker, name="roles", daemon=True)
    t.start()
    threading.Thread(target=rep.watchdog, name="watchdog", daemon=True).start()
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
        except ValueError:
            log.error("bad control line from the agent: %r", line[:200])
            continue
        if cmd.get("cmd") in ("verify", "diff"):
            threading.Thread(target=rep.compare, args=(cmd,), daemon=True).start()
        elif cmd.get("cmd") == "fullsync":
            work.put(cmd)  # on the role worker: never during a role change
        elif cmd.get("cmd") == "permit" and isinstance(cmd.get("generation"), int):
            rep.permit(cmd["generation"])
        elif cmd.get("cmd") == "fence_at" and isinstance(cmd.get("t"), int | float):
            rep.fence_at(float(cmd["t"]))
        elif cmd.get("cmd") == "ping":
            rep.emit({"ev": "pong", "id": cmd.get("id"), "t": time.monotonic()})
        elif cmd.get("cmd") == "role":
            work.put(cmd)
    log.info("agent gone (stdin closed): releasing everything")
    work.put(None)
    t.join(timeout=30)
    rep._release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
