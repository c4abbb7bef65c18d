"""An etcd cluster as an arbiter: the module's lease is an etcd key bound to an etcd lease.

:class:`EtcdArbiter` has the interface of :class:`hakit.net.witness.WitnessClient` and the
semantics of :meth:`hakit.core.lease.LeaseTable.acquire` and ``release``, kept in etcd v3
through its JSON gateway (``/v3/…`` paths: etcd 3.4 or later; plain HTTP, standard library
only), asking the endpoints in turn from the last one that answered. Per cluster and module:

- ``/hakit/<cluster>/<module>/holder``: the holding node's name, attached to an etcd lease of
  ``ceil(duration)`` seconds (or etcd's minimum, if larger). Its ``create_revision`` is the
  **term**: etcd revisions grow strictly over the whole etcd cluster, so every grant has a term
  above every term before it (the fencing token).
- ``/hakit/<cluster>/<module>/alone/<node>``: the generation ``node`` ran alone with (no lease).

``acquire``: key absent → a new etcd lease, and the key put with it in a transaction that
requires the key to be absent (granted). Key held by this node with the lease this object
granted, or — after a restart of the agent (a new object) — with ``term`` equal to the key's
``create_revision`` → that lease kept alive (renewed, same term; if it expired meanwhile,
granted anew). Otherwise refused, with the holder, its term and the seconds its etcd lease has
left. When granted or renewed, the node's ran-alone record is written (``alone`` above the
record) or deleted (``synced`` and no ``alone``) in a transaction that requires the key to be
held by this node with this lease, so a node that lost the lock writes nothing; it is committed
before the answer is returned. ``release``: the etcd lease of this node's key is revoked (the
key goes with it). Every answer carries all the module's ran-alone records, sorted.

:meth:`EtcdArbiter.request` returns ``(sent_at, answer)``, ``sent_at`` being
``hakit.system.clock.now()`` (CLOCK_BOOTTIME) taken before the first message of the request
is sent, or None without a valid answer within ``timeout`` (no endpoint answered, etcd error):
it never raises for those.

Timing: the node's deadline is ``sent_at + min(duration, remaining) - margin``, and
``remaining`` is at most the TTL etcd reported for the grant or keepalive. etcd's leader starts
a lease's TTL when it applies the grant and restarts it when it handles the keepalive, both
after ``sent_at``; the key lives until its lease is revoked, which etcd does only after the TTL
ran out on the leader's monotonic clock (later, never earlier). A new etcd leader renews every
lease for its full TTL (with the experimental lease checkpoints: for what was left at the last
checkpoint, no less than what is left now): leader changes only extend leases. So the key — and
the refusals of the other node — last past the node's deadline while the clock rates differ by
less than ``margin`` over one duration, as with the witness.

Caveats: etcd grants at least its minimum TTL (1.5 × election timeout, rounded up: 2 s by
default), so the other node may wait up to that TTL rather than ``duration``; a refusal's
``remaining`` is whole seconds, rounded down. Terms are etcd revisions: they skip (every etcd
write counts) and repeat only if etcd's data is lost. The steps of a request (range, then grant
or keepalive, then a transaction) are not one transaction: the transactions' conditions and the
lease keep it safe, not the order. A request that timed out may still be carried out by etcd;
the object remembers the lease it granted so its next request renews it, but a late acquire
could take the lock again after a release, for one TTL. Unlike the witness, a key held by this
node under a lease this object does not know is renewed only with the matching ``term``. Plain
HTTP without authentication: etcd must sit on a trusted network. Each request runs in a worker
thread, one at a time per object.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from hakit.core.lease import Answer
from hakit.model import NodeId
from hakit.system import clock as boottime

log = logging.getLogger(__name__)

NOT_FOUND = 5  # gRPC status code: etcd knows no such lease
Records = tuple[tuple[NodeId, int], ...]
_JSON = {"Content-Type": "application/json"}


class _EtcdError(Exception):
    """No usable answer from etcd."""


class _NotFound(_EtcdError):
    """etcd answered that the lease does not exist."""


@dataclass(frozen=True)
class _Holder:
    node: NodeId
    term: int  # the key's create_revision
    lease: int


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(value: object) -> str:
    try:
        return base64.b64decode(str(value or ""), validate=True).decode(errors="replace")
    except ValueError:
        raise _EtcdError(f"not base64: {value!r}") from None


def _int(value: object) -> int:
    """An int64 of the gateway (a JSON string; absent when 0)."""
    try:
        return int(str(value or 0))
    except ValueError:
        raise _EtcdError(f"not an integer: {value!r}") from None


def _end(prefix: str) -> str:
    """The range end covering every key that starts with ``prefix`` (ASCII)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class EtcdArbiter:
    """An agent's requests to one etcd cluster, for one module (see the module docstring)."""

    def __init__(
        self,
        endpoints: list[str],
        cluster: str,
        node: str,
        module: str,
        *,
        duration: float,
        timeout: float = 1.0,
    ) -> None:
        if not endpoints or duration <= 0:
            raise ValueError("an etcd arbiter needs endpoints and a positive duration")
        if not all(e.startswith(("http://", "https://")) for e in endpoints):
            raise ValueError(f"etcd endpoints are http:// or https:// URLs: {endpoints}")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.node, self.module = NodeId(node), module
        self.duration, self.timeout = duration, timeout
        self.name = "etcd:" + ",".join(self.endpoints)
        self.prefix = f"/hakit/{cluster}/{module}/"
        self.holder_key, self.alone_prefix = self.prefix + "holder", self.prefix + "alone/"
        self._ttl = max(1, math.ceil(duration))
        self._lease = 0  # the etcd lease this object granted or adopted last (0: none)
        self._good = 0  # the endpoint that answered last: asked first
        self.source = "etcd"  # "etcd:<cluster id>" once known: the terms' issuer
        self._mutex = threading.Lock()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    async def request(
        self, op: str, term: int, alone: int = 0, synced: int = 0
    ) -> tuple[float, Answer] | None:
        """One request (``acquire`` or ``release``); None without an answer in time."""
        if op not in ("acquire", "release"):
            raise ValueError(f"unknown request {op!r}")
        sent_at = boottime.now()
        deadline = time.monotonic() + self.timeout  # for the HTTP timeouts only
        work = asyncio.to_thread(self._request, op, term, alone, synced, deadline)
        try:
            answer = await asyncio.wait_for(work, self.timeout)
            return sent_at, dataclasses.replace(answer, source=self.source)
        except (_EtcdError, TimeoutError, OSError) as exc:
            log.debug("%s %s %s: no answer (%s)", self.name, self.module, op, exc or "timeout")
            return None

    # --- one request, in a worker thread -------------------------------------------------

    def _request(self, op: str, term: int, alone: int, synced: int, deadline: float) -> Answer:
        if not self._mutex.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _EtcdError("the previous request is still running")
        try:
            if op == "release":
                return self._release(term, deadline)
            return self._acquire(term, alone, synced, deadline)
        finally:
            self._mutex.release()

    def _acquire(self, term: int, alone: int, synced: int, deadline: float) -> Answer:
        holder, records = self._parse(self._call("/v3/kv/range", self._range(), deadline))
        if holder is None:
            return self._grant(records, alone, synced, deadline)
        if not self._ours(holder, term):
            return self._refused(holder, records, deadline)
        kept = self._call("/v3/lease/keepalive", {"ID": str(holder.lease)}, deadline)
        ttl = _int(dict(kept.get("result") or {}).get("TTL"))
        if ttl <= 0:  # expired: the key goes with it (the grant waits for that), new term
            self._lease = 0 if holder.lease == self._lease else self._lease
            return self._grant(records, alone, synced, deadline)
        how = "renewed" if holder.lease == self._lease else "renewed after an agent restart"
        self._lease = holder.lease
        ops = self._record_ops(records, alone, synced)
        if ops:
            held, kvs = self._txn(self._held(holder.lease), ops, deadline)
            now_holder, records = self._parse(kvs)
            if not held:
                return self._refused(now_holder, records, deadline)
        remaining = float(min(self.duration, ttl))
        return Answer(
            True, self.node, holder.term, remaining, f"{how} (term {holder.term})", records
        )

    def _grant(self, records: Records, alone: int, synced: int, deadline: float) -> Answer:
        reply = self._call("/v3/lease/grant", {"TTL": str(self._ttl)}, deadline)
        lease, ttl = _int(reply.get("ID")), _int(reply.get("TTL"))
        if lease == 0 or ttl <= 0:
            raise _EtcdError(f"lease not granted: {reply}")
        self._lease = lease  # known before the key is put: a retried grant is recognised
        put = {"key": _b64(self.holder_key), "value": _b64(self.node), "lease": str(lease)}
        free = {"key": _b64(self.holder_key), "target": "CREATE", "result": "EQUAL"}
        ops = [{"request_put": put}, *self._record_ops(records, alone, synced)]
        _, kvs = self._txn([{**free, "create_revision": "0"}], ops, deadline)
        holder, records = self._parse(kvs)
        if holder is not None and holder.lease == lease:  # ours (also if a retry found it put)
            remaining = float(min(self.duration, ttl))
            reason = f"granted (term {holder.term})"
            return Answer(True, self.node, holder.term, remaining, reason, records)
        self._lease = 0
        with contextlib.suppress(_EtcdError):  # somebody was faster: our lease is of no use
            self._call("/v3/lease/revoke", {"ID": str(lease)}, deadline)  # (or it expires)
        return self._refused(holder, records, deadline)

    def _release(self, term: int, deadline: float) -> Answer:
        holder, records = self._parse(self._call("/v3/kv/range", self._range(), deadline))
        if holder is None or not self._ours(holder, term):
            return Answer(False, holder.node if holder else None, 0, 0.0, "not held", records)
        try:
            self._call("/v3/lease/revoke", {"ID": str(holder.lease)}, deadline)
            reason = "released"
        except _NotFound:
            reason = "not held"  # it had expired: gone already
        self._lease = 0 if holder.lease == self._lease else self._lease
        return Answer(False, None, 0, 0.0, reason, records)

    def _refused(self, holder: _Holder | None, records: Records, deadline: float) -> Answer:
        if holder is None:
            return Answer(False, None, 0, 0.0, "lost the lease", records)
        reply = self._call("/v3/lease/timetolive", {"ID": str(holder.lease)}, deadline)
        left = float(max(0, _int(reply.get("TTL"))))
        reason = f"held by {holder.node} for {left:.1f} s"
        return Answer(False, holder.node, holder.term, left, reason, records)

    # --- etcd requests ---------------------------------------------------------------------

    def _ours(self, holder: _Holder, term: int) -> bool:
        """The key is this node's, under the lease this object holds, or the lease an earlier
        run of this agent held with ``term``."""
        mine = holder.lease == self._lease or (term > 0 and term == holder.term)
        return holder.node == self.node and holder.lease != 0 and mine

    def _held(self, lease: int) -> list[dict[str, str]]:
        """Transaction conditions: this node holds the key with ``lease``."""
        key = _b64(self.holder_key)
        return [
            {"key": key, "target": "VALUE", "result": "EQUAL", "value": _b64(self.node)},
            {"key": key, "target": "LEASE", "result": "EQUAL", "lease": str(lease)},
        ]

    def _record_ops(self, records: Records, alone: int, synced: int) -> list[dict[str, Any]]:
        """The write of this node's ran-alone record (only once granted), if any."""
        key, current = _b64(self.alone_prefix + self.node), dict(records).get(self.node, 0)
        if alone > current:
            return [{"request_put": {"key": key, "value": _b64(str(alone))}}]
        if alone == 0 and 0 < current <= synced:  # its secondary has this generation now
            return [{"request_delete_range": {"key": key}}]
        return []

    def _range(self) -> dict[str, str]:
        return {"key": _b64(self.prefix), "range_end": _b64(_end(self.prefix))}

    def _txn(
        self, compare: list[dict[str, str]], ops: list[dict[str, Any]], deadline: float
    ) -> tuple[bool, dict[str, Any]]:
        """Run ``ops`` if ``compare`` holds; either way, read the module's keys after it."""
        read = {"request_range": self._range()}
        body = {"compare": compare, "success": [*ops, read], "failure": [read]}
        reply = self._call("/v3/kv/txn", body, deadline)
        responses = reply.get("responses")
        if not isinstance(responses, list) or not responses:
            raise _EtcdError(f"transaction without responses: {reply}")
        last = responses[-1].get("response_range") if isinstance(responses[-1], dict) else None
        if not isinstance(last, dict):
            raise _EtcdError(f"transaction without a range: {reply}")
        return reply.get("succeeded") is True, last

    def _parse(self, reply: dict[str, Any]) -> tuple[_Holder | None, Records]:
        """The holder and the ran-alone records in a range answer."""
        holder, records = None, []
        for kv in reply.get("kvs") or []:
            key = _text(kv.get("key"))
            if key == self.holder_key:
                node = NodeId(_text(kv.get("value")))
                holder = _Holder(node, _int(kv.get("create_revision")), _int(kv.get("lease")))
            elif key.startswith(self.alone_prefix):
                generation = _text(kv.get("value"))
                if generation.isdigit() and int(generation) > 0:
                    records.append((NodeId(key.removeprefix(self.alone_prefix)), int(generation)))
        return holder, tuple(sorted(records))

    def _call(self, path: str, body: dict[str, Any], deadline: float) -> dict[str, Any]:
        """POST ``body`` to the first endpoint that answers, from the last one that did."""
        data = json.dumps(body).encode()
        count, first = len(self.endpoints), self._good
        for i in range(count):
            index = (first + i) % count
            # each endpoint gets its share of the time left: one that drops packets must not
            # eat the whole request; and the next request starts with the next endpoint
            left = (deadline - time.monotonic()) / (count - i)
            if left <= 0:
                break
            self._good = (index + 1) % count
            url = self.endpoints[index] + path
            request = urllib.request.Request(url, data, _JSON)  # noqa: S310 (http(s) only)
            try:
                with self._opener.open(request, timeout=left) as response:
                    reply = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                with exc:
                    error = _error(exc)
                if error.get("code") == NOT_FOUND:
                    raise _NotFound(error.get("message", "not found")) from None
                log.debug("%s: %s %s", url, exc.code, error.get("message", ""))
                continue
            except (OSError, ValueError) as exc:  # refused, unreachable, timed out, not JSON
                log.debug("%s: %s", url, exc)
                continue
            if not isinstance(reply, dict) or reply.get("error"):
                log.debug("%s: %s", url, reply)  # a stream's error comes in the body
                continue
            self._good = index
            header = reply.get("header")
            if isinstance(header, dict) and header.get("cluster_id"):
                self.source = f"etcd:{header['cluster_id']}"
            return reply
        raise _EtcdError(f"no etcd endpoint answered {path}")


def _error(response: urllib.error.HTTPError) -> dict[str, Any]:
    """The gateway's error object (``{"error", "message", "code"}``), or an empty one."""
    try:
        error = json.loads(response.read())
    except (OSError, ValueError):
        return {}
    return error if isinstance(error, dict) else {}
